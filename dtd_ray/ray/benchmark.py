"""What ``jobs/bench_extract.py`` measures with: its inputs, the pipeline's side and the figures.

Sides: :func:`ray_run` (``run_extract`` timed, with its per-stage stats and the CPU of every process of
the Ray session) and the plain loops it is compared with (:mod:`dtd_ray.ray.plain_loops`: a strong
PyTorch loop over an image folder, and the proxies' loops of the pipeline's own functions).

Inputs: image folders picked evenly over the classes, replicated by hard links (so that a fast device
gets enough rows while the files stay few and in the page cache), synthetic ImageNet-like JPEGs, and a
replicated Fashion-MNIST copy for the array proxy.

Figures: each side of a comparison (the pipeline, a plain loop) runs on a small and a full size of the
same data. Its ``steady`` rate is the marginal one, (rows_full - rows_small) / (seconds_full -
seconds_small), so that every fixed cost (planning, starting workers and actors, loading the model,
the commit) and the work a pipeline does ahead while it starts cancel out, as long as the small run
holds more rows than that work ahead. Over repeats, the ratios are medians of paired per-repeat ratios.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtd_ray.ray.pipeline_stats import OperatorStats

IMAGE_EXT = (".png", ".jpg", ".jpeg")
JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300))  # ImageNet-typical


# ----------------------------------------------------------------------------- inputs


def is_image(name: str) -> bool:
    """Whether a file name is one the image-folder source lists (torchvision's default takes hidden ones too)."""
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXT)


def list_images(*, root: str) -> list[tuple[str, str]]:
    """``(class, path)`` of every image under ``root/<class>/``, sorted (hidden names skipped)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} not found (expected <data>/cifar10/<split>/<class>/<image>)")
    out = [(c, os.path.join(root, c, f)) for c in sorted(os.listdir(root))
           if not c.startswith(".") and os.path.isdir(os.path.join(root, c))
           for f in sorted(os.listdir(os.path.join(root, c))) if is_image(f)]
    if not out:
        raise FileNotFoundError(f"{root} holds no images in class folders")
    return out


def pick_evenly(items: list[tuple[str, str]], *, n: int) -> list[tuple[str, str]]:
    """The first ``n`` items taken round-robin over the classes, sorted (all of them for ``n`` 0 or larger)."""
    if n <= 0 or n >= len(items):
        return list(items)
    by_class: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        by_class.setdefault(item[0], []).append(item)
    rounds = [by_class[c][i] for i in range(max(map(len, by_class.values()))) for c in sorted(by_class)
              if i < len(by_class[c])]
    return sorted(rounds[:n])


def make_replica_folder(items: list[tuple[str, str]], *, dest: str, split: str, replicas: int) -> dict[str, Any]:
    """An image folder ``dest/<split>/<class>/<stem>_r<k><ext>`` holding every item ``replicas`` times: hard
    links (no bytes copied, one page-cache copy), else symbolic links, else copies (``link`` says which)."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    methods = [("hardlink", os.link), ("symlink", lambda s, d: os.symlink(os.path.abspath(s), d)),
               ("copy", shutil.copyfile)]
    for cls, path in items:
        os.makedirs(os.path.join(dest, split, cls), exist_ok=True)
        stem, ext = os.path.splitext(os.path.basename(path))
        for k in range(replicas):
            while True:
                try:
                    methods[0][1](path, os.path.join(dest, split, cls, f"{stem}_r{k}{ext}"))
                    break
                except OSError:
                    if len(methods) == 1:
                        raise
                    methods.pop(0)  # refused (another filesystem): the next method, for this and every later file
    return {"root": dest, "split": split, "files": len(items), "images": len(items) * replicas, "link": methods[0][0]}


def _synth_jpeg(args: tuple[str, str, int, int, int]) -> int:
    import numpy as np
    from PIL import Image

    src, dst, index, quality, seed = args
    w, h = JPEG_SIZES[index % len(JPEG_SIZES)]
    img = Image.open(src).convert("RGB").resize((w, h), Image.BICUBIC)
    # An upscaled 32-px image alone compresses ~10x better (and decodes faster) than a photograph of the
    # same size; seeded noise gives it a photograph's bytes.
    noise = np.random.default_rng([seed, index]).normal(0.0, 28.0, (h, w, 1)).astype(np.int16)
    Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)).save(
        dst, "JPEG", quality=quality)
    return os.path.getsize(dst)


