"""Pretrained weights as data: the :class:`WeightsRecord` type and the tables of known records.

A record says where weights are (a URL, a local path, or ``"torchvision:<member>"``), how to
check them (sha256), what inputs they expect (:class:`Preprocessing`), their categories,
measured metrics and licence. The registry (:mod:`dtd_ray.models.backbones`) attaches them
to backbone names; nothing here builds or loads a network.

* :func:`akamaster_record`: the public CIFAR-10 ResNet-20/32/44/56 (``pytorch_resnet_cifar10``);
* :data:`ZOO`: public CIFAR-10 checkpoints of other families, each with the architecture that
  loads it (:mod:`dtd_ray.models.cifar_zoo`) and :func:`zoo_record` for its record;
* :func:`torchvision_record`: a torchvision weights enum member as a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from dtd_ray.data.preprocessing import NORMALIZATIONS, Preprocessing
from dtd_ray.models import cifar_zoo

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGENET_PREPROCESSING",
    "ZOO",
    "WeightsRecord",
    "ZooModel",
    "akamaster_record",
    "cifar_preprocessing",
    "torchvision_record",
    "zoo_record",
]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

IMAGENET_PREPROCESSING = Preprocessing(
    mean=NORMALIZATIONS["imagenet"][0], std=NORMALIZATIONS["imagenet"][1], size=224, resize=256
)


@dataclass(frozen=True)
class WeightsRecord:
    """Pretrained weights as data: where they are, how to check them, how they were trained."""

    name: str
    source: str  # a URL, a local path, or "torchvision:<EnumMember>"
    sha256: str | None
    preprocessing: Preprocessing
    categories: tuple[str, ...]
    metrics: dict = field(hash=False)
    notes: str = ""
    license: str = ""  # the licence the weights were published under (SPDX id where there is one)


# --------------------------------------------------------------------------- CIFAR ResNets (akamaster)
def cifar_preprocessing(*, in_channels: int = 3, num_classes: int | None = None) -> Preprocessing:
    """What a CIFAR ResNet with ``in_channels`` inputs expects (random init, or a checkpoint without record)."""
    if in_channels == 3:
        return Preprocessing(mean=NORMALIZATIONS["imagenet"][0], std=NORMALIZATIONS["imagenet"][1], size=32)
    if in_channels == 1:
        # Single-channel inputs in this project are Fashion-MNIST (28×28).
        mean, std = NORMALIZATIONS["fashion-mnist"]
        return Preprocessing(mean=mean, std=std, size=28, channels=1)
    return Preprocessing(mean=(0.5,) * in_channels, std=(0.5,) * in_channels, size=32, channels=in_channels)


_AKAMASTER_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# depth: (file, sha256, test acc % with ImageNet stats, with CIFAR-10 stats) as measured
# on the CIFAR-10 test set (see ../shared/data/README.md).
_AKAMASTER = {
    20: ("resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8", 91.73, 91.71),
    32: ("resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850", 92.63, 92.35),
    44: ("resnet44-014dd654.th", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4", 93.10, 92.89),
    56: ("resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367", 93.39, 93.26),
}


def akamaster_record(depth: int) -> WeightsRecord | None:
    """The public CIFAR-10 checkpoint of the CIFAR ResNet of ``depth``; ``None`` where there is none."""
    if depth not in _AKAMASTER:
        return None
    file, sha, acc_imagenet, acc_cifar = _AKAMASTER[depth]
    return WeightsRecord(
        name="cifar10-akamaster",
        source=_AKAMASTER_URL + file,
        sha256=sha,
        preprocessing=cifar_preprocessing(),
        categories=CIFAR10_CLASSES,
        metrics={
            "cifar10_test_acc@imagenet_norm": acc_imagenet,
            "cifar10_test_acc@cifar10_norm": acc_cifar,
        },
        notes=(
            "akamaster/pytorch_resnet_cifar10 (BSD-2-Clause); trained with ImageNet normalisation; "
            "accuracies measured on cifar10/test, the CIFAR-stat one with normalization='cifar10'"
        ),
        license="BSD-2-Clause",
    )


# --------------------------------------------------------------------------- CIFAR-10 zoo
# Public CIFAR-10 checkpoints of other families (../shared/data/cifar_zoo/README.md): each trained
# with its own normalisation, which its record carries, so no --normalization is needed.
_CHENYAOFO = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/"
_CHENHANG = "https://github.com/chenhang98/"
_CHENYAOFO_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_CHENHANG_NORM = ((0.53129727, 0.5259391, 0.52069134), (0.28938246, 0.28505746, 0.27971658))


@dataclass(frozen=True)
class ZooModel:
    """One zoo checkpoint with the architecture that loads it strictly."""

    builder: Callable[..., nn.Module]
    url: str
    sha256: str
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    test_acc: float  # % on all 10,000 cifar10/test images through the project's extraction (tests pin it)
    license: str
    origin: str
    description: str


ZOO = {
    "cifar_resnet20_proj": ZooModel(
        lambda *, num_classes=10: cifar_zoo.ProjResNet(3, num_classes=num_classes),
        _CHENYAOFO + "resnet/cifar10_resnet20-4118986f.pt",
        "4118986f0df73003d572b0e397f0ac7b3f60af1f31aff3d2da164536e36f6ec8", _CHENYAOFO_NORM, 92.60,
        "BSD-3-Clause", "chenyaofo/pytorch-cifar-models, release resnet",
        "CIFAR ResNet-20 with 1x1-conv + BN projection shortcuts, 64-d features"),
    "cifar_resnet56_proj": ZooModel(
        lambda *, num_classes=10: cifar_zoo.ProjResNet(9, num_classes=num_classes),
        _CHENYAOFO + "resnet/cifar10_resnet56-187c023a.pt",
        "187c023aee0c9cf3093a682d9447a538cbaf5489f7ae78a7df4edf2246ce380b", _CHENYAOFO_NORM, 94.37,
        "BSD-3-Clause", "chenyaofo/pytorch-cifar-models, release resnet",
        "CIFAR ResNet-56 with 1x1-conv + BN projection shortcuts, 64-d features"),
    "cifar_shufflenetv2_x0_5": ZooModel(
        lambda *, num_classes=10: cifar_zoo.shufflenet_v2_cifar(num_classes=num_classes),
        _CHENYAOFO + "shufflenetv2/cifar10_shufflenetv2_x0_5-1308b4e9.pt",
        "1308b4e9c4f88656a3b09775c273fc5ffe8fca9c84044123cf3d138c8dec10bd", _CHENYAOFO_NORM, 90.65,
        "BSD-3-Clause", "chenyaofo/pytorch-cifar-models, release shufflenetv2",
        "ShuffleNetV2 x0.5 with a CIFAR stem (stride-1 3x3 conv, no max-pool), 1024-d features"),
    "cifar_densenet40_k12": ZooModel(
        lambda *, num_classes=10: cifar_zoo.DenseNetCifar(layers=12, growth=12, num_classes=num_classes),
        _CHENHANG + "densenet_cifar10_pytorch/raw/65c15a6/bak/weights.pkl",
        "5d5438139f40ee566d5be28c67c58e663ef336613179ce492f5cd81fe5afde5b", _CHENHANG_NORM, 94.47,
        "GPL-3.0", "chenhang98/densenet_cifar10_pytorch @65c15a6, bak/weights.pkl",
        "DenseNet-40, growth 12, no bottleneck or compression, 448-d features"),
    "cifar_shufflenet_g3_x0_5": ZooModel(
        lambda *, num_classes=10: cifar_zoo.ShuffleNetV1(groups=3, width=0.5, num_classes=num_classes),
        _CHENHANG + "shuffleNet-cifar10/raw/8fa8f82/bak/weights_05g3.pkl",
        "6fa8e5dbb3813364795de489c05fbaabfc36389ebf7867553e5ae190d2be547d", _CHENHANG_NORM, 92.60,
        "GPL-3.0", "chenhang98/shuffleNet-cifar10 @8fa8f82, bak/weights_05g3.pkl",
        "ShuffleNet v1, groups 3, width x0.5, CIFAR stem, 480-d features"),
}


def zoo_record(z: ZooModel) -> WeightsRecord:
    """The weights record of one :data:`ZOO` checkpoint."""
    mean, std = z.norm
    return WeightsRecord(
        name="cifar10-" + z.origin.split("/")[0],
        source=z.url,
        sha256=z.sha256,
        preprocessing=Preprocessing(mean=mean, std=std, size=32),
        categories=CIFAR10_CLASSES,
        metrics={"cifar10_test_acc": z.test_acc},
        notes=f"{z.origin}; trained with mean {mean} / std {std}; accuracy measured on cifar10/test",
        license=z.license,
    )


# --------------------------------------------------------------------------- torchvision
def torchvision_record(weights_enum_member: Any) -> WeightsRecord:
    """A torchvision weights enum member (``ResNet50_Weights.IMAGENET1K_V2``) as a record."""
    w = weights_enum_member
    t = w.transforms()
    metrics: dict[str, float] = {
        f"{ds}/{k}": v for ds, vals in w.meta.get("_metrics", {}).items() for k, v in vals.items()
    }
    for key, out in (("num_params", "num_params"), ("_ops", "gflops")):
        if key in w.meta:
            metrics[out] = w.meta[key]
    member = w.name
    return WeightsRecord(
        name=f"{type(w).__name__}.{member}",
        source=f"torchvision:{member}",
        sha256=None,  # torchvision publishes only a hash prefix, in the file name
        preprocessing=Preprocessing(
            mean=tuple(t.mean),
            std=tuple(t.std),
            size=int(t.crop_size[0]),
            resize=int(t.resize_size[0]),
            interpolation=t.interpolation.value,
        ),
        categories=tuple(w.meta.get("categories", ())),
        metrics=metrics,
        notes=" ".join(str(w.meta.get("_docs", "")).split()),
    )
