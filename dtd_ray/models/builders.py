"""Networks by family, split at their final linear layer, with checkpoints fitted strictly.

Decomposing the Deep works on ``f``, the input of a CNN's final linear layer, and on that
layer's ``(W, b)``; :class:`Backbone` is a classifier split there. This module holds what
turns a registry entry (:mod:`dtd_ray.models.backbones`) into one:

* the family builders (:func:`cifar_resnet_builder`, :func:`torchvision_builder`), each
  returning the whole randomly initialised classifier;
* the split (:func:`find_final_linear`, :func:`split_final_linear`) and the named stages
  (:func:`default_blocks`) for channel maps;
* the strict fit of a checkpoint's tensors (:func:`shape_options`, :func:`load_strict`):
  whatever does not fit raises one ``ValueError`` line that says what did not fit.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from dtd_ray.data.preprocessing import Preprocessing
from dtd_ray.models.cifar_resnet import CifarResNet
from dtd_ray.models.pretrained import WeightsRecord

logger = logging.getLogger(__name__)

__all__ = [
    "TORCHVISION_FAMILIES",
    "Backbone",
    "cifar_resnet_builder",
    "default_blocks",
    "find_final_linear",
    "load_strict",
    "replace_module",
    "shape_options",
    "split_final_linear",
    "torchvision_builder",
]


# --------------------------------------------------------------------------- Backbone
class Backbone(nn.Module):
    """A classifier split at its final linear layer: ``forward(x) == head(features(x))``.

    ``features``: ``x -> f`` of shape ``(N, m)`` (the original network with its final
    ``nn.Linear`` replaced by ``nn.Identity``, so state-dict keys keep their names);
    ``head``: the original ``nn.Linear(m, C)``, untouched. ``blocks`` names the network's
    stages in forward order (paths inside ``features``); the last one is the last conv
    block before global pooling, for channel maps via forward hooks. ``checkpoint_sha256``
    is the sha256 of the file the weights were read from (``None`` for random init).
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
        checkpoint_sha256: str | None = None,
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
        self.checkpoint_sha256 = checkpoint_sha256

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


