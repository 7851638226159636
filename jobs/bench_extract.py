"""Benchmark: the extraction pipeline (``run_extract`` on Ray Data) against a plain PyTorch loop.

    python jobs/bench_extract.py                                   # CPU: png (cifar_resnet20) + proxy
    python jobs/bench_extract.py --device cuda --modes png,jpeg --models cifar_resnet20,cifar_resnet56
    python jobs/bench_extract.py prepare --dest runs/bench_device  # data for a GPU box (README, "GPU measurement")

What is measured. Every case runs both sides (the pipeline, the plain loop) on two sizes of the same
data, a small run (half the images; for the proxy the test split) and a full one, ``--repeats``
times, interleaved and in alternating order, so that drift on a shared machine hits both alike (after
one untimed run of each side before the first case).

* ``steady`` (img/s): the marginal rate (rows_full - rows_small) / (seconds_full - seconds_small) of
  whole runs. Fixed costs cancel: planning, starting Ray Data's workers and the model actor, loading
  the model, the first batch, the commit; and so does the decoding a pipeline does ahead while its
  model actor starts, as long as the small run holds more rows than that (the bench prints the rows
  decoded ahead, and warns where a small run was decoded whole before the model's first output while
  decoding is a fifth or more of the pipeline's CPU time). The single-run rate after the first output
  (``after_first_img_s`` in the JSON) would count that head start as speed.
* ``ratio``: the median of the per-repeat ratios pipeline / plain of the steady rates (``ratio_e2e``:
  of the full runs' end-to-end rates, every cost included; ``cpu_ratio``: plain / pipeline of the
  marginal CPU time per image: the plain loop's process and its DataLoader workers; the pipeline's
  driver and every Ray process it started (GCS, raylet and object store, workers, the model actor).
  Where the machine is shared, wall-clock rates swing with the other jobs; CPU time per image much less).
* start-up: the full run's time to its first row of model output (for the pipeline: the model stage's
  first block, from Ray Data's stats), reported separately, with ``fixed`` (seconds_full - rows_full /
  steady: the time the steady rate does not account for).
* per-stage rates of the pipeline, from Ray Data's per-block stats (``ds.stats()``; ``--verbose``
  prints it whole): per operator the rows it consumed, tasks, first output, span (first task start to
  last task end), rows/s over that span, busy (summed task wall time) and CPU seconds.

Every run also prints the machine's load average; the JSON (default
``results/gpu/bench_extract_<device>.json``; ``--output ''`` writes none) holds every run's figures,
the medians, the stages, the device name, CPU count, load and versions.

Modes
-----
``png``: CIFAR-10 ``<data>/cifar10/<split>`` PNGs through the CIFAR ResNets of ``--models`` (weights
from ``<data>/cifar_resnets``). ``--replicas N`` hard-links every image N times into a temporary image
folder (symbolic links, then copies, where hard links fail; the JSON says which), so that a fast
device gets enough rows while the files stay few and in the page cache.

``jpeg``: ImageNet-like JPEGs: ``--jpeg_images`` synthetic images, each a PNG upscaled (bicubic) to an
ImageNet-typical size (500x375, 375x500, 500x333, 333x500, 500x500, 400x300) with seeded pixel noise so
that it compresses like a photograph (~100 kB at quality 90; the JSON records the mean), written once
and hard-linked ``--replicas`` times. ``--jpeg_model`` (default resnet50, random init: the rate does not
depend on the weights) at 224 px: JPEG decode, shorter side resized to 256 (bilinear, antialiased),
centre crop 224, as the ImageNet weights' transforms.

``proxy``: a CPU proxy for the pipeline's own overhead, so that a regression of its plumbing shows
without a GPU. Pre-decoded arrays (Fashion-MNIST; both splits repeated ``--proxy_replicas`` times into a
temporary IDX copy, 50,000 and 300,000 rows by default) through a near-free model at a GPU run's batch
(1,024), the same work on both sides: the pipeline is ``run_extract`` itself (its own planning: the array source, ``prepare_batch``
tasks, the model actor pool, ``write_part`` Parquet writes, the commit), and the plain loop runs the
same three functions (``prepare_batch``, the project's ``FeatureExtractor`` callable, ``write_part``
every ``rows_per_file`` rows) one after the other in one process. So the ratio measures only what
Ray Data adds or overlaps (tasks, the object store, block and batch formatting, the actor pool). The
model is ``bench_tiny``, which only this benchmark registers (nothing in the project's registry): a 1x1
conv, 8x8 average pooling to 64 features and a 64->10 head, random init, about free. The registry's
smallest backbone, cifar_resnet8, costs ~0.2 ms an image on 2 cores and would hide the plumbing.
``run_extract`` builds it by name because the benchmark registers it in the driver and, through Ray's
``worker_process_setup_hook``, in every Ray worker process; the pipeline itself is unchanged.

The plain loop of the png and jpeg modes is a strong one: torchvision's ``ImageFolder`` (PIL decoding;
for JPEGs Resize + CenterCrop as the weights' transforms) to uint8 HWC tensors in a
``DataLoader(num_workers = all cores but one, pin_memory on CUDA)``, then on the device the project's
one input path (``models.runtime.Runtime``: normalisation there, channels_last and fp16 autocast on
CUDA, fp32 on the CPU), ``forward_features``, the head's argmax, the ranked top-kmax
(``core.counting.rank_topk``), and every result copied back to the host. It writes nothing; the
pipeline's times include writing and committing its Parquet records. Both run while Ray is up (its
idle daemons cost the plain loop a little too).

The device: ``--device auto`` is CUDA where torch sees it, else the CPU; ``--device cuda`` without
CUDA stops with one line (exit status 2). On CUDA the pipeline gets ``use_gpu=True`` (one model actor
on the GPU, decoding in CPU tasks).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray import config as config_lib  # noqa: E402

CKPT = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet32": "resnet32-d509ac18.th",
    "cifar_resnet44": "resnet44-014dd654.th",
    "cifar_resnet56": "resnet56-4bfd9763.th",
}
MODES = ("png", "jpeg", "proxy")
DEVICES = ("auto", "cpu", "cuda")
IMAGE_EXT = (".png", ".jpg", ".jpeg")
JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300))
TINY = "bench_tiny"


@dataclass
class BenchConfig:
    data: str = "../shared/data"  # folder with cifar10/<split>/<class>/*.png and cifar_resnets/*.th (png, jpeg modes)
    modes: tuple[str, ...] = ("png", "proxy")  # benchmarks to run: png, jpeg, proxy
    models: tuple[str, ...] = ("cifar_resnet20",)  # png mode's models (cifar_resnet20/32/44/56)
    device: str = "auto"  # auto (CUDA where available), cpu or cuda
    repeats: int = 3  # repeats of each case (each: both sides, a small and a full run; medians are reported)
    split: str = "test"  # split of <data>/cifar10 to read
    images: int | None = None  # this many of the split's images, evenly over the classes, before replicas (None: 6,000 on the CPU, all on CUDA; 0: all)
    replicas: int = 1  # png and jpeg modes: every image hard-linked this many times into a temporary folder
    batch_size: int | None = None  # None: 1024 for proxy; png 1024 on CUDA, 256 on the CPU; jpeg 256
    kmax: int = 64  # ranked top-k per instance, both sides
    workers: int | None = None  # plain loop's DataLoader workers (None: all cores but one)
    jpeg_model: str = "resnet50"  # jpeg mode's model (a torchvision backbone at 224 px; random init)
    jpeg_images: int = 2000  # jpeg mode: synthetic JPEGs made (from that many PNGs), before replicas
    jpeg_quality: int = 90  # JPEG quality of the synthetic images
    jpeg_replicas: int | None = None  # jpeg mode's replicas (None: --replicas)
    proxy_data: str = "fashion-mnist"  # proxy mode's array source: fashion-mnist[:PATH]
    proxy_splits: tuple[str, ...] = ("test", "train")  # proxy mode's small and full runs (10,000 and 60,000 images, before replicas)
    proxy_replicas: int = 5  # proxy mode: both splits repeated this many times (an IDX copy in --tmp): 50,000 and 300,000 images
    tmp: str | None = None  # where the temporary image folders and records go (None: runs/ here, beside the data's filesystem)
    output: str | None = None  # JSON path (None: results/gpu/bench_extract_<device>.json; '' writes none)
    verbose: bool = False  # print Ray Data's ds.stats() and the pipeline's own progress lines

    def __post_init__(self) -> None:
        config_lib.coerce_option_types(self)
        self.modes = _words(self.modes, "modes")
        self.models = _words(self.models, "models")
        self.proxy_splits = _words(self.proxy_splits, "proxy_splits")
        if "proxy" in self.modes and len(self.proxy_splits) != 2:
            raise ValueError(f"proxy_splits: need two splits (the small run's, the full run's), got {self.proxy_splits}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes: unknown {', '.join(bad) or '(none given)'}; valid: {', '.join(MODES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if "png" in self.modes:
            unknown = [m for m in self.models if m not in CKPT]
            if unknown or not self.models:
                raise ValueError(f"models: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(CKPT)}")
        for name in ("repeats", "replicas", "kmax", "jpeg_images", "proxy_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images is not None and self.images < 0:
            raise ValueError(f"images must be >= 0 (0: all), got {self.images}")
        if self.jpeg_replicas is not None and self.jpeg_replicas < 1:
            raise ValueError(f"jpeg_replicas must be >= 1, got {self.jpeg_replicas}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")


@dataclass
class PrepareConfig:
    data: str = "../shared/data"  # folder with cifar10/<split>/<class>/*.png and cifar_resnets/*.th
    dest: str = "runs/bench_device"  # written here: cifar10/<split>/<class>/*.png (copies) and cifar_resnets/
    split: str = "test"  # split to copy
    per_class: int = 500  # images copied per class (500: 11 MB of PNGs, which fits the device's 64 MiB with .devray/)
    models: tuple[str, ...] = ("cifar_resnet20", "cifar_resnet56")  # checkpoints to copy

    def __post_init__(self) -> None:
        config_lib.coerce_option_types(self)
        self.models = _words(self.models, "models")
        unknown = [m for m in self.models if m not in CKPT]
        if unknown:
            raise ValueError(f"models: unknown {', '.join(unknown)}; valid: {', '.join(CKPT)}")
        if self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")


class DeviceError(RuntimeError):
    """The asked-for device is not there (one line, exit status 2)."""


def _words(value: Any, name: str) -> tuple[str, ...]:
    """``"a,b"`` / ``("a", "b")`` / ``["a"]`` as a tuple of non-empty words."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        raise ValueError(f"{name}: expected comma-separated words, got {value!r}")
    return tuple(w.strip() for w in items if w.strip())


