"""The ``glm`` selection strategy: the order in which features enter an elastic-net path.

A stronger baseline than reading the original head: fit a *sparse* linear head on the
cached training features along glm-saga's regularisation path (Wong, Santurkar & Madry
2021, ``glm_saga.elasticnet.glm_saga``, proximal SAGA) and give every class the features
that enter its row of the weight matrix first.

**Objective** (glm-saga's ``elastic_loss``, multinomial family, ungrouped), for each ``λ``:

    min_{W, b}  (1/N) Σ_n CE(W x̃_n + b, y_n)  +  λ · ( α ‖W‖₁ + (1 − α)/2 · ‖W‖₂² )

with ``‖W‖₁ = Σ_{y,j} |W[y, j]|``, ``‖W‖₂²`` the squared Frobenius norm, the bias ``b``
unpenalised, and ``x̃ = (x − μ) / σ`` the features standardised with the mean and the
(``N − 1``) standard deviation of the training features (as glm-saga's
``NormalizedRepresentation`` does; a constant feature gets ``σ = 1``, so it stays 0 and
never enters). Standardising makes the entry order independent of each feature's scale.
The path is glm-saga's: ``λ_max = maximum_reg_loader(...) / max(α, 0.001)`` (the
smallest ``λ`` at which every ``W`` is zero), then ``path_length`` values log-spaced down to
``epsilon · λ_max``, each solved by ``train_saga`` warm-started from the previous one
(weights and SAGA table), and, with ``do_zero``, glm-saga's final unregularised ``λ = 0``
step (which a ``stop_at_k`` path reaches only where some class still lacks features).

The path is run through ``glm_saga`` itself, one ``λ`` per call (its ``metadata`` fixes
``λ_max``, its ``state`` carries the SAGA table from call to call), which is exactly its
one-call path (tested) but can stop as soon as every class has ``stop_at_k`` entered
features: the entry order up to that point does not depend on where the path stops.

**The map** (:func:`glm_map`). Walking the path from the largest ``λ`` down, feature ``j``
*enters* class ``y`` at the first step ``s`` where ``|W_s[y, j]| > threshold`` (default
0: any non-zero weight, which glm-saga's soft-thresholding makes exact). Class ``y``'s
ranking is: entry step ascending (earlier = larger ``λ`` = better), then ``|W_s[y, j]|``
at the entry step descending, then lower index — a strict total order, so every prefix
of the ``K``-map is the glm map at that ``k``. A feature that leaves the path again keeps
its entry rank. Features that never enter (possible only where the whole path, ``λ = 0``
step included, ran and a weight stayed exactly zero) come after all entered ones, by
``|W_final[y, j]|`` descending, then lower index; :func:`glm_map` refuses a ``kmax`` a
capped path cannot fill. ``score`` is the ``λ`` at entry (0.0 for the ``λ = 0`` step and
for features that never entered); the sign of the entering weight is not used (a
feature can enter as evidence against its class). The map only says *which* features to
keep: the decomposed head still uses the original head's ``W[y, I_y]``.

Determinism: the batches are drawn by a ``torch.Generator`` seeded with ``seed`` and the
path runs in float32 on the CPU on ``threads`` torch threads (default 1, restored after:
the (batch, C, m) operations are small, and on a busy 2-core machine one thread ran the
path several times faster than two), so equal inputs give an equal path and map; the caller's
global RNG is left untouched.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from dtd_ray.core import classmap


# Defaults checked on ResNet-20's CIFAR-10 train features (50,000 × 64, 10 classes): the path to 20
# entered features per class takes 47 of the 50 λ steps, to 5 features 27 steps; its maps equal, at
# every k ≤ 5 and in order, those of a 100-step path and of a tight solve (batch 256, lr 0.05,
# ≤ 50 epochs, tol 1e-5: several times the CPU time), and of another seed;
# the tail (k = 10, 20) shares 95 % / 93 % of its features with the tight solve. A looser tol
# (3e-4, 1e-3) or larger batches change the top 5 of one or two classes.
DEFAULT_ALPHA = 0.99
DEFAULT_EPSILON = 1e-3
DEFAULT_PATH_LENGTH = 50
DEFAULT_NEPOCHS = 20
DEFAULT_BATCH_SIZE = 1024
DEFAULT_LR = 0.1
DEFAULT_TOL = 1e-4


class _Rows(torch.utils.data.Dataset):
    """Whole batches at once: ``ds[list_of_rows]`` is ``(X[rows], y[rows], rows)`` — glm-saga's
    ``(data, target, index)`` — without a Python call per instance."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = torch.as_tensor(rows, dtype=torch.long)
        return self.x[r], self.y[r], r


