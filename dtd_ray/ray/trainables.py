"""Ray Tune function trainables of the retraining modes: head-only and full fine-tuning.

:func:`head_trainable` wraps :func:`dtd_ray.train.head.fit_decomposed_head` (the decomposed
head on cached features); :func:`finetune_trainable` wraps the loops of
:mod:`dtd_ray.train.finetune` (the whole network through the decomposed head). Their
defaults are :mod:`dtd_ray.train.defaults` plus the keys only a trial has (where its data
is, its device and threads). Both report once per epoch with a checkpoint and resume from
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
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from ray import tune

from dtd_ray.core import holdout
from dtd_ray.core.heads import DecomposedHead, check_map
from dtd_ray.data.sources import parse_source
from dtd_ray.io import records, schema
from dtd_ray.models.backbones import get_backbone
from dtd_ray.models.linear_head import load_head
from dtd_ray.models.runtime import Runtime, check_precision, resolve_device
from dtd_ray.train import defaults
from dtd_ray.train.finetune import evaluate_backbone, export_state_dict, finetune_epoch, split_rows, subset_rows
from dtd_ray.train.head import as_tensor, check_same_map, fit_decomposed_head

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"

# Each trainable's config keys (documented in its docstring): the mode's training defaults
# (dtd_ray.train.defaults, shared with the sweep) plus what only a trial needs. Read-only.
HEAD_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "records": None,
    "model": None,
    "train_split": "train",
    "eval_split": "test",
    "idx": None,
    "head": None,
    **defaults.HEAD,
    "seed": 0,
    "val_fraction": None,
    "val_seed": 0,
    "use_gpu": False,
    "cpu_threads": 1,
})
FINETUNE_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "model": "cifar_resnet20",
    "weights": "default",
    "normalization": None,
    "input_size": None,
    "resize": None,
    "dataset": None,
    "train_split": "train",
    "eval_split": "test",
    "idx": None,
    **defaults.FINETUNE,
    "eval_batch_size": 512,
    "seed": 0,
    "val_fraction": None,
    "val_seed": 0,
    "max_train_rows": None,
    "max_eval_rows": None,
    "use_gpu": False,
    "cpu_threads": None,
})


def _config(config: Mapping[str, Any], table: Mapping[str, Any], *, required: tuple[str, ...], name: str) -> dict:
    # Unknown keys are allowed and ignored: a sweep's param_space carries labels (strategy, k1, k2 …).
    cfg = {**table, **{k: v for k, v in config.items() if k in table}}
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{name}: config needs {', '.join(missing)}")
    return cfg


def _set_threads(threads: Any) -> None:
    """Trials run in their own processes, where torch would use every core of the node: use
    what the trial asked for (``cpu_threads``, else the trial's CPU resources)."""
    if not threads:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # outside a trial Ray warns and returns None: keep torch's default
            resources = tune.get_context().get_trial_resources()
        threads = resources.required_resources.get("CPU") if resources is not None else None
    if threads:
        torch.set_num_threads(max(1, math.ceil(float(threads))))


def _load_state(checkpoint: tune.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def _report(metrics: dict[str, Any], files: Mapping[str, Any] | None) -> None:
    """``tune.report`` with a checkpoint directory holding ``files`` (name → object for torch.save)."""
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
        val = holdout.val_mask(sample_id=r[schema.SAMPLE_ID], fraction=cfg["val_fraction"], seed=int(cfg["val_seed"]))
        out["train_features"], out["train_labels"] = r[schema.FEATURES][~val], r[schema.LABEL][~val]
        if val.any():
            out["val_features"], out["val_labels"] = r[schema.FEATURES][val], r[schema.LABEL][val]
    if cfg["eval_split"] and "eval_features" not in out:
        r = records.load_records(cfg["records"], model=cfg["model"], split=cfg["eval_split"], columns=cols)
        out["eval_features"], out["eval_labels"] = r[schema.FEATURES], r[schema.LABEL]
    if need_head:
        manifest = records.read_manifest(cfg["records"], model=cfg["model"], split=cfg["train_split"]) or {}
        out["weight"], out["bias"], source = load_head(root=cfg["records"], manifest=manifest, head=cfg["head"])
        log.info("head_trainable: head from %s", source)
    return out


def head_trainable(config: dict[str, Any], *, data: dict[str, Any] | None = None) -> None:
    """Ray Tune function trainable: head-only retraining of one decomposed head on cached features.

    Use as ``tune.Tuner(tune.with_resources(tune.with_parameters(head_trainable, data=data),
    {"cpu": 1}), param_space=...)``. Calls :func:`dtd_ray.train.head.fit_decomposed_head`
    and reports once per epoch with a checkpoint (``state.pt``, see the module docstring);
    on a restart it resumes from ``tune.get_checkpoint()`` and skips the finished epochs.

    Config keys (others are ignored, so a sweep may add labels such as strategy/k1/k2):

    - ``idx`` (required): the class map, C lists of k2 feature indices.
    - ``records``: records root (``<extract output>/records``); ``model``: its partition tag.
      Needed unless ``data`` carries everything.
    - ``train_split`` ("train"), ``eval_split`` ("test"; ``None``: no evaluation).
    - ``val_fraction`` (None), ``val_seed`` (0): hold that share of the training rows out
      (:mod:`dtd_ray.core.holdout`) and report ``acc_val`` on it every epoch.
    - ``head``: an .npz with ``weight``/``bias``; default: the head stored beside the training
      split's records (``dtd_ray.models.linear_head.load_head``). Ignored when ``data`` has
      ``weight``/``bias``.
    - ``epochs``, ``lr``, ``batch_size``, ``weight_decay``: :data:`dtd_ray.train.defaults.HEAD`
      (10, 1e-2, 512, 0.0); ``seed`` (0).
    - ``use_gpu`` (False; ``dtd_ray.models.runtime.resolve_device``: True without CUDA is an
      error, None: CUDA when visible), ``cpu_threads`` (1).

    ``data`` (``tune.with_parameters``, so large arrays reach the object store once) may
    carry ``train_features, train_labels, eval_features, eval_labels, weight, bias`` and
    ``val_features, val_labels`` (the training rows already without them).

    Reported metrics: ``epoch``, ``acc_eval`` (percent), ``loss_eval``, ``acc_val`` and
    ``loss_val`` (with a validation split), ``loss`` (mean
    training CE), ``acc_train``, ``seconds`` (the epoch), ``acc_decomposed_init`` (the
    decomposed head before training), ``acc_full`` (the original head), ``k2``,
    ``resumed_from_epoch`` (0 on a fresh start).
    """
    cfg = _config(config, HEAD_DEFAULTS, required=("idx",), name="head_trainable")
    _set_threads(cfg["cpu_threads"])
    torch.manual_seed(int(cfg["seed"]))
    device = resolve_device(cfg["use_gpu"])
    d = _load_head_data(cfg, data or {})
    w = as_tensor(d["weight"], torch.float32)
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
        val_features=d.get("val_features"),
        val_labels=d.get("val_labels"),
        on_epoch=on_epoch,
        state=state,
        device=device,
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
    augmentation, one epoch; see :func:`dtd_ray.train.finetune.finetune_epoch`. Reports
    after every epoch, with a checkpoint (``state.pt`` + ``model.pt``, see the module
    docstring); resumes from ``tune.get_checkpoint()``. Give the trial ``{"cpu": n}`` or
    ``{"cpu": 1, "gpu": 1}`` and set ``use_gpu`` accordingly (the driver knows the cluster).

    Config keys (others are ignored):

    - ``idx`` (required): the class map, C lists of k2 feature indices.
    - ``dataset`` (required): a source spec (``imagefolder:PATH``, ``cifar10:PATH``, …).
    - ``model`` ("cifar_resnet20"), ``weights`` ("default"), ``normalization`` (None): as
      ``get_backbone``.
    - ``train_split`` ("train"), ``eval_split`` ("test").
    - ``epochs``, ``lr``, ``batch_size``, ``weight_decay``, ``augment`` ("cifar" or None),
      ``precision``: :data:`dtd_ray.train.defaults.FINETUNE` (1, 1e-4, 128, 0.0, "cifar",
      "auto"); ``eval_batch_size`` (512), ``seed`` (0).
    - ``val_fraction`` (None), ``val_seed`` (0): hold that share of the training images out
      (:mod:`dtd_ray.core.holdout`, by ``sample_id``): trained on the rest, ``acc_val`` on it.
    - ``max_train_rows`` / ``max_eval_rows`` (None: all): a seeded random subset, for tests.
    - ``use_gpu`` (False): the device as ``dtd_ray.models.runtime.resolve_device`` decides
      (True without CUDA is an error); ``precision`` as ``Runtime`` reads it ("auto" = fp16
      autocast with loss scaling on CUDA, fp32 on the CPU; "fp32", "tf32", "bf16", "fp16"),
      channels_last on CUDA.
    - ``cpu_threads`` (None: the trial's CPU resources).

    Reported metrics: ``epoch``, ``acc_eval`` (percent), ``loss_eval``, ``loss`` (mean
    training CE), ``acc_train``, ``seconds`` (the epoch's training time), ``seconds_eval``,
    ``images_per_s``, ``n_train``, ``n_eval``, ``acc_decomposed_init`` (the decomposed
    head before any training, on the eval split), ``acc_full`` (the original network
    there), ``k2``, ``device``, ``resumed_from_epoch``; ``acc_val`` and ``loss_val`` with a
    validation split.
    """
    cfg = _config(config, FINETUNE_DEFAULTS, required=("idx", "dataset"), name="finetune_trainable")
    _set_threads(cfg["cpu_threads"])
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    device = resolve_device(cfg["use_gpu"])
    check_precision(cfg["precision"])  # before the (possibly slow) model load

    backbone = get_backbone(cfg["model"], weights=cfg["weights"], normalization=cfg["normalization"],
                            input_size=cfg["input_size"], resize=cfg["resize"])
    pre = backbone.preprocessing
    rt = Runtime(device=device, precision=cfg["precision"], mean=pre.mean, std=pre.std)
    head = DecomposedHead.from_linear(backbone.head, cfg["idx"])
    backbone = rt.prepare(backbone)
    head.to(device)
    source = parse_source(cfg["dataset"])
    train_rows, val_rows = split_rows(rows=source.read_numpy(cfg["train_split"]), fraction=cfg["val_fraction"],
                                      seed=int(cfg["val_seed"]))
    train_rows = subset_rows(rows=train_rows, max_rows=cfg["max_train_rows"], seed=seed)
    eval_rows = subset_rows(rows=source.read_numpy(cfg["eval_split"]), max_rows=cfg["max_eval_rows"], seed=seed)
    # The original nn.Linear head is not trained (the decomposed head replaces it).
    params = list(backbone.features.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
    scaler = rt.grad_scaler()  # one per run, so its loss scale carries across epochs
    eval_kw = {"rows": eval_rows, "batch_size": int(cfg["eval_batch_size"]), "device": device,
               "precision": rt.precision}

    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        state = _load_state(ckpt)
        check_same_map(state["head"]["idx"], head.idx)
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
            precision=rt.precision, scaler=scaler,
        )  # fmt: skip
        ev = evaluate_backbone(backbone=backbone, head=head, **eval_kw)
        if val_rows is not None:
            vv = evaluate_backbone(backbone=backbone, head=head, **{**eval_kw, "rows": val_rows})
            ev.update(acc_val=vv["acc"], loss_val=vv["loss"])
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
        if "acc_val" in ev:
            metrics.update(acc_val=ev["acc_val"], loss_val=ev["loss_val"])
        if "outcomes" in ev:  # per eval instance, for the report's paired bootstrap
            metrics["outcomes"] = ev["outcomes"]
        history.append(metrics)
        log.info("finetune epoch %d: %s", epoch, {k: v for k, v in metrics.items() if k != "outcomes"})
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
    "finetune_trainable",
    "head_trainable",
]
