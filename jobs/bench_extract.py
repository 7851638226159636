"""Benchmark: the extraction pipeline (``run_extract`` on Ray Data) against a plain PyTorch loop.

    python jobs/bench_extract.py                                   # CPU: png (cifar_resnet20), proxy, pngproxy
    python jobs/bench_extract.py --device cuda --modes png,jpeg --models cifar_resnet20,cifar_resnet56
    python jobs/bench_extract.py prepare --dest runs/bench_device  # data for a GPU box (README, "GPU measurement")

Every case runs both sides on a small and a full run of the same data, ``--repeats`` times, interleaved
and in alternating order (after one untimed run of each side), so that drift on a shared machine hits
both alike; ``steady`` is the marginal rate between the two sizes, so that the fixed costs cancel out
(:mod:`dtd_ray.ray.benchmark`). README, "Extraction speed", describes the modes, the plain loops and
every figure; the JSON (``results/gpu/bench_extract_<device>.json``, rewritten after every case) holds
them all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Annotated, Any

from pydantic import Field

from dtd_ray import cli
from dtd_ray import config as config_lib
from dtd_ray.models.extractor import FeatureExtractor
from dtd_ray.ray import benchmark as bm
from dtd_ray.ray import plain_loops

CKPT = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet32": "resnet32-d509ac18.th",
        "cifar_resnet44": "resnet44-014dd654.th", "cifar_resnet56": "resnet56-4bfd9763.th"}
MODES, DEVICES = ("png", "jpeg", "proxy", "pngproxy"), ("auto", "cpu", "cuda")
TINY, TINY_RGB = "bench_tiny", "bench_tiny_rgb"  # the proxies' near-free models: Fashion-MNIST's, CIFAR-10's
PROXIES = ("proxy", "pngproxy")  # GPU-scaled runs: a near-free model, a GPU run's batch and rows per file
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@config_lib.config_class
class BenchConfig:
    data: Annotated[str, Field(description="folder with cifar10/<split>/<class>/*.png and cifar_resnets/*.th (png, jpeg, pngproxy modes)")] = "../shared/data"
    modes: Annotated[tuple[str, ...], Field(description="benchmarks to run: png, jpeg, proxy, pngproxy")] = ("png", "proxy", "pngproxy")
    models: Annotated[tuple[str, ...], Field(description="png mode's models (cifar_resnet20/32/44/56)")] = ("cifar_resnet20",)
    device: Annotated[str, Field(description="auto (CUDA where torch sees it), cpu or cuda (without CUDA: a one-line error, exit 2)")] = "auto"
    repeats: Annotated[int, Field(description="repeats of each case (each: both sides, a small and a full run; medians are reported)")] = 3
    split: Annotated[str, Field(description="split of <data>/cifar10 to read")] = "test"
    images: Annotated[int, Field(description="this many of the split's images, evenly over the classes, before replicas (0: all; png, jpeg and pngproxy modes)")] = 0
    replicas: Annotated[int, Field(description="png and jpeg modes: every image hard-linked this many times into a temporary folder")] = 1
    batch_size: Annotated[int | None, Field(description="None: 1024 for the proxies; png 1024 on CUDA, 256 on the CPU; jpeg 256")] = None
    kmax: Annotated[int, Field(description="ranked top-k per instance, both sides")] = 64
    workers: Annotated[int | None, Field(description="plain loop's DataLoader workers (None: all cores but one; pngproxy: all cores)")] = None
    jpeg_model: Annotated[str, Field(description="jpeg mode's model (a torchvision backbone at 224 px; random init)")] = "resnet50"
    jpeg_images: Annotated[int, Field(description="jpeg mode: synthetic JPEGs made (from that many PNGs), before replicas")] = 2000
    jpeg_quality: Annotated[int, Field(description="JPEG quality of the synthetic images")] = 90
    jpeg_replicas: Annotated[int | None, Field(description="jpeg mode's replicas (None: --replicas)")] = None
    proxy_data: Annotated[str, Field(description="proxy mode's array source: fashion-mnist[:PATH]")] = "fashion-mnist"
    proxy_splits: Annotated[tuple[str, ...], Field(description="proxy mode's small and full runs (10,000 and 60,000 images, before replicas)")] = ("test", "train")
    proxy_replicas: Annotated[int, Field(description="proxy mode: both splits repeated this many times (an IDX copy in --tmp): 50,000 and 300,000 images")] = 5
    pngproxy_replicas: Annotated[int, Field(description="pngproxy mode: every PNG hard-linked this many times (CIFAR-10 test: 10,000 x 24 = 240,000 images, and half: the small run must outlast the model actor's start, or it is decoded whole meanwhile)")] = 24
    tmp: Annotated[str | None, Field(description="where the temporary image folders and records go (None: runs/ here, beside the data's filesystem)")] = None
    output: Annotated[str | None, Field(description="JSON path (None: results/gpu/bench_extract_<device>.json; '' writes none)")] = None
    verbose: Annotated[bool, Field(description="print Ray Data's ds.stats() and the pipeline's own progress lines")] = False

    def __post_init__(self) -> None:
        if "proxy" in self.modes and len(self.proxy_splits) != 2:
            raise ValueError(f"proxy_splits: need two splits (the small run's, the full run's), "
                             f"got {self.proxy_splits}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes: unknown {', '.join(bad) or '(none given)'}; valid: {', '.join(MODES)}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        unknown = [m for m in self.models if m not in CKPT]
        if "png" in self.modes and (unknown or not self.models):
            raise ValueError(f"models: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(CKPT)}")
        for name, low in (("repeats", 1), ("replicas", 1), ("kmax", 1), ("jpeg_images", 1), ("proxy_replicas", 1),
                          ("pngproxy_replicas", 1),
                          ("jpeg_replicas", 1), ("batch_size", 1), ("images", 0), ("workers", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}{' (0: all)' if name == 'images' else ''}, got {value}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")


@config_lib.config_class
class PrepareConfig:
    data: Annotated[str, Field(description="folder with cifar10/<split>/<class>/*.png and cifar_resnets/*.th")] = "../shared/data"
    dest: Annotated[str, Field(description="written here: cifar10/<split>/<class>/*.png (copies) and cifar_resnets/")] = "runs/bench_device"
    split: Annotated[str, Field(description="split to copy")] = "test"
    per_class: Annotated[int, Field(description="images copied per class (500: 11 MB of PNGs, which fits a device call with .devray/)")] = 500
    models: Annotated[tuple[str, ...], Field(description="checkpoints to copy")] = ("cifar_resnet20", "cifar_resnet56")

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in CKPT]
        if unknown:
            raise ValueError(f"models: unknown {', '.join(unknown)}; valid: {', '.join(CKPT)}")
        if self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")


class DeviceError(RuntimeError):
    """The asked-for device is not there (one line, exit status 2)."""


def resolve_device(*, device: str, cuda_available: bool) -> str:
    if device == "cuda" and not cuda_available:
        raise DeviceError("--device cuda but torch sees no CUDA device here (use --device auto or cpu)")
    return ("cuda" if cuda_available else "cpu") if device == "auto" else device


def default_batch_size(*, mode: str, device: str) -> int:
    # The proxies stand in for a GPU run: its batch on any device, and (run_case) its rows per file and one thread.
    return 1024 if mode in PROXIES or (device == "cuda" and mode == "png") else 256


def default_workers(*, cpu_count: int, mode: str = "png") -> int:  # pngproxy: decoding is all there is to do
    return cpu_count if mode == "pngproxy" else max(1, cpu_count - 1)


def default_output(*, device_slug: str) -> str:
    return os.path.join(ROOT, "results", "gpu", f"bench_extract_{device_slug}.json")


def device_slug(*, device: str, name: str) -> str:
    """``cpu``, or the GPU's name as a file-name word (``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3``)."""
    return "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "cuda"


