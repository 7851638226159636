"""Head-only retraining: the decomposed head fitted on cached features (plain torch, no Ray).

The decomposed head (:class:`dtd_ray.core.heads.DecomposedHead`) computes, per class ``y``,

    z_y = b_y + Σ_{r<k2} Wg[y, r] · f[I_y[r]],      Wg[y, r] initialised to W[y, I_y[r]],

so it loses accuracy against the full head ``z = W f + b``. :func:`fit_decomposed_head`
wins some back with Adam on ``Wg`` and ``b`` alone, over the cached features of the
training split (the records), minimising the mean cross-entropy over all ``C`` classes.
The map ``I`` is a buffer, so features off the map never enter any logit; C·k2 + C
parameters, milliseconds per epoch. The Ray Tune trainable around it is
:func:`dtd_ray.ray.trainables.head_trainable`; fine-tuning the whole network through the
head is :mod:`dtd_ray.train.finetune`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtd_ray.core import stats
from dtd_ray.core.heads import DecomposedHead

log = logging.getLogger(__name__)


def as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (array or tensor) as a detached tensor, optionally cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.asarray(x)
        # torch refuses to alias read-only numpy memory (records and Ray object-store arrays are read-only)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t if dtype is None else t.to(dtype)


def epoch_seed(seed: int, epoch: int) -> int:
    """A non-negative 32-bit seed for ``(seed, epoch)``: shuffling and augmentation differ per
    epoch, yet an epoch replays identically after a resume."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def percent(correct: int, n: int) -> float:
    """``100 · correct / n`` (NaN for no rows)."""
    return 100.0 * correct / n if n else float("nan")


def check_same_map(saved: torch.Tensor, idx: torch.Tensor) -> None:
    """Refuse to resume a checkpoint whose head was trained with another class map."""
    if tuple(saved.shape) != tuple(idx.shape) or not torch.equal(saved.cpu().long(), idx.cpu().long()):
        raise ValueError("the checkpoint was trained with another class map (idx); refusing to resume from it")


def _checked_split(features: Any, labels: Any, w: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    f, y = as_tensor(features, torch.float32), as_tensor(labels).long()
    if f.ndim != 2 or f.shape[1] != w.shape[1]:
        raise ValueError(f"{what} features have shape {tuple(f.shape)}, the head takes (N, {w.shape[1]})")
    _check_labels(y, len(f), w.shape[0], what)
    return f, y


def _check_labels(labels: torch.Tensor, n: int, num_classes: int, what: str) -> None:
    if labels.shape != (n,):
        raise ValueError(f"{what}: {tuple(labels.shape)} labels for {n} feature rows")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what}: labels outside [0, {num_classes})")


