"""One batch of records as sparse partial counts: what the Ray Data reduce's workers emit.

:func:`dtd_ray.ray.reduce_on_ray.reduce_on_ray` maps every batch through :func:`partial_counts`;
the driver sums the partials with :meth:`dtd_ray.core.counting.CountAccumulator.add_partial`
into exactly the tables of the one-pass reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dtd_ray.core.counting import (PARTIAL_COUNT, PARTIAL_FSUM, PARTIAL_MASS, PARTIAL_N, PARTIAL_ROWS,
                                   check_record_arrays, parse_k1)


def partial_counts(
    batch: dict[str, np.ndarray],
    *,
    num_classes: int,
    feature_dim: int,
    k1_grid: Sequence[int],
    kmax: int,
    correct_only: bool,
    with_feature_sums: bool,
) -> dict[str, np.ndarray]:
    """One batch's contribution to the tables as sparse rows ``(kind, key, value)``.

    ``kind`` 0: per-bucket (not yet cumulative) count at ``key = g·C·m + y·m + j``;
    1: instances of class ``key``; 2: mass at ``y·m + j``; 3: feature sum at ``y·m + j``;
    4: bookkeeping (key 0 rows read, 1 rows used, 2 negative values). Only non-zero
    entries are emitted, so a partial is never larger than its batch's top-k lists.
    """
    C, m = int(num_classes), int(feature_dim)
    grid = parse_k1(list(k1_grid), kmax=kmax)
    labels = np.asarray(batch["label"])
    topk_idx = np.asarray(batch["topk_idx"])
    topk_val = batch.get("topk_val")
    features = batch.get("features") if with_feature_sums else None
    if topk_idx.ndim != 2 or topk_idx.shape[1] < kmax:
        raise ValueError(f"topk_idx has shape {topk_idx.shape}; records with kmax ≥ {kmax} expected")
    if topk_val is None:
        raise ValueError("topk_val is needed for the tie-break mass")
    topk_idx, topk_val = topk_idx[:, :kmax], np.asarray(topk_val)[:, :kmax]
    negative = check_record_arrays(
        labels=labels, topk_idx=topk_idx, num_classes=C, feature_dim=m, topk_val=topk_val, features=features
    )
    rows_read = labels.shape[0]
    if correct_only:
        if "pred" not in batch:
            raise ValueError("correct_only=True needs the pred column")
        keep = np.asarray(batch["pred"]) == labels
        labels, topk_idx, topk_val = labels[keep], topk_idx[keep], topk_val[keep]
        features = None if features is None else np.asarray(features)[keep]
    parts: list[tuple[int, np.ndarray, np.ndarray]] = []
    base = labels.astype(np.int64)[:, None] * m
    # per-bucket counts at g·C·m + y·m + j; each rank r < k1_max belongs to one bucket
    k1_max = int(grid[-1])
    bucket = np.repeat(np.arange(len(grid)), np.diff(np.concatenate([[0], grid])))
    keys = (bucket[None, :] * (C * m) + base + topk_idx[:, :k1_max]).ravel()
    size = len(grid) * C * m
    if size <= 4 * keys.size:  # small tables: dense bincount, then keep the non-zeros
        bc = np.bincount(keys, minlength=size)
        nz = np.flatnonzero(bc)
        parts.append((PARTIAL_COUNT, nz, bc[nz]))
    else:  # large tables: sort-based, memory ∝ the batch, never the (G, C, m) table
        uk, cnt = np.unique(keys, return_counts=True)
        parts.append((PARTIAL_COUNT, uk, cnt))
    n = np.bincount(labels, minlength=C)
    parts.append((PARTIAL_N, np.flatnonzero(n), n[n > 0]))
    mk = (base + topk_idx).ravel()
    uk, inv = np.unique(mk, return_inverse=True)
    parts.append((PARTIAL_MASS, uk, np.bincount(inv.ravel(), weights=np.abs(topk_val).ravel().astype(np.float64))))
    if features is not None and labels.size:
        fsum = np.zeros((C, m))
        order = np.argsort(labels, kind="stable")
        sl = labels[order]
        starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
        fsum[sl[starts]] = np.add.reduceat(np.asarray(features)[order].astype(np.float64), starts, axis=0)
        flat = fsum.reshape(-1)
        nz = np.flatnonzero(flat)
        parts.append((PARTIAL_FSUM, nz, flat[nz]))
    parts.append((PARTIAL_ROWS, np.arange(3), np.array([rows_read, labels.shape[0], negative])))
    return {
        "kind": np.concatenate([np.full(len(k), kind, np.int8) for kind, k, _ in parts]),
        "key": np.concatenate([np.asarray(k, np.int64) for _, k, _ in parts]),
        "value": np.concatenate([np.asarray(v, np.float64) for _, _, v in parts]),
    }


