"""Train a CIFAR-style ResNet of any depth on any dataset source (the project's own backbones).

The training loop is plain PyTorch (:func:`train_backbone`), so it runs in a Ray task on
a GPU node (:mod:`dtd_ray.ray.train_on_ray`), in-process on a bare GPU box, or on a CPU. Device,
precision, memory format and normalisation come from :class:`dtd_ray.models.runtime.Runtime`
("auto": fp16 autocast with loss scaling on CUDA, fp32 on the CPU). :func:`run_train` writes
the checkpoint in the public CIFAR-ResNet format (``{'state_dict', 'best_prec1'}``, which
:func:`dtd_ray.models.backbones.get_backbone` loads by path) and a JSON record beside it with
the resolved config, the per-epoch log, the test accuracy and the checkpoint's sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field

from dtd_ray import config as config_lib
from dtd_ray.config import config_class
from dtd_ray.data.sources import parse_source
from dtd_ray.data.transforms import cifar_augment, prepare_batch
from dtd_ray.models.backbones import get_backbone
from dtd_ray.models.runtime import Runtime, check_precision, resolve_device

log = logging.getLogger(__name__)


@config_class
class TrainConfig:
    model: Annotated[str, Field(description="a CIFAR ResNet (cifar_resnet8/14/20/32/44/56/110/1202)")] = "cifar_resnet20"
    dataset: Annotated[str, Field(description="dataset source spec with the two splits below")] = "fashion-mnist"
    train_split: Annotated[str, Field(description="split trained on")] = "train"
    eval_split: Annotated[str, Field(description="split whose accuracy is reported after every epoch")] = "test"
    epochs: Annotated[int, Field(description="passes over the training split")] = 15
    batch_size: Annotated[int, Field(description="images per SGD step")] = 128
    lr: Annotated[float, Field(description="peak learning rate of the one-cycle schedule (SGD, Nesterov momentum)")] = 0.1
    momentum: Annotated[float, Field(description="SGD momentum")] = 0.9
    weight_decay: Annotated[float, Field(description="L2 penalty on all weights")] = 5e-4
    augment: Annotated[str | None, Field(description="\"cifar\": zero-pad 4 px, random crop, random flip (seeded per epoch and sample); None: off")] = "cifar"
    in_channels: Annotated[int | None, Field(description="image channels (None: those of an array source, else 3); 1 → 28 px, 3 → 32 px")] = None
    normalization: Annotated[str | None, Field(description="mean/std (None: the model's default for the data's channels)")] = None
    seed: Annotated[int, Field(description="seeds the initialisation, the shuffling and the augmentation")] = 0
    use_gpu: Annotated[bool | None, Field(description="None: a GPU if the cluster (or, with --ray false, this machine) has one")] = None
    precision: Annotated[str, Field(description="dtd_ray.models.runtime: \"auto\" = fp16 autocast + loss scaling on GPU, fp32 on CPU; fp32, tf32, bf16, fp16")] = "auto"
    cpu_threads: Annotated[int | None, Field(description="torch threads on CPU (None: all cores)")] = None
    ray: Annotated[bool, Field(description="run as a Ray task (a GPU task when the cluster has GPUs); False: in this process")] = True
    output: Annotated[str, Field(description="writes <output>/<name>.th and <output>/<name>.json")] = "runs/train"
    name: Annotated[str | None, Field(description="file stem (default: <model>_<dataset kind>)")] = None
    verbose: Annotated[bool, Field(description="show Ray's and Tune's own INFO output")] = False

    @property
    def stem(self) -> str:
        return self.name or f"{self.model}_{self.dataset.split(':', 1)[0].replace('-', '')}"


def load_split(*, dataset: str, split: str, preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, H, W, C), labels int64)`` of a split, decoded and sized for the model."""
    src = parse_source(dataset)
    out = prepare_batch(src.read_numpy(split), preprocessing=preprocessing, on_bad_input="skip")
    ok = out["ok"]
    if not ok.any():
        reasons = sorted(set(out["error"][~ok].tolist()))[:3]
        raise ValueError(f"{dataset}/{split}: none of {len(ok)} images usable for a {preprocessing.size}-px "
                         f"{preprocessing.channels}-channel model ({'; '.join(reasons)})")
    if not ok.all():
        log.warning("%s/%s: %d undecodable or wrong-size inputs skipped", dataset, split, int((~ok).sum()))
    return out["image"][ok], out["label"][ok].astype(np.int64)


def one_cycle_lr(step: int, *, total: int, peak: float, warmup_frac: float = 0.15) -> float:
    """Linear warm-up to ``peak`` over the first ``warmup_frac`` of steps, then cosine decay to 0."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.inference_mode()
def evaluate(model: nn.Module, *, images: np.ndarray, labels: np.ndarray, runtime: Runtime,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy (percent) of ``model`` on uint8 NHWC ``images``, run as ``runtime`` says."""
    model.eval()
    correct = 0
    for lo in range(0, len(images), batch_size):
        x = runtime.images(images[lo:lo + batch_size])
        with runtime.autocast():
            pred = model(x).argmax(1).cpu().numpy()
        correct += int((pred == labels[lo:lo + batch_size]).sum())
    return 100.0 * correct / max(1, len(images))