# ----------------------------------------------------------------------------- helpers (pure)


def resolve_device(device: str, *, cuda_available: bool) -> str:
    """``"cuda"`` or ``"cpu"`` for ``--device``; ``DeviceError`` for cuda without a CUDA device."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not cuda_available:
        raise DeviceError("--device cuda but torch sees no CUDA device here (use --device auto or cpu)")
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    return device


def default_batch_size(mode: str, device: str) -> int:
    """The model batch of both sides: a GPU run's (1,024; 256 for ResNet-50 at 224 px), and on the CPU
    256 for the real models. The proxy stands in for a GPU run's plumbing, so it takes the GPU's batch
    on any device (Ray Data's per-batch cost is part of what it measures, at the batch a GPU run has)."""
    if mode == "proxy" or (device == "cuda" and mode == "png"):
        return 1024
    return 256


def default_workers(cpu_count: int) -> int:
    """The plain loop's decoding workers: all cores but one (at least one)."""
    return max(1, cpu_count - 1)


def default_output(device_slug: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "results", "gpu", f"bench_extract_{device_slug}.json")


def device_slug(device: str, name: str) -> str:
    """``cpu`` or the GPU's name as a file-name word (``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3``)."""
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "cuda"


def list_images(split_dir: str) -> list[tuple[str, str]]:
    """``(class, path)`` of every image under ``split_dir/<class>/``, sorted (hidden names skipped)."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"{split_dir} not found (expected <data>/cifar10/<split>/<class>/<image>)")
    out = []
    for cls in sorted(d for d in os.listdir(split_dir) if not d.startswith(".")):
        cdir = os.path.join(split_dir, cls)
        if not os.path.isdir(cdir):
            continue
        out += [(cls, os.path.join(cdir, f)) for f in sorted(os.listdir(cdir))
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXT)]
    if not out:
        raise FileNotFoundError(f"{split_dir} holds no images in class folders")
    return out


def pick_evenly(items: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """The first ``n`` items taken round-robin over the classes (all of them when ``n`` is 0 or larger)."""
    if n <= 0 or n >= len(items):
        return list(items)
    by_class: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        by_class.setdefault(item[0], []).append(item)
    out: list[tuple[str, str]] = []
    for i in range(max(len(v) for v in by_class.values())):
        for cls in sorted(by_class):
            if i < len(by_class[cls]) and len(out) < n:
                out.append(by_class[cls][i])
    return sorted(out)


def make_replica_folder(items: list[tuple[str, str]], dest: str, *, split: str, replicas: int) -> dict[str, Any]:
    """An image folder ``dest/<split>/<class>/<stem>_r<k><ext>`` holding every item ``replicas`` times.

    Hard links (no bytes copied; one page-cache copy); where the filesystem refuses them, symbolic
    links, and where those fail too, copies. Returns ``{"root", "split", "files", "images", "link"}``.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    method = "hardlink"
    n = 0
    for cls, path in items:
        cdir = os.path.join(dest, split, cls)
        os.makedirs(cdir, exist_ok=True)
        stem, ext = os.path.splitext(os.path.basename(path))
        for k in range(replicas):
            target = os.path.join(cdir, f"{stem}_r{k}{ext}")
            if method == "hardlink":
                try:
                    os.link(path, target)
                    n += 1
                    continue
                except OSError:
                    method = "symlink"
            if method == "symlink":
                try:
                    os.symlink(os.path.abspath(path), target)
                    n += 1
                    continue
                except OSError:
                    method = "copy"
            shutil.copyfile(path, target)
            n += 1
    return {"root": dest, "split": split, "files": len(items), "images": n, "link": method}


def _synth_jpeg(args: tuple[str, str, int, int, int]) -> int:
    """Write one ImageNet-like JPEG made from a small image; returns its size in bytes."""
    import numpy as np
    from PIL import Image

    src, dst, index, quality, seed = args
    w, h = JPEG_SIZES[index % len(JPEG_SIZES)]
    img = Image.open(src).convert("RGB").resize((w, h), Image.BICUBIC)
    rng = np.random.default_rng([seed, index])
    # Photographs carry detail at every scale; an upscaled 32-px image alone compresses ~10x better
    # (and decodes faster) than an ImageNet JPEG of the same size. Seeded noise restores the bytes.
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0.0, 28.0, (h, w, 1)).astype(np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(dst, "JPEG", quality=quality)
    return os.path.getsize(dst)


def make_jpeg_folder(items: list[tuple[str, str]], dest: str, *, split: str, count: int, quality: int,
                     seed: int = 0, processes: int = 1) -> dict[str, Any]:
    """``count`` synthetic ImageNet-like JPEGs ``dest/<split>/<class>/<stem>_<i>.jpg`` made from ``items``
    (taken in order, cycling). Returns ``{"root", "split", "images", "mean_bytes", "sizes"}``."""
    jobs = []
    for i in range(count):
        cls, src = items[i % len(items)]
        cdir = os.path.join(dest, split, cls)
        os.makedirs(cdir, exist_ok=True)
        stem = os.path.splitext(os.path.basename(src))[0]
        jobs.append((src, os.path.join(cdir, f"{stem}_{i:06d}.jpg"), i, quality, seed))
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_synth_jpeg, jobs, chunksize=16)
    else:
        sizes = [_synth_jpeg(j) for j in jobs]
    return {"root": dest, "split": split, "images": count, "mean_bytes": round(statistics.fmean(sizes)),
            "sizes": [f"{w}x{h}" for w, h in JPEG_SIZES]}