# ----------------------------------------------------------------------------- the cases


def register_tiny() -> None:
    """Register the proxies' near-free models here (once): ``bench_tiny`` (Fashion-MNIST) and ``bench_tiny_rgb``
    (CIFAR-10), a 1x1 conv, 8x8 average pooling to 64 features and a 64->10 head, random init: the registry's
    smallest backbone (cifar_resnet8) would hide the plumbing that the proxies measure."""
    import functools

    from torch import nn

    from dtd_ray.data.preprocessing import NORMALIZATIONS, Preprocessing
    from dtd_ray.models.backbones import register_backbone

    def build(*, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 1, 1, bias=False), nn.AdaptiveAvgPool2d(8), nn.Flatten(),
                             nn.Linear(64, num_classes))

    for name, data, size, channels in ((TINY, "fashion-mnist", 28, 1), (TINY_RGB, "cifar10", 32, 3)):
        mean, std = NORMALIZATIONS[data]
        with contextlib.suppress(ValueError):  # registered already: an earlier case, or an actor's reused process
            register_backbone(name, builder=functools.partial(build, in_channels=channels),
                              description=f"bench_extract's proxy model for {data} (1x1 conv, 8x8 pool, linear)",
                              preprocessing=Preprocessing(mean=mean, std=std, size=size, channels=channels))


