"""The decomposed head and its evaluation on cached features.

The decomposed head keeps, for every class ``y``, only the weights of its own
features ``I_y`` (a row of a class map):

    z_y = b_y + Σ_{j ∈ I_y} W[y, j] · f_j

— exactly the full linear head with its weight matrix masked per class, the bias
kept and nothing rescaled. Three implementations that agree to rounding:

* :func:`masked_logits` — the masked full FC ``f (W ⊙ M)ᵀ + b``: C·m multiply-adds,
  the reference against which the others are tested;
* :class:`DecomposedHead` — an ``nn.Module`` holding the gathered per-class weights
  ``Wg[y, r] = W[y, I_y[r]]``: ``z = b + Σ_r f[:, I_y[r]] · Wg[y, r]``, C·k2 multiply-
  adds, trainable, for use inside a full network;
* :func:`evaluate_grid` — every ``k2`` of many maps at once: for a ranked map of
  length ``K`` the logits of all ``k2 ≤ K`` are the cumulative sums over ``r`` of the
  ranked contributions ``W[y, I_y[r]] · f[:, I_y[r]]`` (one ``(n, C, K)`` tensor and a
  ``cumsum`` per chunk of instances), so a whole ``(strategy, k1, k2)`` grid costs about
  ``N · C · Σ K`` additions instead of one full head evaluation per configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from dtd_ray.core import stats


# Largest (n, C, K) block that evaluate_grid materialises at once (elements): a few
# MB of float64 stays in cache and bounds memory for ImageNet-size heads.
DEFAULT_CHUNK_ELEMS = 1 << 21


def _t(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.ascontiguousarray(x)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # torch refuses to alias read-only memory
    return t if dtype is None else t.to(dtype)


def check_map(idx: Any, *, num_classes: int, feature_dim: int) -> torch.Tensor:
    """A (C, k2) class map as a long tensor, or ``ValueError`` where it does not fit the head.

    Refuses another number of classes, indices outside ``[0, m)`` and a feature
    repeated within a class (it would be counted twice).
    """
    t = _t(idx).long()
    if t.ndim != 2:
        raise ValueError(f"class map has shape {tuple(t.shape)}, expected (num_classes, k2)")
    if t.shape[0] != num_classes:
        raise ValueError(f"class map has {t.shape[0]} classes, the head {num_classes}")
    if t.shape[1] < 1:
        raise ValueError("class map is empty (k2 = 0)")
    if t.shape[1] > feature_dim:
        raise ValueError(f"k2={t.shape[1]} is larger than the feature dimension {feature_dim}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= feature_dim:
        bad_index = hi if hi >= feature_dim else lo
        raise ValueError(f"class map index {bad_index} is outside [0, {feature_dim}) (feature_dim={feature_dim})")
    s = t.sort(dim=1).values
    if (s[:, 1:] == s[:, :-1]).any():
        raise ValueError("class map repeats a feature within a class")
    return t


def _check_features(features: torch.Tensor, feature_dim: int) -> None:
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise ValueError(f"features have shape {tuple(features.shape)}, expected (N, {feature_dim})")


def full_logits(*, features: Any, weight: Any, bias: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``z = f Wᵀ + b`` (N, C) — the original head."""
    f, w, b = _t(features, dtype), _t(weight, dtype), _t(bias, dtype)
    _check_features(f, w.shape[1])
    return torch.addmm(b, f, w.T)


def masked_weight(*, weight: Any, idx: Any) -> torch.Tensor:
    """``W ⊙ M`` with ``M[y, j] = 1`` iff ``j ∈ I_y`` (C, m)."""
    w = _t(weight)
    i = check_map(idx, num_classes=w.shape[0], feature_dim=w.shape[1])
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask.scatter_(1, i, True)
    return w * mask