def make_jpeg_folder(items: list[tuple[str, str]], *, dest: str, split: str, count: int, quality: int,
                     seed: int = 0, processes: int = 1) -> dict[str, Any]:
    """``count`` synthetic ImageNet-like JPEGs ``dest/<split>/<class>/<stem>_<i>.jpg``: the ``items`` in
    order (cycling) upscaled to :data:`JPEG_SIZES` (bicubic) with seeded noise; ``mean_bytes`` their size."""
    jobs = []
    for i in range(count):
        cls, src = items[i % len(items)]
        os.makedirs(os.path.join(dest, split, cls), exist_ok=True)
        stem = os.path.splitext(os.path.basename(src))[0]
        jobs.append((src, os.path.join(dest, split, cls, f"{stem}_{i:06d}.jpg"), i, quality, seed))
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_synth_jpeg, jobs, chunksize=16)
    else:
        sizes = [_synth_jpeg(j) for j in jobs]
    return {"root": dest, "split": split, "images": count, "mean_bytes": round(statistics.fmean(sizes)),
            "sizes": [f"{w}x{h}" for w, h in JPEG_SIZES]}


def make_proxy_replica(spec: str, *, dest: str, splits: tuple[str, ...], replicas: int) -> str:
    """A Fashion-MNIST copy in ``dest`` (uncompressed IDX files, which the source reads like the .gz ones)
    whose ``splits`` hold every image ``replicas`` times, in order; returns its spec ``fashion-mnist:<dest>``.
    A split not in ``splits`` gets one blank image (the source wants all four files)."""
    import numpy as np

    from dtd_ray.data.sources import parse_source

    source = parse_source(spec)
    if source.kind != "fashion-mnist":
        raise ValueError(f"proxy_replicas > 1 needs a fashion-mnist source, got {spec}")
    os.makedirs(dest, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        cols = source.read_numpy(split) if split in splits else None
        images = np.tile(cols["image"][..., 0], (replicas, 1, 1)) if cols else np.zeros((1, 28, 28), np.uint8)
        labels = np.tile(cols["label"].astype(np.uint8), replicas) if cols else np.zeros(1, np.uint8)
        for arr, kind, magic in ((images, "images-idx3", 0x803), (labels, "labels-idx1", 0x801)):
            with open(os.path.join(dest, f"{prefix}-{kind}-ubyte"), "wb") as f:  # magic, big-endian dims, bytes
                f.write(magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape))
                f.write(arr.tobytes())
    return f"fashion-mnist:{dest}"


# ----------------------------------------------------------------------------- figures


def run_figures(*, rows: int, seconds: float, t_first: float | None, first_rows: int,
                cpu_s: float | None = None, cpu_by_kind: dict[str, float] | None = None) -> dict[str, Any]:
    """One run of one side: ``rows`` in ``seconds`` (everything), its first output ``t_first`` s after the
    start, ``cpu_s`` CPU seconds, ``cpu_by_kind`` those per kind of process (a plain loop's ``main`` and
    ``loader`` workers; the pipeline's :data:`dtd_ray.ray.procstats.KINDS`). ``after_first_img_s``, the rate
    after the first output, counts the work done ahead during the start-up as speed (overstated where a
    pipeline decodes while its model starts)."""
    window = seconds - t_first if t_first is not None else 0.0
    return {"rows": int(rows), "seconds": round(seconds, 3), "cpu_s": None if cpu_s is None else round(cpu_s, 3),
            "cpu_by_kind": None if cpu_by_kind is None else {k: round(v, 3) for k, v in cpu_by_kind.items()},
            "startup_s": None if t_first is None else round(t_first, 3),
            "e2e_img_s": round(rows / seconds, 1) if seconds > 0 else None,
            "after_first_img_s": round((rows - first_rows) / window, 1) if window > 0 and rows > first_rows else None}


