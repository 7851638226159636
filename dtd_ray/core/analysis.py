"""Analyses of class maps: channel usage, essentiality, and Ψ.

* :func:`channel_usage` / :func:`pruning_summary` — how many classes use each channel;
  channels no class uses (``m − |∪_y I_y|``) are what pruning the last block could remove.
* :func:`essentiality_test` — the paper's test: for the instances of class ``y``, replace
  the class's selected features ``f_j, j ∈ I_y`` by ``N(0, 1)`` noise, and separately
  replace all its other features ``f_j, j ∉ I_y``; the per-class accuracy of both (and
  of the clean features). Selected features are essential when the first collapses and
  the second does not. Noise of unit variance on features whose class mean is larger is also a
  shift, and the two sets differ in size (k against m − k), so the test is kept as a labelled
  extra beside :func:`ablation_outcomes`, the matched version.
* :func:`ablation_outcomes` — matched ablations: for the instances of class ``y``, the
  class's ``k`` selected features are set to their mean over the training split
  (``kind="mean"``) or replaced by the same features of other instances (``kind="permute"``,
  one permutation of the evaluated rows per seed), against the same ablation of ``k`` of
  the class's other features drawn at random: equal counts, values from the features' own
  distribution. Another strategy's map ablated the same way (top-|W|, contribution) is that
  strategy's row.
* :func:`psi` — per instance, the share of channels that hold a fraction ``q`` of the
  L1 mass: with ``|v|`` sorted descending and ``n_q`` the smallest count whose prefix sum
  is ≥ ``q · Σ|v|``, ``Ψ = n_q / m``. Smaller Ψ means the mass sits on fewer features
  (more concentrated; the paper's "lower-dimensional" final representation);
  :func:`psi_by_class` takes the median over each class. For conv blocks ``v`` is the
  per-channel L1 norm of the feature map (:func:`channel_l1`); :func:`block_channel_norms`
  collects those for the blocks a backbone names (last block and earlier ones) through
  forward hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from dtd_ray.core import heads

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- cost


def channel_usage(*, idx: Any, feature_dim: int) -> np.ndarray:
    """``u[j]`` = number of classes whose map contains feature ``j`` (m,)."""
    idx = heads.check_map(idx, num_classes=np.asarray(idx).shape[0], feature_dim=feature_dim).numpy()
    return np.bincount(idx.reshape(-1), minlength=feature_dim)


def pruning_summary(*, idx: Any, feature_dim: int) -> dict[str, Any]:
    """Channels any class uses (``|∪_y I_y|``) and those none uses (prunable), with shares.

    ``shared`` counts channels used by more than one class; ``max_classes_per_channel``
    is the most classes any one channel serves.
    """
    u = channel_usage(idx=idx, feature_dim=feature_dim)
    used = int((u > 0).sum())
    return {
        "feature_dim": int(feature_dim),
        "channels_used": used,
        "channels_unused": int(feature_dim - used),
        "unused_fraction": float((feature_dim - used) / feature_dim),
        "unused": np.flatnonzero(u == 0).tolist(),
        "shared": int((u > 1).sum()),
        "max_classes_per_channel": int(u.max()) if u.size else 0,
    }


# --------------------------------------------------------------------------- essentiality


def _head_arrays(*, features: Any, labels: Any, weight: Any, bias: Any
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(f, y, W, b)`` as float64 / int64 arrays, features (N, m) and labels (N,) checked against W (C, m)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    m = w.shape[1]
    if f.ndim != 2 or f.shape[1] != m or y.shape != (f.shape[0],):
        raise ValueError(f"features {f.shape} and labels {y.shape} do not match a head of width {m}")
    return f, y, w, b


def essentiality_test(
    *,
    features: Any,
    labels: Any,
    weight: Any,
    bias: Any,
    idx: Any,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    head: str = "full",
    noise_std: float = 1.0,
) -> dict[str, np.ndarray]:
    """Per-class accuracy with the class's selected / other features replaced by noise.

    For each class ``y`` and its instances ``i``: ``f'_i[I_y] ~ N(0, noise_std²)``
    (``acc_selected_noise[y]``) and, separately, ``f'_i[j ∉ I_y] ~ N(0, noise_std²)``
    (``acc_others_noise[y]``); ``acc_clean[y]`` uses ``f_i``. Predictions come from the
    original head (``head="full"``) or the decomposed head (``head="decomposed"``).
    Noise is drawn per class from ``numpy.random.default_rng([s, y])`` for every noise
    seed ``s`` in ``seeds`` (default ``[seed]``), so a class's result does not depend on
    the others; the accuracies are means over the seeds, ``*_sd`` their standard
    deviation over seeds (ddof 1; 0 for one seed). A class with no instances gets NaN.
    Returns arrays (C,): ``n, acc_clean, acc_selected_noise, acc_others_noise,
    acc_selected_noise_sd, acc_others_noise_sd``, and per instance (N,), in input order:
    ``outcome_clean`` (0/1) and ``outcome_selected_noise``, ``outcome_others_noise``
    (the fraction of noise seeds under which the instance is still classified as its class).
    """
    if head not in ("full", "decomposed"):
        raise ValueError(f"head must be 'full' or 'decomposed', got {head!r}")
    seeds = [int(seed)] if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    f, y, w, b = _head_arrays(features=features, labels=labels, weight=weight, bias=bias)
    C, m = w.shape
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf values")
    if y.size and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"labels outside [0, {C})")
    I = heads.check_map(idx, num_classes=C, feature_dim=m).numpy()
    w_eval = heads.masked_weight(weight=w, idx=I).numpy() if head == "decomposed" else w

    def predict(x: np.ndarray) -> np.ndarray:
        return (x @ w_eval.T + b).argmax(1)

    keys = ("acc_clean", "acc_selected_noise", "acc_others_noise", "acc_selected_noise_sd", "acc_others_noise_sd")
    out = {k: np.full(C, np.nan) for k in keys}
    out["n"] = np.bincount(y, minlength=C)
    N = f.shape[0]
    out["outcome_clean"] = np.zeros(N)
    out["outcome_selected_noise"] = np.zeros(N)
    out["outcome_others_noise"] = np.zeros(N)
    for c in range(C):
        rows = np.flatnonzero(y == c)
        if rows.size == 0:
            continue
        x = f[rows]
        sel = np.zeros(m, dtype=bool)
        sel[I[c]] = True
        clean = predict(x) == c
        out["outcome_clean"][rows] = clean
        out["acc_clean"][c] = float(clean.mean())
        accs: dict[str, list[float]] = {"selected": [], "others": []}
        for s in seeds:
            noise = np.random.default_rng([s, c]).normal(0.0, noise_std, size=x.shape)
            for what, mask in (("selected", sel), ("others", ~sel)):
                xn = x.copy()
                xn[:, mask] = noise[:, mask]
                ok = predict(xn) == c
                out[f"outcome_{what}_noise"][rows] += ok / len(seeds)
                accs[what].append(float(ok.mean()))
        for what, a in accs.items():
            out[f"acc_{what}_noise"][c] = float(np.mean(a))
            out[f"acc_{what}_noise_sd"][c] = float(np.std(a, ddof=1)) if len(a) > 1 else 0.0
    empty = np.flatnonzero(out["n"] == 0)
    if empty.size:
        log.warning("essentiality test: class(es) %s have no instances (NaN accuracy)", empty.tolist())
    return out


def ablation_outcomes(
    *,
    features: Any,
    labels: Any,
    weight: Any,
    bias: Any,
    idx: Any,
    kind: str,
    means: Any = None,
    seeds: Sequence[int] = (0,),
) -> dict[str, np.ndarray]:
    """Per instance, the share of ``seeds`` under which it stays right when features of its class are ablated.

    With ``S_y`` a set of features of class ``y`` and ``i`` an instance of ``y``:

        mean:     f'_ij = μ_j                 for j ∈ S_y   (μ: ``means``, the means of the records the maps
                                                         were counted from)
        permute:  f'_ij = f_{π(i), j}         for j ∈ S_y   (π: a permutation of all rows, per seed)

    other features unchanged; the original head ``W f' + b`` predicts. ``selected`` uses
    ``S_y = I_y`` (the map, (C, k)); ``random`` uses k features drawn without replacement
    from the class's m − k others by ``numpy.random.default_rng([s, 1, y])``. Seeds only
    matter where something is drawn (the permutation, the random set): ``mean`` of the
    selected features is the same for every seed. Returns ``{"selected": (N,), "random": (N,)}``
    (floats in [0, 1], input order).
    """
    if kind not in ("mean", "permute"):
        raise ValueError(f"kind must be 'mean' or 'permute', got {kind!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    f, y, w, b = _head_arrays(features=features, labels=labels, weight=weight, bias=bias)
    C, m = w.shape
    I = heads.check_map(idx, num_classes=C, feature_dim=m).numpy()
    k = I.shape[1]
    mu = None
    if kind == "mean":
        mu = None if means is None else np.asarray(means, dtype=np.float64)
        if mu is None or mu.shape != (m,):
            raise ValueError(f"kind='mean' needs the training split's feature means, shape ({m},)")
    N = f.shape[0]
    sel = np.zeros((C, m), dtype=bool)
    sel[np.arange(C)[:, None], I] = True
    out = {"selected": np.zeros(N), "random": np.zeros(N)}
    for s in seeds:
        rand = np.zeros((C, m), dtype=bool)
        for c in range(C):
            others = np.flatnonzero(~sel[c])
            pick = np.random.default_rng([s, 1, c]).choice(others, size=min(k, others.size), replace=False)
            rand[c, pick] = True
        repl = np.broadcast_to(mu, f.shape) if kind == "mean" else f[np.random.default_rng([s, 2]).permutation(N)]
        for name, sets in (("selected", sel), ("random", rand)):
            x = np.where(sets[y], repl, f)  # sets[y]: (N, m), the features ablated for each instance's class
            out[name] += ((x @ w.T + b).argmax(1) == y) / len(seeds)
    return out


# --------------------------------------------------------------------------- Ψ


def psi(*, values: Any, q: float = 0.9) -> np.ndarray:
    """Per instance, the share of channels that hold ``q`` of the L1 mass (N,); smaller = more concentrated.

    ``a = sort(|v|, desc)``, ``n_q = min{n : Σ_{r<n} a_r ≥ q · Σ_r a_r}``, ``Ψ = n_q/m``.
    The comparison allows a relative 1e-12 for rounding in the prefix sums. Rows with
    zero mass have no defined ``n_q``: NaN.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q={q} is outside (0, 1]")
    v = np.abs(np.asarray(values, dtype=np.float64))
    if v.ndim != 2:
        raise ValueError(f"values have shape {v.shape}, expected (N, channels)")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    N, m = v.shape
    a = -np.sort(-v, axis=1)
    cs = np.cumsum(a, axis=1)
    total = cs[:, -1:] if m else np.zeros((N, 1))
    reached = cs >= q * total * (1.0 - 1e-12)
    n_q = reached.argmax(axis=1) + 1
    out = n_q / m
    out[total[:, 0] <= 0] = np.nan
    return out


