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
:func:`dtd_ray.selection.select_frequency`) and, optionally, the summed feature vectors
(for the ``contribution`` strategy).

Three drivers share that arithmetic and give identical tables:

* :func:`reduce_arrays` — records already in memory (numpy arrays);
* :func:`reduce_partition` — one finished ``records/model=…/split=…`` partition read
  file by file, batch by batch with pyarrow (no Ray). Memory: the tables, one row
  group, and the count buffer (≤ ``buffer_bytes``); an ImageNet-size partition
  (1.28 M × kmax 100, C = 1000, m = 2048, every k1 in 1..100) peaks at about 1.6 GB;
* :func:`reduce_ray` — the same partition through Ray Data: ``map_batches`` turns each
  batch into sparse partial counts on the workers (:func:`partial_counts`, never larger
  than the batch's top-k lists), the driver sums them into the tables.

Maps are exchanged with the reference implementation as JSON ``{"<class>": [idx, …]}``
(:func:`read_map_json`, :func:`write_map_json`); ``freq/`` and ``maps/`` tables are built
by :func:`freq_to_table` and :func:`dtd_ray.selection.maps_to_table`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dtd_ray import records, schema, storage

log = logging.getLogger(__name__)

# Buffered top-k entries before the per-bucket bincounts run. A bincount costs
# O(entries + C·m); buffering until the entries outnumber the G·C·m table keeps the
# table-sized part from dominating, while this cap bounds the buffer's memory.
DEFAULT_BUFFER_BYTES = 384 * 2**20
# Largest temporary key array of one bincount call (int64 entries).
_MAX_KEYS_PER_CALL = 1 << 24


# --------------------------------------------------------------------------- grid


def parse_k1_grid(spec: Any, *, kmax: int) -> np.ndarray:
    """The sorted, unique ``k1`` values of ``spec``, each checked to lie in ``[1, kmax]``.

    ``spec`` is ``None`` (every ``k1`` in ``1..kmax``), an int, a sequence of ints, or a
    string: ``"1..64"`` (inclusive range), ``"5..100:5"`` (range with step) or
    ``"1,2,5,10"``.
    """
    if spec is None:
        values = list(range(1, kmax + 1))
    elif isinstance(spec, (int, np.integer)):
        values = [int(spec)]
    elif isinstance(spec, str):
        s = spec.replace(" ", "")
        m = re.fullmatch(r"(\d+)\.\.(\d+)(?::(\d+))?", s)
        if m:
            lo, hi, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
            if step < 1 or hi < lo:
                raise ValueError(f"k1 grid {spec!r}: need lo ≤ hi and step ≥ 1")
            values = list(range(lo, hi + 1, step))
        elif re.fullmatch(r"\d+(,\d+)*", s):
            values = [int(v) for v in s.split(",")]
        else:
            raise ValueError(f"k1 grid {spec!r} is not 'lo..hi', 'lo..hi:step' or 'a,b,c'")
    else:
        values = [int(v) for v in spec]
    if not values:
        raise ValueError("the k1 grid is empty")
    grid = np.unique(np.asarray(values, dtype=np.int64))
    if grid[0] < 1:
        raise ValueError(f"k1={grid[0]} is not ≥ 1")
    if grid[-1] > kmax:
        raise ValueError(f"k1={grid[-1]} exceeds the records' kmax={kmax} (the top-k lists are that long)")
    return grid


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
        self.k1_grid = parse_k1_grid(list(k1_grid), kmax=self.kmax)
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
        sel = kind == _KIND_COUNT
        if sel.any():
            # keys may repeat when the iterator joined several partials: add.at, not +=
            np.add.at(self.counts.reshape(-1), key[sel], value[sel].astype(np.int32))
        sel = kind == _KIND_N
        if sel.any():
            np.add.at(self.n_instances, key[sel], value[sel].astype(np.int64))
        sel = kind == _KIND_MASS
        if sel.any() and self.mass is not None:
            np.add.at(self.mass, key[sel], value[sel])
        sel = kind == _KIND_FSUM
        if sel.any() and self.feature_sum is not None:
            np.add.at(self.feature_sum.reshape(-1), key[sel], value[sel])
        sel = kind == _KIND_ROWS
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
    grid = parse_k1_grid(k1_grid, kmax=kmax)
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


def _partition_info(root: str, *, model: str, split: str) -> tuple[str, Any, str, dict[str, Any]]:
    manifest = records.read_manifest(root, model=model, split=split)
    uri = records.partition_uri(root, model=model, split=split)
    if manifest is None:
        raise FileNotFoundError(f"no finished records at {uri} (no {schema.MANIFEST_NAME}); run jobs/extract.py first")
    for key in ("kmax", "feature_dim", "num_classes"):
        if key not in manifest:
            raise ValueError(f"records manifest at {uri} lacks {key!r}")
    fs, path = storage.resolve(uri)
    return uri, fs, path, manifest


def _record_columns(*, with_mass: bool, correct_only: bool, with_feature_sums: bool) -> list[str]:
    cols = [schema.LABEL, schema.TOPK_IDX]
    if with_mass:
        cols.append(schema.TOPK_VAL)
    if correct_only:
        cols.append(schema.PRED)
    if with_feature_sums:
        cols.append(schema.FEATURES)
    return cols


def _base_options(manifest: dict[str, Any], *, model: str, split: str, correct_only: bool) -> dict[str, Any]:
    cfg = manifest.get("config") or {}
    return {
        "model": model,
        "select_split": split,
        "correct_only": correct_only,
        # how the selection records were made (an augmented pass names its augmentation and seed)
        "augment": manifest.get("augment", cfg.get("augment")),
        "seed": manifest.get("seed", cfg.get("seed")),
        "records_rows": manifest.get("rows"),
    }


def reduce_partition(
    root: str,
    *,
    model: str,
    split: str,
    k1_grid: Any = None,
    correct_only: bool = False,
    with_feature_sums: bool = False,
    batch_rows: int = 65536,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> FreqTables:
    """Frequency tables of one finished records partition, read batch by batch (no Ray).

    Reads only the columns it needs (``label``, ``topk_idx``, ``topk_val``; ``pred`` for
    ``correct_only``; ``features`` for ``with_feature_sums``), so memory stays at the
    tables plus one batch plus the count buffer, whatever the number of records.
    """
    uri, fs, path, manifest = _partition_info(root, model=model, split=split)
    kmax, m, C = int(manifest["kmax"]), int(manifest["feature_dim"]), int(manifest["num_classes"])
    grid = parse_k1_grid(k1_grid, kmax=kmax)
    acc = CountAccumulator(
        num_classes=C,
        feature_dim=m,
        k1_grid=grid,
        kmax=kmax,
        with_feature_sums=with_feature_sums,
        correct_only=correct_only,
        buffer_bytes=buffer_bytes,
    )
    cols = _record_columns(with_mass=True, correct_only=correct_only, with_feature_sums=with_feature_sums)
    for batch in iter_record_batches(fs, path, columns=cols, batch_rows=batch_rows):
        _add_record_batch(acc, records.table_to_records(pa.Table.from_batches([batch])), kmax=kmax)
    return acc.result(options=_base_options(manifest, model=model, split=split, correct_only=correct_only))


def iter_record_batches(fs: Any, path: str, *, columns: list[str], batch_rows: int) -> Iterable[pa.RecordBatch]:
    """The partition's rows, file by file and batch by batch, reading only ``columns``.

    One ``ParquetFile.iter_batches`` at a time rather than a dataset scan: the scanner's
    read-ahead over several files and row groups held ~1 GB for an ImageNet-size
    partition, this holds about one row group.
    """
    files = sorted(pads.dataset(path, filesystem=fs, format="parquet").files)
    for file in files:
        with fs.open_input_file(file) as fh:
            pf = pq.ParquetFile(fh)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


def _add_record_batch(acc: CountAccumulator, arr: dict[str, np.ndarray], *, kmax: int) -> None:
    if arr[schema.LABEL].shape[0] == 0:
        return
    acc.add(
        labels=arr[schema.LABEL],
        topk_idx=arr[schema.TOPK_IDX],
        topk_val=arr.get(schema.TOPK_VAL),
        preds=arr.get(schema.PRED),
        features=arr.get(schema.FEATURES),
    )


# --- the Ray Data path: sparse partial counts per batch, summed on the driver -------

_KIND_COUNT, _KIND_N, _KIND_MASS, _KIND_FSUM, _KIND_ROWS = 0, 1, 2, 3, 4


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
    grid = parse_k1_grid(list(k1_grid), kmax=kmax)
    labels = np.asarray(batch[schema.LABEL])
    topk_idx = np.asarray(batch[schema.TOPK_IDX])
    topk_val = batch.get(schema.TOPK_VAL)
    features = batch.get(schema.FEATURES) if with_feature_sums else None
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
        if schema.PRED not in batch:
            raise ValueError("correct_only=True needs the pred column")
        keep = np.asarray(batch[schema.PRED]) == labels
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
        parts.append((_KIND_COUNT, nz, bc[nz]))
    else:  # large tables: sort-based, memory ∝ the batch, never the (G, C, m) table
        uk, cnt = np.unique(keys, return_counts=True)
        parts.append((_KIND_COUNT, uk, cnt))
    n = np.bincount(labels, minlength=C)
    parts.append((_KIND_N, np.flatnonzero(n), n[n > 0]))
    mk = (base + topk_idx).ravel()
    uk, inv = np.unique(mk, return_inverse=True)
    parts.append((_KIND_MASS, uk, np.bincount(inv.ravel(), weights=np.abs(topk_val).ravel().astype(np.float64))))
    if features is not None and labels.size:
        fsum = np.zeros((C, m))
        order = np.argsort(labels, kind="stable")
        sl = labels[order]
        starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
        fsum[sl[starts]] = np.add.reduceat(np.asarray(features)[order].astype(np.float64), starts, axis=0)
        flat = fsum.reshape(-1)
        nz = np.flatnonzero(flat)
        parts.append((_KIND_FSUM, nz, flat[nz]))
    parts.append((_KIND_ROWS, np.arange(3), np.array([rows_read, labels.shape[0], negative])))
    return {
        "kind": np.concatenate([np.full(len(k), kind, np.int8) for kind, k, _ in parts]),
        "key": np.concatenate([np.asarray(k, np.int64) for _, k, _ in parts]),
        "value": np.concatenate([np.asarray(v, np.float64) for _, _, v in parts]),
    }


class _PartialCountsFn:
    """``map_batches`` callable: Arrow batch of records → sparse partial counts."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return partial_counts(records.table_to_records(batch), **self.kwargs)


def reduce_ray(
    root: str,
    *,
    model: str,
    split: str,
    k1_grid: Any = None,
    correct_only: bool = False,
    with_feature_sums: bool = False,
    batch_rows: int = 65536,
) -> FreqTables:
    """:func:`reduce_partition` through Ray Data, for record sets larger than one node's memory.

    ``read_parquet`` streams the partition block by block; ``map_batches`` turns each
    batch into sparse partial counts (:func:`partial_counts`) on the workers; the
    driver sums the partials into the ``(G, C, m)`` tables. Needs an initialised Ray.
    Gives exactly the tables of the numpy pass (counts are integers; the float sums
    agree to rounding).
    """
    import ray

    uri, fs, path, manifest = _partition_info(root, model=model, split=split)
    kmax, m, C = int(manifest["kmax"]), int(manifest["feature_dim"]), int(manifest["num_classes"])
    grid = parse_k1_grid(k1_grid, kmax=kmax)
    cols = _record_columns(with_mass=True, correct_only=correct_only, with_feature_sums=with_feature_sums)
    # the partition's data files exactly as pyarrow lists them (manifest, staging folders excluded)
    files = sorted(pads.dataset(path, filesystem=fs, format="parquet").files)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {uri}")
    ds = ray.data.read_parquet(files, filesystem=fs, columns=cols, partitioning=None)
    kwargs = dict(
        num_classes=C,
        feature_dim=m,
        k1_grid=[int(v) for v in grid],
        kmax=kmax,
        correct_only=correct_only,
        with_feature_sums=with_feature_sums,
    )
    parts = ds.map_batches(_PartialCountsFn, fn_constructor_kwargs=kwargs, batch_size=batch_rows, batch_format="pyarrow")
    acc = CountAccumulator(
        num_classes=C,
        feature_dim=m,
        k1_grid=grid,
        kmax=kmax,
        with_feature_sums=with_feature_sums,
        correct_only=correct_only,
    )
    for batch in parts.iter_batches(batch_format="numpy", batch_size=None):
        acc.add_partial(batch)
    opts = _base_options(manifest, model=model, split=split, correct_only=correct_only)
    opts["engine"] = "ray"
    return acc.result(options=opts)


# --------------------------------------------------------------------------- freq/ table


def freq_to_table(freq: FreqTables, *, model: str) -> pa.Table:
    """The non-zero entries of every table as rows of :data:`schema.FREQ_SCHEMA`, sorted by (k1, class, feature).

    A missing ``(k1, class, feature)`` row means count 0.
    """
    g, y, j = np.nonzero(freq.counts)
    return pa.Table.from_arrays(
        [
            pa.array(np.full(g.size, model, dtype=object), pa.string()),
            pa.array(freq.k1_grid[g].astype(np.int32)),
            pa.array(y.astype(np.int32)),
            pa.array(j.astype(np.int32)),
            pa.array(freq.counts[g, y, j].astype(np.int64)),
        ],
        schema=schema.FREQ_SCHEMA,
    )


def freq_from_table(table: pa.Table | Any, *, num_classes: int, feature_dim: int, kmax: int | None = None) -> FreqTables:
    """The counts of a ``freq/`` table (Arrow or pandas) back as :class:`FreqTables`.

    Only the counts travel through ``freq/``: the result has no tie-break mass and no
    instance counts (``n_instances`` is the table's k1=min row sums divided by k1).
    """
    df = table.to_pandas() if isinstance(table, pa.Table) else table
    grid = np.unique(df["k1"].to_numpy().astype(np.int64))
    if grid.size == 0:
        raise ValueError("empty freq table")
    y = df["class"].to_numpy().astype(np.int64)
    j = df["feature"].to_numpy().astype(np.int64)
    if y.max() >= num_classes or j.max() >= feature_dim:
        raise ValueError(f"freq table has class {y.max()} / feature {j.max()}, expected C={num_classes}, m={feature_dim}")
    counts = np.zeros((grid.size, num_classes, feature_dim), dtype=np.int32)
    g = np.searchsorted(grid, df["k1"].to_numpy())
    counts[g, y, j] = df["count"].to_numpy()
    n = counts[0].sum(axis=1) // grid[0]
    return FreqTables(k1_grid=grid, counts=counts, n_instances=n.astype(np.int64), kmax=int(kmax or grid[-1]))


# --------------------------------------------------------------------------- JSON maps


def map_to_json(idx: np.ndarray) -> dict[str, list[int]]:
    """A (C, k2) map as the reference implementation's ``{"<class>": [idx, …]}`` (rank order kept)."""
    idx = np.asarray(idx)
    return {str(y): [int(v) for v in idx[y]] for y in range(idx.shape[0])}


def map_from_json(obj: dict[str, Iterable[int]], *, num_classes: int, feature_dim: int) -> np.ndarray:
    """Parse ``{"<class>": [idx, …]}`` into a (C, k2) int64 array, checking it fits the model.

    Raises ``ValueError`` for class keys other than ``0..C-1``, lists of different
    lengths, indices outside ``[0, m)`` or repeated within a class.
    """
    try:
        keys = sorted(int(k) for k in obj)
    except (TypeError, ValueError):
        raise ValueError("map keys must be class indices ('0', '1', …)") from None
    if keys != list(range(num_classes)):
        raise ValueError(f"map has {len(keys)} class(es) (keys {keys[:3]}…{keys[-1:]}), the model has {num_classes}")
    lookup = {int(k): v for k, v in obj.items()}
    rows = [list(lookup[y]) for y in range(num_classes)]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"map lists have different lengths {sorted(lengths)}; one k2 per map expected")
    idx = np.asarray(rows, dtype=np.int64).reshape(num_classes, -1)
    if idx.shape[1] == 0:
        raise ValueError("map lists are empty")
    if idx.min() < 0 or idx.max() >= feature_dim:
        bad_index = idx.max() if idx.max() >= feature_dim else idx.min()
        raise ValueError(f"map index {bad_index} is outside [0, {feature_dim}) (feature_dim={feature_dim})")
    s = np.sort(idx, axis=1)
    if (s[:, 1:] == s[:, :-1]).any():
        raise ValueError("map repeats a feature within a class")
    return idx


def read_map_json(path: str, *, num_classes: int, feature_dim: int) -> np.ndarray:
    """Read a reference-format JSON map (local path or URI) as a (C, k2) array; see :func:`map_from_json`."""
    fs, p = storage.resolve(path)
    obj = storage.read_json(fs, p)
    if obj is None:
        raise FileNotFoundError(f"no map file at {path}")
    return map_from_json(obj, num_classes=num_classes, feature_dim=feature_dim)


def write_map_json(path: str, idx: np.ndarray) -> None:
    """Write a (C, k2) map in the reference format (compact, like the published files)."""
    fs, p = storage.resolve(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(map_to_json(idx)).encode())
