"""Retraining decomposed heads: head-only on cached features, and full fine-tuning through the head.

The decomposed head (:class:`dtd_ray.core.heads.DecomposedHead`) computes, per class ``y``,

    z_y = b_y + Σ_{r<k2} Wg[y, r] · f[I_y[r]],      Wg[y, r] initialised to W[y, I_y[r]],

so it loses accuracy against the full head ``z = W f + b``. Two ways to win it back:

* **head-only** (:func:`fit_decomposed_head`, :func:`head_trainable`): Adam on ``Wg`` and
  ``b`` alone, over the cached features of the training split (the records), minimising
  the mean cross-entropy over all ``C`` classes. The map ``I`` is a buffer, so features
  off the map never enter any logit; C·k2 + C parameters, milliseconds per epoch.
* **full fine-tuning** (:func:`finetune_epoch`, :func:`evaluate_backbone`,
  :func:`finetune_trainable`), as in the paper: the backbone's feature module and the
  decomposed head end to end on images (standard CIFAR augmentation, Adam, lr 1e-4,
  one epoch by default), BatchNorm in training mode; on a GPU when the driver says so.

The pure building blocks need no Ray; the two ``*_trainable`` functions are Ray Tune
function trainables that report once per epoch with a checkpoint and resume from
``tune.get_checkpoint()``. Checkpoint layout (a directory)::

    state.pt   torch.save({"epoch": int (finished epochs), "head": DecomposedHead state_dict
               (weight, bias, idx), "optimizer": Adam state_dict, "history": [metrics per epoch],
               "acc_decomposed_init": float, "acc_full": float | None,
               + "backbone": feature-module state_dict (fine-tuning only)})
    model.pt   (fine-tuning only) {"state_dict": features.* + head.weight/head.bias (the decomposed
               head scattered into a dense, masked nn.Linear), "decomposed_idx": (C, k2)}: the
               fine-tuned network, loadable by ``get_backbone(model, weights=".../model.pt")``

Both files load with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtd_ray.core.heads import DecomposedHead, check_map

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Defaults of the trainables' config keys (documented in their docstrings). The head-only
# defaults were tuned on cifar_resnet20 / CIFAR-10 at k1 = k2 = 5 with the published map:
# every lr in 1e-3..3e-2 at batch 512 exceeds 89.8 % after one epoch and settles at
# 90.3-90.6 % (the decomposed head starts at 88.59 %); lr 1e-2 gets there in the fewest epochs.
HEAD_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "records": None,
    "model": None,
    "train_split": "train",
    "eval_split": "test",
    "idx": None,
    "head": None,
    "epochs": 20,
    "lr": 1e-2,
    "batch_size": 512,
    "weight_decay": 0.0,
    "seed": 0,
    "use_gpu": False,
    "cpu_threads": 1,
})  # read-only
FINETUNE_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "model": "cifar_resnet20",
    "weights": "default",
    "normalization": None,
    "dataset": None,
    "train_split": "train",
    "eval_split": "test",
    "idx": None,
    "epochs": 1,
    "lr": 1e-4,
    "batch_size": 128,
    "eval_batch_size": 512,
    "weight_decay": 0.0,
    "augment": "cifar",
    "seed": 0,
    "max_train_rows": None,
    "max_eval_rows": None,
    "use_gpu": False,
    "precision": "auto",
    "cpu_threads": None,
})  # read-only


# =========================================================================== helpers


def _tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
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


def _percent(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else float("nan")


def _check_labels(labels: torch.Tensor, n: int, num_classes: int, what: str) -> None:
    if labels.shape != (n,):
        raise ValueError(f"{what}: {tuple(labels.shape)} labels for {n} feature rows")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what}: labels outside [0, {num_classes})")


@torch.no_grad()
def evaluate_head(
    *, head: nn.Module, features: Any, labels: Any, batch_size: int = 8192, device: Any = None
) -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy of ``head`` on cached features, in chunks
    (a decomposed head materialises (batch, C, k2): chunking bounds memory for ImageNet heads)."""
    device = torch.device(device) if device is not None else next(head.parameters()).device
    f, y = _tensor(features, torch.float32), _tensor(labels).long()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(f), batch_size):
        fb, yb = f[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        z = head(fb)
        correct += int((z.argmax(1) == yb).sum())
        loss_sum += float(F.cross_entropy(z.float(), yb, reduction="sum"))
    n = len(f)
    return {"acc": _percent(correct, n), "loss": loss_sum / n if n else float("nan"), "n": n}


def _check_same_map(saved: torch.Tensor, idx: torch.Tensor) -> None:
    if tuple(saved.shape) != tuple(idx.shape) or not torch.equal(saved.cpu().long(), idx.cpu().long()):
        raise ValueError("the checkpoint was trained with another class map (idx); refusing to resume from it")


# =========================================================================== head-only


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
    replays exactly the epochs an uninterrupted run would.

    ``on_epoch(epoch, metrics, state)`` is called after every epoch (epochs count from 1);
    ``state`` is a fresh dict ``{"epoch", "head", "optimizer", "history",
    "acc_decomposed_init", "acc_full"}`` that ``torch.save`` can write and
    ``fit_decomposed_head(state=...)`` resumes from (finished epochs are skipped).
    ``metrics`` has ``epoch, loss`` (mean training CE), ``acc_train`` (percent, on the
    training batches as they were seen), ``seconds`` (the epoch's training time), and with
    eval data ``acc_eval`` (percent) and ``loss_eval``.

    Returns ``{"head", "history", "acc_decomposed_init", "acc_full", "optimizer",
    "epoch", "resumed_from_epoch"}``; ``acc_decomposed_init``/``acc_full`` (percent, on the
    eval data, ``None`` without it) are the decomposed head before training and the full head.
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    device = torch.device(device or "cpu")
    w, b = _tensor(weight, torch.float32), _tensor(bias, torch.float32)
    f = _tensor(train_features, torch.float32)
    y = _tensor(train_labels).long()
    if f.ndim != 2 or f.shape[1] != w.shape[1]:
        raise ValueError(f"train features have shape {tuple(f.shape)}, the head takes (N, {w.shape[1]})")
    _check_labels(y, len(f), w.shape[0], "train")
    if len(f) == 0:
        raise ValueError("no training rows")
    have_eval = eval_features is not None and eval_labels is not None
    fe = ye = None
    if have_eval:
        fe, ye = _tensor(eval_features, torch.float32), _tensor(eval_labels).long()
        if fe.ndim != 2 or fe.shape[1] != w.shape[1]:
            raise ValueError(f"eval features have shape {tuple(fe.shape)}, the head takes (N, {w.shape[1]})")
        _check_labels(ye, len(fe), w.shape[0], "eval")

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
        _check_same_map(state["head"]["idx"], head.idx)
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
            "acc_train": _percent(correct, n),
            "seconds": time.perf_counter() - t0,
        }
        head.eval()
        if have_eval:
            ev = evaluate_head(head=head, features=fe, labels=ye, device=device)
            metrics["acc_eval"], metrics["loss_eval"] = ev["acc"], ev["loss"]
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
    import copy

    return {
        "epoch": int(epoch),
        "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "history": [dict(h) for h in history],
        "acc_decomposed_init": acc_init,
        "acc_full": acc_full,
    }


# =========================================================================== full network


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: plain fp32).

    ``"auto"`` is bf16 on CUDA (no loss scaling needed, the range of fp32) and fp32 on
    CPU, where autocast brings no speed and only costs accuracy.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def subset_rows(*, rows: Mapping[str, np.ndarray], max_rows: int | None, seed: int) -> dict[str, np.ndarray]:
    """At most ``max_rows`` rows of a source's columns: a seeded random subset kept in row order
    (image folders list rows class by class, so the first rows would be one class)."""
    rows = dict(rows)
    n = len(rows["sample_id"])
    if max_rows is None or max_rows >= n:
        return rows
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    keep = np.sort(np.random.default_rng([int(seed), 1]).choice(n, size=int(max_rows), replace=False))
    return {k: v[keep] for k, v in rows.items()}


