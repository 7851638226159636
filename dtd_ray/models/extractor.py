"""The model as a batch-inference callable: uint8 images in, per-instance records out.

Ray Data runs it in an actor pool (:mod:`dtd_ray.ray.extract`) as the pipeline's model stage,
:func:`writing_stage`: the callable with the write fused into its output (and, for decoded
arrays, the prepare step into its input). Neither needs Ray, so the tests and a bare GPU box
call them directly.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from dtd_ray.core.counting import rank_topk
from dtd_ray.data.transforms import prepare_batch
from dtd_ray.io import records, schema
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


def writing_stage(model_stage: type) -> type:
    """The extraction pipeline's model stage: ``model_stage`` (:class:`FeatureExtractor` or a subclass)
    whose calls write their records and return only the file's summary.

    Built with ``model_stage``'s keyword arguments plus ``staging_uri``, ``model_batch`` and
    ``prepare``. One call gets the rows of one Parquet file: it runs :func:`prepare_batch` on them
    where ``prepare`` (its keyword arguments) is given, the model in chunks of ``model_batch`` rows,
    then :func:`dtd_ray.io.records.write_part` into ``staging_uri``, and returns its one-row summary.
    So the records never pass through the object store, and there is no write stage with its tasks
    and hops. A call that fails, or whose process dies, leaves at most a file that no summary names,
    which the driver's commit drops with the staging folder: nothing is lost or written twice.

    Calls may run concurrently in one actor (the model of one while another writes); the model is
    only read. The class is a subclass of ``model_stage`` under the same name, so that Ray Data names
    the operator after the model (``MapBatches(FeatureExtractor)``).
    """

    class Stage(model_stage):
        def __init__(self, *, staging_uri: str, model_batch: int, prepare: dict | None = None, **kwargs) -> None:
            super().__init__(**kwargs)
            self.staging_uri, self.model_batch, self.prepare = staging_uri, int(model_batch), prepare

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if self.prepare is not None:
                batch = prepare_batch(batch, **self.prepare)
            n, b = len(batch[schema.SAMPLE_ID]), self.model_batch
            outs = [super(Stage, self).__call__({k: v[lo:lo + b] for k, v in batch.items()}) for lo in range(0, n, b)]
            return records.write_part(records.concat_records(outs), staging_uri=self.staging_uri)

    Stage.__name__ = Stage.__qualname__ = model_stage.__name__
    Stage.__doc__ = f"{model_stage.__name__} with its records written (:func:`writing_stage`)."
    return Stage
