"""Reduce extraction records to per-class frequency tables (``freq/``).

For every instance ``i`` of class ``y`` the records hold its top-``kmax`` feature
indices ranked by ``|f|`` (``topk_idx``), so the top-``k1`` set of any ``k1 ≤ kmax`` is a
prefix. The paper's frequency table is

    count[k1][y, j] = #{ i : label_i = y,  j ∈ topk_idx_i[:k1] }

and, because the lists are ranked, it is a cumulative sum over rank positions:

    count[k1][y, j] = Σ_{r < k1} n_r[y, j],   n_r[y, j] = #{ i : label_i = y, topk_idx_i[r] = j }.

One pass over the records therefore gives the tables of every ``k1`` of a grid: the
counts of the rank positions ``[k1_{g-1}, k1_g)`` are accumulated per grid bucket ``g``
(one ``np.bincount`` per bucket over ``label·m + index``), and a cumulative sum over the
buckets turns them into the tables. Only the grid's tables are held, ``(G, C, m)`` int32.

Alongside the counts the pass accumulates, per class, the number of instances, the
summed magnitude ``mass[y, j] = Σ_{i: label_i = y, j ∈ topk_idx_i} |f_ij|`` over the
whole top-``kmax`` lists (the frequency strategy's tie-break, see
:func:`dtd_ray.core.selection.select_frequency`) and, optionally, the summed feature vectors
(for the ``contribution`` strategy).

Three drivers share that arithmetic (:class:`CountAccumulator`) and give identical tables:

* :func:`reduce_arrays` here — records already in memory (numpy arrays);
* :func:`dtd_ray.stages.reduce.reduce_partition` — one finished ``records/model=…/split=…``
  partition read file by file, batch by batch with pyarrow (no Ray). Memory: the tables,
  one row group, and the count buffer (≤ ``buffer_bytes``); an ImageNet-size partition
  (1.28 M × kmax 100, C = 1000, m = 2048, every k1 in 1..100) peaks at about 1.6 GB;
* :func:`dtd_ray.ray.reduce_on_ray.reduce_on_ray` — the same partition through Ray Data: each batch
  becomes sparse partial counts on the workers (:func:`dtd_ray.core.partials.partial_counts`, never larger than
  the batch's top-k lists), the driver sums them into the tables.

The per-instance ranking the counts read is :func:`rank_topk` (extraction stores it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from dtd_ray.core.kgrid import parse_k_grid

log = logging.getLogger(__name__)


def parse_k1(spec: Any, *, kmax: int) -> np.ndarray:
    """The k1 grid of ``spec`` (:func:`dtd_ray.core.kgrid.parse_k_grid`) as an int64 array."""
    return np.asarray(parse_k_grid(spec, kmax=kmax, name="k1"), dtype=np.int64)

# Buffered top-k entries before the per-bucket bincounts run. A bincount costs
# O(entries + C·m); buffering until the entries outnumber the G·C·m table keeps the
# table-sized part from dominating, while this cap bounds the buffer's memory.
DEFAULT_BUFFER_BYTES = 384 * 2**20
# Largest temporary key array of one bincount call (int64 entries).
_MAX_KEYS_PER_CALL = 1 << 24



def rank_topk(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` feature indices per row by magnitude and their values.

    ``idx[n] = argsort(-|f[n]|)[:k]``, ties broken by the lower index (a stable sort), so the
    ranking is deterministic on every device; ``val[n, r] = f[n, idx[n, r]]`` (signed).
    """
    order = torch.sort(features.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    return order, torch.gather(features, 1, order)


# --------------------------------------------------------------------------- result


@dataclasses.dataclass
class FreqTables:
    """Per-class frequency tables for a grid of ``k1``.

    ``counts[g, y, j]`` is the number of instances of class ``y`` with feature ``j``
    among their top-``k1_grid[g]`` features. ``mass[y, j]`` is ``Σ |f_ij|`` over the
    class's top-``kmax`` entries (``None`` when the values were not read);
    ``feature_sum[y]`` is ``Σ_i f_i`` over the class (``None`` unless requested).
    ``options`` records how the tables were made (selection split, correct-only, …)
    and ``warnings`` anything suspicious in the input.
    """

    k1_grid: np.ndarray
    counts: np.ndarray
    n_instances: np.ndarray
    kmax: int
    mass: np.ndarray | None = None
    feature_sum: np.ndarray | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.counts.shape[2])

    def for_k1(self, k1: int) -> np.ndarray:
        """The (C, m) table of one ``k1`` of the grid."""
        hit = np.flatnonzero(self.k1_grid == k1)
        if hit.size == 0:
            raise ValueError(f"k1={k1} is not in the reduced grid {_grid_str(self.k1_grid)}")
        return self.counts[int(hit[0])]

    def class_mean_features(self) -> np.ndarray:
        """``feature_sum[y] / n_y`` (C, m); raises where a class has no instances."""
        if self.feature_sum is None:
            raise ValueError("these tables were reduced without feature sums (with_feature_sums=False)")
        empty = np.flatnonzero(self.n_instances == 0)
        if empty.size:
            raise ValueError(f"class(es) {empty.tolist()} have no instances: their mean feature is undefined")
        return self.feature_sum / self.n_instances[:, None]


