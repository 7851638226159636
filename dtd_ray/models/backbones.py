"""Backbones by name: a feature module, its final linear layer, preprocessing and weights.

Decomposing the Deep works on ``f``, the input of a CNN's final linear layer, and on
that layer's ``(W, b)``. Every registered backbone is therefore split into

* ``features``: ``x -> f`` of shape ``(N, m)`` (the original network with its final
  ``nn.Linear`` replaced by ``nn.Identity``, so state-dict keys keep their names), and
* ``head``: the original ``nn.Linear(m, C)``, untouched.

Two families are registered at import:

* ``cifar_resnet8/14/20/32/44/56/110/1202``: the CIFAR ResNets of He et al. (2016) with
  option-A (parameter-free) shortcuts, key-compatible with the public
  ``pytorch_resnet_cifar10`` checkpoints (``module.`` prefix stripped).
* torchvision classifiers that end in one linear layer (ResNet, ResNeXt, Wide-ResNet,
  DenseNet, MobileNet V2/V3, EfficientNet v1/v2, RegNet, ConvNeXt, VGG).

Weights are data (:class:`WeightsRecord`): a local file, an http(s) URL checked
against its sha256, or a member of torchvision's weights enum. Every checkpoint is
read with ``torch.load(..., weights_only=True)`` and loaded with ``strict=True``;
whatever does not fit raises one ``ValueError`` line that says what did not fit.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

# The input record lives in the data layer (torch-free): the decode tasks that receive it never import torch.
from dtd_ray.data.preprocessing import NORMALIZATIONS, Preprocessing
from dtd_ray.models.checkpoints import load_checkpoint, load_state_dict_file
from dtd_ray.models import cifar_zoo
from dtd_ray.models.cifar_resnet import CifarResNet

logger = logging.getLogger(__name__)

__all__ = [
    "NORMALIZATIONS",
    "Backbone",
    "Preprocessing",
    "WeightsRecord",
    "get_backbone",
    "list_backbones",
    "load_state_dict_file",
    "register_backbone",
    "split_final_linear",
]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


# --------------------------------------------------------------------------- records
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


# --------------------------------------------------------------------------- Backbone
class Backbone(nn.Module):
    """A classifier split at its final linear layer: ``forward(x) == head(features(x))``.

    ``blocks`` names the network's stages in forward order (paths inside ``features``);
    the last one is the last conv block before global pooling, for channel maps via
    forward hooks.
    """

    def __init__(
        self,
        *,
        name: str,
        features: nn.Module,
        head: nn.Linear,
        preprocessing: Preprocessing,
        blocks: dict[str, nn.Module] | None = None,
        weights: WeightsRecord | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{name}: head must be an nn.Linear, got {type(head).__name__}")
        self.name = name
        self.features = features
        self.head = head
        self.preprocessing = preprocessing
        # A plain dict, not a ModuleDict: these modules already live inside
        # `features`, and registering them twice would duplicate state-dict keys.
        self.blocks = dict(blocks or {})
        self.weights = weights

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def forward_features(self, x: Tensor) -> Tensor:
        """``f``: the input of the final linear layer, shape ``(N, feature_dim)``."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``head(features(x))``, shape ``(N, num_classes)``."""
        return self.head(self.features(x))

    def extra_repr(self) -> str:
        w = self.weights.name if self.weights is not None else None
        return f"name={self.name!r}, feature_dim={self.feature_dim}, num_classes={self.num_classes}, weights={w!r}"


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Entry:
    name: str
    builder: Callable[..., nn.Module]
    default_weights: WeightsRecord | None
    description: str
    preprocessing: Preprocessing | Callable[..., Preprocessing] | None
    torchvision_weights: Any = None  # the torchvision weights enum class, for "torchvision:" sources


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str,
    *,
    builder: Callable[..., nn.Module],
    default_weights: WeightsRecord | None = None,
    description: str = "",
    preprocessing: Preprocessing | Callable[..., Preprocessing] | None = None,
    torchvision_weights: Any = None,
) -> None:
    """Register a backbone under ``name`` (a duplicate name raises ``ValueError``).

    ``builder(**options)`` returns the whole randomly initialised classifier (ending
    in its final ``nn.Linear``); ``options`` holds only what the caller of
    :func:`get_backbone` set (``num_classes``, ``in_channels``). ``preprocessing`` is
    used for random init and unrecognised checkpoints: a record, or a callable of the
    same options; it defaults to ``default_weights.preprocessing`` or ImageNet
    256→224. ``torchvision_weights`` is the torchvision weights enum that
    ``"torchvision:<member>"`` resolves in.
    """
    if _TORCHVISION_FAMILIES.match(name):
        _ensure_torchvision()  # a name torchvision could own: register those first, so a clash raises
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = _Entry(name, builder, default_weights, description, preprocessing, torchvision_weights)


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    _ensure_torchvision()
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    _ensure_torchvision()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown backbone {name!r}; {hint}valid: {', '.join(list_backbones())}")


