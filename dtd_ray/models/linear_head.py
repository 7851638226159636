"""The final linear layer (W, b) that a set of records was extracted with.

Extraction stores it beside each partition's records (:func:`dtd_ray.io.records.write_head`,
from :func:`stored_head` of the model it already holds); :func:`load_head` reads it back, so
decomposition, the head trials and the report never rebuild the network to get W and b.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from dtd_ray.io import records, storage
from dtd_ray.models.backbones import Backbone, get_backbone

log = logging.getLogger(__name__)


def stored_head(backbone: Backbone, *, weights: str | None) -> dict[str, Any]:
    """``{"weight", "bias", "identity"}`` of ``backbone``'s final linear layer, as extraction stores it.

    ``weight``/``bias`` are copies of the module's own float32 tensors (not a recomputation),
    so :func:`load_head` returns exactly what it returned when it rebuilt the network.
    ``identity`` says which weights they are: the backbone, ``weights`` as the records'
    config names them, the known record's name and source where there is one, and the
    sha256 of the checkpoint file read (``None`` for random init).
    """
    record = backbone.weights
    return {
        "weight": backbone.head.weight.detach().cpu().numpy().copy(),
        "bias": backbone.head.bias.detach().cpu().numpy().copy(),
        "identity": {
            "model": backbone.name,
            "weights": weights,
            "weights_name": record.name if record is not None else None,
            "weights_source": record.source if record is not None else weights,
            "sha256": backbone.checkpoint_sha256 or (record.sha256 if record is not None else None),
        },
    }


def load_head(
    *, root: str, manifest: dict[str, Any], head: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(W, b, source)`` (float64) of the final linear layer the records were extracted with.

    From ``head`` (an .npz with ``weight``/``bias``) when given, else the head stored in
    the partition that ``manifest`` describes under the records root ``root``. Records
    extracted before heads were stored have none: then the backbone the manifest names
    (``config.model``, ``config.weights``) is rebuilt, with a warning.
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
    described = f"backbone {cfg['model']} weights={cfg.get('weights')!r}"
    stored = records.read_head(root, model=manifest["model"], split=manifest["split"])
    if stored is not None:
        w, b = stored["weight"].astype(np.float64), stored["bias"].astype(np.float64)
        return w, b, f"{described} (its stored {records.HEAD_NAME})"
    w, b = _rebuilt_head(cfg["model"], cfg.get("weights"), cfg.get("normalization"))
    return w.copy(), b.copy(), described


@functools.cache
def _rebuilt_head(model: str, weights: str | None, normalization: str | None) -> tuple[np.ndarray, np.ndarray]:
    # Cached: the stages of one sweep ask for the same old records' head several times (each
    # split, decomposition and trials), and one rebuild (and one warning) per process is enough.
    log.warning("records of backbone %s weights=%r have no stored head (%s: extracted before heads were "
                "stored); rebuilding the backbone to get it (re-extract with --overwrite to store it)",
                model, weights, records.HEAD_NAME)
    bb = get_backbone(model, weights=weights, normalization=normalization)
    return bb.head.weight.detach().double().numpy(), bb.head.bias.detach().double().numpy()
