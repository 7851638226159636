"""A resolved sweep unit's pieces, found from wherever a later stage runs: its backbone, its
dataset, and the last conv block's maps (for the activation maps, the atlas and the
localisation measurement).

A unit is one entry of ``sweep_config.json``'s ``resolved.units`` (model, weights, dataset,
normalization, with the absolute paths the sweep saw).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dtd_ray.data.sources import parse_source
from dtd_ray.models.backbones import get_backbone

# The project folder: a sweep's configured relative paths are resolved against it as a last resort.
PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def last_block_maps(backbone: Any, x: torch.Tensor) -> torch.Tensor:
    """The output ``A`` (N, C, h, w) of the backbone's last conv block (before pooling), via a forward hook.

    ``backbone.blocks`` names the stages in forward order (see :class:`dtd_ray.models.builders.Backbone`).
    """
    if not getattr(backbone, "blocks", None):
        raise ValueError(f"{getattr(backbone, 'name', 'backbone')} names no blocks: no channel maps")
    name, block = list(backbone.blocks.items())[-1]
    out: list[torch.Tensor] = []
    h = block.register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
    try:
        with torch.inference_mode():
            backbone.forward_features(x)
    finally:
        h.remove()
    if not out or out[0].ndim != 4:
        raise ValueError(f"block {name!r} gave no (N, C, h, w) output")
    return out[0]


def _exists(p: str | None) -> bool:
    return bool(p) and "://" not in p and os.path.exists(p)


def _resolve_path(p: str | None) -> str | None:
    """A configured local path as it exists from here: as given (relative to the working
    folder, as the sweep read it), else against the project folder, else unchanged."""
    if p is None or "://" in p or os.path.isabs(p) or os.path.exists(p) or p in ("default",):
        return p
    cand = os.path.join(PROJECT, p)
    return cand if os.path.exists(cand) else p


def load_unit_backbone(unit: dict[str, Any]) -> Any:
    """The backbone of one resolved sweep unit (``sweep_config.json``'s ``resolved.units``), in eval mode,
    with the unit's normalization: the sweep's absolute weights path where it exists here, else the configured one."""
    weights = unit.get("weights_abs") if _exists(unit.get("weights_abs")) else _resolve_path(unit.get("weights"))
    backbone = get_backbone(unit["backbone"], weights=weights, normalization=unit.get("normalization"),
                            input_size=unit.get("input_size"), resize=unit.get("resize"))
    return backbone.eval()


def unit_source(unit: dict[str, Any]) -> Any:
    """The dataset :class:`~dtd_ray.data.sources.Source` of one resolved sweep unit, found as
    :func:`load_unit_backbone` finds its weights."""
    kind, sep, where = str(unit["dataset"]).partition(":")
    if sep and _exists(str(unit.get("dataset_abs", "")).partition(":")[2]):
        return parse_source(unit["dataset_abs"])
    return parse_source(f"{kind}:{_resolve_path(where)}" if sep and "://" not in where else unit["dataset"])


