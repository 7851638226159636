"""The final linear layer (W, b) that a set of records was extracted with."""

from __future__ import annotations

from typing import Any

import numpy as np

from dtd_ray.io import storage
from dtd_ray.models.backbones import get_backbone


def load_head(*, manifest: dict[str, Any], head: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """``(W, b, source)`` of the final linear layer the records were extracted with.

    From ``head`` (an .npz with ``weight``/``bias``) when given, else from the backbone
    the records' manifest names (``config.model``, ``config.weights``,
    ``config.normalization``). Kept small so another head source is easy to add.
    """
    if head:
        fs, path = storage.resolve(head)
        with fs.open_input_file(path) as f:
            z = np.load(f)
            w, b = np.asarray(z["weight"], dtype=np.float64), np.asarray(z["bias"], dtype=np.float64)
        return w, b, head
    cfg = manifest.get("config") or {}
    if "model" not in cfg:
        raise ValueError("the records' manifest names no backbone (config.model); pass --head W,b.npz")
    bb = get_backbone(cfg["model"], weights=cfg.get("weights"), normalization=cfg.get("normalization"))
    w = bb.head.weight.detach().double().numpy()
    b = bb.head.bias.detach().double().numpy()
    return w, b, f"backbone {cfg['model']} weights={cfg.get('weights')!r}"