def _loader(x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int, shuffle: bool) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(X, y, index)`` batches; with ``shuffle`` a fresh seeded permutation per pass."""
    ds = _Rows(x, y)
    gen = torch.Generator().manual_seed(int(seed))
    base = (torch.utils.data.RandomSampler(ds, generator=gen) if shuffle
            else torch.utils.data.SequentialSampler(ds))
    batches = torch.utils.data.BatchSampler(base, batch_size=int(batch_size), drop_last=False)
    return torch.utils.data.DataLoader(ds, sampler=batches, batch_size=None, generator=gen)


def _elasticnet():
    try:
        from glm_saga import elasticnet
    except ImportError as e:  # glm-saga imports tqdm without declaring it
        raise ImportError(f"the glm strategy needs glm-saga (and tqdm): pip install glm-saga tqdm ({e})") from e
    return elasticnet


def standardize(features: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x̃, μ, σ)``: float32 features standardised by their column mean and (N − 1) std (σ = 0 → 1)."""
    x = torch.from_numpy(np.array(features, dtype=np.float64))  # a copy: records arrays are read-only
    mu = x.mean(0)
    sd = x.std(0, unbiased=True) if x.shape[0] > 1 else torch.ones(x.shape[1], dtype=torch.float64)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return ((x - mu) / sd).float(), mu.float(), sd.float()


def glm_path(
    *,
    features: Any,
    labels: Any,
    num_classes: int,
    alpha: float = DEFAULT_ALPHA,
    epsilon: float = DEFAULT_EPSILON,
    path_length: int = DEFAULT_PATH_LENGTH,
    nepochs: int = DEFAULT_NEPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    tol: float = DEFAULT_TOL,
    lookbehind: int | None = None,
    stop_at_k: int | None = None,
    threshold: float = 0.0,
    do_zero: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    threads: int | None = 1,
    verbose: bool = False,
) -> dict[str, Any]:
    """glm-saga's elastic-net path of a multinomial linear head on (standardised) ``features``.

    ``features`` (N, m), ``labels`` (N,) in ``[0, num_classes)``. The ``λ`` grid is
    ``path_length`` values log-spaced from ``λ_max`` to ``epsilon · λ_max`` (module
    docstring); at each, glm-saga's ``train_saga`` runs at most ``nepochs`` epochs of
    proximal SAGA with step ``lr`` on batches of ``batch_size``, stopping once one step
    moves ``(W, b)`` by ≤ ``tol`` (or, with ``lookbehind``, once the objective has not
    improved by ``tol`` for that many epochs). ``stop_at_k`` ends the path at the first
    step at which every class has ≥ ``stop_at_k`` entered features (``|W| > threshold``);
    ``None`` runs the whole grid. ``do_zero`` appends glm-saga's ``λ = 0`` step where the
    grid ends before that (it ends a ``stop_at_k`` path only if still needed). ``threads``
    sets torch's intra-op threads for the run (``None``: leave them); ``shuffle=False``
    visits the rows in order; ``verbose`` lets glm-saga print and adds a line per ``λ``.

    Returns ``{"lambdas" (S,) float64, "weights" (S, C, m) float32, "biases" (S, C),
    "acc_train" (S,) (glm-saga's training accuracy at each step), "mean", "std" (m,),
    "lambda_max", "complete" (the whole grid ran, so a never-entered feature really never
    enters), "stop_at_k", "threshold", "seconds" (wall), "cpu_seconds", "settings"}``.
    """
    en = _elasticnet()
    f = np.asarray(features)
    y = torch.as_tensor(np.asarray(labels)).long()
    C = int(num_classes)
    if f.ndim != 2 or tuple(y.shape) != (f.shape[0],) or f.shape[0] == 0:
        raise ValueError(f"features {f.shape} and labels {tuple(y.shape)} must be (N, m) and (N,) with N ≥ 1")
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise ValueError(f"labels outside [0, {C})")
    x, mu, sd = standardize(f)
    n, m = x.shape
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf values")
    if not (0 < alpha <= 1 and 0 < epsilon <= 1 and path_length >= 1 and nepochs >= 1 and batch_size >= 1 and lr > 0):
        raise ValueError("need 0 < alpha ≤ 1, 0 < epsilon ≤ 1, path_length, nepochs, batch_size ≥ 1 and lr > 0")
    if stop_at_k is not None and not 1 <= stop_at_k <= m:
        raise ValueError(f"stop_at_k={stop_at_k} is outside [1, {m}]")
    settings = dict(alpha=alpha, epsilon=epsilon, path_length=path_length, nepochs=nepochs, batch_size=batch_size,
                    lr=lr, tol=tol, lookbehind=lookbehind, do_zero=do_zero, shuffle=shuffle, seed=seed,
                    threads=threads)

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run_path(en, x, y, mu, sd, C=C, alpha=alpha, epsilon=epsilon, path_length=path_length,
                         nepochs=nepochs, batch_size=batch_size, lr=lr, tol=tol, lookbehind=lookbehind,
                         stop_at_k=stop_at_k, threshold=threshold, do_zero=do_zero, shuffle=shuffle, seed=seed,
                         verbose=verbose, settings=settings)
    finally:
        torch.set_num_threads(threads_before)


