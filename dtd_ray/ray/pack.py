"""``jobs/pack.py``: an image folder packed into Parquet shards, one Ray task per shard.

    python jobs/pack.py --dataset imagefolder:SRC --output DST [--rows_per_file 1000]

The driver lists the folder once (the ``imagefolder`` source's listing, so the shards keep its
``sample_id`` and ``label``), writes the plan (``DST/_pack.json``), then runs one task per shard
that is not in place yet: each reads its images' bytes and writes one Parquet file atomically.
``DST/_classes.json`` is written last and marks the pack finished. A rerun (after a crash, or
Ctrl-C) writes only the missing shards; a plan that differs (another source, other rows, another
``rows_per_file``) is refused unless ``--overwrite``. Source and output are local folders or
``s3://`` prefixes, in any combination. Layout and columns: :mod:`dtd_ray.data.shards`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
import pyarrow.fs as pafs
import ray
from pydantic import Field

from dtd_ray import console
from dtd_ray.config import config_class
from dtd_ray.data import shards
from dtd_ray.data.sources import Source, parse_source
from dtd_ray.io import storage
from dtd_ray.ray import cluster


@config_class
class PackConfig:
    dataset: Annotated[str, Field(description="the image folder to pack: imagefolder:PATH (local or s3://…)")] = ""
    output: Annotated[str, Field(description="where the shards go: a local folder or s3://bucket/prefix (read it back as parquet:OUTPUT)")] = ""
    rows_per_file: Annotated[int, Field(description="images per Parquet file (Ray's batch-inference benchmarks use about a thousand)")] = 1000
    splits: Annotated[tuple[str, ...] | None, Field(description="which splits to pack (None: every split folder)")] = None
    shared_fs: Annotated[bool, Field(description="the local output is on a filesystem every node mounts (NFS)")] = False
    overwrite: Annotated[bool, Field(description="replace a pack of another plan at the output (a finished pack of the same plan is kept)")] = False
    verbose: Annotated[bool, Field(description="show Ray's own INFO output")] = False

    def __post_init__(self) -> None:
        if not self.dataset or not self.output:
            raise ValueError("pack needs --dataset imagefolder:SRC and --output DST")
        if self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {self.rows_per_file}")


def _rel_paths(source: Source, split: str, paths: np.ndarray) -> list[str]:
    """``<class>/<file>`` of each listed path (the rows name files as ``<source>/<split>/<class>/<file>``)."""
    prefix = f"{source.path.rstrip('/')}/{split}/"
    rel = [str(p)[len(prefix):] for p in paths]
    if any(not str(p).startswith(prefix) for p in paths[:1]):
        raise RuntimeError(f"listed path {paths[0]} is not under {prefix}")
    return rel


def plan_pack(cfg: PackConfig) -> dict[str, Any]:
    """Check the inputs and list the folder; the plan (JSON) and, per split, its columns. Needs no Ray."""
    kind = cfg.dataset.partition(":")[0].strip().lower()
    if kind != "imagefolder":  # before the data is touched
        raise ValueError(f"pack reads an image folder (imagefolder:PATH), not {kind}: {kind} data is read in place")
    source = parse_source(cfg.dataset)
    splits = tuple(cfg.splits) if cfg.splits else source.splits()
    for split in splits:
        if split not in source.splits():
            raise ValueError(f"split {split!r} not in {cfg.dataset}; valid: {', '.join(source.splits())}")
    out = cfg.output if "://" in cfg.output else storage.resolve(cfg.output)[1]
    if storage.same_location(out, source.path) or (out.rstrip("/") + "/").startswith(source.path.rstrip("/") + "/"):
        raise ValueError(f"output {cfg.output} is inside the folder it packs ({source.path}): choose another")
    storage.check_writable(out)
    columns: dict[str, dict[str, Any]] = {}
    plan_splits: dict[str, Any] = {}
    for split in splits:
        cols = source.read_numpy(split)
        rel = _rel_paths(source, split, cols["path"])
        columns[split] = {**cols, "rel_path": rel}
        plan_splits[split] = {"rows": len(rel), "digest": shards.listing_digest(rel_paths=rel, labels=cols["label"])}
    plan = {"version": shards.PACK_VERSION, "source": f"imagefolder:{source.path}", "classes": list(source.classes),
            "rows_per_file": cfg.rows_per_file, "splits": plan_splits}
    return {"source": source, "output": out, "plan": plan, "columns": columns}


@ray.remote
def _pack_shard(uri: str, cols: dict[str, Any]) -> int:
    return shards.write_shard(uri=uri, **cols)


def _done_shards(fs: pafs.FileSystem, split_path: str) -> set[str]:
    """The shard names already in place (one listing; a shard is written whole or not at all)."""
    if not storage.exists(fs, split_path):
        return set()
    return {i.base_name for i in fs.get_file_info(pafs.FileSelector(split_path)) if i.type == pafs.FileType.File}


def run_pack(cfg: PackConfig, *, planned: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pack the folder on the running Ray cluster; returns ``_classes.json``'s content (with ``written`` shards)."""
    planned = planned or plan_pack(cfg)
    out, plan, source = planned["output"], planned["plan"], planned["source"]
    cluster.check_output(out, shared_fs=cfg.shared_fs)
    fs, root = storage.resolve(out)
    finished = storage.read_json(fs, f"{root}/{shards.CLASSES_NAME}")
    old = storage.read_json(fs, f"{root}/{shards.PLAN_NAME}")
    if old is not None and old != plan:
        if not cfg.overwrite:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(f"{out} holds a pack of another plan (differs in {', '.join(diff)}); "
                             "pass --overwrite to replace it, or choose another --output")
        storage.remove_tree(fs, root)
        finished = None
    elif old is None and fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        raise ValueError(f"{out} is not empty and holds no pack plan ({shards.PLAN_NAME}): choose another --output")
    if finished is not None:
        print(f"[pack] {out}: finished earlier ({shards.describe_pack(finished)}), skipped", flush=True)
        return {**finished, "written": 0}
    storage.write_json(fs, f"{root}/{shards.PLAN_NAME}", plan)

    t0 = time.perf_counter()
    tasks, rows_todo = [], 0
    for split, cols in planned["columns"].items():
        split_path = f"{root}/{shards.SPLIT_PREFIX}{split}"
        have = _done_shards(fs, split_path)
        for i, (lo, hi) in enumerate(shards.shard_bounds(len(cols["sample_id"]), cfg.rows_per_file)):
            if shards.shard_name(i) in have:
                continue
            labels = cols["label"][lo:hi]
            shard = {"sample_id": cols["sample_id"][lo:hi], "label": labels, "paths": list(cols["path"][lo:hi]),
                     "rel_path": cols["rel_path"][lo:hi], "class_name": [source.classes[j] for j in labels]}
            tasks.append(_pack_shard.options(num_cpus=0.5).remote(storage.join(out, f"{shards.SPLIT_PREFIX}{split}",
                                                                               shards.shard_name(i)), shard))
            rows_todo += hi - lo
    total_rows = sum(s["rows"] for s in plan["splits"].values())
    if rows_todo < total_rows:
        print(f"[pack] {out}: resuming, {total_rows - rows_todo:,} of {total_rows:,} images in place", flush=True)
    pending = list(tasks)
    with console.progress(total=rows_todo, desc=f"[pack] {out}", unit="img") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            bar.update(int(ray.get(ready[0])))
    meta = {k: plan[k] for k in ("version", "source", "classes", "rows_per_file")}
    meta["splits"] = {s: v["rows"] for s, v in plan["splits"].items()}
    storage.write_json(fs, f"{root}/{shards.CLASSES_NAME}", meta)  # last: the pack is finished
    seconds = time.perf_counter() - t0
    print(f"[pack] done: {len(tasks)} shard(s) written in {seconds:.1f} s ({shards.describe_pack(meta)}) "
          f"-> read it as parquet:{out}", flush=True)
    return {**meta, "written": len(tasks)}
