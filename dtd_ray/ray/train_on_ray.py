"""Backbone training on Ray: :func:`dtd_ray.train.backbone.train_backbone` as a Ray task.

The task asks for a GPU only when the cluster has one (a ``num_gpus=1`` request on a
cluster without GPUs would wait forever), and the worker gets the decided ``use_gpu``.
"""

from __future__ import annotations

from typing import Any

import ray

from dtd_ray import config as config_lib
from dtd_ray.ray import cluster
from dtd_ray.train import backbone
from dtd_ray.train.backbone import TrainConfig, train_backbone


def train_as_task(cfg: TrainConfig) -> dict[str, Any]:
    """:func:`train_backbone` in a Ray task (one CPU, plus a GPU when the cluster has one); its result."""
    gpus = int(cluster.probe().gpus)
    use_gpu = bool(gpus) if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not gpus:
        raise RuntimeError("use_gpu=True but the Ray cluster has no GPU (the task would wait forever)")
    task_cfg = TrainConfig(**{**config_lib.to_dict(cfg), "use_gpu": use_gpu, "ray": False})
    remote = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(train_backbone)
    return ray.get(remote.remote(task_cfg))


def train_on_ray(cfg: TrainConfig) -> dict[str, Any]:
    """Train (in a Ray task when ``cfg.ray``, else in this process) and save; returns the record."""
    return backbone.run_train(cfg, train=train_as_task if cfg.ray else train_backbone)


__all__ = ["train_as_task", "train_on_ray"]