def train_backbone(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` from scratch; returns ``state_dict``, ``history``, ``acc`` and the device used.

    Cross-entropy, SGD with Nesterov momentum and weight decay, one-cycle learning rate
    (:func:`one_cycle_lr`) per step; precision per ``cfg.precision`` (``Runtime``: "auto" is
    fp16 autocast with a gradient scaler on a GPU, fp32 on CPU).
    """
    check_precision(cfg.precision)
    device = resolve_device(cfg.use_gpu)
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    src = parse_source(cfg.dataset)
    first = src.read_numpy(cfg.train_split)
    channels = cfg.in_channels or (int(first["image"].shape[-1]) if "image" in first else 3)
    model = get_backbone(cfg.model, weights=None, num_classes=len(src.classes), in_channels=channels,
                         normalization=cfg.normalization)
    pre = model.preprocessing
    x_tr, y_tr = load_split(dataset=cfg.dataset, split=cfg.train_split, preprocessing=pre)
    x_te, y_te = load_split(dataset=cfg.dataset, split=cfg.eval_split, preprocessing=pre)
    ids = np.arange(len(x_tr), dtype=np.int64)
    rt = Runtime(device=device, precision=cfg.precision, mean=pre.mean, std=pre.std)
    model = rt.prepare(model)
    scaler = rt.grad_scaler()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases: no weight decay
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = len(x_tr) // cfg.batch_size  # drop the ragged last batch: BN needs > 1 sample
    total = steps_per_epoch * cfg.epochs
    rng = np.random.default_rng(cfg.seed)
    history, step = [], 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        # a new crop/flip per (epoch, sample), reproducible however the data is sharded
        x_ep = cifar_augment(x_tr, sample_ids=ids, seed=cfg.seed * 100_003 + epoch) if cfg.augment else x_tr
        order = rng.permutation(len(x_tr))
        # summed on the device: a .item() per step would stall a GPU on every step
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        for b in range(steps_per_epoch):
            sel = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x, y = rt.images(x_ep[sel]), rt.labels(y_tr[sel])
            for g in opt.param_groups:
                g["lr"] = one_cycle_lr(step, total=total, peak=cfg.lr)
            with rt.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            # a disabled scaler (every precision but fp16) passes the loss and the step through unchanged
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            loss_sum += loss.detach() * len(sel)
            correct += (logits.argmax(1) == y).sum()
            seen += len(sel)
        acc = evaluate(model, images=x_te, labels=y_te, runtime=rt)
        row = {"epoch": epoch + 1, "loss": float(loss_sum) / max(1, seen), "train_acc": 100.0 * int(correct) / max(1, seen),
               "eval_acc": acc, "seconds": time.perf_counter() - t0}
        history.append(row)
        print(f"[train] {cfg.stem} epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} "
              f"train {row['train_acc']:.2f} % {cfg.eval_split} {acc:.2f} % ({row['seconds']:.1f} s)", flush=True)
    # fp32 evaluation of the final weights: the number recorded with the checkpoint
    final = evaluate(model, images=x_te, labels=y_te,
                     runtime=Runtime(device=device, precision="fp32", mean=pre.mean, std=pre.std))
    sd = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
          for k, v in model.state_dict().items()}
    return {"state_dict": sd, "history": history, "acc": final, "device": str(device),
            "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "n_train": int(len(x_tr)), "n_eval": int(len(x_te))}


def save_result(cfg: TrainConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``<output>/<stem>.th`` (public format) and ``<output>/<stem>.json``; returns the record."""
    os.makedirs(cfg.output, exist_ok=True)
    # The backbone registry strips the DataParallel prefix; keeping it makes the file a drop-in
    # for tools that expect the public pytorch_resnet_cifar10 layout.
    ckpt = os.path.join(cfg.output, f"{cfg.stem}.th")
    torch.save({"best_prec1": result["acc"], "state_dict": {f"module.{k}": v for k, v in result["state_dict"].items()}},
               ckpt)
    with open(ckpt, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    record = {
        "checkpoint": os.path.basename(ckpt),
        "sha256": sha,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "eval_split": cfg.eval_split,
        "eval_acc": round(result["acc"], 2),
        "n_train": result["n_train"],
        "n_eval": result["n_eval"],
        "device": result["device_name"],
        "config": config_lib.to_dict(cfg),
        "versions": config_lib.versions(),
        "history": result["history"],
    }
    with open(os.path.join(cfg.output, f"{cfg.stem}.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def run_train(cfg: TrainConfig, *, train: Callable[[TrainConfig], dict[str, Any]] = train_backbone) -> dict[str, Any]:
    """Train with ``train`` and save; returns the record.

    ``train`` defaults to :func:`train_backbone` in this process; the Ray layer
    (:func:`dtd_ray.ray.train_on_ray.train_on_ray`) passes a Ray task instead when ``cfg.ray``.
    """
    result = train(cfg)
    record = save_result(cfg, result)
    print(f"[train] done: {cfg.stem} {cfg.eval_split} accuracy {record['eval_acc']:.2f} % on {record['device']} "
          f"-> {os.path.join(cfg.output, record['checkpoint'])}", flush=True)
    return record
