"""Full fine-tuning: the whole network trained end to end through the decomposed head (plain torch, no Ray).

As in the paper: the backbone's feature module and the decomposed head (initialised from
``W[y, I_y]``, ``b``; see :mod:`dtd_ray.train.head`) trained on images with standard CIFAR
augmentation, Adam, lr 1e-4, one epoch by default (:data:`dtd_ray.train.defaults.FINETUNE`),
BatchNorm in training mode. Device, precision, memory format and input normalisation
come from :class:`dtd_ray.models.runtime.Runtime` ("auto": fp16 autocast with loss scaling
on CUDA, fp32 on the CPU). The Ray Tune trainable around these loops is
:func:`dtd_ray.ray.trainables.finetune_trainable`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtd_ray.core import holdout, stats
from dtd_ray.core.heads import DecomposedHead
from dtd_ray.data.sources import subset_positions
from dtd_ray.data.transforms import INPUT_COLUMNS, prepare_batch
from dtd_ray.models.runtime import Runtime
from dtd_ray.train.head import epoch_seed, percent


def subset_rows(*, rows: Mapping[str, np.ndarray], max_rows: int | None, seed: int) -> dict[str, np.ndarray]:
    """At most ``max_rows`` rows of a source's columns (:func:`dtd_ray.data.sources.subset_positions`)."""
    rows = dict(rows)
    keep = subset_positions(num_rows=len(rows["sample_id"]), max_rows=max_rows, seed=seed)
    return rows if keep is None else {k: v[keep] for k, v in rows.items()}


def split_rows(*, rows: Mapping[str, np.ndarray], fraction: float | None, seed: int
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """``(fit rows, validation rows)`` of a source's columns (:func:`dtd_ray.core.holdout.val_mask` by
    ``sample_id``); ``(rows, None)`` without a ``fraction``."""
    rows = dict(rows)
    if fraction is None:
        return rows, None
    val = holdout.val_mask(sample_id=rows["sample_id"], fraction=fraction, seed=seed)
    return {k: v[~val] for k, v in rows.items()}, {k: v[val] for k, v in rows.items()}


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
    cols = [k for k in ("sample_id", "label", *INPUT_COLUMNS) if k in rows]

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


def _runtime(backbone: nn.Module, device: Any, precision: str) -> Runtime:
    # No device given: where the backbone already is (a Runtime elsewhere would need a copy).
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    pre = backbone.preprocessing
    return Runtime(device=device, precision=precision, mean=pre.mean, std=pre.std)


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
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """One epoch of end-to-end training of ``backbone.features`` and the decomposed ``head``.

    Minimises the mean cross-entropy of ``head(backbone.forward_features(x))`` over the
    rows of a source (``Source.read_numpy`` columns: ``sample_id``, ``label`` and
    ``image`` or ``path``) with the caller's ``optimizer`` (the paper: Adam, lr 1e-4, over
    the feature module's and the head's parameters). BatchNorm layers are in training
    mode (batch statistics, running averages updated). Rows are visited in a permutation
    drawn from ``epoch_seed(seed, epoch)``; ``augment="cifar"`` applies
    ``dtd_ray.data.transforms.cifar_augment`` with the same per-epoch seed (4-px pad,
    random crop, flip), so every epoch sees new crops and a resumed epoch sees the same ones.

    ``device`` (default: the backbone's) and ``precision`` make a
    :class:`~dtd_ray.models.runtime.Runtime`: images normalised on the device, autocast per
    ``precision``, channels_last on CUDA. ``scaler``: the run's ``torch.amp.GradScaler``
    (``Runtime.grad_scaler()``, active under fp16 only), kept across epochs so its scale
    carries over; ``None``: a fresh one for this epoch. Returns ``{"loss", "acc_train"
    (percent), "n", "seconds", "images_per_s"}``.
    """
    rt = _runtime(backbone, device, precision)
    scaler = rt.grad_scaler() if scaler is None else scaler
    n_all = len(rows["sample_id"])
    es = epoch_seed(seed, epoch)
    order = np.random.default_rng(es).permutation(n_all)
    backbone.train()
    head.train()
    t0 = time.perf_counter()
    # Sums stay on the device until the epoch ends: a float()/int() per step would make the host wait
    # for the GPU every step. (Under fp16 the loss scaler's step still reads its inf check on the host
    # once a step; bf16 has no scaler. jobs/bench_gpu.py times both.)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    n = 0
    for batch in _prepared_batches(
        rows, order=order, batch_size=batch_size, preprocessing=backbone.preprocessing, augment=augment, seed=es
    ):
        if not len(batch["label"]):
            continue
        x, y = rt.images(batch["image"]), rt.labels(batch["label"])
        with rt.autocast():
            # the head in fp32: its gather-multiply-sum is tiny and fp32 keeps the logits exact
            z = head(backbone.forward_features(x).float())
        loss = F.cross_entropy(z.float(), y)
        optimizer.zero_grad(set_to_none=True)
        # a disabled scaler (every precision but fp16) passes the loss and the step through unchanged
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        k = len(y)
        loss_sum += loss.detach().double() * k
        correct += (z.detach().argmax(1) == y).sum()
        n += k
    loss_total, correct_total = float(loss_sum), int(correct)  # the epoch's one wait for the device
    seconds = time.perf_counter() - t0
    backbone.eval()
    head.eval()
    return {
        "loss": loss_total / n if n else float("nan"),
        "acc_train": percent(correct_total, n),
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
    statistics); ``device`` and ``precision`` as in :func:`finetune_epoch`. Returns
    ``{"acc", "loss", "n", "seconds", "acc_<name>"…}``, and ``outcomes`` (per instance, sorted by
    ``sample_id``, as :func:`dtd_ray.core.stats.outcomes_text`) where every row was evaluated.
    """
    rt = _runtime(backbone, device, precision)
    head = backbone.head if head is None else head
    extra = dict(extra_heads or {})
    backbone.eval()
    head.eval()
    t0 = time.perf_counter()
    n_all = len(rows["sample_id"])
    loss_sum, correct, n = 0.0, 0, 0
    extra_correct = dict.fromkeys(extra, 0)
    ok: list[np.ndarray] = []
    for batch in _prepared_batches(
        rows, order=np.arange(n_all), batch_size=batch_size, preprocessing=backbone.preprocessing, augment=None, seed=0
    ):
        if not len(batch["label"]):
            continue
        x, y = rt.images(batch["image"]), rt.labels(batch["label"])
        with rt.autocast():
            f = backbone.forward_features(x).float()
        z = head(f)
        loss_sum += float(F.cross_entropy(z, y, reduction="sum"))
        hit = z.argmax(1) == y
        correct += int(hit.sum())
        ok.append(hit.cpu().numpy())
        for name, h in extra.items():
            extra_correct[name] += int((h(f).argmax(1) == y).sum())
        n += len(y)
    out: dict[str, Any] = {
        "acc": percent(correct, n),
        "loss": loss_sum / n if n else float("nan"),
        "n": n,
        "seconds": time.perf_counter() - t0,
    }
    if n == n_all:  # every row, in row order: the outcomes sorted by sample_id, as every other row's
        order = np.argsort(np.asarray(rows["sample_id"]), kind="stable")
        out["outcomes"] = stats.outcomes_text(np.concatenate(ok)[order])
    for name, c in extra_correct.items():
        out[f"acc_{name}"] = percent(c, n)
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


__all__ = [
    "evaluate_backbone",
    "export_state_dict",
    "finetune_epoch",
    "split_rows",
    "subset_rows",
]
