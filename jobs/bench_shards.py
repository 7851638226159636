"""Benchmark: extraction from packed shards (``parquet:``) against the same images as a folder.

    python -m jobs.bench_shards                  # from the project's root: local disk and the S3 test server
    python jobs/bench_shards.py --stores local --repeats 5

Both sources hold the same PNGs: the first Fashion-MNIST train images written as an image folder
with two splits (``small`` and ``full``), and that folder packed by ``jobs/pack.py``. Each store
(``local``: a temporary folder; ``s3``: moto's S3 server of the tests, ``tests/s3_server.py``,
started here) gets both. Each side runs ``run_extract`` with jobs/bench_extract.py's CPU proxy
model (a 1x1 conv: what is measured is reading, decoding and Ray Data, not a network) on both
splits, ``--repeats`` times, interleaved, the order reversed every other repeat. ``steady`` is the
marginal rate between the splits, so that the fixed costs (planning, actors, the commit) cancel
out; ``overhead_us`` is the median over repeats of the paired per-image difference
``1/steady_shards - 1/steady_folder`` (negative: the shards are faster). Writes ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated, Any

from pydantic import Field

from dtd_ray import cli
from dtd_ray import config as config_lib
from dtd_ray.ray import benchmark as bm

try:  # python jobs/bench_shards.py: jobs/ is on sys.path
    import bench_extract
except ImportError:  # python -m jobs.bench_shards, or imported by the tests
    from jobs import bench_extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORES = ("local", "s3")


@config_lib.config_class
class ShardBenchConfig:
    small: Annotated[int, Field(description="images of the small split (the first of Fashion-MNIST train)")] = 4000
    full: Annotated[int, Field(description="images of the full split (the next ones)")] = 16000
    rows_per_file: Annotated[int, Field(description="the pack's rows per shard (jobs/pack.py's default)")] = 1000
    batch_size: Annotated[int, Field(description="the model stage's batch (jobs/bench_extract.py's proxy: 1024)")] = 1024
    repeats: Annotated[int, Field(description="repeats of each store's four runs; medians are reported")] = 3
    stores: Annotated[tuple[str, ...], Field(description="local, s3 (the tests' moto server, started here)")] = STORES
    json: Annotated[str, Field(description="where the figures go")] = "results/bench/bench_shards_cpu.json"
    tmp: Annotated[str | None, Field(description="scratch folder (None: the system's)")] = None

    def __post_init__(self) -> None:
        bad = [s for s in self.stores if s not in STORES]
        if bad or not self.stores:
            raise ValueError(f"stores: {', '.join(bad) or '(none)'} not among {', '.join(STORES)}")
        if min(self.small, self.repeats, self.rows_per_file, self.batch_size) < 1 or self.full <= self.small:
            raise ValueError("small, repeats, rows_per_file and batch_size must be >= 1 and full > small")


def write_folder(dest: str, *, small: int, full: int) -> None:
    """``dest/{small,full}/<label>/<i>.png``: Fashion-MNIST train images 0..small-1 and small..small+full-1."""
    from PIL import Image

    from dtd_ray.data.sources import parse_source

    cols = parse_source("fashion-mnist").read_numpy("train")
    if small + full > len(cols["label"]):
        raise ValueError(f"small + full = {small + full} is more than Fashion-MNIST train's {len(cols['label'])}")
    for split, lo, hi in (("small", 0, small), ("full", small, small + full)):
        for i in range(lo, hi):
            d = os.path.join(dest, split, str(int(cols["label"][i])))
            os.makedirs(d, exist_ok=True)
            Image.fromarray(cols["image"][i][..., 0]).save(os.path.join(d, f"{i:06d}.png"))


def run_store(cfg: ShardBenchConfig, *, store: str, sources: dict[str, str], tmp: str) -> dict[str, Any]:
    from dtd_ray.ray.extract import ExtractConfig

    def one(kind: str, split: str) -> dict[str, Any]:
        out = tempfile.mkdtemp(prefix="out_", dir=tmp)
        try:
            ecfg = ExtractConfig(model=bench_extract.TINY, weights=None, dataset=sources[kind], splits=(split,), output=out, kmax=64,
                                 batch_size=cfg.batch_size, use_gpu=False)
            return bm.ray_run(ecfg, verbose=False, model_stage=bench_extract.TinyExtractor)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    for kind in sources:  # untimed: worker processes, imports, the page cache
        one(kind, "small")
    repeats = []
    for r in range(cfg.repeats):
        order = [(kind, split) for split in ("small", "full") for kind in ("folder", "shards")]
        load, runs = round(os.getloadavg()[0], 2), {}
        for kind, split in order if r % 2 == 0 else order[::-1]:
            runs[kind, split] = one(kind, split)
        sides = {k: bm.side_figures(small=runs[k, "small"], full=runs[k, "full"]) for k in ("folder", "shards")}
        f, s = sides["folder"]["steady_img_s"], sides["shards"]["steady_img_s"]
        over = round(1e6 / s - 1e6 / f, 1) if f and s else None
        repeats.append({"load1": load, "folder": sides["folder"], "shards": sides["shards"], "overhead_us": over})
        print(f"[bench] {store} repeat {r + 1}/{cfg.repeats} (load {load}): folder {bm.fmt(f)} img/s, "
              f"shards {bm.fmt(s)} img/s, overhead {over} µs/img", flush=True)
    med = {f"{k}_{x}": bm.median([rep[k][x] for rep in repeats]) for k in ("folder", "shards")
           for x in ("steady_img_s", "e2e_img_s", "fixed_s")}
    med.update(overhead_us=bm.median([rep["overhead_us"] for rep in repeats]),
               ratio=bm.median([bm.ratio(rep["shards"]["steady_img_s"], rep["folder"]["steady_img_s"]) for rep in repeats]))
    return {"store": store, "sources": sources, "median": med, "repeats": repeats}


def main(cfg: ShardBenchConfig) -> dict[str, Any]:
    import ray
    from ray import cloudpickle

    from dtd_ray.ray import session
    from dtd_ray.ray.pack import PackConfig, run_pack

    cloudpickle.register_pickle_by_value(bench_extract)  # the actors get the proxy's classes with the job
    bench_extract.register_tiny()  # the driver checks the backbone before Ray runs it
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = tempfile.mkdtemp(prefix="bench_shards_", dir=cfg.tmp)
    server = None
    try:
        folder = os.path.join(tmp, "folder")
        write_folder(folder, small=cfg.small, full=cfg.full)
        locs = {"local": {"folder": folder, "shards": os.path.join(tmp, "pack")}}
        if "s3" in cfg.stores:  # before Ray starts: its workers inherit the store's environment
            try:
                from tests.s3_server import S3Server
            except ImportError:
                raise ValueError("--stores s3 starts the tests' S3 server (tests/s3_server.py): run this from the "
                                 "project's root as python -m jobs.bench_shards") from None

            server = S3Server(os.path.join(tmp, "moto")).start()
            server.create_bucket("bench")
            os.environ.update(server.env)
            server.upload_dir(folder, "bench", "folder")
            locs["s3"] = {"folder": "s3://bench/folder", "shards": "s3://bench/pack"}
        stores = []
        # before Ray starts (its workers inherit the store's environment), or in a running one (the tests')
        with contextlib.nullcontext() if ray.is_initialized() else session.start():
            for store in cfg.stores:
                run_pack(PackConfig(dataset=f"imagefolder:{folder}", output=locs[store]["shards"],
                                    rows_per_file=cfg.rows_per_file))
                sources = {"folder": f"imagefolder:{locs[store]['folder']}",
                           "shards": f"parquet:{locs[store]['shards']}"}
                stores.append(run_store(cfg, store=store, sources=sources, tmp=tmp))
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"bench": "jobs/bench_shards.py", "started_at": started, "seconds": round(time.perf_counter() - t0, 1),
           "argv": sys.argv[1:], "config": config_lib.to_dict(cfg), "cpu": bm.cpu_model(), "cpu_count": os.cpu_count(),
           "versions": config_lib.versions(), "stores": stores}
    os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
    with open(cfg.json, "w") as fh:
        json.dump(out, fh, indent=2)
    for s in stores:
        m = s["median"]
        print(f"[bench] {s['store']}: folder {bm.fmt(m['folder_steady_img_s'])} img/s, shards "
              f"{bm.fmt(m['shards_steady_img_s'])} img/s (ratio {m['ratio']}), per-image overhead of the shards "
              f"{m['overhead_us']} µs (medians of {cfg.repeats})", flush=True)
    print(f"[bench] wrote {cfg.json} in {out['seconds']:.0f} s", flush=True)
    return out


COMMAND = cli.Command(summary=__doc__.splitlines()[0], help=__doc__.split("\n", 1)[1].strip("\n"),
                      config=ShardBenchConfig, run=lambda cfg: main(cfg) and None)

if __name__ == "__main__":
    cli.main(COMMAND)
