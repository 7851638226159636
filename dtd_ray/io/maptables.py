"""The method's small tables as Arrow (``freq/``, ``maps/``) and the reference JSON maps.

Schemas are in :mod:`dtd_ray.io.schema`; the maps exchanged with the reference
implementation are JSON ``{"<class>": [idx, …]}``, checked by the one class-map validator
(:func:`dtd_ray.core.heads.check_map`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

from dtd_ray.core.counting import FreqTables
from dtd_ray.core.heads import check_map
from dtd_ray.core.selection import ClassMap
from dtd_ray.io import schema, storage


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


# --------------------------------------------------------------------------- maps/ table


def maps_to_table(maps: Sequence[ClassMap], *, model: str) -> "pa.Table":
    """Rows of :data:`schema.MAPS_SCORED_SCHEMA`: one per (map, class, rank).

    Each map is stored once at its full length ``K`` (column ``k2 = K``); the map of
    any smaller ``k2`` is its rows with ``rank < k2`` (see :func:`map_from_table`).
    """

    cols: dict[str, list[np.ndarray]] = {f.name: [] for f in schema.MAPS_SCORED_SCHEMA}
    for cm in maps:
        C, K = cm.idx.shape
        n = C * K
        cols["model"].append(np.full(n, model, dtype=object))
        cols["strategy"].append(np.full(n, cm.strategy, dtype=object))
        cols["k1"].append(np.full(n, cm.k1, dtype=np.int32))
        cols["k2"].append(np.full(n, K, dtype=np.int32))
        cols["class"].append(np.repeat(np.arange(C, dtype=np.int32), K))
        cols["rank"].append(np.tile(np.arange(K, dtype=np.int32), C))
        cols["feature"].append(cm.idx.reshape(-1).astype(np.int32))
        cols["count"].append(
            np.full(n, None, dtype=object) if cm.count is None else cm.count.reshape(-1).astype(object)
        )
        cols["score"].append(cm.score.reshape(-1).astype(np.float64))
        cols["map_seed"].append(np.full(n, cm.seed, dtype=np.int32))
    arrays = []
    for f in schema.MAPS_SCORED_SCHEMA:
        parts = cols[f.name]
        data = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
        arrays.append(pa.array(data, type=f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema.MAPS_SCORED_SCHEMA)


def map_from_table(table, *, strategy: str, k1: int, k2: int, num_classes: int | None = None,
                   map_seed: int | None = None) -> ClassMap:
    """The ``(strategy, k1, k2)`` map from a ``maps/`` table (Arrow or pandas).

    Picks the stored map of that strategy and ``k1`` (``-1`` for k1-independent
    strategies) whose length is ≥ ``k2`` and takes its first ``k2`` ranks. A random
    map is one per seed: ``map_seed`` picks it (default: the smallest stored seed).
    """

    df = table.to_pandas() if isinstance(table, pa.Table) else table
    sel = df[(df["strategy"] == strategy) & (df["k1"] == k1) & (df["k2"] >= k2)]
    if "map_seed" in sel and len(sel):
        seed = int(sel["map_seed"].min()) if map_seed is None else int(map_seed)
        sel = sel[sel["map_seed"] == seed]
    else:
        seed = -1
    if sel.empty:
        raise ValueError(f"no stored {strategy} map with k1={k1} and length ≥ {k2}")
    K = int(sel["k2"].min())
    sel = sel[(sel["k2"] == K) & (sel["rank"] < k2)].sort_values(["class", "rank"])
    C = int(sel["class"].max()) + 1
    if num_classes is not None and C != num_classes:
        raise ValueError(f"stored map has {C} classes, expected {num_classes}")
    if len(sel) != C * k2 or sel.duplicated(["class", "rank"]).any():
        raise ValueError(
            f"stored {strategy} map k1={k1}: {len(sel)} rows for {C}×{k2} (incomplete, or several selections "
            "mixed: filter the table to one select_split / correct_only first)"
        )
    idx = sel["feature"].to_numpy().astype(np.int64).reshape(C, k2)
    score = sel["score"].to_numpy().astype(np.float64).reshape(C, k2) if "score" in sel else np.full((C, k2), np.nan)
    count = None
    if strategy == "frequency" and sel["count"].notna().all():
        count = sel["count"].to_numpy().astype(np.int64).reshape(C, k2)
    return ClassMap(strategy=strategy, k1=int(k1), idx=idx, score=score, count=count, seed=seed)


# --------------------------------------------------------------------------- JSON maps


def map_to_json(idx: np.ndarray) -> dict[str, list[int]]:
    """A (C, k2) map as the reference implementation's ``{"<class>": [idx, …]}`` (rank order kept)."""
    idx = np.asarray(idx)
    return {str(y): [int(v) for v in idx[y]] for y in range(idx.shape[0])}


def map_from_json(obj: dict[str, Iterable[int]], *, num_classes: int, feature_dim: int) -> np.ndarray:
    """Parse ``{"<class>": [idx, …]}`` into a (C, k2) int64 array, checking it fits the model.

    Raises ``ValueError`` for class keys other than ``0..C-1`` and lists of different
    lengths; the indices are checked by the one class-map validator
    (:func:`dtd_ray.core.heads.check_map`: inside ``[0, m)``, none repeated within a class).
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
    return check_map(idx, num_classes=num_classes, feature_dim=feature_dim).numpy()  # indices in range, none repeated


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