def _prepared_batches(
    rows: Mapping[str, np.ndarray],
    *,
    order: np.ndarray,
    batch_size: int,
    preprocessing: Any,
    augment: str | None,
    seed: int,
) -> Iterator[dict[str, np.ndarray]]:
    """``prepare_batch`` over ``rows`` in ``order``, one batch prepared ahead in a thread.

    PIL decoding and the numpy augmentation release the GIL, so the next batch is ready
    while torch works on this one. Rows that cannot be prepared are dropped (logged by
    ``prepare_batch``).
    """
    from dtd_ray.data.sources import prepare_batch

    cols = [k for k in ("sample_id", "label", "image", "path") if k in rows]

    def prepare(sel: np.ndarray) -> dict[str, np.ndarray]:
        out = prepare_batch(
            {k: rows[k][sel] for k in cols}, preprocessing=preprocessing, augment=augment, seed=seed, on_bad_input="skip"
        )
        ok = out["ok"]
        return out if ok.all() else {k: v[ok] for k, v in out.items()}

    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(prepare, chunks[0])
        for nxt in chunks[1:] + [None]:
            batch = pending.result()
            if nxt is not None:
                pending = pool.submit(prepare, nxt)
            yield batch


class _Runner:
    """Device, autocast and memory format of one fine-tuning run, and the batch → tensors step."""

    def __init__(self, *, backbone: nn.Module, device: Any, precision: str) -> None:
        from dtd_ray.models.runtime import normalize_images

        self.device = torch.device(device or "cpu")
        self.autocast_dtype = resolve_precision(precision, self.device)
        # NHWC is faster for convs on GPUs (tensor cores); on CPU it is not reliably so.
        self.channels_last = self.device.type == "cuda"
        pre = backbone.preprocessing
        self.mean = torch.tensor(pre.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(pre.std, dtype=torch.float32, device=self.device)
        self._normalize = normalize_images

    def inputs(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 travels to the device (4x less than float32) and is normalised there
        u8 = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device, non_blocking=True)
        x = self._normalize(u8, mean=self.mean, std=self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64)).to(self.device, non_blocking=True)
        return x, y

    def autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
        )