# --------------------------------------------------------------------------- checkpoints
def _shape_options(state_dict: Mapping[str, Tensor], entry: _Entry) -> dict[str, int]:
    """``num_classes`` / ``in_channels`` as the checkpoint's tensors have them, where the builder takes them.

    The final linear layer is the last 2-D ``*.weight`` in the state dict (state dicts list
    modules in registration order); the stem is the first 4-D ``*.weight``.
    """
    accepted = inspect.signature(entry.builder).parameters
    out: dict[str, int] = {}
    mats = [v for k, v in state_dict.items() if k.endswith("weight") and v.ndim == 2]
    convs = [v for k, v in state_dict.items() if k.endswith("weight") and v.ndim == 4]
    if mats and "num_classes" in accepted:
        out["num_classes"] = int(mats[-1].shape[0])
    if convs and "in_channels" in accepted and int(convs[0].shape[1]) != 3:
        out["in_channels"] = int(convs[0].shape[1])
    return out


def _describe_mismatch(
    sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], *, label: str, arch: str
) -> str | None:
    """One line that says what in ``sd`` does not fit ``model_sd``; ``None`` if it fits."""
    # BatchNorm's step counter: checkpoints saved before torch 0.4.1 lack it, and
    # BatchNorm's own loader fills it in (it does not affect eval outputs).
    missing = [k for k in model_sd if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in model_sd]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in model_sd.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs model: {'; '.join(shapes[:3])})")
    hints = _mismatch_hints(sd, model_sd, arch)
    return f"{label} does not fit {arch}: " + ", ".join(parts) + (f"; {'; '.join(hints)}" if hints else "")