def _grid_str(grid: np.ndarray) -> str:
    g = [int(v) for v in grid]
    if len(g) > 2 and g == list(range(g[0], g[-1] + 1)):
        return f"{g[0]}..{g[-1]}"
    return ",".join(map(str, g))


# --------------------------------------------------------------------------- checks


def check_record_arrays(
    *,
    labels: np.ndarray,
    topk_idx: np.ndarray,
    num_classes: int,
    feature_dim: int,
    topk_val: np.ndarray | None = None,
    features: np.ndarray | None = None,
    check_duplicates: bool = True,
) -> int:
    """Validate one batch of records; return its number of negative feature values.

    Raises ``ValueError`` (one line) for labels outside ``[0, C)``, indices outside
    ``[0, m)``, an index repeated within an instance's list, NaN/inf values, or
    mismatched shapes. Negative values are legal (the ranking is by ``|f|``) but unusual
    after a ReLU, so they are counted for a warning rather than refused.
    """
    n = labels.shape[0]
    if topk_idx.ndim != 2 or topk_idx.shape[0] != n:
        raise ValueError(f"topk_idx has shape {topk_idx.shape}, expected ({n}, kmax)")
    if topk_idx.shape[1] > feature_dim:
        raise ValueError(f"records' kmax={topk_idx.shape[1]} is larger than the feature dimension {feature_dim}")
    if n == 0:
        return 0
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"label {lo if lo < 0 else hi} is outside [0, {num_classes}) (num_classes={num_classes})")
    if topk_idx.size:
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < 0 or hi >= feature_dim:
            bad_index = lo if lo < 0 else hi
            raise ValueError(f"feature index {bad_index} is outside [0, {feature_dim}) (feature_dim={feature_dim})")
        if check_duplicates and topk_idx.shape[1] > 1:
            s = np.sort(topk_idx, axis=1)
            bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
            if bad.size:
                raise ValueError(
                    f"{bad.size} record(s) repeat a feature index within their top-k list (first: row {bad[0]})"
                )
    negative = 0
    for name, v in (("topk_val", topk_val), ("features", features)):
        if v is None:
            continue
        if v.shape[0] != n:
            raise ValueError(f"{name} has {v.shape[0]} rows, labels {n}")
        if not np.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or inf values")
        if name == "features" and v.shape[1] != feature_dim:
            raise ValueError(f"features have dimension {v.shape[1]}, expected feature_dim={feature_dim}")
        negative = max(negative, int((v < 0).sum()))
    return negative


# --------------------------------------------------------------------------- counting

# The kinds of a sparse partial's rows (dtd_ray.core.partials.partial_counts), which
# CountAccumulator.add_partial sums.
PARTIAL_COUNT, PARTIAL_N, PARTIAL_MASS, PARTIAL_FSUM, PARTIAL_ROWS = 0, 1, 2, 3, 4


def _bucket_bounds(k1_grid: np.ndarray) -> list[tuple[int, int]]:
    """Rank intervals ``[k1_{g-1}, k1_g)`` whose per-rank counts add up to bucket ``g``."""
    lo = np.concatenate([[0], k1_grid[:-1]])
    return [(int(a), int(b)) for a, b in zip(lo, k1_grid)]


def _bincount_into(acc: np.ndarray, keys: np.ndarray, *, size: int) -> None:
    """``acc[k] += #{keys == k}`` for a flat int32 ``acc`` of length ``size``."""
    if keys.size == 0:
        return
    bc = np.bincount(keys, minlength=size)
    np.add(acc, bc, out=acc, casting="unsafe")