def finetune_epoch(
    *,
    backbone: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: Mapping[str, np.ndarray],
    epoch: int,
    batch_size: int = 128,
    augment: str | None = "cifar",
    seed: int = 0,
    device: Any = None,
    precision: str = "auto",
    scaler: Any = None,
) -> dict[str, Any]:
    """One epoch of end-to-end training of ``backbone.features`` and the decomposed ``head``.

    Minimises the mean cross-entropy of ``head(backbone.forward_features(x))`` over the
    rows of a source (``Source.read_numpy`` columns: ``sample_id``, ``label`` and
    ``image`` or ``path``) with the caller's ``optimizer`` (the paper: Adam, lr 1e-4, over
    the feature module's and the head's parameters). BatchNorm layers are in training
    mode (batch statistics, running averages updated). Rows are visited in a permutation
    drawn from ``epoch_seed(seed, epoch)``; ``augment="cifar"`` applies
    ``datasets.cifar_augment`` with the same per-epoch seed (4-px pad, random crop, flip),
    so every epoch sees new crops and a resumed epoch sees the same ones. Images are
    normalised on the device (``extract.normalize_images``); on CUDA with autocast
    (``precision``) and channels_last. ``scaler`` (a ``torch.amp.GradScaler``) is needed
    for fp16 only. Returns ``{"loss", "acc_train" (percent), "n", "seconds", "images_per_s"}``.
    """
    run = _Runner(backbone=backbone, device=device, precision=precision)
    n_all = len(rows["sample_id"])
    es = epoch_seed(seed, epoch)
    order = np.random.default_rng(es).permutation(n_all)
    backbone.train()
    head.train()
    t0 = time.perf_counter()
    loss_sum, correct, n = 0.0, 0, 0
    for batch in _prepared_batches(
        rows, order=order, batch_size=batch_size, preprocessing=backbone.preprocessing, augment=augment, seed=es
    ):
        if not len(batch["label"]):
            continue
        x, y = run.inputs(batch)
        with run.autocast():
            # the head in fp32: its gather-multiply-sum is tiny and fp32 keeps the logits exact
            z = head(backbone.forward_features(x).float())
        loss = F.cross_entropy(z.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        k = len(y)
        loss_sum += float(loss.detach()) * k
        correct += int((z.detach().argmax(1) == y).sum())
        n += k
    seconds = time.perf_counter() - t0
    backbone.eval()
    head.eval()
    return {
        "loss": loss_sum / n if n else float("nan"),
        "acc_train": _percent(correct, n),
        "n": n,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
    }


@torch.no_grad()
def evaluate_backbone(
    *,
    backbone: nn.Module,
    head: nn.Module | None,
    rows: Mapping[str, np.ndarray],
    batch_size: int = 512,
    device: Any = None,
    precision: str = "auto",
    extra_heads: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Accuracy (percent) and mean cross-entropy of ``head(backbone.forward_features(x))`` on un-augmented rows.

    ``head=None`` evaluates the backbone's own linear head. ``extra_heads`` (name → module)
    are evaluated on the same features in the same pass and reported as ``acc_<name>``
    (e.g. the full head beside the decomposed one). Eval mode (BatchNorm running
    statistics). Returns ``{"acc", "loss", "n", "seconds", "acc_<name>"…}``.
    """
    run = _Runner(backbone=backbone, device=device, precision=precision)
    head = backbone.head if head is None else head
    extra = dict(extra_heads or {})
    backbone.eval()
    head.eval()
    t0 = time.perf_counter()
    n_all = len(rows["sample_id"])
    loss_sum, correct, n = 0.0, 0, 0
    extra_correct = dict.fromkeys(extra, 0)
    for batch in _prepared_batches(
        rows, order=np.arange(n_all), batch_size=batch_size, preprocessing=backbone.preprocessing, augment=None, seed=0
    ):
        if not len(batch["label"]):
            continue
        x, y = run.inputs(batch)
        with run.autocast():
            f = backbone.forward_features(x).float()
        z = head(f)
        loss_sum += float(F.cross_entropy(z, y, reduction="sum"))
        correct += int((z.argmax(1) == y).sum())
        for name, h in extra.items():
            extra_correct[name] += int((h(f).argmax(1) == y).sum())
        n += len(y)
    out: dict[str, Any] = {
        "acc": _percent(correct, n),
        "loss": loss_sum / n if n else float("nan"),
        "n": n,
        "seconds": time.perf_counter() - t0,
    }
    for name, c in extra_correct.items():
        out[f"acc_{name}"] = _percent(c, n)
    return out


def export_state_dict(*, backbone: nn.Module, head: DecomposedHead) -> dict[str, torch.Tensor]:
    """The network with its decomposed head as a ``get_backbone``-loadable state dict:
    ``features.*`` and ``head.weight``/``head.bias``, the head scattered into a dense
    ``nn.Linear`` that is zero off the map (it computes exactly the decomposed logits)."""
    # Scattered here on CPU copies rather than with DecomposedHead.to_linear, which builds its
    # nn.Linear on the CPU and so fails for a head on a GPU.
    dense = torch.zeros(head.num_classes, head.feature_dim, dtype=torch.float32)
    dense.scatter_(1, head.idx.detach().cpu(), head.weight.detach().cpu().float())
    sd = {f"features.{k}": v.detach().cpu().clone() for k, v in backbone.features.state_dict().items()}
    sd["head.weight"] = dense
    sd["head.bias"] = head.bias.detach().cpu().float().clone()
    return sd


# =========================================================================== Tune trainables


def _config(config: Mapping[str, Any], defaults: Mapping[str, Any], *, required: tuple[str, ...], name: str) -> dict:
    # Unknown keys are allowed and ignored: a sweep's param_space carries labels (strategy, k1, k2 …).
    cfg = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{name}: config needs {', '.join(missing)}")
    return cfg


def _set_threads(threads: Any) -> None:
    """Trials run in their own processes, where torch would use every core of the node: use
    what the trial asked for (``cpu_threads``, else the trial's CPU resources)."""
    if not threads:
        import warnings

        from ray import tune

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # outside a trial Ray warns and returns None: keep torch's default
            resources = tune.get_context().get_trial_resources()
        threads = resources.required_resources.get("CPU") if resources is not None else None
    if threads:
        torch.set_num_threads(max(1, math.ceil(float(threads))))


def _device(use_gpu: bool) -> torch.device:
    if use_gpu and not torch.cuda.is_available():
        # The driver decided from the cluster's resources; a CPU-only worker still must not fail.
        log.warning("use_gpu=True but this worker sees no CUDA device; training on the CPU")
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _load_state(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _report(metrics: dict[str, Any], files: Mapping[str, Any] | None) -> None:
    """``tune.report`` with a checkpoint directory holding ``files`` (name → object for torch.save)."""
    from ray import tune

    if not files:
        tune.report(metrics)
        return
    # Tune copies the directory into the run's storage before report returns, so a
    # temporary directory is enough.
    with tempfile.TemporaryDirectory(prefix="dtd_retrain_") as d:
        for name, obj in files.items():
            torch.save(obj, os.path.join(d, name))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _load_head_data(cfg: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """Features, labels and the original head (W, b): from ``data`` where given, else from the records."""
    from dtd_ray.io import records
    from dtd_ray.io import schema

    out = dict(data)
    need_records = ("train_features" not in out) or (cfg["eval_split"] and "eval_features" not in out)
    need_head = "weight" not in out or "bias" not in out
    if (need_records or need_head) and not cfg["records"]:
        raise ValueError("head_trainable: config needs records (and model) unless data carries the features and head")
    if need_records and not cfg["model"]:
        raise ValueError("head_trainable: config needs model (the records' partition tag)")
    cols = [schema.LABEL, schema.FEATURES]
    if "train_features" not in out:
        r = records.load_records(cfg["records"], model=cfg["model"], split=cfg["train_split"], columns=cols)
        out["train_features"], out["train_labels"] = r[schema.FEATURES], r[schema.LABEL]
    if cfg["eval_split"] and "eval_features" not in out:
        r = records.load_records(cfg["records"], model=cfg["model"], split=cfg["eval_split"], columns=cols)
        out["eval_features"], out["eval_labels"] = r[schema.FEATURES], r[schema.LABEL]
    if need_head:
        from dtd_ray.models.linear_head import load_head

        manifest = records.read_manifest(cfg["records"], model=cfg["model"], split=cfg["train_split"]) or {}
        out["weight"], out["bias"], source = load_head(manifest=manifest, head=cfg["head"])
        log.info("head_trainable: head from %s", source)
    return out


def head_trainable(config: dict[str, Any], *, data: dict[str, Any] | None = None) -> None:
    """Ray Tune function trainable: head-only retraining of one decomposed head on cached features.

    Use as ``tune.Tuner(tune.with_resources(tune.with_parameters(head_trainable, data=data),
    {"cpu": 1}), param_space=...)``. Calls :func:`fit_decomposed_head` and reports once
    per epoch with a checkpoint (``state.pt``, see the module docstring); on a restart it
    resumes from ``tune.get_checkpoint()`` and skips the finished epochs.

    Config keys (others are ignored, so a sweep may add labels such as strategy/k1/k2):

    - ``idx`` (required): the class map, C lists of k2 feature indices.
    - ``records``: records root (``<extract output>/records``); ``model``: its partition tag.
      Needed unless ``data`` carries everything.
    - ``train_split`` ("train"), ``eval_split`` ("test"; ``None``: no evaluation).
    - ``head``: an .npz with ``weight``/``bias``; default: the backbone named in the training
      split's manifest (``decompose.load_head``). Ignored when ``data`` has ``weight``/``bias``.
    - ``epochs`` (20), ``lr`` (1e-2), ``batch_size`` (512), ``weight_decay`` (0.0), ``seed`` (0).
    - ``use_gpu`` (False; cuda iff set and available), ``cpu_threads`` (1).

    ``data`` (``tune.with_parameters``, so large arrays reach the object store once) may
    carry ``train_features, train_labels, eval_features, eval_labels, weight, bias``.

    Reported metrics: ``epoch``, ``acc_eval`` (percent), ``loss_eval``, ``loss`` (mean
    training CE), ``acc_train``, ``seconds`` (the epoch), ``acc_decomposed_init`` (the
    decomposed head before training), ``acc_full`` (the original head), ``k2``,
    ``resumed_from_epoch`` (0 on a fresh start).
    """
    from ray import tune

    cfg = _config(config, HEAD_DEFAULTS, required=("idx",), name="head_trainable")
    _set_threads(cfg["cpu_threads"])
    torch.manual_seed(int(cfg["seed"]))
    d = _load_head_data(cfg, data or {})
    w = _tensor(d["weight"], torch.float32)
    idx = check_map(cfg["idx"], num_classes=w.shape[0], feature_dim=w.shape[1])

    ckpt = tune.get_checkpoint()
    state = _load_state(ckpt) if ckpt is not None else None
    epochs = int(cfg["epochs"])
    static = {"k2": int(idx.shape[1]), "resumed_from_epoch": int(state["epoch"]) if state else 0}

    def on_epoch(epoch: int, metrics: dict[str, Any], st: dict[str, Any]) -> None:
        out = {**metrics, **static, "acc_decomposed_init": st["acc_decomposed_init"], "acc_full": st["acc_full"]}
        _report({k: v for k, v in out.items() if v is not None}, {STATE_FILE: st})

    res = fit_decomposed_head(
        train_features=d["train_features"],
        train_labels=d["train_labels"],
        weight=w,
        bias=d["bias"],
        idx=idx,
        epochs=epochs,
        lr=float(cfg["lr"]),
        batch_size=int(cfg["batch_size"]),
        weight_decay=float(cfg["weight_decay"]),
        seed=int(cfg["seed"]),
        eval_features=d.get("eval_features") if cfg["eval_split"] else None,
        eval_labels=d.get("eval_labels") if cfg["eval_split"] else None,
        on_epoch=on_epoch,
        state=state,
        device=_device(bool(cfg["use_gpu"])),
    )
    if state is not None and int(state["epoch"]) >= epochs and state.get("history"):
        # Restored after the last epoch: nothing to train, but the trial still needs a result.
        last = {**state["history"][-1], **static, "acc_decomposed_init": res["acc_decomposed_init"],
                "acc_full": res["acc_full"]}
        _report({k: v for k, v in last.items() if v is not None}, None)


def finetune_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: fine-tune the whole network through a decomposed head.

    The paper's recipe: the backbone's feature module and the decomposed head (initialised
    from ``W[y, I_y]``, ``b``) trained end to end with Adam, lr 1e-4, standard CIFAR
    augmentation, one epoch; see :func:`finetune_epoch`. Reports after every epoch, with
    a checkpoint (``state.pt`` + ``model.pt``, see the module docstring); resumes from
    ``tune.get_checkpoint()``. Give the trial ``{"cpu": n}`` or ``{"cpu": 1, "gpu": 1}``
    and set ``use_gpu`` accordingly (the driver knows the cluster).

    Config keys (others are ignored):

    - ``idx`` (required): the class map, C lists of k2 feature indices.
    - ``dataset`` (required): a source spec (``imagefolder:PATH``, ``cifar10:PATH``, …).
    - ``model`` ("cifar_resnet20"), ``weights`` ("default"), ``normalization`` (None): as
      ``get_backbone``.
    - ``train_split`` ("train"), ``eval_split`` ("test").
    - ``epochs`` (1), ``lr`` (1e-4), ``weight_decay`` (0.0), ``batch_size`` (128),
      ``eval_batch_size`` (512), ``augment`` ("cifar" or None), ``seed`` (0).
    - ``max_train_rows`` / ``max_eval_rows`` (None: all): a seeded random subset, for tests.
    - ``use_gpu`` (False): cuda iff set and available; then autocast per ``precision``
      ("auto" = bf16 on GPU, fp32 on CPU; "fp32", "bf16", "fp16") and channels_last.
    - ``cpu_threads`` (None: the trial's CPU resources).

    Reported metrics: ``epoch``, ``acc_eval`` (percent), ``loss_eval``, ``loss`` (mean
    training CE), ``acc_train``, ``seconds`` (the epoch's training time), ``seconds_eval``,
    ``images_per_s``, ``n_train``, ``n_eval``, ``acc_decomposed_init`` (the decomposed
    head before any training, on the eval split), ``acc_full`` (the original network
    there), ``k2``, ``device``, ``resumed_from_epoch``.
    """
    from ray import tune

    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.data.sources import parse_source

    cfg = _config(config, FINETUNE_DEFAULTS, required=("idx", "dataset"), name="finetune_trainable")
    _set_threads(cfg["cpu_threads"])
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    device = _device(bool(cfg["use_gpu"]))
    precision = cfg["precision"]
    resolve_precision(precision, device)  # validate early

    backbone = get_backbone(cfg["model"], weights=cfg["weights"], normalization=cfg["normalization"])
    head = DecomposedHead.from_linear(backbone.head, cfg["idx"])
    backbone.to(device)
    head.to(device)
    if device.type == "cuda":
        backbone.to(memory_format=torch.channels_last)
    source = parse_source(cfg["dataset"])
    train_rows = subset_rows(rows=source.read_numpy(cfg["train_split"]), max_rows=cfg["max_train_rows"], seed=seed)
    eval_rows = subset_rows(rows=source.read_numpy(cfg["eval_split"]), max_rows=cfg["max_eval_rows"], seed=seed)
    # The original nn.Linear head is not trained (the decomposed head replaces it).
    params = list(backbone.features.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    scaler = torch.amp.GradScaler("cuda") if resolve_precision(precision, device) == torch.float16 else None
    eval_kw = {"rows": eval_rows, "batch_size": int(cfg["eval_batch_size"]), "device": device, "precision": precision}

    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        state = _load_state(ckpt)
        _check_same_map(state["head"]["idx"], head.idx)
        backbone.features.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
        acc_init, acc_full = state["acc_decomposed_init"], state["acc_full"]
        log.info("finetune: resuming after epoch %d", start)
    else:
        start, history = 0, []
        ev0 = evaluate_backbone(backbone=backbone, head=head, extra_heads={"full": backbone.head}, **eval_kw)
        acc_init, acc_full = ev0["acc"], ev0["acc_full"]
    static = {
        "k2": int(head.k2),
        "device": device.type,
        "resumed_from_epoch": start,
        "acc_decomposed_init": acc_init,
        "acc_full": acc_full,
    }
    epochs = int(cfg["epochs"])
    for epoch in range(start + 1, epochs + 1):
        tr = finetune_epoch(
            backbone=backbone, head=head, optimizer=opt, rows=train_rows, epoch=epoch,
            batch_size=int(cfg["batch_size"]), augment=cfg["augment"], seed=seed, device=device,
            precision=precision, scaler=scaler,
        )  # fmt: skip
        ev = evaluate_backbone(backbone=backbone, head=head, **eval_kw)
        metrics = {
            "epoch": epoch,
            "loss": tr["loss"],
            "acc_train": tr["acc_train"],
            "seconds": tr["seconds"],
            "images_per_s": tr["images_per_s"],
            "n_train": tr["n"],
            "acc_eval": ev["acc"],
            "loss_eval": ev["loss"],
            "seconds_eval": ev["seconds"],
            "n_eval": ev["n"],
        }
        history.append(metrics)
        log.info("finetune epoch %d: %s", epoch, metrics)
        state = {
            "epoch": epoch,
            "backbone": {k: v.detach().cpu() for k, v in backbone.features.state_dict().items()},
            "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
            "optimizer": opt.state_dict(),
            "history": history,
            "acc_decomposed_init": acc_init,
            "acc_full": acc_full,
        }
        model = {"state_dict": export_state_dict(backbone=backbone, head=head), "decomposed_idx": head.idx.cpu()}
        _report({**metrics, **static}, {STATE_FILE: state, MODEL_FILE: model})
    if start >= epochs and history:
        _report({**history[-1], **static}, None)  # restored after the last epoch: repeat its result


__all__ = [
    "FINETUNE_DEFAULTS",
    "HEAD_DEFAULTS",
    "MODEL_FILE",
    "STATE_FILE",
    "epoch_seed",
    "evaluate_backbone",
    "evaluate_head",
    "export_state_dict",
    "finetune_epoch",
    "finetune_trainable",
    "fit_decomposed_head",
    "head_trainable",
    "resolve_precision",
    "subset_rows",
]
