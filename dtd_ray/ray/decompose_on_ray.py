"""The decompose stage with its Ray steps: the Ray Data reduce and the augmented selection pass.

:func:`dtd_ray.stages.decompose.run_decompose` is Ray-free; this module hands it the
two steps that run on the cluster (``engine="ray"``, ``extract_missing``). Needs an
initialised Ray (the entry point calls ``ray.init``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dtd_ray.io import records
from dtd_ray.ray.extract import ExtractConfig, run_extract
from dtd_ray.ray.reduce_on_ray import reduce_on_ray
from dtd_ray.stages import decompose as stage


def extract_select(cfg: stage.DecomposeConfig, eval_manifest: dict[str, Any]) -> dict[str, Any]:
    """Extract the augmented selection pass (``<select_split>_aug<seed>``) with the eval split's
    extraction config; returns its manifest."""
    src = dict(eval_manifest.get("config") or {})
    keep = {f.name for f in dataclasses.fields(ExtractConfig)}
    src = {k: v for k, v in src.items() if k in keep}
    root = cfg.records.rstrip("/")
    src.update(
        splits=(cfg.select_split,),
        augment=cfg.select_augment,
        seed=cfg.select_seed,
        output=root.rsplit("/", 1)[0] if root.endswith("records") else cfg.records,
        tag=cfg.model,
        overwrite=False,
    )
    run_extract(ExtractConfig(**src))
    man = records.read_manifest(cfg.records, model=cfg.model, split=cfg.select_records)
    if man is None:
        raise FileNotFoundError(f"the augmented extraction did not produce split {cfg.select_records}")
    return man


HOOKS = stage.RayHooks(reduce=reduce_on_ray, extract_select=extract_select)


def decompose_on_ray(cfg: stage.DecomposeConfig, *, brief: bool = False) -> dict[str, Any]:
    """:func:`dtd_ray.stages.decompose.run_decompose` with the Ray steps available."""
    return stage.run_decompose(cfg, hooks=HOOKS, brief=brief)
