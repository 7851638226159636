"""Selection strategies: which ``k2`` features each class keeps.

Every strategy returns a :class:`ClassMap` — per class a ranked list of feature
indices (best first) with the score that ranked it. A map of length ``K`` holds every
smaller map as a prefix: the ``k2``-map is ``idx[:, :k2]``, because each strategy's
ranking is a strict total order (its ties are broken deterministically), so the top-
``k2`` set of a ranking is always its first ``k2`` entries.

Strategies and their tie-breaks (earlier keys win; "lower index" is the last key of
every strategy, which makes each ranking a strict order):

``frequency`` (the paper)
    ``count[k1][y, j]`` descending (how many instances of ``y`` have ``j`` among their
    top-``k1`` features), then the class's summed magnitude ``mass[y, j] = Σ |f_ij|``
    over its top-``kmax`` entries descending, then lower index. Depends on ``k1``.
``weight_l1``
    ``|W[y, j]|`` descending, then ``W[y, j]`` descending (a positive weight before a
    negative one of equal size), then lower index. Independent of ``k1``.
``contribution``
    the mean contribution ``W[y, j] · mean_{i ∈ y} f_ij`` over the class's selection
    instances descending (signed: features that push the class's own logit up), then
    lower index. Independent of ``k1``.
``random``
    a per-class permutation drawn from ``numpy.random.default_rng(seed)`` (one
    ``random((C, m))`` draw, ranked by the drawn key, ties impossible in practice and
    broken by lower index). Independent of ``k1``; maps of every ``k2`` are nested.
    One map per seed (``random_seeds``), so that the report can give a mean ± sd.
``glm``
    the order in which the class's features enter the elastic-net regularisation path of
    a sparse linear head fitted on the selection features (glm-saga; see
    :mod:`dtd_ray.core.glm` for the objective and the tie-breaks). Independent of ``k1``.
    It needs the selection split's features, not only the frequency tables, and costs
    a path fit per model (README gives its time), so it is not in :data:`DEFAULT_STRATEGIES`.

For the ``k1``-independent strategies the map's ``k1`` is :data:`K1_NOT_APPLICABLE`
(``-1``) in every table (``maps/``, evaluation rows), so a ``(strategy, k1, k2)`` key
never pretends that ``k1`` mattered; compare them with ``frequency`` at equal ``k2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# What every strategy shares (the map, the names, the k2 rules) lives in core.classmap, which
# core.glm imports too; re-exported here, where the strategies are.
from dtd_ray.core.classmap import (  # noqa: F401
    DEFAULT_STRATEGIES,
    FULL,
    K1_INDEPENDENT,
    K1_NOT_APPLICABLE,
    SEED_NOT_APPLICABLE,
    STRATEGIES,
    ClassMap,
    check_k2,
    full_map,
    rank_rows,
)
from dtd_ray.core.counting import FreqTables

__all__ = ["DEFAULT_STRATEGIES", "FULL", "K1_INDEPENDENT", "K1_NOT_APPLICABLE", "SEED_NOT_APPLICABLE", "STRATEGIES", "ClassMap",
           "check_k2", "full_map", "imported_map", "mean_contribution", "rank_rows", "select_contribution", "select_frequency",
           "select_maps",
           "select_random", "select_weight_l1", "frequency_tie_order"]


def _rank_by_int_then_order(primary: np.ndarray, pos0: np.ndarray, *, k: int) -> np.ndarray:
    """``rank_rows`` for an integer primary key whose ties follow a fixed per-row order.

    ``pos0[y, j]`` is ``j``'s position in the tie order (0 = best). The composite key
    ``primary·m + (m-1-pos0)`` is unique per row, so ``argpartition`` (O(m)) plus a sort
    of the ``k`` winners gives the exact order — much cheaper than a full lexsort when
    it is repeated for every ``k1`` of a large grid.
    """
    C, m = primary.shape
    key = primary.astype(np.int64) * m + (m - 1 - pos0)
    if k < m:
        part = np.argpartition(-key, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(m), (C, m))
    sub = np.take_along_axis(key, part, axis=1)
    order = np.argsort(-sub, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def frequency_tie_order(freq: FreqTables) -> np.ndarray:
    """``pos0[y, j]``: ``j``'s place in class ``y``'s tie order (mass desc, then lower index)."""
    C, m = freq.num_classes, freq.feature_dim
    mass = freq.mass if freq.mass is not None else np.zeros((C, m))
    order = rank_rows([mass], k=m)
    pos0 = np.empty_like(order)
    np.put_along_axis(pos0, order, np.broadcast_to(np.arange(m), (C, m)), axis=1)
    return pos0


def select_frequency(
    *, freq: FreqTables, k1: int, k2: int, tie_order: np.ndarray | None = None, allow_empty: bool = False
) -> ClassMap:
    """The paper's map: ``I_y`` = the ``k2`` most frequent features in the top-``k1`` lists of class ``y``.

    Ranking: ``count[k1][y, j]`` desc, then ``mass[y, j]`` desc, then lower ``j`` (see the
    module docstring). ``tie_order`` (from :func:`frequency_tie_order`) may be passed to
    reuse it over a grid. A class with no instances would get an arbitrary map: that is
    a ``ValueError`` unless ``allow_empty``.
    """
    check_k2(k2=k2, k1=k1, limit=freq.feature_dim, what="the feature dimension")
    counts = freq.for_k1(k1)
    empty = np.flatnonzero(freq.n_instances == 0)
    if empty.size and not allow_empty:
        raise ValueError(
            f"class(es) {empty.tolist()} have no selection instances: no frequency map can be selected for them"
        )
    pos0 = frequency_tie_order(freq) if tie_order is None else tie_order
    idx = _rank_by_int_then_order(counts, pos0, k=k2)
    cnt = np.take_along_axis(counts, idx, axis=1).astype(np.int64)
    return ClassMap(strategy="frequency", k1=int(k1), idx=idx, score=cnt.astype(np.float64), count=cnt)


def select_weight_l1(*, weight: np.ndarray, k2: int) -> ClassMap:
    """``I_y`` = the ``k2`` features with the largest ``|W[y, j]|`` (then larger ``W``, then lower ``j``)."""
    w = np.asarray(weight, dtype=np.float64)
    check_k2(k2=k2, k1=K1_NOT_APPLICABLE, limit=w.shape[1], what="the feature dimension")
    idx = rank_rows([np.abs(w), w], k=k2)
    return ClassMap(strategy="weight_l1", k1=K1_NOT_APPLICABLE, idx=idx, score=np.abs(np.take_along_axis(w, idx, 1)))


def mean_contribution(*, weight: np.ndarray, class_mean_features: np.ndarray) -> np.ndarray:
    """``s[y, j] = W[y, j] · mean_{i ∈ y} f_ij`` (C, m): the mean of ``W[y, j] f_ij`` over class ``y``."""
    w = np.asarray(weight, dtype=np.float64)
    mu = np.asarray(class_mean_features, dtype=np.float64)
    if mu.shape != w.shape:
        raise ValueError(f"class mean features have shape {mu.shape}, the head {w.shape}")
    return w * mu


def select_contribution(*, weight: np.ndarray, class_mean_features: np.ndarray, k2: int) -> ClassMap:
    """``I_y`` = the ``k2`` features of largest mean contribution ``W[y, j]·f̄_yj`` (then lower ``j``)."""
    s = mean_contribution(weight=weight, class_mean_features=class_mean_features)
    check_k2(k2=k2, k1=K1_NOT_APPLICABLE, limit=s.shape[1], what="the feature dimension")
    if not np.isfinite(s).all():
        raise ValueError("mean contributions contain NaN/inf (a class without instances?)")
    idx = rank_rows([s], k=k2)
    return ClassMap(strategy="contribution", k1=K1_NOT_APPLICABLE, idx=idx, score=np.take_along_axis(s, idx, 1))


def select_random(*, num_classes: int, feature_dim: int, k2: int, seed: int) -> ClassMap:
    """``I_y`` = the first ``k2`` of a seeded per-class random permutation (nested over ``k2``)."""
    check_k2(k2=k2, k1=K1_NOT_APPLICABLE, limit=feature_dim, what="the feature dimension")
    key = np.random.default_rng(seed).random((num_classes, feature_dim))
    idx = rank_rows([key], k=k2)
    return ClassMap(strategy="random", k1=K1_NOT_APPLICABLE, idx=idx, score=np.take_along_axis(key, idx, 1),
                    seed=int(seed))


def select_maps(
    *,
    strategies: Sequence[str],
    freq: FreqTables,
    weight: np.ndarray,
    k1_grid: Sequence[int] | None = None,
    k2_max: int | None = None,
    seed: int = 0,
    random_seeds: int = 1,
    features: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> list[ClassMap]:
    """The maps of a whole grid: for ``frequency`` one map per ``k1`` (length ``k1``, so
    every ``k2 ≤ k1`` is a prefix), for each ``k1``-independent strategy one map of length
    ``k2_max`` (default: the largest ``k1``); ``random`` gets one map per seed
    ``seed, seed + 1, …, seed + random_seeds − 1`` (a single random draw says little).
    ``glm`` fits its path on ``features``/``labels`` (the selection split), which it requires.
    """
    if random_seeds < 1:
        raise ValueError(f"random_seeds={random_seeds} must be ≥ 1")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; valid: {', '.join(STRATEGIES)}")
    w = np.asarray(weight)
    if w.shape != (freq.num_classes, freq.feature_dim):
        raise ValueError(f"head weight has shape {w.shape}, the tables (C, m) = {(freq.num_classes, freq.feature_dim)}")
    grid = [int(k) for k in (freq.k1_grid if k1_grid is None else k1_grid)]
    kk = int(k2_max or max(grid))
    out: list[ClassMap] = []
    for strategy in strategies:
        if strategy == "frequency":
            pos0 = frequency_tie_order(freq)
            out.extend(select_frequency(freq=freq, k1=k1, k2=k1, tie_order=pos0) for k1 in grid)
        elif strategy == "weight_l1":
            out.append(select_weight_l1(weight=w, k2=kk))
        elif strategy == "contribution":
            out.append(select_contribution(weight=w, class_mean_features=freq.class_mean_features(), k2=kk))
        elif strategy == "random":
            out.extend(select_random(num_classes=w.shape[0], feature_dim=w.shape[1], k2=kk, seed=seed + i)
                       for i in range(random_seeds))
        else:
            if features is None or labels is None:
                raise ValueError("the glm strategy fits its path on the selection features: pass features and labels")
            # imported when used: core.glm brings torch and glm-saga
            from dtd_ray.core.glm import select_glm

            check_k2(k2=kk, k1=K1_NOT_APPLICABLE, limit=w.shape[1], what="the feature dimension")
            out.append(select_glm(features=features, labels=labels, num_classes=w.shape[0], kmax=kk, seed=seed))
    return out


def imported_map(idx: np.ndarray, *, name: str = "imported") -> ClassMap:
    """Wrap an external (C, k2) map (e.g. a reference JSON) in a :class:`ClassMap` (``k1`` not applicable)."""
    idx = np.asarray(idx, dtype=np.int64)
    return ClassMap(strategy=name, k1=K1_NOT_APPLICABLE, idx=idx, score=np.full(idx.shape, np.nan), nested=False)