def _write_idx(path: str, arr: Any, magic: int) -> None:
    """``arr`` (uint8) as an uncompressed IDX file: the magic number, one big-endian uint32 per dimension, the bytes."""
    with open(path, "wb") as f:
        f.write(magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape))
        f.write(arr.tobytes())


def make_proxy_replica(spec: str, dest: str, *, splits: tuple[str, ...], replicas: int) -> str:
    """A Fashion-MNIST copy in ``dest`` whose ``splits`` hold every image ``replicas`` times (uncompressed
    IDX files, which the source reads like the .gz ones); returns its spec ``fashion-mnist:<dest>``.

    So that the proxy's full run is long (300,000 images by default) against the fixed costs that the
    steady rate subtracts, as the png mode's hard-linked replicas are. A split not in ``splits`` gets one
    blank image (the source wants all four files)."""
    import numpy as np

    from dtd_ray.data.sources import parse_source

    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    source = parse_source(spec)
    if source.kind != "fashion-mnist":
        raise ValueError(f"proxy_replicas > 1 needs a fashion-mnist source, got {spec}")
    os.makedirs(dest, exist_ok=True)
    for split, (images_name, labels_name) in names.items():
        if split in splits:
            cols = source.read_numpy(split)
            images = np.tile(cols["image"][..., 0], (replicas, 1, 1))
            labels = np.tile(cols["label"].astype(np.uint8), replicas)
        else:
            images, labels = np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.uint8)
        _write_idx(os.path.join(dest, images_name), images, 0x803)
        _write_idx(os.path.join(dest, labels_name), labels, 0x801)
    return f"fashion-mnist:{dest}"


def stage_table(ops: list[tuple[str, list[Any]]], t0: float) -> list[dict[str, Any]]:
    """Per-stage figures from Ray Data's per-block stats, in pipeline order.

    ``ops``: ``(operator name, its BlockStats)``; a BlockStats has ``num_rows`` and ``exec_stats``
    (``start_time_s``/``end_time_s`` on the machine's monotonic clock, as ``time.perf_counter``,
    ``wall_time_s``, ``cpu_time_s``, ``task_idx``). Times are seconds after ``t0``. ``rows`` is what
    the stage consumed (the previous stage's output; its own for the first), ``rows_per_s`` that
    over the stage's span (first task start to last task end), ``busy_s`` the summed task wall time
    (``busy_s / span_s`` is its mean concurrency).
    """
    out: list[dict[str, Any]] = []
    prev_rows: int | None = None
    for name, blocks in ops:
        ex = [b.exec_stats for b in blocks if getattr(b, "exec_stats", None) is not None]
        rows_out = int(sum(b.num_rows or 0 for b in blocks))
        rows = rows_out if prev_rows is None else prev_rows
        starts = [e.start_time_s for e in ex if e.start_time_s is not None]
        ends = [e.end_time_s for e in ex if e.end_time_s is not None]
        span = (max(ends) - min(starts)) if starts and ends else 0.0
        first_end = min(ends) if ends else None
        first_rows = 0
        if first_end is not None:
            first_rows = int(sum(b.num_rows or 0 for b in blocks
                                 if getattr(b, "exec_stats", None) is not None and b.exec_stats.end_time_s == first_end))
        out.append({
            "stage": _short(name),
            "rows": rows,
            "rows_out": rows_out,
            "blocks": len(blocks),
            "tasks": len({e.task_idx for e in ex}),
            "first_start_s": round(min(starts) - t0, 3) if starts else None,
            "first_out_s": round(first_end - t0, 3) if first_end is not None else None,
            "first_out_rows": first_rows,
            "last_out_s": round(max(ends) - t0, 3) if ends else None,
            "span_s": round(span, 3),
            "rows_per_s": round(rows / span, 1) if span > 0 else None,
            "busy_s": round(sum(e.wall_time_s or 0.0 for e in ex), 3),
            "cpu_s": round(sum(e.cpu_time_s or 0.0 for e in ex), 3),
        })
        prev_rows = rows_out
    return out


def rows_done_by(blocks: list[Any], t: float) -> int:
    """Rows of the blocks (BlockStats, as in :func:`stage_table`) that were finished by time ``t``."""
    return int(sum(b.num_rows or 0 for b in blocks
                   if getattr(b, "exec_stats", None) is not None and b.exec_stats.end_time_s is not None
                   and b.exec_stats.end_time_s <= t))


def decode_share(stages: list[dict[str, Any]]) -> float | None:
    """The stage before the model's (decoding) share of the pipeline's task CPU time, from :func:`stage_table`."""
    names = [s["stage"] for s in stages]
    if "FeatureExtractor" not in names or names.index("FeatureExtractor") == 0:
        return None
    total = sum(s["cpu_s"] for s in stages)
    return round(stages[names.index("FeatureExtractor") - 1]["cpu_s"] / total, 3) if total > 0 else None