def side_figures(*, small: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """A side's figures from its small and full :func:`run_figures`: the steady (marginal) rate, the marginal
    CPU time per image (which a shared machine disturbs much less than wall-clock rates), in total and per
    kind of process (``cpu_us_by_kind``, microseconds), ``fixed_s`` (what the steady rate leaves of the full
    run's time) and the full run's ``startup_s`` and rates."""
    dn, dt = full["rows"] - small["rows"], full["seconds"] - small["seconds"]
    steady = dn / dt if dn > 0 and dt > 0 else None  # no rate rather than a negative one where noise wins
    dc = full["cpu_s"] - small["cpu_s"] if None not in (full.get("cpu_s"), small.get("cpu_s")) else None
    kinds_small, kinds_full = small.get("cpu_by_kind") or {}, full.get("cpu_by_kind") or {}
    by_kind = {k: round(1e6 * (kinds_full[k] - kinds_small.get(k, 0.0)) / dn, 1) for k in kinds_full} if dn > 0 else {}
    return {"steady_img_s": round(steady, 1) if steady else None,
            "cpu_ms_per_img": round(1000 * dc / dn, 4) if dc is not None and dc > 0 and dn > 0 else None,
            "cpu_us_by_kind": by_kind,
            "startup_s": full["startup_s"],
            "fixed_s": round(full["seconds"] - full["rows"] / steady, 3) if steady else None,
            "e2e_img_s": full["e2e_img_s"], "after_first_img_s": full["after_first_img_s"],
            "small": small, "full": full}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, ``None`` where either is missing or zero."""
    return round(a / b, 3) if a and b else None


def median(values: list[float | None]) -> float | None:
    """The median of the values that are there (``None`` if none is)."""
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats (each ``{"plain": side_figures, "ray": side_figures, "stages": [...]}``).

    ``ratio``: the median of the paired per-repeat ratios ray / plain of the steady rates; ``ratio_e2e``: the
    same of the full runs' end-to-end rates; ``cpu_ratio``: plain / ray of the CPU time per image (above 1,
    the pipeline spends less CPU on an image); ``stage_rows_per_s``: each stage's median rate."""
    med: dict[str, Any] = {f"{side}_{key}": median([r[side].get(key) for r in repeats]) for side in ("plain", "ray")
                           for key in ("steady_img_s", "e2e_img_s", "startup_s", "fixed_s", "after_first_img_s",
                                       "cpu_ms_per_img")}
    ratios = [ratio(r["ray"]["steady_img_s"], r["plain"]["steady_img_s"]) for r in repeats]
    ratios_e2e = [ratio(r["ray"]["e2e_img_s"], r["plain"]["e2e_img_s"]) for r in repeats]
    med.update(ratio=median(ratios), ratio_e2e=median(ratios_e2e),
               ratio_of_medians=ratio(med["ray_steady_img_s"], med["plain_steady_img_s"]),
               cpu_ratio=median([ratio(r["plain"].get("cpu_ms_per_img"), r["ray"].get("cpu_ms_per_img"))
                                 for r in repeats]),
               ratios=ratios, ratios_e2e=ratios_e2e,
               ahead_small_max=max((r["ray"]["small"].get("ahead_frac") or 0.0 for r in repeats), default=0.0))
    for side in ("plain", "ray"):
        kinds = dict.fromkeys(k for r in repeats for k in r[side].get("cpu_us_by_kind") or {})
        med[f"{side}_cpu_us_by_kind"] = {k: median([(r[side].get("cpu_us_by_kind") or {}).get(k) for r in repeats])
                                         for k in kinds}
    by_stage: dict[str, list[float | None]] = {}
    for r in repeats:
        for s in r.get("stages") or []:
            by_stage.setdefault(s["stage"], []).append(s["rows_per_s"])
    med["stage_rows_per_s"] = {k: median(v) for k, v in by_stage.items()}
    return med


def record(*, cfg: dict[str, Any], argv: list[str], machine: dict[str, Any], versions: dict[str, str],
           cases: list[dict[str, Any]], started_at: str, seconds: float) -> dict[str, Any]:
    """The JSON ``jobs/bench_extract.py`` writes: what ran where, every case's figures and a summary of each."""
    keys = ("plain_steady_img_s", "ray_steady_img_s", "ratio", "ratio_e2e", "cpu_ratio", "plain_startup_s",
            "ray_startup_s")
    return {"bench": "jobs/bench_extract.py", "schema": 1, "started_at": started_at, "seconds": round(seconds, 1),
            "argv": argv, "config": cfg, "device": machine["device"], "device_type": machine["device_type"],
            "cpu_count": machine["cpu_count"], "machine": machine, "versions": versions, "cases": cases,
            "summary": [{"mode": c["mode"], "model": c["model"], "images": c["images"], "batch_size": c["batch_size"],
                         **{k: c["median"].get(k) for k in keys}} for c in cases]}


# ----------------------------------------------------------------------------- the pipeline's side


def ray_run(ecfg: Any, *, verbose: bool, model_stage: type | None = None) -> dict[str, Any]:
    """``run_extract(ecfg)`` timed: :func:`run_figures` (first output: the model stage's first file written) plus
    the stage table, ``ahead_rows`` (rows the decode stage had output by then; ``None`` where the model stage
    prepares its rows itself), ``write_tail_s`` (the model stage's last output to the last row read), the CPU
    per process kind and Ray Data's ``stats_text``."""
    from dtd_ray.ray import procstats
    from dtd_ray.ray.extract import run_extract

    parts: list[Any] = []
    t0, c0 = time.perf_counter(), procstats.cpu_seconds()
    with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()), procstats.TreeCPU() as tree:
        summary = run_extract(ecfg, model_stage=model_stage, on_stats=parts.append)
    seconds, driver_cpu = time.perf_counter() - t0, procstats.cpu_seconds() - c0
    if summary["skipped"]:
        raise RuntimeError(f"the pipeline skipped {summary['skipped']} inputs; the benchmark needs clean data")
    (st,) = parts  # one partition: one split, written afresh
    ops, stages = st.operators, stage_table(st.operators, t0=t0)
    i = next((k for k, op in enumerate(ops) if op.stage == "model"), None)
    model = stages[i] if i is not None else {}
    # Where the process table cannot be read: the driver's CPU and the task calls' alone.
    task_cpu = driver_cpu + sum(s["cpu_s"] for s in stages)
    out = run_figures(rows=summary["rows"], seconds=seconds, t_first=model.get("first_out_s"),
                      first_rows=model.get("first_out_rows", 0),
                      cpu_s=task_cpu if tree.seconds is None else tree.seconds, cpu_by_kind=tree.by_kind or None)
    # Rows decoded ahead: only where decoding is a stage of its own (decoded arrays are prepared in the model stage).
    decoding = i is not None and i > 0 and ops[i - 1].stage == "prepare" and ops[i].first_out_s is not None
    ahead = ops[i - 1].rows_done_by(ops[i].first_out_s) if decoding else None
    out.update(task_cpu_s=round(task_cpu, 3), pipeline_img_s=summary["images_per_s"],
               ahead_rows=ahead,
               ahead_frac=round(ahead / summary["rows"], 3) if ahead is not None and summary["rows"] else None,
               write_tail_s=round(st.ended_s - t0 - model["last_out_s"], 3) if model.get("last_out_s") else None,
               stages=stages, stats_text=st.text)
    return out


