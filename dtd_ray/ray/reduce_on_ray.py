"""Reduce a records partition through Ray Data, for record sets larger than one node's memory.

``read_parquet`` streams the partition block by block; ``map_batches`` turns each batch into
sparse partial counts (:func:`dtd_ray.core.partials.partial_counts`) on the workers; the
driver sums them into the ``(G, C, m)`` tables. Gives exactly the tables of
:func:`dtd_ray.stages.reduce.reduce_partition` (counts are integers; float sums agree to rounding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray

from dtd_ray.core.counting import FreqTables
from dtd_ray.core.partials import partial_counts
from dtd_ray.io import records
from dtd_ray.stages.reduce import accumulator_for, base_options, record_columns, without_val


class _PartialCountsFn:
    """``map_batches`` callable: Arrow batch of records → sparse partial counts."""

    def __init__(self, *, val_fraction: float | None = None, val_seed: int = 0, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.holdout = {"val_fraction": val_fraction, "val_seed": val_seed}

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return partial_counts(without_val(records.table_to_records(batch), **self.holdout), **self.kwargs)


def reduce_on_ray(
    root: str,
    *,
    model: str,
    split: str,
    k1_grid: Any = None,
    correct_only: bool = False,
    with_feature_sums: bool = False,
    val_fraction: float | None = None,
    val_seed: int = 0,
    batch_rows: int = 65536,
) -> FreqTables:
    """:func:`reduce_partition` through Ray Data, for record sets larger than one node's memory.

    ``read_parquet`` streams the partition block by block; ``map_batches`` turns each
    batch into sparse partial counts (:func:`partial_counts`) on the workers; the
    driver sums the partials into the ``(G, C, m)`` tables. Needs an initialised Ray.
    Gives exactly the tables of the numpy pass (counts are integers; the float sums
    agree to rounding).
    """
    uri, fs, path, manifest = records.partition_info(root, model=model, split=split)
    acc = accumulator_for(manifest, k1_grid=k1_grid, correct_only=correct_only, with_feature_sums=with_feature_sums)
    cols = record_columns(with_mass=True, correct_only=correct_only, with_feature_sums=with_feature_sums,
                          holdout_val=val_fraction is not None)
    # the partition's data files exactly as pyarrow lists them (manifest, staging folders excluded)
    files = sorted(pads.dataset(path, filesystem=fs, format="parquet").files)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {uri}")
    ds = ray.data.read_parquet(files, filesystem=fs, columns=cols, partitioning=None)
    kwargs = dict(num_classes=acc.C, feature_dim=acc.m, k1_grid=[int(v) for v in acc.k1_grid], kmax=acc.kmax,
                  correct_only=correct_only, with_feature_sums=with_feature_sums, val_fraction=val_fraction,
                  val_seed=val_seed)
    parts = ds.map_batches(_PartialCountsFn, fn_constructor_kwargs=kwargs, batch_size=batch_rows, batch_format="pyarrow")
    for batch in parts.iter_batches(batch_format="numpy", batch_size=None):
        acc.add_partial(batch)
    opts = base_options(manifest, model=model, split=split, correct_only=correct_only, val_fraction=val_fraction,
                        val_seed=val_seed)
    opts["engine"] = "ray"
    return acc.result(options=opts)