def _short(name: str) -> str:
    """``MapBatches(FeatureExtractor)`` -> ``FeatureExtractor``; other names unchanged."""
    m = re.fullmatch(r"\w+\((.+)\)", name)
    return m.group(1) if m else name


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished, waited-for children."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def process_tree_cpu(root: int) -> dict[int, float] | None:
    """CPU seconds (user + system) of process ``root`` and of each of its live descendants, by pid
    (Linux ``/proc``); ``None`` where ``/proc`` cannot be read. Finished processes are missing:
    Ray's raylet does not collect its workers' times, so :class:`TreeCPU` samples while a run lasts."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    data = f.read()
            except OSError:  # exited meanwhile
                continue
            rest = data[data.rindex(")") + 2:].split()  # fields 3.. (the name in parentheses may hold spaces)
            parent[int(name)] = int(rest[1])
            cpu[int(name)] = (int(rest[11]) + int(rest[12])) / tick  # utime, stime
    except (OSError, ValueError):
        return None
    if root not in cpu:
        return None
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        out[pid] = cpu.get(pid, 0.0)
        stack += children.get(pid, [])
    return out


class TreeCPU:
    """CPU seconds spent by this process and every process it started, directly or not, while in the
    ``with`` block: for the pipeline, the driver and every process of its Ray session (GCS, raylet and
    object store, workers, the model actor, also outside its calls). Sampled every ``interval`` s, so a
    process that ends loses at most its last interval; the sampler's own time is left out.
    ``seconds`` is ``None`` where ``/proc`` cannot be read."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval, self.seconds = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._base: dict[int, float] | None = None
        self._last: dict[int, float] = {}
        self._own = 0.0

    def _sample(self) -> None:
        snap = process_tree_cpu(os.getpid())
        if snap is not None:
            self._last.update(snap)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self._own = time.thread_time()

    def __enter__(self) -> "TreeCPU":
        self._base = process_tree_cpu(os.getpid())
        if self._base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = sum(v - self._base.get(pid, 0.0) for pid, v in self._last.items()) - self._own


def run_figures(*, rows: int, seconds: float, t_first: float | None, first_rows: int,
                cpu_s: float | None = None) -> dict[str, Any]:
    """One run of one side: ``rows`` in ``seconds`` (everything), the first output ``t_first`` s after the
    start, ``cpu_s`` CPU seconds spent on it (every process of that side that the run could account)."""
    out = {"rows": int(rows), "seconds": round(seconds, 3), "cpu_s": None if cpu_s is None else round(cpu_s, 3),
           "startup_s": round(t_first, 3) if t_first is not None else None,
           "e2e_img_s": round(rows / seconds, 1) if seconds > 0 else None}
    # The rate after the first output: overstated where work was done ahead during the start-up.
    window = seconds - t_first if t_first is not None else 0.0
    out["after_first_img_s"] = round((rows - first_rows) / window, 1) if window > 0 and rows > first_rows else None
    return out


def side_figures(small: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """A side's figures from a run of fewer rows (``small``) and one of more (``full``).

    ``steady_img_s`` is the marginal rate (rows_full - rows_small) / (seconds_full - seconds_small):
    every fixed cost (planning, starting workers and actors, loading the model, the first batch,
    the commit) and the work a pipeline does ahead while it starts up cancel out, as long as the
    small run is larger than that work ahead. ``fixed_s`` is what the rate leaves of the full run's
    time (seconds_full - rows_full / steady), ``startup_s`` the full run's time to its first output.
    """
    dn, dt = full["rows"] - small["rows"], full["seconds"] - small["seconds"]
    steady = dn / dt if dn > 0 and dt > 0 else None
    dc = (full["cpu_s"] - small["cpu_s"]) if full.get("cpu_s") is not None and small.get("cpu_s") is not None else None
    return {
        "steady_img_s": round(steady, 1) if steady else None,
        # CPU time per image, marginal too: what a load average far above the core count does not change much
        "cpu_ms_per_img": round(1000 * dc / dn, 4) if dc is not None and dc > 0 and dn > 0 else None,
        "startup_s": full["startup_s"],
        "fixed_s": round(full["seconds"] - full["rows"] / steady, 3) if steady else None,
        "e2e_img_s": full["e2e_img_s"],
        "after_first_img_s": full["after_first_img_s"],
        "small": small,
        "full": full,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over a case's repeats (each ``{"plain": side_figures, "ray": side_figures, ...}``) and the ratios.

    ``ratio`` is the median of the per-repeat (paired) ratios ray / plain of the steady rates,
    ``ratio_e2e`` the same of the end-to-end rates of the full runs.
    """
    med: dict[str, Any] = {}
    for side in ("plain", "ray"):
        for key in ("steady_img_s", "e2e_img_s", "startup_s", "fixed_s", "after_first_img_s", "cpu_ms_per_img"):
            med[f"{side}_{key}"] = _median([r[side].get(key) for r in repeats])
    ratios = [_ratio(r["ray"]["steady_img_s"], r["plain"]["steady_img_s"]) for r in repeats]
    ratios_e2e = [_ratio(r["ray"]["e2e_img_s"], r["plain"]["e2e_img_s"]) for r in repeats]
    med["ratio"] = _median(ratios)
    med["ratio_e2e"] = _median(ratios_e2e)
    med["ratio_of_medians"] = _ratio(med["ray_steady_img_s"], med["plain_steady_img_s"])
    # plain / ray CPU time per image: above 1, the pipeline spends less CPU on an image than the plain loop
    med["cpu_ratio"] = _median([_ratio(r["plain"].get("cpu_ms_per_img"), r["ray"].get("cpu_ms_per_img"))
                                for r in repeats])
    med["ratios"] = ratios
    med["ratios_e2e"] = ratios_e2e
    med["ahead_small_max"] = max((r["ray"]["small"].get("ahead_frac") or 0.0 for r in repeats), default=0.0)
    stage_rates: dict[str, list[float | None]] = {}
    for r in repeats:
        for s in r.get("stages") or []:
            stage_rates.setdefault(s["stage"], []).append(s["rows_per_s"])
    med["stage_rows_per_s"] = {k: _median(v) for k, v in stage_rates.items()}
    return med


def record(*, cfg: dict[str, Any], argv: list[str], machine: dict[str, Any], versions: dict[str, str],
           cases: list[dict[str, Any]], started_at: str, seconds: float) -> dict[str, Any]:
    """The JSON the benchmark writes: what ran where, and every figure."""
    return {
        "bench": "jobs/bench_extract.py",
        "schema": 1,
        "started_at": started_at,
        "seconds": round(seconds, 1),
        "argv": argv,
        "config": cfg,
        "device": machine["device"],
        "device_type": machine["device_type"],
        "cpu_count": machine["cpu_count"],
        "machine": machine,
        "versions": versions,
        "cases": cases,
        "summary": [
            {"mode": c["mode"], "model": c["model"], "images": c["images"], "batch_size": c["batch_size"],
             **{k: c["median"].get(k) for k in ("plain_steady_img_s", "ray_steady_img_s", "ratio", "ratio_e2e",
                                                "cpu_ratio", "plain_startup_s", "ray_startup_s")}}
            for c in cases
        ],
    }


def load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------- the tiny model (proxy)


def register_tiny() -> None:
    """Register ``bench_tiny`` in this process's backbone registry (idempotent): the proxy's near-free model.

    Run in the driver and, as Ray's ``worker_process_setup_hook``, in every worker process, so that
    ``run_extract`` and its model actors build it by name. Self-contained: Ray ships it by value.
    """
    from torch import nn

    from dtd_ray.models import backbones

    if TINY in backbones._REGISTRY:
        return

    def build(*, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 1, 1, bias=False), nn.AdaptiveAvgPool2d(8), nn.Flatten(),
                             nn.Linear(64, num_classes))

    mean, std = backbones.NORMALIZATIONS["fashion-mnist"]
    backbones.register_backbone(
        TINY, builder=build, description="bench_extract's near-free proxy model (1x1 conv, 8x8 pool, linear)",
        preprocessing=backbones.Preprocessing(mean=mean, std=std, size=28, channels=1),
    )


# ----------------------------------------------------------------------------- the plain loops


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXT)


class _HWCUint8:
    """PIL image -> uint8 HWC tensor (what the pipeline's prepare stage hands the model)."""

    def __call__(self, img):
        import numpy as np
        import torch

        arr = np.array(img, dtype=np.uint8)
        return torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr)


def plain_folder(*, root: str, model: str, weights: str | None, device: str, batch_size: int, kmax: int,
                 workers: int) -> dict[str, Any]:
    """The strong plain loop over an image folder (module docstring); returns :func:`rates`."""
    import torch
    import torchvision
    import torchvision.transforms as T

    from dtd_ray.core.counting import rank_topk
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.models.runtime import Runtime

    t0, c0 = time.perf_counter(), _cpu_seconds()
    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)  # as the pipeline's CPU actor (cpu_threads: the node's cores)
    bb = get_backbone(model, weights=weights)
    pre = bb.preprocessing
    steps = []
    if pre.resize is not None:
        inter = T.InterpolationMode(pre.interpolation)
        steps += [T.Resize(pre.resize, interpolation=inter, antialias=True), T.CenterCrop(pre.size)]
    steps.append(_HWCUint8())
    # the files the pipeline's image-folder source lists (torchvision's default would take hidden ones too)
    ds = torchvision.datasets.ImageFolder(root, transform=T.Compose(steps), is_valid_file=_is_image)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=cuda,
                                         persistent_workers=False)
    it = iter(loader)  # the workers start decoding while the model is set up
    rt = Runtime(device=torch.device(device), precision="auto", mean=pre.mean, std=pre.std, channels_last=True)
    bb = rt.prepare(bb.eval())
    k = min(kmax, bb.feature_dim)
    n = first_rows = 0
    t_first = None
    with torch.inference_mode():
        for x, _ in it:
            with rt.autocast():
                f = bb.forward_features(rt.images(x)).float()
            pred = bb.head(f).argmax(1)
            idx, val = rank_topk(f, k)
            _ = (pred.to(torch.int32).cpu(), idx.to(torch.int32).cpu(), val.cpu(), f.cpu())
            n += len(x)
            if t_first is None:
                t_first, first_rows = time.perf_counter(), len(x)
    t_end = time.perf_counter()
    return run_figures(rows=n, seconds=t_end - t0, t_first=None if t_first is None else t_first - t0,
                       first_rows=first_rows, cpu_s=_cpu_seconds() - c0)