# ----------------------------------------------------------------------------- per-stage figures


# The pipeline's stages as the figures name them: the functions build_pipeline maps by default, so that a
# model stage of another class (the proxy's FeatureExtractor subclass) keeps the model stage's name. The
# model stage also writes the records (dtd_ray.models.extractor.writing_stage).
STAGE_LABELS = {"prepare": "prepare_batch", "model": "FeatureExtractor"}


def stage_table(operators: Sequence[OperatorStats], *, t0: float) -> list[dict[str, Any]]:
    """Per-stage figures of a pipeline's operators (:class:`dtd_ray.ray.pipeline_stats.OperatorStats`), in pipeline
    order, times in seconds after ``t0``. ``rows`` is what the stage consumed (the previous stage's output;
    its own for the first), ``rows_per_s`` that over its span (first task start to last task end),
    ``busy_s`` the summed task wall time (``busy_s / span_s``: its mean concurrency)."""
    out, prev_rows = [], None
    for op in operators:
        starts = [b.start_s for b in op.blocks if b.start_s is not None]
        ends = [b.end_s for b in op.blocks if b.end_s is not None]
        rows, first = (op.rows_out if prev_rows is None else prev_rows), op.first_out_s
        span = max(ends) - min(starts) if starts and ends else 0.0
        out.append({"stage": STAGE_LABELS.get(op.stage) or re.sub(r"^\w+\((.+)\)$", r"\1", op.name),
                    "rows": rows, "rows_out": op.rows_out, "blocks": len(op.blocks),
                    "tasks": len({b.task for b in op.blocks if b.end_s is not None}),  # a read's blocks: task None
                    "first_start_s": round(min(starts) - t0, 3) if starts else None,
                    "first_out_s": None if first is None else round(first - t0, 3),
                    "first_out_rows": sum(b.rows for b in op.blocks if first is not None and b.end_s == first),
                    "last_out_s": round(max(ends) - t0, 3) if ends else None, "span_s": round(span, 3),
                    "rows_per_s": round(rows / span, 1) if span > 0 else None,
                    "busy_s": round(sum(b.wall_s for b in op.blocks), 3),
                    "cpu_s": round(sum(b.cpu_s for b in op.blocks), 3)})
        prev_rows = op.rows_out
    return out


