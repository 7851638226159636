"""A user's own network as a backbone: ``--model module.path:callable`` or ``--model path/to/file.py:callable``.

The callable (a function or a class) returns the whole classifier as an ``nn.Module`` ending
in its final ``nn.Linear``; it is called with ``num_classes`` where the caller gives one (and
``in_channels`` likewise). The rest is as for a registered backbone
(:func:`dtd_ray.models.backbones.get_backbone`): the final linear is found and split off,
``--weights`` is loaded strictly with ``weights_only``, and the preprocessing comes from
``--normalization`` / ``--input_size`` / ``--resize``, else from the callable's optional
``preprocessing`` attribute (a :class:`~dtd_ray.data.preprocessing.Preprocessing` or a dict of
its fields), else ImageNet's 256 → 224.

``timm:<name>`` (with timm installed: ``pip install dtd-ray[timm]``) builds that timm model with
random init (``pretrained=False``: weights come from ``--weights``, never from the network), its
preprocessing from timm's ``pretrained_cfg`` (input size, crop, mean/std, interpolation).

A dotted module is imported as Python imports it (on a cluster, ``ray job submit
--working-dir .`` ships it with the job, and the job's processes start in that folder); a
``.py`` path is read from that file, relative to the working folder. Every failure is one line.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import runpy
from collections.abc import Callable
from typing import Any

from torch import nn

from dtd_ray.data.preprocessing import Preprocessing

_SPEC = re.compile(r"^(?P<where>[^:]+\.py|[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_]\w*)$")


_TIMM = re.compile(r"^timm:(?P<name>[\w.\-]+)$")


def is_factory(spec: str) -> bool:
    """Whether ``spec`` names a factory (``module:callable``, ``file.py:callable`` or ``timm:<name>``)."""
    return bool(_SPEC.match(spec or "") or _TIMM.match(spec or "")) and not spec.startswith("torchvision:")


def default_tag(spec: str) -> str:
    """The partition name of a factory without a ``tag``: ``<module or file stem>_<callable>``."""
    if _TIMM.match(spec):
        return f"timm_{_TIMM.match(spec)['name'].replace('.', '_').replace('-', '_')}"
    m = _SPEC.match(spec)
    if m is None:
        raise ValueError(f"{spec!r} is not a model factory (module.path:callable or file.py:callable)")
    stem = os.path.basename(m["where"])[: -len(".py")] if m["where"].endswith(".py") else m["where"].rsplit(".", 1)[-1]
    return f"{stem}_{m['attr']}"


@functools.cache
def load_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names, imported once per process (a backbone is built several times in a
    run: its checks, the decode tasks' preprocessing, each model actor); a one-line ``ValueError``
    where it cannot be (not cached: a fixed file is read again)."""
    if _TIMM.match(spec):
        return _timm_factory(_TIMM.match(spec)["name"])
    m = _SPEC.match(spec)
    if m is None:
        raise ValueError(f"model {spec!r}: a factory is module.path:callable or path/to/file.py:callable")
    where, attr = m["where"], m["attr"]
    if where.endswith(".py"):
        path = _find_file(where)
        if path is None:
            raise ValueError(f"model factory {spec!r}: no such file {where} (relative to {os.getcwd()})")
        try:
            namespace = runpy.run_path(path)
        except Exception as e:  # the user's file: whatever it raises is its own error, in one line
            raise ValueError(f"model factory {spec!r}: {where} failed to run: {type(e).__name__}: {e}") from None
    else:
        try:
            namespace = vars(importlib.import_module(where))
        except ImportError as e:
            raise ValueError(f"model factory {spec!r}: module {where} is not importable ({type(e).__name__}: {e}); "
                             "on a cluster, ship it with `ray job submit --working-dir .`") from None
    fn = namespace.get(attr)
    if not callable(fn):
        found = "nothing" if fn is None else f"a {type(fn).__name__}"
        raise ValueError(f"model factory {spec!r}: {where} has {found} named {attr}, not a callable")
    return fn


def _find_file(where: str) -> str | None:
    """``where`` relative to the working folder, or to the one a Ray Tune trial started from (Tune runs
    each trial in its own folder and names the original in ``TUNE_ORIG_WORKING_DIR``)."""
    bases = [""] if os.path.isabs(where) else ["", os.environ.get("TUNE_ORIG_WORKING_DIR", "")]
    return next((os.path.join(b, where) for b in bases if os.path.isfile(os.path.join(b, where))), None)


def factory_builder(spec: str) -> Callable[..., nn.Module]:
    """``builder(**options)`` for the registry: the factory's module, checked to be an ``nn.Module``."""
    fn = load_factory(spec)

    def build(**options: Any) -> nn.Module:
        model = fn(**options)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    build.__signature__ = _signature_of(fn)  # the checkpoint's shape options are matched against it
    return build


def _signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or an extension type: options pass through unchecked
        return inspect.Signature()


def factory_preprocessing(spec: str) -> Preprocessing | None:
    """The factory's own ``preprocessing`` attribute as a record, where it has one."""
    p = getattr(load_factory(spec), "preprocessing", None)
    if p is None or isinstance(p, Preprocessing):
        return p
    if isinstance(p, dict):
        try:
            return Preprocessing(**{k: tuple(v) if k in ("mean", "std") else v for k, v in p.items()})
        except TypeError as e:
            raise ValueError(f"model factory {spec!r}: its preprocessing attribute: {e}") from None
    raise ValueError(f"model factory {spec!r}: its preprocessing attribute is a {type(p).__name__}, "
                     "not a Preprocessing or a dict of its fields")


def _timm_factory(name: str) -> Callable[..., Any]:
    """``timm.create_model(name, pretrained=False, **options)``, with its preprocessing as an attribute."""
    try:
        import timm
    except ImportError:
        raise ValueError(f"model timm:{name} needs timm: pip install 'dtd-ray[timm]'") from None
    if name not in timm.list_models():
        raise ValueError(f"model timm:{name}: timm has no model {name!r}")

    def build(num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
        options = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_channels)) if v is not None}
        return timm.create_model(name, pretrained=False, **options)

    cfg = dict(timm.create_model(name, pretrained=False).pretrained_cfg)
    channels, _, size = (int(v) for v in cfg.get("input_size", (3, 224, 224)))
    crop = float(cfg.get("crop_pct") or 1.0)
    interpolation = cfg.get("interpolation")  # timm also names ones the decode step does not have
    build.preprocessing = Preprocessing(  # type: ignore[attr-defined]
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        size=size, resize=int(size / crop) if crop < 1.0 else None, channels=channels,
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear")
    return build