def plain_proxy(*, spec: str, split: str, device: str, batch_size: int, kmax: int, rows_per_file: int,
                out_dir: str) -> dict[str, Any]:
    """The proxy's plain loop: prepare_batch, FeatureExtractor and write_part in one process."""
    import numpy as np

    from dtd_ray.data.sources import parse_source
    from dtd_ray.data.transforms import prepare_batch
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.models.extractor import FeatureExtractor
    from dtd_ray.io.records import write_part

    t0, c0 = time.perf_counter(), _cpu_seconds()
    cols = parse_source(spec).read_numpy(split)
    pre = get_backbone(TINY, weights=None).preprocessing
    ext = FeatureExtractor(model=TINY, weights=None, kmax=kmax, use_gpu=device == "cuda",
                           cpu_threads=os.cpu_count() or 1)
    os.makedirs(out_dir, exist_ok=True)
    total = len(cols["sample_id"])
    n = first_rows = 0
    t_first = None
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if pending:
            write_part({k: np.concatenate([p[k] for p in pending]) for k in pending[0]}, staging_uri=out_dir)
        pending, pending_rows = [], 0

    for lo in range(0, total, batch_size):
        out = ext(prepare_batch({k: v[lo:lo + batch_size] for k, v in cols.items()}, preprocessing=pre))
        pending.append(out)
        pending_rows += len(out["sample_id"])
        n += len(out["sample_id"])
        if t_first is None:
            t_first, first_rows = time.perf_counter(), len(out["sample_id"])
        if pending_rows >= rows_per_file:
            flush()
    flush()
    t_end = time.perf_counter()
    return run_figures(rows=n, seconds=t_end - t0, t_first=None if t_first is None else t_first - t0,
                       first_rows=first_rows, cpu_s=_cpu_seconds() - c0)


# ----------------------------------------------------------------------------- the pipeline


class _Probe:
    """Wraps the Dataset ``build_pipeline`` returns: records when its rows end and keeps its stats.

    ``extract_split`` only iterates it and drops it; the probe holds the Dataset no longer than
    that (so the model actors are released as usual) and keeps only the stats.
    """

    def __init__(self, ds, sink: dict[str, Any]) -> None:
        self._ds, self._sink = ds, sink

    def iter_rows(self):
        yield from self._ds.iter_rows()
        self._sink["t_end"] = time.perf_counter()
        self._sink["stats_text"] = self._ds.stats()
        self._sink["ops"] = _ops_of(self._ds._raw_stats())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)


def _ops_of(stats) -> list[tuple[str, list[Any]]]:
    """``(operator name, BlockStats)`` of a DatasetStats, parents (upstream) first."""
    out: list[tuple[str, list[Any]]] = []
    for parent in getattr(stats, "parents", None) or []:
        out += _ops_of(parent)
    out += [(name, list(blocks)) for name, blocks in stats.metadata.items()]
    return out


