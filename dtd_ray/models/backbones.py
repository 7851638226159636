"""Backbones by name: the registry, and :func:`get_backbone` that builds one with its weights.

Decomposing the Deep works on ``f``, the input of a CNN's final linear layer, and on
that layer's ``(W, b)``; every registered backbone is built as a :class:`Backbone` split
there (:mod:`dtd_ray.models.builders`). Two families are registered:

* ``cifar_resnet8/14/20/32/44/56/110/1202``: the CIFAR ResNets of He et al. (2016) with
  option-A (parameter-free) shortcuts, key-compatible with the public
  ``pytorch_resnet_cifar10`` checkpoints (``module.`` prefix stripped); and the CIFAR-10 zoo
  of other families (:data:`dtd_ray.models.pretrained.ZOO`), at import;
* torchvision classifiers that end in one linear layer (ResNet, ResNeXt, Wide-ResNet,
  DenseNet, MobileNet V2/V3, EfficientNet v1/v2, RegNet, ConvNeXt, VGG), on first need.

Weights are data (:class:`WeightsRecord`, :mod:`dtd_ray.models.pretrained`): a local file,
an http(s) URL checked against its sha256, or a member of torchvision's weights enum. Every
checkpoint is read with ``torch.load(..., weights_only=True)`` and loaded with
``strict=True``; whatever does not fit raises one ``ValueError`` line that says what did not fit.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

# The input record lives in the data layer (torch-free): the decode tasks that receive it never import torch.
from dtd_ray.data.preprocessing import NORMALIZATIONS, Preprocessing
from dtd_ray.models.builders import (
    TORCHVISION_FAMILIES,
    Backbone,
    cifar_resnet_builder,
    default_blocks,
    find_final_linear,
    load_strict,
    replace_module,
    shape_options,
    split_final_linear,
    torchvision_builder,
)
from dtd_ray.models import factories
from dtd_ray.models.checkpoints import load_checkpoint, load_state_dict_file
from dtd_ray.models.pretrained import (
    IMAGENET_PREPROCESSING,
    ZOO,
    WeightsRecord,
    akamaster_record,
    cifar_preprocessing,
    torchvision_record,
    zoo_record,
)

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
    if TORCHVISION_FAMILIES.match(name):
        _ensure_torchvision()  # a name torchvision could own: register those first, so a clash raises
    _add(_Entry(name, builder, default_weights, description, preprocessing, torchvision_weights))


def _add(entry: _Entry) -> None:
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    _ensure_torchvision()
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if factories.is_factory(name):  # a user's own network: built from its callable, never registered
        return _Entry(name, factories.factory_builder(name), None, "model factory",
                      factories.factory_preprocessing(name))
    _ensure_torchvision()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown backbone {name!r}; {hint}valid: {', '.join(list_backbones())}")


# --------------------------------------------------------------------------- weights of an entry
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


def _known_records(entry: _Entry) -> list[WeightsRecord]:
    records = [entry.default_weights] if entry.default_weights is not None else []
    if entry.torchvision_weights is not None:
        records += [torchvision_record(m) for m in entry.torchvision_weights]
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


def _resolve_weights(entry: _Entry, weights: str | None) -> tuple[WeightsRecord | None, str | None]:
    """``(record, source)`` that ``weights`` names: a known record and/or the file or URL to read."""
    if weights is None:
        return None, None
    if weights == "default":
        if entry.default_weights is None:
            raise ValueError(
                f"{entry.name} has no default weights; pass weights=<local file or URL> or weights=None for random init"
            )
        record = entry.default_weights
    elif weights.startswith("torchvision:") or re.fullmatch(r"\w+_Weights\.\w+", weights):
        record = torchvision_record(_torchvision_member(entry, weights))
    elif entry.default_weights is not None and weights == entry.default_weights.name:
        record = entry.default_weights
    else:
        # A URL that is a known record's source gets that record (and its hash check).
        return next((r for r in _known_records(entry) if r.source == weights), None), weights
    if record.source.startswith("torchvision:"):
        # Load torchvision's file ourselves: torchvision's own loader reads it with
        # weights_only=False, and we want one strict, weights-only path for all.
        return record, _torchvision_member(entry, record.source).url
    return record, record.source


def _check_record_options(entry: _Entry, record: WeightsRecord, options: Mapping[str, int]) -> None:
    """Pretrained weights fix the architecture: refuse options that contradict them."""
    num_classes, in_channels = options.get("num_classes"), options.get("in_channels")
    if num_classes is not None and record.categories and num_classes != len(record.categories):
        raise ValueError(
            f"{entry.name} weights {record.name!r} have {len(record.categories)} classes, not num_classes={num_classes}; "
            "num_classes combines with weights=None or a local file"
        )
    if in_channels is not None and in_channels != record.preprocessing.channels:
        raise ValueError(
            f"{entry.name} weights {record.name!r} take {record.preprocessing.channels} input channel(s), "
            f"not in_channels={in_channels}"
        )


def _record_of_file(entry: _Entry, digest: str, path: str) -> WeightsRecord | None:
    """The known record whose (full or prefix) sha256 the file at ``path`` has, if any."""
    for r in _known_records(entry):
        prefix = _hash_prefix(r, entry)
        if prefix and digest.startswith(prefix.lower()):
            logger.info("%s: %s is the registered weights %r", entry.name, path, r.name)
            return r
    return None


# --------------------------------------------------------------------------- get_backbone
def _build(entry: _Entry, options: Mapping[str, int]) -> nn.Module:
    try:
        return entry.builder(**options)
    except TypeError as e:
        raise ValueError(f"{entry.name} does not take option(s) {', '.join(options)}: {e}") from None


def _preprocessing(
    entry: _Entry, record: WeightsRecord | None, options: Mapping[str, int], normalization: str | None,
    input_size: int | None = None, resize: int | None = None,
) -> Preprocessing:
    """The record's preprocessing (else the entry's default), with ``normalization``'s mean/std and,
    where ``input_size`` is given, that input size and ``resize`` (``None``: images come at that size)."""
    if record is not None:
        p = record.preprocessing
    elif callable(entry.preprocessing):
        p = entry.preprocessing(**options)
    elif entry.preprocessing is not None:
        p = entry.preprocessing
    else:
        p = entry.default_weights.preprocessing if entry.default_weights is not None else IMAGENET_PREPROCESSING
    if input_size is not None:
        p = replace(p, size=int(input_size), resize=None if resize is None else int(resize))
    elif resize is not None:
        p = replace(p, resize=int(resize))
    return p.with_normalization(normalization) if normalization is not None else p


def get_backbone(
    name: str,
    *,
    weights: str | None = "default",
    normalization: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: int | None = None,
    resize: int | None = None,
) -> Backbone:
    """Build backbone ``name`` with ``weights``, split at its final linear layer, in eval mode.

    ``weights``: ``"default"`` (the registered record; ``ValueError`` if there is
    none), ``None`` (random init), a local file, an http(s) URL, or a torchvision enum
    member as ``"torchvision:IMAGENET1K_V2"`` / ``"ResNet50_Weights.IMAGENET1K_V2"``.
    A local file or URL whose sha256 matches a known record of this architecture gets
    that record (its preprocessing, categories, metrics) as ``backbone.weights``.
    ``normalization`` (a key of :data:`NORMALIZATIONS`) overrides the preprocessing's
    mean/std. ``num_classes``/``in_channels`` change the architecture, so they combine
    only with ``weights=None`` or a file whose tensors have those shapes. ``input_size`` (with
    ``resize``, the shorter side before the center crop; ``None``: images come at that size)
    overrides the input size. ``name`` may also be a model factory, ``module.path:callable`` or
    ``file.py:callable`` (:mod:`dtd_ray.models.factories`).
    """
    entry = _entry(name)
    options = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v is not None}
    record, source = _resolve_weights(entry, weights)
    if record is not None:
        _check_record_options(entry, record, options)
    state_dict = digest = None
    if source is not None:
        state_dict, path, digest = load_checkpoint(source, _hash_prefix(record, entry) if record else None)
        # A checkpoint fixes the head and stem shapes: take what was not given from it.
        options = {**shape_options(state_dict, entry.builder), **options}
        record = record or _record_of_file(entry, digest, path)
    model = _build(entry, options)
    preprocessing = _preprocessing(entry, record, options, normalization, input_size, resize)
    # Split before loading: a checkpoint saved from a Backbone names its keys
    # features.* / head.*, and translating them needs the final linear's path.
    size = min(preprocessing.size, 64)  # small: the forward only checks structure
    head_path = find_final_linear(model, name=name, input_size=size, in_channels=in_channels)
    if state_dict is not None:
        load_strict(model, state_dict, head_path=head_path, label=f"checkpoint {source!r}", arch=name,
                    known=_REGISTRY.__contains__)
    head = replace_module(model, head_path, nn.Identity())
    if in_channels is not None and preprocessing.channels != in_channels:
        raise ValueError(f"{name}: preprocessing has {preprocessing.channels} channel(s), the model takes {in_channels}")
    backbone = Backbone(name=name, features=model, head=head, preprocessing=preprocessing,
                        blocks=default_blocks(model), weights=record, checkpoint_sha256=digest)
    return backbone.eval()


# --------------------------------------------------------------------------- registration
def _register_cifar() -> None:
    for depth in (8, 14, 20, 32, 44, 56, 110, 1202):
        register_backbone(
            f"cifar_resnet{depth}",
            builder=cifar_resnet_builder(depth),
            default_weights=akamaster_record(depth),
            description=f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts), 64-d features",
            preprocessing=cifar_preprocessing,
        )
    for name, z in ZOO.items():
        register_backbone(name, builder=z.builder, default_weights=zoo_record(z), description=z.description)


@functools.cache
def _ensure_torchvision() -> None:
    """Register the torchvision classifiers on first need (once: the cache remembers the call).

    Importing torchvision costs about a second; a model actor of a CIFAR ResNet never
    needs it, and every actor of a pool pays its start-up time before the first batch.
    """
    import torchvision.models as tvm

    for arch in tvm.list_models(module=tvm):
        if not TORCHVISION_FAMILIES.match(arch):
            continue
        enum = tvm.get_model_weights(arch)
        # _add, not register_backbone: that would call back into this function before its cache is set.
        _add(_Entry(arch, torchvision_builder(arch), torchvision_record(enum.DEFAULT), f"torchvision {arch}",
                    IMAGENET_PREPROCESSING, enum))


_register_cifar()