def _blocks_in(sd: Mapping[str, Tensor], stage: str) -> int:
    pat = re.compile(rf"^{re.escape(stage)}\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def _mismatch_hints(sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], arch: str) -> list[str]:
    hints = []
    n_ckpt, n_model = _blocks_in(sd, "layer1"), _blocks_in(model_sd, "layer1")
    if n_ckpt and n_ckpt != n_model:
        if arch.startswith("cifar_resnet"):
            depth = 6 * n_ckpt + 2
            known = f"cifar_resnet{depth}" in _REGISTRY
            hints.append(
                f"the checkpoint has {n_ckpt} blocks in layer1, so it looks like a depth-{depth} CIFAR ResNet"
                + (f" (cifar_resnet{depth})" if known else "")
                + f"; {arch} has {n_model}"
            )
        else:
            hints.append(f"the checkpoint has {n_ckpt} blocks in layer1, {arch} has {n_model}")
    # The two options a user can fix from the call site: classes and input channels.
    last_w = [k for k in model_sd if k.endswith(".weight") and model_sd[k].ndim == 2]
    if last_w and last_w[-1] in sd and sd[last_w[-1]].ndim == 2:
        k = last_w[-1]
        if sd[k].shape[0] != model_sd[k].shape[0]:
            hints.append(f"pass num_classes={sd[k].shape[0]}")
    conv_w = [k for k, v in model_sd.items() if v.ndim == 4]
    if conv_w and conv_w[0] in sd and sd[conv_w[0]].ndim == 4:
        k = conv_w[0]
        if sd[k].shape[1] != model_sd[k].shape[1]:
            hints.append(f"pass in_channels={sd[k].shape[1]}")
    return hints


# --------------------------------------------------------------------------- splitting
def _first_conv_in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _find_final_linear(model: nn.Module, *, name: str, input_size: int, in_channels: int | None) -> str:
    """Path of the ``nn.Linear`` whose output is the model's output (checked by one forward)."""
    c = in_channels if in_channels is not None else _first_conv_in_channels(model)
    # Hook every leaf: the last one to run is the module to name when the check fails.
    order: list[tuple[str, nn.Module, Any]] = []
    handles = []
    for path, mod in model.named_modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(lambda m, i, o, p=path: order.append((p, m, o))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, c, input_size, input_size, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise ValueError(f"{name} does not end in one linear layer: it has no leaf modules")
    last_path, last_mod, last_out = order[-1]
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = f"its final module is {type(last_mod).__name__} ({last_path or 'the model'})"
    if not isinstance(out, Tensor):
        raise ValueError(f"{name} does not end in one linear layer: its output is a {type(out).__name__}, not a tensor")
    if not linears:
        raise ValueError(f"{name} does not end in one linear layer: {found} and it has no nn.Linear")
    path, lin = linears[-1]
    calls = [o for p, m, o in order if m is lin]
    if len(calls) != 1 or last_mod is not lin or not torch.equal(calls[0], out):
        reason = f"it is called {len(calls)} times" if len(calls) != 1 else "the model output is not its output"
        raise ValueError(
            f"{name} does not end in one linear layer: {found}; the last nn.Linear ({path}) is not final: {reason}"
        )
    return path


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def split_final_linear(
    model: nn.Module, *, name: str, input_size: int, in_channels: int | None = None
) -> tuple[nn.Module, nn.Linear]:
    """Split ``model`` into ``(features, head)`` at its final ``nn.Linear``.

    The final linear is the last ``nn.Linear`` in module order, accepted only if one
    dummy forward (``2×in_channels×input_size²``; channels default to the first
    conv's) shows its output *is* the model's output. It is replaced in place by
    ``nn.Identity`` (so ``features`` is ``model`` itself and keeps its key names) and
    returned as ``head``. Anything else (a conv classifier, a final activation) raises
    ``ValueError`` naming the type of the final module.
    """
    path = _find_final_linear(model, name=name, input_size=input_size, in_channels=in_channels)
    if not path:
        raise ValueError(f"{name} is itself a single nn.Linear; there is no feature module to split off")
    head = _replace_module(model, path, nn.Identity())
    return model, head


def _default_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Named stages in forward order; the last is the last conv block before pooling."""
    named = getattr(model, "stage_names", None)  # the project's own architectures name theirs
    if named:
        return {n: model.get_submodule(n) for n in named}
    stages = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if stages:  # ResNet / ResNeXt / Wide-ResNet / CIFAR ResNets
        return {s: getattr(model, s) for s in stages}
    trunk = getattr(model, "trunk_output", None)
    if isinstance(trunk, nn.Sequential):  # RegNet
        return {f"trunk_output.{n}": m for n, m in trunk.named_children()}
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential):
        children = list(feats.named_children())
        if all(not list(m.children()) for _, m in children):
            # VGG: a flat list of conv/ReLU/pool layers; a stage ends at each max pool,
            # and its channel maps are the output of the layer just before that pool.
            return {
                f"features.{children[i - 1][0]}": children[i - 1][1]
                for i, (_, m) in enumerate(children)
                if isinstance(m, nn.MaxPool2d) and i > 0
            }
        # MobileNet / EfficientNet / ConvNeXt / DenseNet: the children of `features`
        # (for DenseNet the last is norm5; a ReLU follows it before pooling).
        return {f"features.{n}": m for n, m in children}
    return {}


# --------------------------------------------------------------------------- get_backbone
def _torchvision_member(entry: _Entry, spec: str):
    """The enum member that ``torchvision:<member>`` / ``<Enum>.<member>`` names."""
    enum = entry.torchvision_weights
    body = spec[len("torchvision:") :] if spec.startswith("torchvision:") else spec
    cls_name, _, member = body.rpartition(".")
    if enum is None:
        raise ValueError(f"weights {spec!r}: {entry.name} has no torchvision weights enum")
    if cls_name and cls_name != enum.__name__:
        raise ValueError(f"weights {spec!r}: {entry.name} takes {enum.__name__}, not {cls_name}")
    try:
        return enum[member]
    except KeyError:
        raise ValueError(
            f"weights {spec!r}: {enum.__name__} has no member {member!r}; valid: {', '.join(enum.__members__)}"
        ) from None


def _torchvision_record(weights_enum_member) -> WeightsRecord:
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


def _known_records(entry: _Entry) -> list[WeightsRecord]:
    records = [entry.default_weights] if entry.default_weights is not None else []
    if entry.torchvision_weights is not None:
        records += [_torchvision_record(m) for m in entry.torchvision_weights]
    return records


def _hash_prefix(record: WeightsRecord, entry: _Entry) -> str | None:
    """The full sha256 of a record, or the prefix in a torchvision file name."""
    if record.sha256:
        return record.sha256
    if record.source.startswith("torchvision:"):
        m = torch.hub.HASH_REGEX.search(os.path.basename(_torchvision_member(entry, record.source).url))
        if m and len(m.group(1)) >= 8:
            return m.group(1)
    return None


def _default_preprocessing(entry: _Entry, options: dict[str, int]) -> Preprocessing:
    p = entry.preprocessing
    if callable(p):
        return p(**options)
    if p is not None:
        return p
    return entry.default_weights.preprocessing if entry.default_weights is not None else IMAGENET_PREPROCESSING


def get_backbone(
    name: str,
    *,
    weights: str | None = "default",
    normalization: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
) -> Backbone:
    """Build backbone ``name`` with ``weights``, split at its final linear layer, in eval mode.

    ``weights``: ``"default"`` (the registered record; ``ValueError`` if there is
    none), ``None`` (random init), a local file, an http(s) URL, or a torchvision enum
    member as ``"torchvision:IMAGENET1K_V2"`` / ``"ResNet50_Weights.IMAGENET1K_V2"``.
    A local file or URL whose sha256 matches a known record of this architecture gets
    that record (its preprocessing, categories, metrics) as ``backbone.weights``.
    ``normalization`` (a key of :data:`NORMALIZATIONS`) overrides the preprocessing's
    mean/std. ``num_classes``/``in_channels`` change the architecture, so they combine
    only with ``weights=None`` or a file whose tensors have those shapes.
    """
    entry = _entry(name)
    options = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v is not None}

    record: WeightsRecord | None = None
    source: str | None = None
    sha: str | None = None
    if weights == "default":
        if entry.default_weights is None:
            raise ValueError(
                f"{name} has no default weights; pass weights=<local file or URL> or weights=None for random init"
            )
        record = entry.default_weights
    elif weights is not None:
        if weights.startswith("torchvision:") or re.fullmatch(r"\w+_Weights\.\w+", weights):
            record = _torchvision_record(_torchvision_member(entry, weights))
        elif entry.default_weights is not None and weights == entry.default_weights.name:
            record = entry.default_weights
        else:
            source = weights
            # A URL that is a known record's source gets that record (and its hash check).
            record = next((r for r in _known_records(entry) if r.source == weights), None)

    if record is not None:
        if record.source.startswith("torchvision:"):
            # Load torchvision's file ourselves: torchvision's own loader reads it with
            # weights_only=False, and we want one strict, weights-only path for all.
            source = _torchvision_member(entry, record.source).url
        else:
            source = record.source
        sha = _hash_prefix(record, entry)
        # Pretrained weights fix the architecture; refuse options that contradict them.
        if num_classes is not None and record.categories and num_classes != len(record.categories):
            raise ValueError(
                f"{name} weights {record.name!r} have {len(record.categories)} classes, not num_classes={num_classes}; "
                "num_classes combines with weights=None or a local file"
            )
        if in_channels is not None and in_channels != record.preprocessing.channels:
            raise ValueError(
                f"{name} weights {record.name!r} take {record.preprocessing.channels} input channel(s), "
                f"not in_channels={in_channels}"
            )

    state_dict = path = digest = None
    if source is not None:
        state_dict, path, digest = load_checkpoint(source, sha)
        # A checkpoint fixes the head and stem shapes: take what was not given from it.
        options = {**_shape_options(state_dict, entry), **options}

    try:
        model = entry.builder(**options)
    except TypeError as e:
        raise ValueError(f"{name} does not take option(s) {', '.join(options)}: {e}") from None

    preprocessing = record.preprocessing if record is not None else _default_preprocessing(entry, options)

    if state_dict is not None:
        if record is None:
            for r in _known_records(entry):
                prefix = _hash_prefix(r, entry)
                if prefix and digest.startswith(prefix.lower()):
                    record, preprocessing = r, r.preprocessing
                    logger.info("%s: %s is the registered weights %r", name, path, r.name)
                    break

    # Split before loading: a checkpoint saved from a Backbone names its keys
    # features.* / head.*, and translating them needs the final linear's path.
    size = min(preprocessing.size, 64)  # small: the forward only checks structure
    head_path = _find_final_linear(model, name=name, input_size=size, in_channels=in_channels)
    if state_dict is not None:
        if all(k.startswith(("features.", "head.")) for k in state_dict):
            state_dict = {
                (f"{head_path}.{k[5:]}" if k.startswith("head.") else k[9:]): v for k, v in state_dict.items()
            }
        label = f"checkpoint {source!r}"
        problem = _describe_mismatch(state_dict, model.state_dict(), label=label, arch=name)
        if problem:
            raise ValueError(problem)
        model.load_state_dict(state_dict, strict=True)

    head = _replace_module(model, head_path, nn.Identity())
    if normalization is not None:
        preprocessing = preprocessing.with_normalization(normalization)
    if in_channels is not None and preprocessing.channels != in_channels:
        raise ValueError(f"{name}: preprocessing has {preprocessing.channels} channel(s), the model takes {in_channels}")
    backbone = Backbone(
        name=name,
        features=model,
        head=head,
        preprocessing=preprocessing,
        blocks=_default_blocks(model),
        weights=record,
    )
    return backbone.eval()


# --------------------------------------------------------------------------- CIFAR ResNets
def _cifar_builder(depth: int) -> Callable[..., nn.Module]:
    n = (depth - 2) // 6

    def build(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(n, num_classes=num_classes, in_channels=in_channels)

    return build


def _cifar_preprocessing(*, in_channels: int = 3, num_classes: int | None = None) -> Preprocessing:
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


def _register_cifar_resnets() -> None:
    for depth in (8, 14, 20, 32, 44, 56, 110, 1202):
        record = None
        if depth in _AKAMASTER:
            file, sha, acc_imagenet, acc_cifar = _AKAMASTER[depth]
            record = WeightsRecord(
                name="cifar10-akamaster",
                source=_AKAMASTER_URL + file,
                sha256=sha,
                preprocessing=_cifar_preprocessing(),
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
        register_backbone(
            f"cifar_resnet{depth}",
            builder=_cifar_builder(depth),
            default_weights=record,
            description=f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts), 64-d features",
            preprocessing=_cifar_preprocessing,
        )


# --------------------------------------------------------------------------- CIFAR-10 zoo
# Public CIFAR-10 checkpoints of other families (../shared/data/cifar_zoo/README.md): each trained
# with its own normalisation, which its record carries, so no --normalization is needed.
_CHENYAOFO = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/"
_CHENHANG = "https://github.com/chenhang98/"
_CHENYAOFO_NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
_CHENHANG_NORM = ((0.53129727, 0.5259391, 0.52069134), (0.28938246, 0.28505746, 0.27971658))


@dataclass(frozen=True)
class _ZooModel:
    builder: Callable[..., nn.Module]
    url: str
    sha256: str
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    test_acc: float  # % on all 10,000 cifar10/test images through the project's extraction (tests pin it)
    license: str
    origin: str
    description: str


_ZOO = {
    "cifar_resnet20_proj": _ZooModel(
        lambda *, num_classes=10: cifar_zoo.ProjResNet(3, num_classes=num_classes),
        _CHENYAOFO + "resnet/cifar10_resnet20-4118986f.pt",
        "4118986f0df73003d572b0e397f0ac7b3f60af1f31aff3d2da164536e36f6ec8", _CHENYAOFO_NORM, 92.60,
        "BSD-3-Clause", "chenyaofo/pytorch-cifar-models, release resnet",
        "CIFAR ResNet-20 with 1x1-conv + BN projection shortcuts, 64-d features"),
    "cifar_resnet56_proj": _ZooModel(
        lambda *, num_classes=10: cifar_zoo.ProjResNet(9, num_classes=num_classes),
        _CHENYAOFO + "resnet/cifar10_resnet56-187c023a.pt",
        "187c023aee0c9cf3093a682d9447a538cbaf5489f7ae78a7df4edf2246ce380b", _CHENYAOFO_NORM, 94.37,
        "BSD-3-Clause", "chenyaofo/pytorch-cifar-models, release resnet",
        "CIFAR ResNet-56 with 1x1-conv + BN projection shortcuts, 64-d features"),
    "cifar_shufflenetv2_x0_5": _ZooModel(
        lambda *, num_classes=10: cifar_zoo.shufflenet_v2_cifar(num_classes=num_classes),
        _CHENYAOFO + "shufflenetv2/cifar10_shufflenetv2_x0_5-1308b4e9.pt",
        "1308b4e9c4f88656a3b09775c273fc5ffe8fca9c84044123cf3d138c8dec10bd", _CHENYAOFO_NORM, 90.65,
        "BSD-3-Clause", "chenyaofo/pytorch-cifar-models, release shufflenetv2",
        "ShuffleNetV2 x0.5 with a CIFAR stem (stride-1 3x3 conv, no max-pool), 1024-d features"),
    "cifar_densenet40_k12": _ZooModel(
        lambda *, num_classes=10: cifar_zoo.DenseNetCifar(layers=12, growth=12, num_classes=num_classes),
        _CHENHANG + "densenet_cifar10_pytorch/raw/65c15a6/bak/weights.pkl",
        "5d5438139f40ee566d5be28c67c58e663ef336613179ce492f5cd81fe5afde5b", _CHENHANG_NORM, 94.47,
        "GPL-3.0", "chenhang98/densenet_cifar10_pytorch @65c15a6, bak/weights.pkl",
        "DenseNet-40, growth 12, no bottleneck or compression, 448-d features"),
    "cifar_shufflenet_g3_x0_5": _ZooModel(
        lambda *, num_classes=10: cifar_zoo.ShuffleNetV1(groups=3, width=0.5, num_classes=num_classes),
        _CHENHANG + "shuffleNet-cifar10/raw/8fa8f82/bak/weights_05g3.pkl",
        "6fa8e5dbb3813364795de489c05fbaabfc36389ebf7867553e5ae190d2be547d", _CHENHANG_NORM, 92.60,
        "GPL-3.0", "chenhang98/shuffleNet-cifar10 @8fa8f82, bak/weights_05g3.pkl",
        "ShuffleNet v1, groups 3, width x0.5, CIFAR stem, 480-d features"),
}


def _register_cifar_zoo() -> None:
    for name, z in _ZOO.items():
        mean, std = z.norm
        record = WeightsRecord(
            name="cifar10-" + z.origin.split("/")[0],
            source=z.url,
            sha256=z.sha256,
            preprocessing=Preprocessing(mean=mean, std=std, size=32),
            categories=CIFAR10_CLASSES,
            metrics={"cifar10_test_acc": z.test_acc},
            notes=f"{z.origin}; trained with mean {mean} / std {std}; accuracy measured on cifar10/test",
            license=z.license,
        )
        register_backbone(name, builder=z.builder, default_weights=record, description=z.description)


# --------------------------------------------------------------------------- torchvision
# Families that end in one linear layer (the others, e.g. SqueezeNet, end in a conv).
_TORCHVISION_FAMILIES = re.compile(
    r"^(resnet\d+|resnext\w+|wide_resnet\w+|densenet\d+|mobilenet_v[23]\w*|efficientnet_\w+"
    r"|regnet_[xy]_\w+|convnext_\w+|vgg\d+(_bn)?)$"
)


def _torchvision_builder(arch: str) -> Callable[..., nn.Module]:
    def build(*, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
        import torchvision

        if in_channels not in (None, 3):
            raise ValueError(f"{arch}: torchvision models take 3 input channels, not in_channels={in_channels}")
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        # Always random init here; pretrained tensors are loaded by get_backbone.
        return torchvision.models.get_model(arch, weights=None, **kwargs)

    return build


_TORCHVISION_REGISTERED: list[bool] = []  # registration state of the lazy torchvision entries


def _ensure_torchvision() -> None:
    """Register the torchvision classifiers on first need.

    Importing torchvision costs about a second; a model actor of a CIFAR ResNet never
    needs it, and every actor of a pool pays its start-up time before the first batch.
    """
    if not _TORCHVISION_REGISTERED:
        _TORCHVISION_REGISTERED.append(True)
        _register_torchvision()


def _register_torchvision() -> None:
    import torchvision.models as tvm

    for arch in tvm.list_models(module=tvm):
        if not _TORCHVISION_FAMILIES.match(arch):
            continue
        enum = tvm.get_model_weights(arch)
        register_backbone(
            arch,
            builder=_torchvision_builder(arch),
            default_weights=_torchvision_record(enum.DEFAULT),
            description=f"torchvision {arch}",
            preprocessing=IMAGENET_PREPROCESSING,
            torchvision_weights=enum,
        )


_register_cifar_resnets()
_register_cifar_zoo()