def _run_path(en, x, y, mu, sd, *, C, alpha, epsilon, path_length, nepochs, batch_size, lr, tol, lookbehind,
              stop_at_k, threshold, do_zero, shuffle, seed, verbose, settings) -> dict[str, Any]:
    n, m = x.shape
    t0, c0 = time.perf_counter(), time.process_time()
    loader = _loader(x, y, batch_size=batch_size, seed=seed, shuffle=shuffle)  # its own generator: the only draws
    with torch.random.fork_rng(devices=[]):  # nn.Linear's init would advance the caller's global RNG
        linear = nn.Linear(m, C)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    out_ctx = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    lams, ws, bs, accs = [], [], [], []
    complete = False
    with out_ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # glm-saga's F.softmax without dim, once per batch
        # glm-saga's own λ_max (max over (class, feature) of |X̃ᵀ(Y − Ȳ)| / N), and its grid
        reg = float(en.maximum_reg_loader(loader, group=False))
        lam_max = reg / max(0.001, alpha)
        grid = torch.logspace(math.log10(lam_max), math.log10(epsilon * lam_max), path_length)
        state = None
        entered = torch.zeros(C, m, dtype=torch.bool)
        for i, lam in enumerate(grid.tolist()):
            last = i == len(grid) - 1
            # one λ per call: metadata pins its λ_max (= this λ) and the sizes; state warm-starts SAGA
            meta = {"max_reg": {"nongrouped": lam * max(0.001, alpha)},
                    "X": {"num_examples": n}, "y": {"num_classes": C}}
            res = en.glm_saga(linear, loader, lr, nepochs, alpha, k=1, epsilon=1.0, metadata=meta, state=state,
                              group=False, tol=tol, lookbehind=lookbehind, do_zero=do_zero and last,
                              n_ex=n, n_classes=C, verbose=None)
            state = res["state"]
            for p in res["path"]:
                lams.append(float(p["lam"]))
                ws.append(p["weight"].numpy())
                bs.append(p["bias"].numpy())
                accs.append(float(p["metrics"]["acc_tr"]))
                entered |= torch.from_numpy(np.abs(ws[-1]) > threshold)
            if verbose:
                print(f"[glm] step {i}: λ={lam:.5g} entered/class min {int(entered.sum(1).min())} "
                      f"acc_tr {accs[-1]:.4f} ({time.perf_counter() - t0:.1f} s)")
            if last:
                complete = True
            if stop_at_k is not None and int(entered.sum(1).min()) >= stop_at_k:
                break
    return {
        "lambdas": np.asarray(lams, dtype=np.float64),
        "weights": np.stack(ws).astype(np.float32),
        "biases": np.stack(bs).astype(np.float32),
        "acc_train": np.asarray(accs, dtype=np.float64),
        "mean": mu.numpy(),
        "std": sd.numpy(),
        "lambda_max": lam_max,
        "complete": complete,
        "stop_at_k": stop_at_k,
        "threshold": float(threshold),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "settings": settings,
    }