def ray_run(cfg, *, verbose: bool) -> dict[str, Any]:
    """``run_extract(cfg)`` timed, with Ray Data's stats: :func:`run_figures` (first output: the model
    stage's first block) plus ``stages``, ``ahead_rows`` (rows the stage before the model had output by
    then), ``write_tail_s`` (the model's last output to the last write) and ``stats_text``."""
    from dtd_ray.ray import extract as ex

    sink: dict[str, Any] = {}
    real = ex.build_pipeline

    def build(*args, **kwargs):
        return _Probe(real(*args, **kwargs), sink)

    ex.build_pipeline = build
    buf = io.StringIO()
    try:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        with contextlib.redirect_stdout(sys.stdout if verbose else buf), TreeCPU() as tree:
            summary = ex.run_extract(cfg)
        seconds = time.perf_counter() - t0
        driver_cpu = _cpu_seconds() - c0
    finally:
        ex.build_pipeline = real
    if summary["skipped"]:
        raise RuntimeError(f"the pipeline skipped {summary['skipped']} inputs; the benchmark needs clean data")
    stages = stage_table(sink.get("ops", []), t0)
    i_model = next((i for i, s in enumerate(stages) if s["stage"] == "FeatureExtractor"), None)
    model = stages[i_model] if i_model is not None else None
    t_first = model["first_out_s"] if model else None
    # The CPU of the driver and every Ray process of this session (Ray's daemons, its workers and the model
    # actor, also outside its calls); where /proc is not there, the driver's and the task calls' alone.
    task_cpu = driver_cpu + sum(st["cpu_s"] for st in stages)
    out = run_figures(rows=summary["rows"], seconds=seconds, t_first=t_first,
                      first_rows=model["first_out_rows"] if model else 0,
                      cpu_s=tree.seconds if tree.seconds is not None else task_cpu)
    out["task_cpu_s"] = round(task_cpu, 3)
    out["pipeline_img_s"] = summary["images_per_s"]  # run_extract's own figure (its manifest's seconds)
    ahead = None
    if model and i_model and t_first is not None:
        ahead = rows_done_by(sink["ops"][i_model - 1][1], t0 + t_first)
    out["ahead_rows"] = ahead
    out["ahead_frac"] = round(ahead / summary["rows"], 3) if ahead is not None and summary["rows"] else None
    t_end = sink["t_end"] - t0 if "t_end" in sink else None
    out["write_tail_s"] = round(t_end - model["last_out_s"], 3) if model and t_end and model["last_out_s"] else None
    out["stages"] = stages
    out["stats_text"] = sink.get("stats_text", "")
    return out


# ----------------------------------------------------------------------------- driver


def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _print_stages(stages: list[dict[str, Any]]) -> None:
    print(f"    {'stage':<18}{'rows':>8}{'tasks':>7}{'1st out s':>11}{'span s':>9}{'rows/s':>10}"
          f"{'busy s':>9}{'cpu s':>8}")
    for s in stages:
        print(f"    {s['stage'][:17]:<18}{s['rows']:>8}{s['tasks']:>7}{_fmt(s['first_out_s'], '.2f'):>11}"
              f"{s['span_s']:>9.2f}{_fmt(s['rows_per_s']):>10}{s['busy_s']:>9.2f}{s['cpu_s']:>8.2f}")


def _side_line(tag: str, s: dict[str, Any]) -> str:
    sm, fu = s["small"], s["full"]
    return (f"{tag} {sm['rows']:,} in {sm['seconds']:.1f} s, {fu['rows']:,} in {fu['seconds']:.1f} s -> "
            f"{_fmt(s['steady_img_s'])} img/s steady; first row {_fmt(s['startup_s'], '.2f')} s, fixed "
            f"{_fmt(s['fixed_s'], '.2f')} s; e2e {_fmt(s['e2e_img_s'])} img/s; CPU {_fmt(s['cpu_ms_per_img'], '.2f')} "
            f"ms/img")


def run_case(*, mode: str, model: str, cfg: BenchConfig, device: str, sizes: dict[str, dict[str, Any]],
             weights: str | None, batch_size: int, workers: int, tmp: str, warm_up: bool) -> dict[str, Any]:
    """Both sides on both sizes (``sizes["small"]``, ``sizes["full"]``: an image folder or a proxy split),
    ``cfg.repeats`` times, interleaved; returns the case's record (every run, medians, stages). ``warm_up``:
    first one untimed run of each side (the bench's first case; later ones find everything warm)."""
    from dtd_ray.ray.extract import ExtractConfig

    def one(side: str, size: dict[str, Any], out_dir: str) -> dict[str, Any]:
        if mode == "proxy":
            ecfg = ExtractConfig(model=TINY, weights=None, dataset=size["source"], splits=(size["split"],),
                                 output=out_dir, kmax=cfg.kmax, batch_size=batch_size, use_gpu=device == "cuda")
            if side == "plain":
                return plain_proxy(spec=size["source"], split=size["split"], device=device, batch_size=batch_size,
                                   kmax=cfg.kmax, rows_per_file=ecfg.rows_per_file,
                                   out_dir=os.path.join(out_dir, "plain"))
        else:
            ecfg = ExtractConfig(model=model, weights=weights, dataset=f"imagefolder:{size['root']}",
                                 splits=(size["split"],), output=out_dir, kmax=cfg.kmax, batch_size=batch_size,
                                 use_gpu=device == "cuda")
            if side == "plain":
                return plain_folder(root=os.path.join(size["root"], size["split"]), model=model, weights=weights,
                                    device=device, batch_size=batch_size, kmax=cfg.kmax, workers=workers)
        return ray_run(ecfg, verbose=cfg.verbose)

    # Untimed warm-up of both sides: Ray's first tasks start worker processes and import their modules,
    # the plain loop's first run imports torchvision's datasets; a cold run would skew the marginal rate
    # of the first repeat. (Every pipeline run starts its model actor afresh, warm-up or not.)
    t = t_case = time.perf_counter()
    for side in ("plain", "ray") if warm_up else ():
        out_dir = tempfile.mkdtemp(prefix="warm_", dir=tmp)
        try:
            one(side, sizes.get("warm", sizes["small"]), out_dir)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
    warmup_s = round(time.perf_counter() - t, 1)
    if warm_up:
        print(f"[bench] {mode} {model}: warmed up in {warmup_s:.1f} s", flush=True)
    repeats = []
    stats_text = ""
    for r in range(cfg.repeats):
        load0 = load_avg()
        runs: dict[tuple[str, str], dict[str, Any]] = {}
        # interleaved, the order reversed every other repeat: drift on a shared machine hits both sides alike
        order = [(side, size) for size in ("small", "full") for side in ("plain", "ray")]
        for side, size in (order if r % 2 == 0 else order[::-1]):
            out_dir = tempfile.mkdtemp(prefix="out_", dir=tmp)
            try:
                runs[side, size] = one(side, sizes[size], out_dir)
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        stages = runs["ray", "full"].pop("stages")
        stats_text = runs["ray", "full"].pop("stats_text")
        for key in ("stages", "stats_text"):
            runs["ray", "small"].pop(key, None)
        rep = {side: side_figures(runs[side, "small"], runs[side, "full"]) for side in ("plain", "ray")}
        rep.update(stages=stages, load=[load0, load_avg()],
                   ratio=_ratio(rep["ray"]["steady_img_s"], rep["plain"]["steady_img_s"]),
                   ratio_e2e=_ratio(rep["ray"]["e2e_img_s"], rep["plain"]["e2e_img_s"]))
        share = rep["decode_cpu_share"] = decode_share(stages)
        repeats.append(rep)
        ray_full, ray_small = runs["ray", "full"], runs["ray", "small"]
        print(f"[bench] {mode} {model} repeat {r + 1}/{cfg.repeats} (load {load0:.2f} -> {rep['load'][1]:.2f}):",
              flush=True)
        print(f"  {_side_line('plain', rep['plain'])}", flush=True)
        print(f"  {_side_line('ray  ', rep['ray'])}", flush=True)
        print(f"        ray: run_extract's own {_fmt(ray_full['pipeline_img_s'])} img/s, decoded ahead of the first "
              f"model output {_fmt(ray_small['ahead_rows'], ',')} / {_fmt(ray_full['ahead_rows'], ',')} rows "
              f"(decoding: {_fmt(None if share is None else 100 * share, '.0f')} % of its CPU), write tail {_fmt(ray_full['write_tail_s'], '.2f')} s; ratio {_fmt(rep['ratio'], '.2f')} "
              f"(e2e {_fmt(rep['ratio_e2e'], '.2f')})", flush=True)
        if (ray_small.get("ahead_frac") or 0) >= 0.9 and (share or 0) >= 0.2:
            # Decoding done ahead is missing from the small run's time: the steady rate is overstated by up
            # to decoding's share of the work (on a CPU the model's work dwarfs it, so no warning there).
            print(f"  warning: the small run was decoded whole before the model's first output and decoding is "
                  f"{100 * share:.0f} % of the pipeline's CPU time: the steady rate is overstated; give it more "
                  f"rows (--replicas), or read e2e", flush=True)
        if cfg.verbose:
            print(stats_text, flush=True)
    print(f"  per-stage rates of the pipeline (full run of repeat {cfg.repeats}; seconds after run_extract was "
          f"called):")
    _print_stages(repeats[-1]["stages"])
    case = {"mode": mode, "model": model, "images": sizes["full"]["images"], "images_small": sizes["small"]["images"],
            "batch_size": batch_size, "workers": workers if mode != "proxy" else 0, "device": device,
            "data": {k: v for k, v in sizes["full"].items() if k != "root"},
            "warmup_s": warmup_s, "seconds": round(time.perf_counter() - t_case, 1),
            "repeats": repeats, "median": summarise(repeats), "ray_stats_text": stats_text}
    m = case["median"]
    print(f"  median of {cfg.repeats}: plain {_fmt(m['plain_steady_img_s'])} img/s, ray {_fmt(m['ray_steady_img_s'])} "
          f"img/s, ratio {_fmt(m['ratio'], '.2f')} (e2e {_fmt(m['ratio_e2e'], '.2f')}, CPU per image plain / ray "
          f"{_fmt(m['cpu_ratio'], '.2f')}); time to first row: plain "
          f"{_fmt(m['plain_startup_s'], '.2f')} s, ray {_fmt(m['ray_startup_s'], '.2f')} s\n", flush=True)
    return case


