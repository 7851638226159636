"""The one defaults table of each retraining mode: the Tune trainables and the sweep read these.

The head-only defaults were picked in an early version by looking at cifar_resnet20's *test*
accuracy at k1 = k2 = 5 (every lr in 1e-3..3e-2 at batch 512 settled at 90.3-90.6 %): a default,
not a result. A sweep with a validation split (``val_fraction``) gives ``lr`` as a list and keeps,
per cell, the lr and the epoch best on validation (``dtd_ray.report.protocol.choose_on_val``).
Fine-tuning follows the paper: Adam, lr 1e-4, standard CIFAR augmentation, one epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

HEAD: Mapping[str, Any] = MappingProxyType({
    "epochs": 10,  # passes over the cached training features
    "lr": 1e-2,  # Adam learning rate
    "batch_size": 512,  # instances per step
    "weight_decay": 0.0,  # Adam weight decay
})
FINETUNE: Mapping[str, Any] = MappingProxyType({
    "epochs": 1,  # passes over the training images
    "lr": 1e-4,  # Adam learning rate (the paper's)
    "batch_size": 128,  # images per step
    "weight_decay": 0.0,  # Adam weight decay
    "augment": "cifar",  # 4-px pad + random crop + flip, seeded per (epoch, sample); None: off
    "precision": "auto",  # dtd_ray.models.runtime: fp16 autocast (+ loss scaling) on GPU, fp32 on CPU
})