def entry_order(path: dict[str, Any], *, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class the full entry ranking of a path: ``(idx (C, m), step (C, m), score (C, m))``.

    ``step`` is each ranked feature's entry step (``S`` = never entered), ``score`` its
    ``λ`` at entry (0.0 where it never entered). See the module docstring for the order.
    """
    w = np.abs(np.asarray(path["weights"], dtype=np.float64))  # (S, C, m)
    lam = np.asarray(path["lambdas"], dtype=np.float64)
    thr = path.get("threshold", 0.0) if threshold is None else threshold
    S, C, m = w.shape
    nz = w > thr
    ever = nz.any(0)
    step = np.where(ever, nz.argmax(0), S)  # first non-zero step, S = never
    mag = np.where(ever, np.take_along_axis(w, np.minimum(step, S - 1)[None], 0)[0], w[-1])
    # keys most significant first, each ranked descending by rank_rows: earlier step, larger |W|, then lower index
    idx = classmap.rank_rows([-step, mag], k=m)
    st = np.take_along_axis(step, idx, 1)
    score = np.where(st < S, lam[np.minimum(st, S - 1)], 0.0)
    return idx, st, score


def glm_map(*, path: dict[str, Any], kmax: int, threshold: float | None = None) -> classmap.ClassMap:
    """The ``glm`` class map of length ``kmax`` from a :func:`glm_path` result.

    ``idx[y]`` = class ``y``'s features in entry order (module docstring), ``score`` their
    ``λ`` at entry. Refuses a ``kmax`` that a path stopped early (``stop_at_k``) leaves
    some class without ``kmax`` entered features for: that map's tail would be undefined.
    """
    C, m = np.asarray(path["weights"]).shape[1:]
    classmap.check_k2(k2=kmax, k1=classmap.K1_NOT_APPLICABLE, limit=m, what="the feature dimension")
    idx, st, score = entry_order(path, threshold=threshold)
    S = len(path["lambdas"])
    if not path.get("complete", True):
        short = np.flatnonzero((st[:, :kmax] >= S).any(1))
        if short.size:
            raise ValueError(f"the path stopped before class(es) {short.tolist()} had {kmax} entered features; "
                             f"run glm_path with stop_at_k ≥ {kmax} (or None)")
    return classmap.ClassMap(strategy="glm", k1=classmap.K1_NOT_APPLICABLE, idx=idx[:, :kmax].astype(np.int64),
                              score=score[:, :kmax].astype(np.float64))


def select_glm(
    *, features: Any, labels: Any, num_classes: int, kmax: int, seed: int = 0, **path_options: Any
) -> classmap.ClassMap:
    """The ``glm`` map of length ``kmax`` in one call: :func:`glm_path` stopped once every class
    has ``kmax`` entered features (``stop_at_k=kmax``), then :func:`glm_map`. ``path_options``
    are :func:`glm_path`'s other keywords."""
    path_options.setdefault("stop_at_k", int(kmax))
    path = glm_path(features=features, labels=labels, num_classes=num_classes, seed=seed, **path_options)
    return glm_map(path=path, kmax=kmax)