def _machine(device: str) -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    cpu = cpu_model()
    return {"device": gpu or f"CPU: {cpu}", "device_type": device, "gpu": gpu, "cpu_model": cpu,
            "cpu_count": os.cpu_count(), "cuda": torch.version.cuda if device == "cuda" else None}


def _ray_resources() -> dict[str, Any]:
    """What Ray sees (CPUs, GPUs, object store) and the size of /dev/shm, where its object store lives."""
    import ray

    res = ray.cluster_resources()
    out: dict[str, Any] = {"ray_cpus": res.get("CPU"), "ray_gpus": res.get("GPU", 0.0),
                           "ray_object_store_gib": round(res.get("object_store_memory", 0.0) / 2**30, 2)}
    try:
        st = os.statvfs("/dev/shm")
        out["dev_shm_gib"] = round(st.f_frsize * st.f_blocks / 2**30, 2)
    except OSError:
        out["dev_shm_gib"] = None
    return out


def _versions() -> dict[str, str]:
    import PIL
    import ray
    import torch

    out = dict(config_lib.versions())
    out.update(torch=torch.__version__, ray=ray.__version__, pillow=PIL.__version__)
    return out


def _tiny_hook_env():
    """Add :func:`register_tiny` as the job's ``worker_process_setup_hook`` to the ``ray.init`` that
    ``session.start`` makes (the session's other settings kept)."""
    import ray
    from ray import cloudpickle

    real = ray.init
    if register_tiny.__module__ != "__main__":
        # imported (not run as a script): ship the hook by value too, the workers cannot import this file
        cloudpickle.register_pickle_by_value(sys.modules[register_tiny.__module__])

    @contextlib.contextmanager
    def patched():
        def init(*args, **kwargs):
            env = dict(kwargs.get("runtime_env") or {})
            env["worker_process_setup_hook"] = register_tiny
            kwargs["runtime_env"] = env
            return real(*args, **kwargs)

        ray.init = init
        try:
            yield
        finally:
            ray.init = real

    return patched()