class CountAccumulator:
    """Streaming accumulator of the frequency tables (the arithmetic of every driver).

    ``add`` takes one batch of records; per-rank occurrences are buffered (compactly,
    int16 where the sizes allow) and turned into per-bucket counts in large flushes, so
    the O(G·C·m) part of each ``np.bincount`` is paid rarely. Memory: the ``(G, C, m)``
    int32 table, the ``(C, m)`` float64 mass (and feature sums), and the buffer
    (≤ ``buffer_bytes``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int,
        k1_grid: np.ndarray,
        kmax: int,
        with_mass: bool = True,
        with_feature_sums: bool = False,
        correct_only: bool = False,
        check_duplicates: bool = True,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        if kmax > feature_dim:
            raise ValueError(f"kmax={kmax} is larger than the feature dimension {feature_dim}")
        self.C, self.m, self.kmax = int(num_classes), int(feature_dim), int(kmax)
        self.k1_grid = parse_k1(list(k1_grid), kmax=self.kmax)
        self.buckets = _bucket_bounds(self.k1_grid)
        self.k1_max = int(self.k1_grid[-1])
        self.correct_only = correct_only
        self.check_duplicates = check_duplicates
        cm = self.C * self.m
        self.counts = np.zeros((len(self.buckets), cm), dtype=np.int32)
        self.n_instances = np.zeros(self.C, dtype=np.int64)
        self.mass = np.zeros(cm, dtype=np.float64) if with_mass else None
        self.feature_sum = np.zeros((self.C, self.m), dtype=np.float64) if with_feature_sums else None
        self.rows_read = 0
        self.rows_used = 0
        self.negative_values = 0
        # buffer of (label, top-k1_max indices), flushed when full
        self._idx_dtype = np.int16 if self.m <= np.iinfo(np.int16).max else np.int32
        self._lab_dtype = np.int16 if self.C <= np.iinfo(np.int16).max else np.int32
        row_bytes = self.k1_max * np.dtype(self._idx_dtype).itemsize + np.dtype(self._lab_dtype).itemsize
        # at least enough rows that one flush's entries match the table size (amortised), within the byte cap
        want = max(1, -(-len(self.buckets) * cm // self.k1_max))
        self._cap = int(max(1024, min(want, buffer_bytes // row_bytes)))
        self._buf_idx: np.ndarray | None = None
        self._buf_lab: np.ndarray | None = None
        self._fill = 0

    # -- input -------------------------------------------------------------
    def add(
        self,
        *,
        labels: np.ndarray,
        topk_idx: np.ndarray,
        topk_val: np.ndarray | None = None,
        preds: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> None:
        """Count one batch (``topk_idx`` (n, ≥kmax) ranked; the other arrays row-aligned)."""
        labels = np.asarray(labels)
        topk_idx = np.asarray(topk_idx)
        if topk_idx.ndim != 2 or topk_idx.shape[1] < self.kmax:
            raise ValueError(f"topk_idx has shape {topk_idx.shape}; records with kmax ≥ {self.kmax} expected")
        if self.mass is not None and topk_val is None:
            raise ValueError("topk_val is needed for the tie-break mass (or pass with_mass=False)")
        if self.feature_sum is not None and features is None:
            raise ValueError("features are needed for the feature sums (with_feature_sums=True)")
        negative = check_record_arrays(
            labels=labels,
            topk_idx=topk_idx[:, : self.kmax],
            num_classes=self.C,
            feature_dim=self.m,
            topk_val=None if topk_val is None else np.asarray(topk_val)[:, : self.kmax],
            features=features,
            check_duplicates=self.check_duplicates,
        )
        self.negative_values += negative
        self.rows_read += labels.shape[0]
        if self.correct_only:
            if preds is None:
                raise ValueError("correct_only=True needs the pred column")
            keep = np.asarray(preds) == labels
            labels, topk_idx = labels[keep], topk_idx[keep]
            topk_val = None if topk_val is None else np.asarray(topk_val)[keep]
            features = None if features is None else np.asarray(features)[keep]
        n = labels.shape[0]
        if n == 0:
            return
        self.rows_used += n
        self.n_instances += np.bincount(labels, minlength=self.C).astype(np.int64)
        if self.mass is not None:
            keys = labels.astype(np.int64)[:, None] * self.m + topk_idx[:, : self.kmax]
            w = np.abs(np.asarray(topk_val, dtype=np.float64)[:, : self.kmax])
            self.mass += np.bincount(keys.ravel(), weights=w.ravel(), minlength=self.C * self.m)
        if self.feature_sum is not None:
            self._add_feature_sums(labels, np.asarray(features))
        # buffer the ranked prefixes for the per-bucket counts
        start = 0
        while start < n:
            if self._buf_idx is None:
                self._buf_idx = np.empty((self._cap, self.k1_max), dtype=self._idx_dtype)
                self._buf_lab = np.empty(self._cap, dtype=self._lab_dtype)
            take = min(n - start, self._cap - self._fill)
            self._buf_idx[self._fill : self._fill + take] = topk_idx[start : start + take, : self.k1_max]
            self._buf_lab[self._fill : self._fill + take] = labels[start : start + take]
            self._fill += take
            start += take
            if self._fill == self._cap:
                self._flush()

    def _add_feature_sums(self, labels: np.ndarray, features: np.ndarray) -> None:
        # sort by class and sum contiguous runs: O(n·m), no (C, n) one-hot matmul
        order = np.argsort(labels, kind="stable")
        sl = labels[order]
        starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
        sums = np.add.reduceat(features[order].astype(np.float64), starts, axis=0)
        self.feature_sum[sl[starts]] += sums

    def _flush(self) -> None:
        r = self._fill
        if r == 0:
            return
        idx, lab = self._buf_idx[:r], self._buf_lab[:r]
        cm = self.C * self.m
        for g, (lo, hi) in enumerate(self.buckets):
            rows_per_call = max(1, _MAX_KEYS_PER_CALL // (hi - lo))
            for s in range(0, r, rows_per_call):
                e = min(r, s + rows_per_call)
                keys = lab[s:e].astype(np.int64)[:, None] * self.m + idx[s:e, lo:hi]
                _bincount_into(self.counts[g], keys.ravel(), size=cm)
        self._fill = 0

    def add_partial(self, partial: dict[str, np.ndarray]) -> None:
        """Merge the sparse partial counts of :func:`partial_counts` (the Ray path)."""
        kind, key, value = partial["kind"], partial["key"], partial["value"]
        sel = kind == PARTIAL_COUNT
        if sel.any():
            # keys may repeat when the iterator joined several partials: add.at, not +=
            np.add.at(self.counts.reshape(-1), key[sel], value[sel].astype(np.int32))
        sel = kind == PARTIAL_N
        if sel.any():
            np.add.at(self.n_instances, key[sel], value[sel].astype(np.int64))
        sel = kind == PARTIAL_MASS
        if sel.any() and self.mass is not None:
            np.add.at(self.mass, key[sel], value[sel])
        sel = kind == PARTIAL_FSUM
        if sel.any() and self.feature_sum is not None:
            np.add.at(self.feature_sum.reshape(-1), key[sel], value[sel])
        sel = kind == PARTIAL_ROWS
        if sel.any():
            self.rows_read += int(value[sel & (key == 0)].sum())
            self.rows_used += int(value[sel & (key == 1)].sum())
            self.negative_values += int(value[sel & (key == 2)].sum())

    # -- output ------------------------------------------------------------
    def result(self, *, options: dict[str, Any] | None = None) -> FreqTables:
        """Finish: flush the buffer, turn bucket counts into cumulative tables, collect warnings."""
        self._flush()
        self._buf_idx = self._buf_lab = None
        counts = self.counts
        for g in range(1, counts.shape[0]):  # in place: no second (G, C, m) array
            counts[g] += counts[g - 1]
        warnings = []
        empty = np.flatnonzero(self.n_instances == 0)
        if empty.size:
            warnings.append(
                f"class(es) {empty.tolist()} have no instances in the selection records"
                + (" that are classified correctly" if self.correct_only else "")
                + ": their frequency/contribution maps cannot be selected"
            )
        if self.negative_values:
            warnings.append(
                f"{self.negative_values} negative feature value(s): the ranking uses |f|, the tie-break mass Σ|f|"
            )
        if self.rows_used == 0:
            warnings.append("no records were counted")
        for w in warnings:
            log.warning(w)
        opts = {"correct_only": self.correct_only, "rows_read": self.rows_read, "rows_used": self.rows_used}
        opts.update(options or {})
        return FreqTables(
            k1_grid=self.k1_grid.copy(),
            counts=counts.reshape(len(self.buckets), self.C, self.m),
            n_instances=self.n_instances,
            kmax=self.kmax,
            mass=None if self.mass is None else self.mass.reshape(self.C, self.m),
            feature_sum=self.feature_sum,
            options=opts,
            warnings=warnings,
        )


# --------------------------------------------------------------------------- drivers


def reduce_arrays(
    *,
    labels: np.ndarray,
    topk_idx: np.ndarray,
    num_classes: int,
    feature_dim: int,
    topk_val: np.ndarray | None = None,
    preds: np.ndarray | None = None,
    features: np.ndarray | None = None,
    k1_grid: Any = None,
    kmax: int | None = None,
    correct_only: bool = False,
    with_feature_sums: bool = False,
    options: dict[str, Any] | None = None,
) -> FreqTables:
    """Frequency tables of in-memory records (see the module docstring for the formula).

    ``kmax`` defaults to ``topk_idx.shape[1]``; ``k1_grid`` (see :func:`parse_k1_grid`)
    defaults to every ``k1`` in ``1..kmax``. Without ``topk_val`` there is no tie-break
    mass (ties then fall to the lower index).
    """
    topk_idx = np.asarray(topk_idx)
    kmax = int(kmax or topk_idx.shape[1])
    grid = parse_k1(k1_grid, kmax=kmax)
    acc = CountAccumulator(
        num_classes=num_classes,
        feature_dim=feature_dim,
        k1_grid=grid,
        kmax=kmax,
        with_mass=topk_val is not None,
        with_feature_sums=with_feature_sums,
        correct_only=correct_only,
    )
    acc.add(labels=np.asarray(labels), topk_idx=topk_idx, topk_val=topk_val, preds=preds, features=features)
    return acc.result(options=options)
