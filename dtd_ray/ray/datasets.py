"""A dataset source's rows as a Ray Dataset (the first stage of the extraction pipeline)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from dtd_ray.data.sources import Source

log = logging.getLogger(__name__)

# Rows per block: image folders carry paths (decoded in the prepare tasks), array sources pixels.
_DEFAULT_BLOCK_ROWS = {"imagefolder": 512, "array": 2048}


def to_ray_dataset(source: Source, split: str, *, override_num_blocks: int | None = None) -> ray.data.Dataset:
    """The rows of ``split`` as a Ray Dataset with the same columns as ``read_numpy``.

    The driver cuts the columns into ``override_num_blocks`` contiguous blocks of
    about equal size (default: 512 rows per block for image folders, 2048 for array
    sources) and puts each block in the object store once (``ray.data.from_arrow``), so
    a task receives only its own block, never the whole array. Images become a
    fixed-shape tensor column. The result is already materialised: iterating it
    again (another epoch, another model) re-reads nothing from storage.
    """
    columns = source.read_numpy(split)
    n = len(columns["sample_id"])
    if override_num_blocks is not None and override_num_blocks < 1:
        raise ValueError(f"override_num_blocks must be >= 1, got {override_num_blocks}")
    rows_per_block = _DEFAULT_BLOCK_ROWS["imagefolder" if source.kind == "imagefolder" else "array"]
    num_blocks = override_num_blocks or max(1, math.ceil(n / rows_per_block))
    num_blocks = max(1, min(num_blocks, n))
    bounds = np.linspace(0, n, num_blocks + 1).round().astype(np.int64)
    blocks = [
        _to_block({name: col[lo:hi] for name, col in columns.items()})
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    log.debug("%s split %s: %d rows in %d blocks", source.kind, split, n, len(blocks))
    return ray.data.from_arrow(blocks)


def _to_block(columns: dict[str, np.ndarray]) -> pa.Table:
    """One Ray Data block (an Arrow table) from numpy columns."""
    if "image" in columns:
        # BlockAccessor.batch_to_block is the conversion map_batches applies to a dict of
        # arrays, so the tensor extension column is exactly what a Ray Data stage makes.
        return BlockAccessor.batch_to_block(columns)
    # paths: typed explicitly so that an empty split still has a string column
    return pa.table(
        {
            "sample_id": pa.array(columns["sample_id"], type=pa.int64()),
            "label": pa.array(columns["label"], type=pa.int32()),
            "path": pa.array(list(columns["path"]), type=pa.string()),
        }
    )