def run(cfg: BenchConfig) -> dict[str, Any]:
    import torch

    device = resolve_device(cfg.device, cuda_available=torch.cuda.is_available())
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_start = time.perf_counter()
    ncpu = os.cpu_count() or 1
    workers = default_workers(ncpu) if cfg.workers is None else cfg.workers
    # Inputs are checked before Ray starts: a missing folder is one line, not a stack of Ray output.
    items = []
    if "png" in cfg.modes or "jpeg" in cfg.modes:
        n_images = cfg.images if cfg.images is not None else (6000 if device == "cpu" else 0)
        items = pick_evenly(list_images(os.path.join(cfg.data, "cifar10", cfg.split)), n_images)
    if "png" in cfg.modes:
        for m in cfg.models:
            if not os.path.isfile(os.path.join(cfg.data, "cifar_resnets", CKPT[m])):
                raise FileNotFoundError(f"{os.path.join(cfg.data, 'cifar_resnets', CKPT[m])} not found ({m}'s weights)")
    if "proxy" in cfg.modes:
        from dtd_ray.data.sources import parse_source

        valid = parse_source(cfg.proxy_data).splits()
        missing = [s for s in cfg.proxy_splits if s not in valid]
        if missing:
            raise ValueError(f"proxy_splits: {', '.join(missing)} not in {cfg.proxy_data}; valid: {', '.join(valid)}")
        register_tiny()
    machine = _machine(device)
    machine["load_start"] = list(os.getloadavg())
    out_path = default_output(device_slug(device, machine["device"])) if cfg.output is None else cfg.output
    print(f"[bench] {machine['device']}, {ncpu} CPUs, load {machine['load_start'][0]:.2f}; modes "
          f"{','.join(cfg.modes)}; {cfg.repeats} repeats", flush=True)
    logging.getLogger("dtd_ray.ray.extract").setLevel(logging.ERROR)  # resnet50's 1000 classes vs 10: expected

    from dtd_ray.ray import session

    cases: list[dict[str, Any]] = []

    def save(complete: bool) -> dict[str, Any]:
        """The record so far, written after every case (a run cut short keeps its finished cases)."""
        machine["load_end"] = list(os.getloadavg())
        rec = record(cfg=config_lib.to_dict(cfg), argv=sys.argv[1:], machine=machine, versions=_versions(),
                     cases=cases, started_at=started_at, seconds=time.perf_counter() - t_start)
        rec["complete"] = complete
        if out_path:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            with open(out_path + ".tmp", "w") as f:
                json.dump(rec, f, indent=1)
            os.replace(out_path + ".tmp", out_path)
        return rec

    tmp_root = cfg.tmp or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs")
    os.makedirs(tmp_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench_extract_", dir=tmp_root)
    try:
        # The image folders first, before Ray starts (the JPEGs are made by forked processes).
        folders: dict[str, dict[str, dict[str, Any]]] = {}
        for mode in [m for m in cfg.modes if m in ("png", "jpeg")]:
            bs = cfg.batch_size or default_batch_size(mode, device)
            t = time.perf_counter()
            src, extra, what = items, {}, f"{len(items)} PNGs"
            if mode == "jpeg":
                jp = make_jpeg_folder(items, os.path.join(tmp, "jpeg_src"), split=cfg.split, count=cfg.jpeg_images,
                                      quality=cfg.jpeg_quality, processes=ncpu)
                src = list_images(os.path.join(jp["root"], cfg.split))
                extra = {"mean_bytes": jp["mean_bytes"], "sizes": jp["sizes"], "quality": cfg.jpeg_quality}
                what = f"{jp['images']} JPEGs (mean {jp['mean_bytes'] / 1000:.0f} kB)"
            replicas = (cfg.jpeg_replicas or cfg.replicas) if mode == "jpeg" else cfg.replicas
            sizes = {}
            for size, subset, reps in (("warm", pick_evenly(src, min(len(src), 2 * bs)), 1),
                                       ("small", pick_evenly(src, len(src) // 2), replicas),
                                       ("full", src, replicas)):
                sizes[size] = make_replica_folder(subset, os.path.join(tmp, f"{mode}_{size}"), split=cfg.split,
                                                  replicas=reps) | extra
            folders[mode] = sizes
            print(f"[bench] {mode}: {what} x {replicas} = {sizes['full']['images']:,} images, and half of them "
                  f"({sizes['full']['link']}s, made in {time.perf_counter() - t:.1f} s)", flush=True)
        t = time.perf_counter()
        with (_tiny_hook_env() if "proxy" in cfg.modes else contextlib.nullcontext()), \
                session.start(verbose=cfg.verbose):
            machine["ray_start_s"] = round(time.perf_counter() - t, 2)
            machine.update(_ray_resources())
            print(f"[bench] Ray started in {machine['ray_start_s']:.1f} s: {machine['ray_cpus']:g} CPUs, "
                  f"{machine['ray_gpus']:g} GPUs, object store {machine['ray_object_store_gib']} GiB "
                  f"(/dev/shm {machine['dev_shm_gib']} GiB)", flush=True)
            for mode in cfg.modes:
                bs = cfg.batch_size or default_batch_size(mode, device)
                if mode in ("png", "jpeg"):
                    sizes = folders[mode]
                    print(f"[bench] {mode}: batch {bs}; the plain loop decodes with {workers} worker(s)", flush=True)
                    for m in (cfg.models if mode == "png" else (cfg.jpeg_model,)):
                        w = os.path.join(cfg.data, "cifar_resnets", CKPT[m]) if mode == "png" else None
                        cases.append(run_case(mode=mode, model=m, cfg=cfg, device=device, sizes=sizes, weights=w,
                                              batch_size=bs, workers=workers, tmp=tmp, warm_up=not cases))
                        save(complete=False)
                    for s in sizes.values():
                        shutil.rmtree(s["root"], ignore_errors=True)
                else:
                    from dtd_ray.data.sources import parse_source

                    spec = cfg.proxy_data
                    if cfg.proxy_replicas > 1:
                        spec = make_proxy_replica(cfg.proxy_data, os.path.join(tmp, "proxy_data"),
                                                  splits=cfg.proxy_splits, replicas=cfg.proxy_replicas)
                    source = parse_source(spec)
                    sizes = {size: {"source": spec, "split": split, "images": source.num_rows(split)}
                             for size, split in zip(("small", "full"), cfg.proxy_splits)}
                    print(f"[bench] proxy: {cfg.proxy_data} x {cfg.proxy_replicas}: {cfg.proxy_splits[0]} "
                          f"({sizes['small']['images']:,}) and "
                          f"{cfg.proxy_splits[1]} ({sizes['full']['images']:,}), pre-decoded arrays, model {TINY}, "
                          f"batch {bs}; both sides prepare_batch + FeatureExtractor + write_part", flush=True)
                    cases.append(run_case(mode=mode, model=TINY, cfg=cfg, device=device, sizes=sizes, weights=None,
                                          batch_size=bs, workers=0, tmp=tmp, warm_up=not cases))
                    save(complete=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec = save(complete=True)
    print(f"{'mode':<6}{'model':<16}{'images':>8}{'plain img/s':>13}{'ray img/s':>11}{'ratio':>7}{'e2e':>6}"
          f"{'cpu':>6}{'first row plain/ray s':>23}")
    for s in rec["summary"]:
        print(f"{s['mode']:<6}{s['model']:<16}{s['images']:>8}{_fmt(s['plain_steady_img_s']):>13}"
              f"{_fmt(s['ray_steady_img_s']):>11}{_fmt(s['ratio'], '.2f'):>7}{_fmt(s['ratio_e2e'], '.2f'):>6}"
              f"{_fmt(s['cpu_ratio'], '.2f'):>6}{_fmt(s['plain_startup_s'], '.1f'):>14} / {_fmt(s['ray_startup_s'], '.1f')}")
    print(f"(medians of {cfg.repeats}; ratio = ray / plain of the steady rates, e2e = of the end-to-end rates, "
          f"cpu = plain / ray of the CPU time per image; "
          f"{machine['device']}, {ncpu} CPUs, load {machine['load_start'][0]:.2f} at the start, "
          f"{machine['load_end'][0]:.2f} at the end)")
    if out_path:
        print(f"[bench] wrote {out_path}")
    return rec


def prepare(cfg: PrepareConfig) -> None:
    """Copy a class-balanced subset of the PNGs and the checkpoints into ``dest`` (for a GPU box)."""
    items = pick_evenly(list_images(os.path.join(cfg.data, "cifar10", cfg.split)), 0)
    by_class: dict[str, list[str]] = {}
    for cls, path in items:
        by_class.setdefault(cls, []).append(path)
    n = 0
    for cls, paths in by_class.items():
        d = os.path.join(cfg.dest, "cifar10", cfg.split, cls)
        os.makedirs(d, exist_ok=True)
        for p in paths[:cfg.per_class]:
            shutil.copyfile(p, os.path.join(d, os.path.basename(p)))
            n += 1
    os.makedirs(os.path.join(cfg.dest, "cifar_resnets"), exist_ok=True)
    for m in cfg.models:
        shutil.copyfile(os.path.join(cfg.data, "cifar_resnets", CKPT[m]), os.path.join(cfg.dest, "cifar_resnets", CKPT[m]))
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cfg.dest) for f in fs)
    print(f"[bench] {cfg.dest}: {n} PNGs of {cfg.split} and {len(cfg.models)} checkpoint(s), {size / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["prepare"]:
            config_lib.run_cli(PrepareConfig, prepare, summary=prepare.__doc__, argv=argv[1:])
        else:
            config_lib.run_cli(BenchConfig, lambda cfg: run(cfg) and None,
                               summary=__doc__.strip().splitlines()[0], argv=argv)
    except (ValueError, OSError, RuntimeError) as e:  # DeviceError, missing data, a bad option: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