def weighted_psi(*, features: Any, labels: Any, weight: Any, q: float = 0.9) -> np.ndarray:
    """Ψ of the contributions to the instance's own class logit: :func:`psi` of ``|W[y_i, j] · f_ij|`` (N,).

    Plain Ψ counts a large feature that the head barely weighs; this one measures how few
    features carry the class's evidence."""
    f = np.asarray(features, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if f.ndim != 2 or f.shape[1] != w.shape[1] or y.shape != (f.shape[0],):
        raise ValueError(f"features {f.shape}, labels {y.shape} and weight {w.shape} do not match")
    return psi(values=w[y] * f, q=q)


def psi_by_class(*, values: Any, labels: Any, num_classes: int, q: float = 0.9) -> dict[str, Any]:
    """``median_{i ∈ y} Ψ_i`` per class (C,), with the instance counts and a warning list.

    Instances with zero mass (undefined Ψ) are left out and counted in ``zero_mass``; a
    class with no instances (or none with mass) gets NaN and a warning.
    """
    p = psi(values=values, q=q)
    y = np.asarray(labels).astype(np.int64)
    if y.shape != p.shape:
        raise ValueError(f"labels have shape {y.shape}, values {np.asarray(values).shape}")
    med = np.full(num_classes, np.nan)
    n = np.bincount(y, minlength=num_classes)[:num_classes]
    warnings: list[str] = []
    for c in range(num_classes):
        pc = p[y == c]
        pc = pc[np.isfinite(pc)]
        if pc.size:
            med[c] = float(np.median(pc))
    zero = int(np.isnan(p).sum())
    if zero:
        warnings.append(f"{zero} instance(s) with zero L1 mass have no Ψ and were left out")
    empty = np.flatnonzero(np.isnan(med)).tolist()
    if empty:
        warnings.append(f"class(es) {empty} have no instances with mass: Ψ is NaN")
    for w in warnings:
        log.warning(w)
    return {"q": q, "psi_median": med, "n": n, "zero_mass": zero, "warnings": warnings}


def channel_l1(feature_map: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-channel L1 norm of a block's output: ``v[n, c] = Σ_{h,w} |x[n, c, h, w]|`` (N, C).

    A 2-D input (already pooled features) is returned as ``|x|``.
    """
    x = feature_map if isinstance(feature_map, torch.Tensor) else torch.from_numpy(np.asarray(feature_map))
    x = x.detach().float().abs()
    if x.ndim == 2:
        return x.numpy()
    if x.ndim < 3:
        raise ValueError(f"feature map has shape {tuple(x.shape)}, expected (N, C, ...)")
    return x.flatten(2).sum(-1).numpy()


def block_channel_norms(
    *,
    backbone: Any,
    batches: Iterable[torch.Tensor],
    blocks: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per-channel L1 norms (N, C_b) of the outputs of named blocks, via forward hooks.

    ``backbone`` has ``blocks`` (name → module, forward order; the last is the last
    conv block before pooling) and ``forward_features``; ``batches`` yields normalised
    input tensors. ``blocks`` defaults to all the backbone names. The hooks are removed
    afterwards, also on error.
    """
    named = dict(backbone.blocks)
    names = list(named) if blocks is None else list(blocks)
    unknown = [b for b in names if b not in named]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown}; the backbone names {list(named)}")
    acc: dict[str, list[np.ndarray]] = {b: [] for b in names}
    handles = []
    for b in names:
        handles.append(named[b].register_forward_hook(lambda _m, _i, out, b=b: acc[b].append(channel_l1(out))))
    try:
        with torch.inference_mode():
            for x in batches:
                backbone.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return {b: (np.concatenate(v) if v else np.zeros((0, 0))) for b, v in acc.items()}
