"""Where and how a backbone runs: the one device rule, the one precision policy, the one input path.

Every place that runs a network (extraction, head and network fine-tuning, backbone
training, the report's activation maps) takes its device, autocast dtype, memory format
and normalisation from here, so "auto" means one thing everywhere:

- **device**: ``use_gpu=None`` → CUDA when this process sees a GPU, else the CPU;
  ``True`` without a CUDA device is an error (the driver decided from the cluster's
  resources, so a worker without one is misconfigured: running on its CPU would be a
  silent 100× slowdown); ``False`` → the CPU.
- **precision** ``"auto"``: fp16 autocast on CUDA, plain fp32 on the CPU. Measured on an
  H200 (``results/gpu/bench_gpu_h200.json``): fp16 is as fast as bf16 there, and bf16's
  7-bit mantissa reorders near-tied features (top-5 sets equal to fp32's for 96.2 % of
  CIFAR-10 instances; fp16 99.5 %). On the CPU autocast brings no speed and only costs
  accuracy. Training under fp16 uses a gradient scaler (:meth:`Runtime.grad_scaler`).
  ``"fp32"`` is strict fp32 (cuDNN's TF32 switched off), ``"tf32"`` allows TF32 on CUDA,
  ``"bf16"`` / ``"fp16"`` autocast to that dtype on any device.
- **memory format**: channels_last on CUDA (measured faster for convs there), the
  default NCHW on the CPU (not reliably faster there).
- **inputs**: uint8 NHWC images travel to the device (4× less than float32), from page-locked
  host memory on CUDA, and are normalised there: ``x = (u/255 − mean) / std`` per channel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(use_gpu: bool | None = None) -> torch.device:
    """The one device rule (module docstring): CUDA iff asked for or, with ``None``, available."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but torch sees no CUDA device on this worker")
    return torch.device("cuda" if use_gpu else "cpu")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with ``"auto"`` resolved for ``device``: ``"fp16"`` on CUDA, ``"fp32"`` on the CPU."""
    check_precision(precision)
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def normalize_images(images: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float NCHW, ``x = (u/255 − mean) / std`` per channel (ToTensor + Normalize)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


class Runtime:
    """Device, precision, memory format and normalisation of one network run.

    ``Runtime(device=resolve_device(use_gpu), precision="auto", mean=pre.mean, std=pre.std)``;
    then ``model = rt.prepare(model)``, ``x = rt.images(u8)`` and ``with rt.autocast(): …``.
    """

    def __init__(
        self,
        *,
        device: torch.device | str,
        precision: str = "auto",
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = _AUTOCAST.get(self.precision)
        self.cuda = self.device.type == "cuda"
        # NHWC is faster for convs on GPUs (tensor cores); on the CPU it is not reliably so.
        self.channels_last = self.cuda if channels_last is None else bool(channels_last and self.cuda)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        if self.cuda:
            # Process-wide, but a worker runs one model at a time. cuDNN convs default to TF32,
            # so "fp32" must switch it off to mean fp32.
            torch.backends.cudnn.allow_tf32 = self.precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on the device, in the memory format of this run."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A uint8 NHWC batch as the network's normalised float input on the device."""
        if isinstance(images, np.ndarray):
            if self.cuda and images.dtype == np.uint8:
                # One copy into page-locked host memory (torch's caching host allocator reuses it), so
                # that the copy to the GPU is a DMA that does not wait on pageable memory, as a
                # DataLoader with pin_memory=True gives the plain loop.
                host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
                host.numpy()[...] = images
                images = host
            else:
                # Ray Data hands out read-only, zero-copy batches; torch wants a writable array (uint8: a cheap copy).
                images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
        x = normalize_images(images.to(self.device, non_blocking=True), mean=self.mean, std=self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def labels(self, labels: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to this run's dtype (a no-op context for fp32 / TF32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for training: active under fp16 autocast (whose gradients can underflow), else a no-op."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


__all__ = [
    "PRECISIONS",
    "Runtime",
    "check_precision",
    "normalize_images",
    "resolve_device",
    "resolve_precision",
]