def masked_logits(*, features: Any, weight: Any, bias: Any, idx: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The masked full FC ``z = f (W ⊙ M)ᵀ + b`` (N, C): the decomposed head at full cost."""
    return full_logits(features=features, weight=masked_weight(weight=_t(weight, dtype), idx=idx), bias=bias, dtype=dtype)


def decomposed_logits(
    *, features: Any, weight: Any, bias: Any, idx: Any, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``z[n, y] = b_y + Σ_r W[y, I_y[r]] · f[n, I_y[r]]`` (N, C) by gathering (C·k2 multiply-adds per instance)."""
    f, w, b = _t(features, dtype), _t(weight, dtype), _t(bias, dtype)
    i = check_map(idx, num_classes=w.shape[0], feature_dim=w.shape[1])
    _check_features(f, w.shape[1])
    wg = w.gather(1, i)
    return (f[:, i] * wg).sum(-1) + b


class DecomposedHead(nn.Module):
    """``z_y = b_y + Σ_{r<k2} Wg[y, r] · f[I_y[r]]`` with per-class gathered weights.

    Holds ``weight`` (C, k2) = ``W[y, I_y]`` and ``bias`` (C,) as parameters and the
    map ``idx`` (C, k2) as a buffer; compute and parameters are ∝ C·k2. Built from the
    original head with :meth:`from_linear` it reproduces the masked full FC exactly.
    """

    def __init__(self, *, weight: Any, bias: Any, idx: Any) -> None:
        super().__init__()
        # keep the caller's float dtype (float64 for exact checks, float32 in a network)
        w, b = _t(weight).detach(), _t(bias).detach()
        if not (w.is_floating_point() and b.is_floating_point()):
            w, b = w.float(), b.float()
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"head weight {tuple(w.shape)} / bias {tuple(b.shape)} do not form a (C, m) head")
        i = check_map(idx, num_classes=w.shape[0], feature_dim=w.shape[1])
        self.num_classes, self.feature_dim, self.k2 = int(w.shape[0]), int(w.shape[1]), int(i.shape[1])
        self.register_buffer("idx", i)
        self.weight = nn.Parameter(w.gather(1, i).clone())
        self.bias = nn.Parameter(b.clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, idx: Any) -> "DecomposedHead":
        """The decomposed head of ``linear`` (an ``nn.Linear`` with bias) under map ``idx``."""
        if linear.bias is None:
            raise ValueError("the head has no bias; the decomposed head keeps b_y, so one is needed")
        return cls(weight=linear.weight, bias=linear.bias, idx=idx)

    @property
    def macs(self) -> int:
        """Multiply-adds per instance: C·k2 (bias additions not counted)."""
        return self.num_classes * self.k2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # f[:, idx] is (N, C, k2): each class reads only its own k2 features
        return (features[:, self.idx] * self.weight).sum(-1) + self.bias

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` (weights scattered back, zeros elsewhere)."""
        lin = nn.Linear(self.feature_dim, self.num_classes, dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight.scatter_(1, self.idx, self.weight)
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, k2={self.k2}"


# --------------------------------------------------------------------------- grid


def channels_used_by_k2(idx: Any, *, feature_dim: int) -> np.ndarray:
    """``u[k2-1] = |∪_y I_y[:k2]|`` for every ``k2`` in ``1..K`` of a ranked (C, K) map.

    A feature is used from the first rank at which any class lists it:
    ``first[j] = min_y rank_y(j)``; ``u = cumsum(bincount(first))``.
    """
    idx = np.asarray(idx)
    C, K = idx.shape
    first = np.full(feature_dim, K, dtype=np.int64)
    ranks = np.broadcast_to(np.arange(K), (C, K))
    np.minimum.at(first, idx.reshape(-1), ranks.reshape(-1))
    return np.cumsum(np.bincount(first, minlength=K + 1)[:K])


def _group_by_label(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Features transposed to (m, N) with instances sorted by label, and the groups' bounds (C+1,)."""
    order = np.argsort(labels, kind="stable")
    fT = np.ascontiguousarray(features[order].T)
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return fT, bounds


def grid_correct(
    *,
    fT: np.ndarray,
    bounds: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    idx: np.ndarray,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    outcomes: np.ndarray | None = None,
) -> np.ndarray:
    """Number of correctly classified instances for every ``k2`` in ``1..K`` of one ranked map (K,).

    ``z[k2, y, n] = b_y + Σ_{r<k2} W[y, I_y[r]] f[n, I_y[r]]`` is a cumulative sum over
    ``r`` of the ranked contributions, laid out (K, C, n) so that every step is a
    contiguous vector add. ``fT``/``bounds`` come from :func:`_group_by_label`: with the
    instances of label ``y`` contiguous, "predicted ``y``" is the slice test
    ``z_y > max_{c<y} z_c  and  z_y ≥ max_{c>y} z_c`` — exactly ``argmax`` with its
    first-maximum rule, without a gather. Memory: one (K, C, n) block of
    ≤ ``chunk_elems`` elements. ``outcomes`` (K, N) bool, if given, receives every
    instance's outcome per ``k2`` (in ``fT``'s label-sorted column order).
    """
    C, K = idx.shape
    rows = idx.T.reshape(-1)  # rank-major: rows[r*C + y] = I_y[r]
    wg = weight[np.arange(C)[None, :], idx.T][:, :, None]  # (K, C, 1)
    b = bias[:, None]
    correct = np.zeros(K, dtype=np.int64)
    N = fT.shape[1]
    step = max(1, chunk_elems // (C * K))
    for s in range(0, N, step):
        e = min(s + step, N)
        z = fT[rows, s:e].reshape(K, C, e - s)
        z *= wg
        z[0] += b
        for r in range(1, K):  # cumsum over ranks; np.cumsum(axis=0) is several times slower here
            np.add(z[r], z[r - 1], out=z[r])
        # the label groups that overlap this chunk, as column slices of z
        for y in range(C):
            lo, hi = max(int(bounds[y]), s) - s, min(int(bounds[y + 1]), e) - s
            if hi <= lo:
                continue
            zg = z[:, :, lo:hi]
            zy = zg[:, y]
            ok = np.ones(zy.shape, dtype=bool)
            if y > 0:
                ok &= zy > zg[:, :y].max(axis=1)
            if y < C - 1:
                ok &= zy >= zg[:, y + 1 :].max(axis=1)
            correct += ok.sum(axis=1)
            if outcomes is not None:
                outcomes[:, s + lo : s + hi] = ok
    return correct


def evaluate_grid(
    *,
    features: Any,
    labels: Any,
    weight: Any,
    bias: Any,
    maps: Sequence[Any],
    dtype: Any = np.float64,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    threads: int | None = None,
    outcomes: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy of the decomposed head for every map and every ``k2`` up to its length.

    ``maps`` are :class:`dtd_ray.core.selection.ClassMap` (a ``frequency`` map of ``k1``
    has length ``k1``, so its rows are ``k2 = 1..k1``). Returns one dict per
    ``(strategy, k1, k2)``: ``strategy, k1, k2, n_instances, correct, acc_full,
    acc_decomposed, head_macs_full (C·m), head_macs_decomposed (C·k2), channels_used``.
    Maps are spread over ``threads`` threads (default: ``torch.get_num_threads()``);
    numpy releases the GIL inside the vector operations. With ``outcomes`` every row also
    carries ``outcomes``: each instance's 0/1 outcome, in input order, packed as bits
    (:func:`dtd_ray.core.stats.pack_outcomes`) — what the report's paired bootstrap resamples.
    """
    f = np.asarray(features.numpy() if isinstance(features, torch.Tensor) else features)
    w = np.asarray(weight.detach().numpy() if isinstance(weight, torch.Tensor) else weight, dtype=dtype)
    b = np.asarray(bias.detach().numpy() if isinstance(bias, torch.Tensor) else bias, dtype=dtype)
    y = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    C, m = w.shape
    if b.shape != (C,):
        raise ValueError(f"bias has shape {b.shape}, expected ({C},)")
    if f.ndim != 2 or f.shape[1] != m:
        raise ValueError(f"features have shape {f.shape}, expected (N, {m})")
    if y.shape != (f.shape[0],):
        raise ValueError(f"labels have shape {y.shape}, features {f.shape}")
    if f.shape[0] == 0:
        raise ValueError("no instances to evaluate")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf values")
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise ValueError(f"labels outside [0, {C})")
    N = int(f.shape[0])
    f = f.astype(dtype, copy=False)
    full_ok = (f @ w.T + b).argmax(1) == y
    acc_full = float(full_ok.mean())
    idxs = [check_map(cm.idx, num_classes=C, feature_dim=m).numpy() for cm in maps]
    fT, bounds = _group_by_label(f, y, C)
    by_label = np.argsort(y, kind="stable")  # _group_by_label's column order

    def one(idx: np.ndarray) -> Any:
        out = np.zeros((idx.shape[1], N), dtype=bool) if outcomes else None
        n = grid_correct(fT=fT, bounds=bounds, weight=w, bias=b, idx=idx, chunk_elems=chunk_elems, outcomes=out)
        if out is None:
            return n, None
        unsorted = np.empty_like(out)
        unsorted[:, by_label] = out
        return n, unsorted

    threads = int(threads or torch.get_num_threads())
    if threads > 1 and len(idxs) > 1:
        # largest maps first so the threads finish together
        order = sorted(range(len(idxs)), key=lambda i: -idxs[i].size)
        with ThreadPoolExecutor(threads) as pool:
            done = dict(zip(order, pool.map(one, [idxs[i] for i in order])))
        corrects = [done[i] for i in range(len(idxs))]
    else:
        corrects = [one(i) for i in idxs]
    rows: list[dict[str, Any]] = []
    for cm, idx, (correct, per_instance) in zip(maps, idxs, corrects):
        used = channels_used_by_k2(idx, feature_dim=m)
        for k2 in range(1, idx.shape[1] + 1):
            extra: dict[str, Any] = {}
            if per_instance is not None:
                extra = {"outcomes": stats.pack_outcomes(per_instance[k2 - 1])}
            rows.append(
                {
                    **extra,
                    "strategy": cm.strategy,
                    "k1": int(cm.k1),
                    "map_seed": int(getattr(cm, "seed", -1)),
                    "k2": k2,
                    "n_instances": N,
                    "correct": int(correct[k2 - 1]),
                    "acc_full": acc_full,
                    "acc_decomposed": float(correct[k2 - 1]) / N,
                    "head_macs_full": int(C * m),
                    "head_macs_decomposed": int(C * k2),
                    "channels_used": int(used[k2 - 1]),
                }
            )
    return rows
