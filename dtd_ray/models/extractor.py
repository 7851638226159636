"""The model as a batch-inference callable: uint8 images in, per-instance records out.

Ray Data runs it in an actor pool (:mod:`dtd_ray.ray.extract`); it needs no Ray, so the
tests and a bare GPU box call it directly.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dtd_ray.core.counting import rank_topk
from dtd_ray.io import schema
from dtd_ray.models.backbones import get_backbone
from dtd_ray.models.runtime import Runtime, resolve_device

log = logging.getLogger(__name__)


class FeatureExtractor:
    """Loads the backbone once, then maps numpy batches to numpy records.

    Input batch: ``image`` uint8 (N, H, W, C) unnormalised, ``sample_id``, ``label``, and
    optionally ``ok``/``error`` (passed through). Output: the record columns of
    :data:`dtd_ray.io.schema.RECORDS_SCHEMA` plus ``ok``/``error``. Device, precision and
    memory format follow :mod:`dtd_ray.models.runtime` ("auto": fp16 autocast on a GPU,
    fp32 on the CPU).
    """

    def __init__(
        self,
        *,
        model: str,
        weights: str | None = "default",
        normalization: str | None = None,
        input_size: int | None = None,
        resize: int | None = None,
        kmax: int = 64,
        use_gpu: bool | None = None,
        precision: str = "auto",
        channels_last: bool = True,
        cpu_threads: int | None = None,
    ) -> None:
        device = resolve_device(use_gpu)
        if device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        backbone = get_backbone(model, weights=weights, normalization=normalization, input_size=input_size,
                                resize=resize).eval()
        pre = backbone.preprocessing
        self.runtime = Runtime(device=device, precision=precision, mean=pre.mean, std=pre.std,
                               channels_last=channels_last)
        self.device = self.runtime.device
        self.precision = self.runtime.precision
        self.backbone = self.runtime.prepare(backbone)
        self.kmax = min(kmax, self.backbone.feature_dim)

    def features(self, images: np.ndarray) -> torch.Tensor:
        """Penultimate features (fp32) of a uint8 NHWC batch."""
        x = self.runtime.images(images)
        with self.runtime.autocast():
            f = self.backbone.forward_features(x).float()
        if self.runtime.dtype == torch.float16 and not torch.isfinite(f).all():
            # fp16 overflowed (activations beyond 65504): redo this batch in fp32 rather than store inf.
            log.warning("fp16 overflow in %s; batch recomputed in fp32", self.backbone.name)
            f = self.backbone.forward_features(x).float()
        return f

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            f = self.features(batch["image"])
            # The head runs in fp32 even under autocast so that pred is the fp32 head's argmax of f.
            logits = self.backbone.head(f)
            idx, val = rank_topk(f, self.kmax)
        out = {
            schema.SAMPLE_ID: np.asarray(batch[schema.SAMPLE_ID], dtype=np.int64),
            schema.LABEL: np.asarray(batch[schema.LABEL], dtype=np.int32),
            schema.PRED: logits.argmax(1).to(torch.int32).cpu().numpy(),
            schema.TOPK_IDX: idx.to(torch.int32).cpu().numpy(),
            schema.TOPK_VAL: val.cpu().numpy(),
            schema.FEATURES: f.cpu().numpy(),
        }
        n = len(out[schema.SAMPLE_ID])
        out["ok"] = np.asarray(batch["ok"], dtype=bool) if "ok" in batch else np.ones(n, dtype=bool)
        out["error"] = np.asarray(batch["error"], dtype=object) if "error" in batch else np.full(n, "", dtype=object)
        return out
