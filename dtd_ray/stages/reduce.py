"""Reduce one finished records partition to frequency tables with numpy, batch by batch (no Ray).

The arithmetic is :class:`dtd_ray.core.counting.CountAccumulator`; this module reads the
partition's Parquet files one row group at a time, so memory stays at the tables, one
batch and the count buffer whatever the number of records.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dtd_ray.core.counting import DEFAULT_BUFFER_BYTES, CountAccumulator, FreqTables, parse_k1
from dtd_ray.core import holdout
from dtd_ray.io import records, schema


def record_columns(*, with_mass: bool, correct_only: bool, with_feature_sums: bool,
                   holdout_val: bool = False) -> list[str]:
    cols = [schema.LABEL, schema.TOPK_IDX]
    if holdout_val:
        cols.append(schema.SAMPLE_ID)
    if with_mass:
        cols.append(schema.TOPK_VAL)
    if correct_only:
        cols.append(schema.PRED)
    if with_feature_sums:
        cols.append(schema.FEATURES)
    return cols


def without_val(arr: dict[str, np.ndarray], *, val_fraction: float | None, val_seed: int) -> dict[str, np.ndarray]:
    """The records of a batch minus the validation split's (:mod:`dtd_ray.core.holdout`); all of them without one."""
    if val_fraction is None:
        return arr
    keep = ~holdout.val_mask(sample_id=arr[schema.SAMPLE_ID], fraction=val_fraction, seed=val_seed)
    return {k: v[keep] for k, v in arr.items()}


def base_options(manifest: dict[str, Any], *, model: str, split: str, correct_only: bool,
                 val_fraction: float | None = None, val_seed: int = 0) -> dict[str, Any]:
    cfg = manifest.get("config") or {}
    return {
        **({} if val_fraction is None else {"val_fraction": float(val_fraction), "val_seed": int(val_seed)}),
        "model": model,
        "select_split": split,
        "correct_only": correct_only,
        # how the selection records were made (an augmented pass names its augmentation and seed)
        "augment": manifest.get("augment", cfg.get("augment")),
        "seed": manifest.get("seed", cfg.get("seed")),
        "records_rows": manifest.get("rows"),
    }


def accumulator_for(manifest: dict[str, Any], *, k1_grid: Any, correct_only: bool, with_feature_sums: bool,
                    buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> CountAccumulator:
    """An empty :class:`CountAccumulator` shaped by a records partition's manifest (C, m, kmax) and ``k1_grid``."""
    kmax = int(manifest["kmax"])
    return CountAccumulator(
        num_classes=int(manifest["num_classes"]),
        feature_dim=int(manifest["feature_dim"]),
        k1_grid=parse_k1(k1_grid, kmax=kmax),
        kmax=kmax,
        with_feature_sums=with_feature_sums,
        correct_only=correct_only,
        buffer_bytes=buffer_bytes,
    )


def reduce_partition(
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
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> FreqTables:
    """Frequency tables of one finished records partition, read batch by batch (no Ray).

    Reads only the columns it needs (``label``, ``topk_idx``, ``topk_val``; ``pred`` for
    ``correct_only``; ``features`` for ``with_feature_sums``), so memory stays at the
    tables plus one batch plus the count buffer, whatever the number of records. With a
    ``val_fraction`` the validation split's records (``val_seed``) are left out of the counts.
    """
    uri, fs, path, manifest = records.partition_info(root, model=model, split=split)
    acc = accumulator_for(manifest, k1_grid=k1_grid, correct_only=correct_only,
                          with_feature_sums=with_feature_sums, buffer_bytes=buffer_bytes)
    cols = record_columns(with_mass=True, correct_only=correct_only, with_feature_sums=with_feature_sums,
                          holdout_val=val_fraction is not None)
    for batch in records.iter_record_batches(fs, path, columns=cols, batch_rows=batch_rows):
        arr = records.table_to_records(pa.Table.from_batches([batch]))
        _add_record_batch(acc, without_val(arr, val_fraction=val_fraction, val_seed=val_seed))
    return acc.result(options=base_options(manifest, model=model, split=split, correct_only=correct_only,
                                           val_fraction=val_fraction, val_seed=val_seed))


def _add_record_batch(acc: CountAccumulator, arr: dict[str, np.ndarray]) -> None:
    if arr[schema.LABEL].shape[0] == 0:
        return
    acc.add(
        labels=arr[schema.LABEL],
        topk_idx=arr[schema.TOPK_IDX],
        topk_val=arr.get(schema.TOPK_VAL),
        preds=arr.get(schema.PRED),
        features=arr.get(schema.FEATURES),
    )