def decode_share(stages: list[dict[str, Any]]) -> float | None:
    """The share of the pipeline's task CPU time that the stage before the model's (decoding) took, from
    :func:`stage_table`: where it is large and a small run was decoded whole before the model's first
    output, the steady rate is overstated by up to that share."""
    names = [s["stage"] for s in stages]
    if "FeatureExtractor" not in names or names.index("FeatureExtractor") == 0:
        return None
    total = sum(s["cpu_s"] for s in stages)
    return round(stages[names.index("FeatureExtractor") - 1]["cpu_s"] / total, 3) if total > 0 else None


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------- text


def fmt(v: Any, spec: str = ",.0f") -> str:
    """``v`` formatted, ``-`` where it is missing."""
    return "-" if v is None else format(v, spec)


def side_line(tag: str, s: dict[str, Any]) -> str:
    """One side's figures of a repeat (:func:`side_figures`) as one line."""
    sm, fu = s["small"], s["full"]
    return (f"{tag} {sm['rows']:,} in {sm['seconds']:.1f} s, {fu['rows']:,} in {fu['seconds']:.1f} s -> "
            f"{fmt(s['steady_img_s'])} img/s steady; first row {fmt(s['startup_s'], '.2f')} s, fixed "
            f"{fmt(s['fixed_s'], '.2f')} s; e2e {fmt(s['e2e_img_s'])} img/s; "
            f"CPU {fmt(s['cpu_ms_per_img'], '.2f')} ms/img")


def kinds_line(rep: dict[str, Any]) -> str:
    """Both sides' marginal CPU per image by kind of process (:func:`side_figures`' ``cpu_us_by_kind``) as one
    line: ``plain main 12.0, loader 0.0; ray driver 4.1, worker 17.4, …`` (kinds that took none left out)."""
    parts = []
    for side in ("plain", "ray"):
        kinds = rep[side].get("cpu_us_by_kind") or {}
        shown = [f"{k} {fmt(v, '.1f')}" for k, v in kinds.items() if v is None or v > 0 or k in ("main", "driver")]
        parts.append(f"{side} {', '.join(shown) or '-'}")
    return "; ".join(parts)


def stage_lines(stages: list[dict[str, Any]]) -> list[str]:
    """:func:`stage_table` as a table: a header and one line per stage."""
    out = [f"{'stage':<18}{'rows':>8}{'tasks':>7}{'1st out s':>11}{'span s':>9}{'rows/s':>10}{'busy s':>9}{'cpu s':>8}"]
    out += [f"{s['stage'][:17]:<18}{s['rows']:>8}{s['tasks']:>7}{fmt(s['first_out_s'], '.2f'):>11}{s['span_s']:>9.2f}"
            f"{fmt(s['rows_per_s']):>10}{s['busy_s']:>9.2f}{s['cpu_s']:>8.2f}" for s in stages]
    return out


def summary_lines(summary: list[dict[str, Any]]) -> list[str]:
    """The summary of :func:`record` as a table: a header and one line per case."""
    out = [f"{'mode':<9}{'model':<16}{'images':>8}{'plain img/s':>13}{'ray img/s':>11}{'ratio':>7}{'e2e':>6}{'cpu':>6}"
           f"{'first row plain/ray s':>23}"]
    out += [f"{s['mode']:<9}{s['model']:<16}{s['images']:>8}{fmt(s['plain_steady_img_s']):>13}"
            f"{fmt(s['ray_steady_img_s']):>11}{fmt(s['ratio'], '.2f'):>7}{fmt(s['ratio_e2e'], '.2f'):>6}"
            f"{fmt(s['cpu_ratio'], '.2f'):>6}{fmt(s['plain_startup_s'], '.1f'):>14} / {fmt(s['ray_startup_s'], '.1f')}"
            for s in summary]
    return out


def ray_resources() -> dict[str, Any]:
    """What the running Ray sees (CPUs, GPUs, object store) and the size of /dev/shm, where its object
    store lives (a small one on a container makes Ray spill to disk)."""
    import ray

    res = ray.cluster_resources()
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    return {"ray_cpus": res.get("CPU"), "ray_gpus": res.get("GPU", 0.0),
            "ray_object_store_gib": round(res.get("object_store_memory", 0.0) / 2**30, 2),
            "dev_shm_gib": round(shm.f_frsize * shm.f_blocks / 2**30, 2) if shm else None}
