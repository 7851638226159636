"""What a backbone expects of its input images: the :class:`Preprocessing` record and the named
normalisations.

Torch-free on purpose: the record travels to every decode task of the extraction pipeline
(``data.transforms.prepare_batch``), and unpickling it there imports only this module; were it
defined beside the backbones, every decode worker would import torch (a process's largest import) just to read four numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["NORMALIZATIONS", "Preprocessing"]

# Per-channel (mean, std) of the data sets dtd-ray uses, selectable by name.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # CIFAR-10 at the precision of the paper's reference implementation: with these the
    # ImageNet-stat-trained cifar_resnet20 scores the paper's 91.71 % (the 4-digit
    # statistics (0.4914, …)/(0.2470, …) give 91.69 %).
    "cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input images.

    ``resize`` (if set) resizes the shorter side to ``resize`` with ``interpolation``
    (antialiased) and center-crops ``size``×``size``; with ``resize=None`` images must
    already be ``size``×``size``. Pixels are scaled to [0, 1], then normalised by
    ``mean``/``std`` per channel.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int
    resize: int | None = None
    channels: int = 3
    # torchvision's EfficientNet v1 weights were evaluated with bicubic resizing, so the
    # record must say so to reproduce them.
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"Preprocessing: mean {self.mean} and std {self.std} need {self.channels} values (channels={self.channels})"
            )
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            # The crop is taken from the resized image, so it cannot be larger.
            raise ValueError(f"Preprocessing: need size > 0 and resize None or >= size, got {self.size}, {self.resize}")

    def with_normalization(self, name: str) -> Preprocessing:
        """A copy with ``mean``/``std`` replaced by ``NORMALIZATIONS[name]``."""
        if name not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {name!r}; valid: {', '.join(sorted(NORMALIZATIONS))}")
        mean, std = NORMALIZATIONS[name]
        if len(mean) != self.channels:
            raise ValueError(
                f"normalization {name!r} has {len(mean)} channel(s) but the model takes {self.channels}"
            )
        return replace(self, mean=tuple(mean), std=tuple(std))