@torch.no_grad()
def evaluate_head(
    *, head: nn.Module, features: Any, labels: Any, batch_size: int = 8192, device: Any = None
) -> dict[str, float]:
    """Accuracy (percent), mean cross-entropy and per-instance outcomes (text, :func:`stats.outcomes_text`,
    in input order) of ``head`` on cached features, in chunks (a decomposed head materialises
    (batch, C, k2): chunking bounds memory for ImageNet heads)."""
    device = torch.device(device) if device is not None else next(head.parameters()).device
    f, y = as_tensor(features, torch.float32), as_tensor(labels).long()
    loss_sum = 0.0
    ok: list[np.ndarray] = []
    for i in range(0, len(f), batch_size):
        fb, yb = f[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        z = head(fb)
        ok.append((z.argmax(1) == yb).cpu().numpy())
        loss_sum += float(F.cross_entropy(z.float(), yb, reduction="sum"))
    n = len(f)
    outcomes = np.concatenate(ok) if ok else np.zeros(0, dtype=bool)
    return {"acc": percent(int(outcomes.sum()), n), "loss": loss_sum / n if n else float("nan"), "n": n,
            "outcomes": stats.outcomes_text(outcomes)}


def fit_decomposed_head(
    *,
    train_features: Any,
    train_labels: Any,
    weight: Any,
    bias: Any,
    idx: Any,
    epochs: int,
    lr: float = 1e-2,
    batch_size: int = 512,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_features: Any = None,
    eval_labels: Any = None,
    val_features: Any = None,
    val_labels: Any = None,
    on_epoch: Callable[[int, dict[str, Any], dict[str, Any]], None] | None = None,
    state: Mapping[str, Any] | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Retrain a decomposed head on cached features with Adam; the map stays fixed.

    The head starts from the original head's ``W[y, I_y]`` and ``b`` (``weight`` (C, m),
    ``bias`` (C,), ``idx`` the (C, k2) class map) and minimises

        L(Wg, b) = mean_n CE(z(f_n), y_n),   z_y(f) = b_y + Σ_r Wg[y, r] f[I_y[r]],

    the softmax cross-entropy over all C classes, plus Adam's L2 ``weight_decay`` on
    ``Wg`` and ``b``. Only those C·k2 + C numbers train; ``idx`` is a buffer, so a
    feature off the map never enters a logit. Each epoch visits the training rows once in
    a permutation drawn from ``epoch_seed(seed, epoch)``, so a run resumed from ``state``
    replays exactly the epochs an uninterrupted run would. ``device`` defaults to the CPU.

    ``on_epoch(epoch, metrics, state)`` is called after every epoch (epochs count from 1);
    ``state`` is a fresh dict ``{"epoch", "head", "optimizer", "history",
    "acc_decomposed_init", "acc_full"}`` that ``torch.save`` can write and
    ``fit_decomposed_head(state=...)`` resumes from (finished epochs are skipped).
    ``metrics`` has ``epoch, loss`` (mean training CE), ``acc_train`` (percent, on the
    training batches as they were seen), ``seconds`` (the epoch's training time), with
    eval data ``acc_eval`` (percent) and ``loss_eval``, and with validation data (held out of
    the training split: what chooses the epoch and the lr) ``acc_val`` and ``loss_val``.

    Returns ``{"head", "history", "acc_decomposed_init", "acc_full", "optimizer",
    "epoch", "resumed_from_epoch"}``; ``acc_decomposed_init``/``acc_full`` (percent, on the
    eval data, ``None`` without it) are the decomposed head before training and the full head.
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    device = torch.device(device or "cpu")
    w, b = as_tensor(weight, torch.float32), as_tensor(bias, torch.float32)
    f = as_tensor(train_features, torch.float32)
    y = as_tensor(train_labels).long()
    if f.ndim != 2 or f.shape[1] != w.shape[1]:
        raise ValueError(f"train features have shape {tuple(f.shape)}, the head takes (N, {w.shape[1]})")
    _check_labels(y, len(f), w.shape[0], "train")
    if len(f) == 0:
        raise ValueError("no training rows")
    have_eval = eval_features is not None and eval_labels is not None
    have_val = val_features is not None and val_labels is not None
    fe = ye = fv = yv = None
    if have_eval:
        fe, ye = _checked_split(eval_features, eval_labels, w, "eval")
    if have_val:
        fv, yv = _checked_split(val_features, val_labels, w, "val")

    head = DecomposedHead(weight=w, bias=b, idx=idx).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    acc_init = acc_full = None
    if have_eval:
        acc_init = evaluate_head(head=head, features=fe, labels=ye, device=device)["acc"]
        full = nn.Linear(w.shape[1], w.shape[0]).to(device)
        with torch.no_grad():
            full.weight.copy_(w)
            full.bias.copy_(b)
        acc_full = evaluate_head(head=full, features=fe, labels=ye, device=device)["acc"]

    start, history = 0, []
    if state is not None:
        check_same_map(state["head"]["idx"], head.idx)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), [dict(h) for h in state.get("history", [])]
        log.info("resuming head retraining after epoch %d of %d", start, epochs)

    f_dev, y_dev = f.to(device), y.to(device)  # the whole split fits: N·m floats (50k·64 = 13 MB)
    n = len(f_dev)
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        perm = torch.randperm(n, generator=gen).to(device)
        head.train()
        loss_sum, correct = 0.0, 0
        for i in range(0, n, batch_size):
            j = perm[i : i + batch_size]
            z = head(f_dev[j])
            loss = F.cross_entropy(z, y_dev[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(j)
            correct += int((z.detach().argmax(1) == y_dev[j]).sum())
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss_sum / n,
            "acc_train": percent(correct, n),
            "seconds": time.perf_counter() - t0,
        }
        head.eval()
        if have_eval:
            ev = evaluate_head(head=head, features=fe, labels=ye, device=device)
            metrics["acc_eval"], metrics["loss_eval"], metrics["outcomes"] = ev["acc"], ev["loss"], ev["outcomes"]
        if have_val:
            vv = evaluate_head(head=head, features=fv, labels=yv, device=device)
            metrics["acc_val"], metrics["loss_val"] = vv["acc"], vv["loss"]
        history.append(metrics)
        log.debug("head epoch %d: %s", epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, dict(metrics), _head_state(head, opt, epoch, history, acc_init, acc_full))
    head.eval()
    return {
        "head": head,
        "history": history,
        "acc_decomposed_init": acc_init,
        "acc_full": acc_full,
        "optimizer": opt,
        "epoch": max(start, epochs),
        "resumed_from_epoch": start,
    }


def _head_state(head, opt, epoch, history, acc_init, acc_full) -> dict[str, Any]:
    # Copies, so a caller that keeps the dict (rather than saving it at once) is not changed by later epochs.
    return {
        "epoch": int(epoch),
        "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "history": [dict(h) for h in history],
        "acc_decomposed_init": acc_init,
        "acc_full": acc_full,
    }


__all__ = [
    "as_tensor",
    "check_same_map",
    "epoch_seed",
    "evaluate_head",
    "fit_decomposed_head",
    "percent",
]