class TinyExtractor(FeatureExtractor):
    """The proxies' model stage: the project's callable, after registering the tiny models in the actor."""

    def __init__(self, **kwargs: Any) -> None:
        register_tiny()
        super().__init__(**kwargs)


def run_case(*, mode: str, model: str, cfg: BenchConfig, device: str, sizes: dict[str, dict[str, Any]],
             weights: str | None, batch_size: int, workers: int, tmp: str, warm_up: bool) -> dict[str, Any]:
    """Both sides on both sizes (an image folder or a proxy split each), ``cfg.repeats`` times, interleaved;
    the case's record. ``warm_up``: one untimed run of each side first (Ray's first tasks start its worker
    processes, the plain loop's first run imports torchvision's datasets: a cold run skews the first repeat)."""
    from dtd_ray.ray.extract import GPU_ROWS_PER_FILE, ExtractConfig

    def one(side: str, size: dict[str, Any]) -> dict[str, Any]:
        out_dir = tempfile.mkdtemp(prefix="out_", dir=tmp)
        try:
            ecfg = ExtractConfig(model=model, weights=weights, splits=(size["split"],), output=out_dir, kmax=cfg.kmax,
                                 dataset=size["source"] if mode == "proxy" else f"imagefolder:{size['root']}",
                                 batch_size=batch_size, use_gpu=device == "cuda",
                                 **({"rows_per_file": GPU_ROWS_PER_FILE, "cpu_threads": 1} if mode in PROXIES else {}))
            if side == "ray":
                return bm.ray_run(ecfg, verbose=cfg.verbose, model_stage=TinyExtractor if mode in PROXIES else None)
            if mode == "proxy":
                return plain_loops.plain_proxy(spec=size["source"], split=size["split"], model=TINY, device=device,
                                               batch_size=batch_size, kmax=cfg.kmax, rows_per_file=GPU_ROWS_PER_FILE,
                                               out_dir=os.path.join(out_dir, "plain"))
            root = os.path.join(size["root"], size["split"])
            if mode == "pngproxy":
                return plain_loops.plain_pngproxy(root=root, model=TINY_RGB, device=device, batch_size=batch_size,
                                                  kmax=cfg.kmax, workers=workers, rows_per_file=GPU_ROWS_PER_FILE,
                                                  out_dir=os.path.join(out_dir, "plain"))
            return plain_loops.plain_folder(root=root, model=model, weights=weights, device=device,
                                            batch_size=batch_size, kmax=cfg.kmax, workers=workers)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    t_case = time.perf_counter()
    for side in ("plain", "ray") if warm_up else ():
        one(side, sizes.get("warm", sizes["small"]))
    warmup_s = round(time.perf_counter() - t_case, 1)
    if warm_up:
        print(f"[bench] {mode} {model}: warmed up in {warmup_s:.1f} s", flush=True)
    repeats, stats_text, fmt = [], "", bm.fmt
    for r in range(cfg.repeats):
        load0, runs = round(os.getloadavg()[0], 2), {}
        # interleaved, the order reversed every other repeat: drift on a shared machine hits both sides alike
        order = [(side, size) for size in ("small", "full") for side in ("plain", "ray")]
        for side, size in order if r % 2 == 0 else order[::-1]:
            runs[side, size] = one(side, sizes[size])
        small, full = runs["ray", "small"], runs["ray", "full"]
        stages, stats_text = full.pop("stages"), full.pop("stats_text")
        del small["stages"], small["stats_text"]
        rep = {side: bm.side_figures(small=runs[side, "small"], full=runs[side, "full"]) for side in ("plain", "ray")}
        rep.update(stages=stages, load=[load0, round(os.getloadavg()[0], 2)],
                   ratio=bm.ratio(rep["ray"]["steady_img_s"], rep["plain"]["steady_img_s"]),
                   ratio_e2e=bm.ratio(rep["ray"]["e2e_img_s"], rep["plain"]["e2e_img_s"]))
        share = rep["decode_cpu_share"] = bm.decode_share(stages)
        repeats.append(rep)
        print(f"[bench] {mode} {model} repeat {r + 1}/{cfg.repeats} (load {load0:.2f} -> {rep['load'][1]:.2f}):\n"
              f"  {bm.side_line('plain', rep['plain'])}\n  {bm.side_line('ray  ', rep['ray'])}\n"
              f"        CPU per image by process (us, marginal): {bm.kinds_line(rep)}\n"
              f"        ray: run_extract's own {fmt(full['pipeline_img_s'])} img/s, decoded ahead of the first model "
              f"output {fmt(small['ahead_rows'], ',')} / {fmt(full['ahead_rows'], ',')} rows (decoding: "
              f"{fmt(None if share is None else 100 * share, '.0f')} % of its CPU), write tail "
              f"{fmt(full['write_tail_s'], '.2f')} s; ratio {fmt(rep['ratio'], '.2f')} "
              f"(e2e {fmt(rep['ratio_e2e'], '.2f')})", flush=True)
        if (small.get("ahead_frac") or 0) >= 0.9 and (share or 0) >= 0.2:
            # Decoding done ahead is missing from the small run's time: the steady rate is overstated by up to
            # decoding's share of the work (on a CPU the model's work dwarfs it, so no warning there).
            print(f"  warning: the small run was decoded whole before the model's first output and decoding is "
                  f"{100 * share:.0f} % of the pipeline's CPU time: the steady rate is overstated; give it more "
                  f"rows (--replicas), or read e2e", flush=True)
        if cfg.verbose:
            print(stats_text, flush=True)
    print(f"  per-stage rates of the pipeline (full run of repeat {cfg.repeats}; seconds after run_extract was "
          f"called):\n" + "\n".join(f"    {line}" for line in bm.stage_lines(repeats[-1]["stages"])))
    m = bm.summarise(repeats)
    print(f"  median of {cfg.repeats}: plain {fmt(m['plain_steady_img_s'])} img/s, ray {fmt(m['ray_steady_img_s'])} "
          f"img/s, ratio {fmt(m['ratio'], '.2f')} (e2e {fmt(m['ratio_e2e'], '.2f')}, CPU per image plain / ray "
          f"{fmt(m['cpu_ratio'], '.2f')}); time to first row: plain {fmt(m['plain_startup_s'], '.2f')} s, ray "
          f"{fmt(m['ray_startup_s'], '.2f')} s; CPU per image by process (us): "
          f"{bm.kinds_line({side: {'cpu_us_by_kind': m[f'{side}_cpu_us_by_kind']} for side in ('plain', 'ray')})}\n",
          flush=True)
    return {"mode": mode, "model": model, "images": sizes["full"]["images"], "images_small": sizes["small"]["images"],
            "batch_size": batch_size, "workers": workers, "device": device, "warmup_s": warmup_s,
            "data": {k: v for k, v in sizes["full"].items() if k != "root"}, "repeats": repeats, "median": m,
            "seconds": round(time.perf_counter() - t_case, 1), "ray_stats_text": stats_text}