# --------------------------------------------------------------------------- family builders
def cifar_resnet_builder(depth: int) -> Callable[..., nn.Module]:
    """The builder of the CIFAR ResNet of ``depth`` (6n + 2) with option-A shortcuts."""
    n = (depth - 2) // 6

    def build(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(n, num_classes=num_classes, in_channels=in_channels)

    return build


# torchvision families that end in one linear layer (the others, e.g. SqueezeNet, end in a conv).
TORCHVISION_FAMILIES = re.compile(
    r"^(resnet\d+|resnext\w+|wide_resnet\w+|densenet\d+|mobilenet_v[23]\w*|efficientnet_\w+"
    r"|regnet_[xy]_\w+|convnext_\w+|vgg\d+(_bn)?)$"
)


def torchvision_builder(arch: str) -> Callable[..., nn.Module]:
    """The builder of torchvision's ``arch``, always randomly initialised (tensors are loaded by the registry)."""

    def build(*, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
        import torchvision

        if in_channels not in (None, 3):
            raise ValueError(f"{arch}: torchvision models take 3 input channels, not in_channels={in_channels}")
        kwargs = {"num_classes": num_classes} if num_classes is not None else {}
        return torchvision.models.get_model(arch, weights=None, **kwargs)

    return build


# --------------------------------------------------------------------------- splitting
def _first_conv_in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def find_final_linear(model: nn.Module, *, name: str, input_size: int, in_channels: int | None) -> str:
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
            # Its own generator: building a backbone must not move the global RNG that random init draws from.
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


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` inside ``model``; returns the module it replaced."""
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
    path = find_final_linear(model, name=name, input_size=input_size, in_channels=in_channels)
    if not path:
        raise ValueError(f"{name} is itself a single nn.Linear; there is no feature module to split off")
    head = replace_module(model, path, nn.Identity())
    return model, head


def default_blocks(model: nn.Module) -> dict[str, nn.Module]:
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


# --------------------------------------------------------------------------- fitting a checkpoint
def shape_options(state_dict: Mapping[str, Tensor], builder: Callable[..., nn.Module]) -> dict[str, int]:
    """``num_classes`` / ``in_channels`` as the checkpoint's tensors have them, where ``builder`` takes them.

    The final linear layer is the last 2-D ``*.weight`` in the state dict (state dicts list
    modules in registration order); the stem is the first 4-D ``*.weight``.
    """
    accepted = inspect.signature(builder).parameters
    out: dict[str, int] = {}
    mats = [v for k, v in state_dict.items() if k.endswith("weight") and v.ndim == 2]
    convs = [v for k, v in state_dict.items() if k.endswith("weight") and v.ndim == 4]
    if mats and "num_classes" in accepted:
        out["num_classes"] = int(mats[-1].shape[0])
    if convs and "in_channels" in accepted and int(convs[0].shape[1]) != 3:
        out["in_channels"] = int(convs[0].shape[1])
    return out


def _is_step_counter(key: str) -> bool:
    # BatchNorm's step counter: checkpoints saved before torch 0.4.1 lack it, and
    # BatchNorm's own loader fills it in (it does not affect eval outputs).
    return key.endswith(".num_batches_tracked")


def _blocks_in(sd: Mapping[str, Tensor], stage: str) -> int:
    pat = re.compile(rf"^{re.escape(stage)}\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def _mismatch_hints(
    sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], arch: str, known: Callable[[str], bool]
) -> list[str]:
    hints = []
    n_ckpt, n_model = _blocks_in(sd, "layer1"), _blocks_in(model_sd, "layer1")
    if n_ckpt and n_ckpt != n_model:
        if arch.startswith("cifar_resnet"):
            depth = 6 * n_ckpt + 2
            hints.append(
                f"the checkpoint has {n_ckpt} blocks in layer1, so it looks like a depth-{depth} CIFAR ResNet"
                + (f" (cifar_resnet{depth})" if known(f"cifar_resnet{depth}") else "")
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


def describe_mismatch(
    sd: Mapping[str, Tensor], model_sd: Mapping[str, Tensor], *, label: str, arch: str,
    known: Callable[[str], bool] = lambda name: False,
) -> str | None:
    """One line that says what in ``sd`` does not fit ``model_sd``; ``None`` if it fits.

    ``known(name)``: whether a backbone name is registered (to name the architecture a
    checkpoint of another depth looks like).
    """
    missing = [k for k in model_sd if k not in sd and not _is_step_counter(k)]
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
    hints = _mismatch_hints(sd, model_sd, arch, known)
    return f"{label} does not fit {arch}: " + ", ".join(parts) + (f"; {'; '.join(hints)}" if hints else "")


def load_strict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, head_path: str, label: str, arch: str,
    known: Callable[[str], bool] = lambda name: False,
) -> None:
    """Load ``state_dict`` into ``model`` with ``strict=True``; what does not fit raises one ``ValueError`` line.

    A state dict saved from a :class:`Backbone` (keys ``features.*`` / ``head.*``) is first
    translated to the original model's names (``head_path``: the final linear's path).
    The one relaxation: BatchNorm step counters a pre-0.4.1 checkpoint lacks, logged.
    """
    if all(k.startswith(("features.", "head.")) for k in state_dict):
        state_dict = {(f"{head_path}.{k[5:]}" if k.startswith("head.") else k[9:]): v for k, v in state_dict.items()}
    model_sd = model.state_dict()
    problem = describe_mismatch(state_dict, model_sd, label=label, arch=arch, known=known)
    if problem:
        raise ValueError(problem)
    counters = [k for k in model_sd if _is_step_counter(k) and k not in state_dict]
    if counters:
        logger.info("%s: lacks %d BatchNorm step counter(s) (num_batches_tracked, as saved before torch 0.4.1); "
                    "BatchNorm fills them in", label, len(counters))
    model.load_state_dict(state_dict, strict=True)