def image_folders(*, cfg: BenchConfig, mode: str, items: list[tuple[str, str]], batch_size: int, tmp: str,
                  processes: int) -> dict[str, dict[str, Any]]:
    """The png or jpeg mode's folders: ``warm`` (two batches, for the warm-up), ``small`` (half) and ``full``."""
    t, src, extra, what = time.perf_counter(), items, {}, f"{len(items)} PNGs"
    if mode == "jpeg":
        jp = bm.make_jpeg_folder(items, dest=os.path.join(tmp, "jpeg_src"), split=cfg.split, count=cfg.jpeg_images,
                                 quality=cfg.jpeg_quality, processes=processes)
        src = bm.list_images(root=os.path.join(jp["root"], cfg.split))
        extra = {"mean_bytes": jp["mean_bytes"], "sizes": jp["sizes"], "quality": cfg.jpeg_quality}
        what = f"{jp['images']} JPEGs (mean {jp['mean_bytes'] / 1000:.0f} kB)"
    reps = {"jpeg": cfg.jpeg_replicas or cfg.replicas, "pngproxy": cfg.pngproxy_replicas}.get(mode, cfg.replicas)
    subsets = (("warm", bm.pick_evenly(src, n=min(len(src), 2 * batch_size)), 1),
               ("small", bm.pick_evenly(src, n=len(src) // 2), reps), ("full", src, reps))
    out = {size: bm.make_replica_folder(sub, dest=os.path.join(tmp, f"{mode}_{size}"), split=cfg.split, replicas=r)
           | extra for size, sub, r in subsets}
    print(f"[bench] {mode}: {what} x {reps} = {out['full']['images']:,} images, and half of them "
          f"({out['full']['link']}s, made in {time.perf_counter() - t:.1f} s)", flush=True)
    return out


def run(cfg: BenchConfig) -> dict[str, Any]:
    import PIL
    import ray
    import torch

    from dtd_ray.data.sources import parse_source
    from dtd_ray.ray import session

    device = resolve_device(device=cfg.device, cuda_available=torch.cuda.is_available())
    started_at, t_start, ncpu = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter(), os.cpu_count()
    workers = default_workers(cpu_count=ncpu) if cfg.workers is None else cfg.workers
    # Inputs are checked before Ray starts: a missing folder is one line, not a stack of Ray output.
    items = []
    if {"png", "jpeg", "pngproxy"} & set(cfg.modes):
        n = cfg.images
        items = bm.pick_evenly(bm.list_images(root=os.path.join(cfg.data, "cifar10", cfg.split)), n=n)
    for m in cfg.models if "png" in cfg.modes else ():
        if not os.path.isfile(os.path.join(cfg.data, "cifar_resnets", CKPT[m])):
            raise FileNotFoundError(f"{os.path.join(cfg.data, 'cifar_resnets', CKPT[m])} not found ({m}'s weights)")
    if set(PROXIES) & set(cfg.modes):
        register_tiny()  # in the driver (run_extract checks the model here); TinyExtractor registers it in the actors
        if __name__ != "__main__":  # imported: the workers cannot import this file, so TinyExtractor goes by value
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if "proxy" in cfg.modes:
        missing = [s for s in cfg.proxy_splits if s not in parse_source(cfg.proxy_data).splits()]
        if missing:
            raise ValueError(f"proxy_splits: {', '.join(missing)} not in {cfg.proxy_data}; "
                             f"valid: {', '.join(parse_source(cfg.proxy_data).splits())}")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    machine = {"device": gpu or f"CPU: {bm.cpu_model()}", "device_type": device, "gpu": gpu,
               "cpu_model": bm.cpu_model(), "cpu_count": ncpu, "cuda": torch.version.cuda if gpu else None,
               "load_start": list(os.getloadavg())}
    versions = {**config_lib.versions(), "torch": torch.__version__, "ray": ray.__version__, "pillow": PIL.__version__}
    out_path = default_output(device_slug=device_slug(device=device, name=machine["device"])) \
        if cfg.output is None else cfg.output
    print(f"[bench] {machine['device']}, {ncpu} CPUs, load {machine['load_start'][0]:.2f}; modes "
          f"{','.join(cfg.modes)}; {cfg.repeats} repeats", flush=True)
    logging.getLogger("dtd_ray.ray.extract").setLevel(logging.ERROR)  # resnet50's 1000 classes vs 10: expected
    cases: list[dict[str, Any]] = []

    def save(complete: bool) -> dict[str, Any]:
        """The record so far, written after every case (a run cut short keeps its finished cases)."""
        machine["load_end"] = list(os.getloadavg())
        rec = bm.record(cfg=config_lib.to_dict(cfg), argv=sys.argv[1:], machine=machine, versions=versions,
                        cases=cases, started_at=started_at, seconds=time.perf_counter() - t_start)
        rec["complete"] = complete
        if out_path:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            with open(out_path + ".tmp", "w") as f:
                json.dump(rec, f, indent=1)
            os.replace(out_path + ".tmp", out_path)
        return rec

    os.makedirs(tmp_root := cfg.tmp or os.path.join(ROOT, "runs"), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench_extract_", dir=tmp_root)
    try:
        # The image folders first, before Ray starts (the JPEGs are made by forked processes).
        folders = {mode: image_folders(cfg=cfg, mode=mode, items=items, tmp=tmp, processes=ncpu,
                                       batch_size=cfg.batch_size or default_batch_size(mode=mode, device=device))
                   for mode in cfg.modes if mode != "proxy"}
        t = time.perf_counter()
        with session.start(verbose=cfg.verbose):
            machine.update(ray_start_s=round(time.perf_counter() - t, 2), **bm.ray_resources())
            print(f"[bench] Ray started in {machine['ray_start_s']:.1f} s: {machine['ray_cpus']:g} CPUs, "
                  f"{machine['ray_gpus']:g} GPUs, object store {machine['ray_object_store_gib']} GiB "
                  f"(/dev/shm {machine['dev_shm_gib']} GiB)", flush=True)
            for mode in cfg.modes:
                bs = cfg.batch_size or default_batch_size(mode=mode, device=device)
                if mode == "proxy":
                    spec = cfg.proxy_data if cfg.proxy_replicas == 1 else bm.make_proxy_replica(
                        cfg.proxy_data, dest=os.path.join(tmp, "proxy_data"), splits=cfg.proxy_splits,
                        replicas=cfg.proxy_replicas)
                    sizes = {size: {"source": spec, "split": split, "images": parse_source(spec).num_rows(split)}
                             for size, split in zip(("small", "full"), cfg.proxy_splits)}
                    print(f"[bench] proxy: {cfg.proxy_data} x {cfg.proxy_replicas}: {cfg.proxy_splits[0]} "
                          f"({sizes['small']['images']:,}) and {cfg.proxy_splits[1]} ({sizes['full']['images']:,}), "
                          f"pre-decoded arrays, model {TINY}, batch {bs}; both sides prepare_batch + "
                          f"FeatureExtractor + write_part", flush=True)
                    todo = [(TINY, None, sizes, 0)]
                elif mode == "pngproxy":
                    w = cfg.workers if cfg.workers is not None else default_workers(cpu_count=ncpu, mode=mode)
                    print(f"[bench] pngproxy: PNGs decoded (plain: {w} DataLoader workers), model {TINY_RGB}, batch {bs}",
                          flush=True)
                    todo = [(TINY_RGB, None, folders[mode], w)]
                else:
                    print(f"[bench] {mode}: batch {bs}; the plain loop decodes with {workers} worker(s)", flush=True)
                    todo = [(m, os.path.join(cfg.data, "cifar_resnets", CKPT[m]) if mode == "png" else None,
                             folders[mode], workers) for m in (cfg.models if mode == "png" else (cfg.jpeg_model,))]
                for model, weights, sizes, w in todo:
                    cases.append(run_case(mode=mode, model=model, cfg=cfg, device=device, sizes=sizes, weights=weights,
                                          batch_size=bs, workers=w, tmp=tmp, warm_up=not cases))
                    save(complete=False)
                for s in folders.pop(mode, {}).values():
                    shutil.rmtree(s["root"], ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec = save(complete=True)
    print("\n".join(bm.summary_lines(rec["summary"])))
    print(f"(medians of {cfg.repeats}; ratio = ray / plain of the steady rates, e2e = of the end-to-end rates, "
          f"cpu = plain / ray of the CPU time per image; {machine['device']}, {ncpu} CPUs, load "
          f"{machine['load_start'][0]:.2f} at the start, {machine['load_end'][0]:.2f} at the end)")
    if out_path:
        print(f"[bench] wrote {out_path}")
    return rec


def prepare(cfg: PrepareConfig) -> None:
    """Copy a class-balanced subset of the PNGs and the checkpoints into ``dest`` (for a GPU box)."""
    copied: dict[str, int] = {}
    for cls, path in bm.list_images(root=os.path.join(cfg.data, "cifar10", cfg.split)):
        if copied.setdefault(cls, 0) < cfg.per_class:  # the first per_class images of each class, sorted
            os.makedirs(d := os.path.join(cfg.dest, "cifar10", cfg.split, cls), exist_ok=True)
            shutil.copyfile(path, os.path.join(d, os.path.basename(path)))
            copied[cls] += 1
    os.makedirs(os.path.join(cfg.dest, "cifar_resnets"), exist_ok=True)
    for m in cfg.models:
        shutil.copyfile(os.path.join(cfg.data, "cifar_resnets", CKPT[m]),
                        os.path.join(cfg.dest, "cifar_resnets", CKPT[m]))
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cfg.dest) for f in fs)
    print(f"[bench] {cfg.dest}: {sum(copied.values())} PNGs of {cfg.split} and {len(cfg.models)} checkpoint(s), "
          f"{size / 2**20:.1f} MiB")


COMMANDS = {None: cli.Command(summary=__doc__.splitlines()[0], help=__doc__.split("\n", 1)[1].strip("\n"),
                              config=BenchConfig, run=lambda cfg: run(cfg) and None),
            "prepare": cli.Command(summary=prepare.__doc__, config=PrepareConfig, run=prepare)}

if __name__ == "__main__":
    cli.main(COMMANDS)
