"""The one config layer: every job's options are a pydantic dataclass, validated where it is built.

:func:`config_class` makes a config class: a ``pydantic.dataclasses.dataclass`` that refuses
unknown fields, with each field's description as data (``Annotated[T, Field(description=…)]``),
the words a command line or YAML carries read once (:func:`_from_words`: ``none`` for an optional
field, ``auto`` for an optional switch, ``a,b`` for a list) and a failed validation raised as a
one-line ``ValueError``. :func:`to_dict` / :func:`config_hash` / :func:`versions` record what
ran beside every output; the command line on top of it is :mod:`dtd_ray.cli`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import typing
from importlib import metadata
from typing import Any

import pydantic
import pydantic.dataclasses

from dtd_ray import __version__

# Unknown fields are refused (a misspelt option must not be ignored); a number given where a
# name is expected (``--tag 20``) is the name "20".
_PYDANTIC_CONFIG = pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True, arbitrary_types_allowed=True)

_NONE_WORDS = ("none", "null")


def _allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _is_names(annotation: Any) -> bool:
    """Whether a field holds a list of names (``tuple[str, ...]``, optionally ``| None``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if _allows_none(annotation) else [annotation]
    return any(typing.get_origin(a) is tuple and typing.get_args(a) == (str, ...) for a in args)


def _from_words(annotation: Any, value: Any) -> Any:
    """A raw command-line or YAML ``value`` read for a field of type ``annotation``: a list of names
    may be one comma-separated word (``--strategies frequency,random``) or a list; otherwise ``none``
    / ``null`` are ``None`` where the field allows it, and ``auto`` (or an empty word) is ``None`` for
    an optional switch (``use_gpu``: decide from the cluster). Everything else is left to pydantic's
    validation."""
    if _is_names(annotation):  # a name is never a none-word here: `--modes none` is the mode "none"
        return names(value) if isinstance(value, (str, list, tuple)) else value
    if isinstance(value, str) and _allows_none(annotation):
        word = value.strip().lower()
        if word in _NONE_WORDS or (word in ("auto", "") and bool in typing.get_args(annotation)):
            return None
    return value


def names(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A list of names as a tuple: a comma-separated word (``frequency,random``) or a list of words,
    each of which may itself hold commas (``["a,b", "c"]``, as a shell splits ``--x a,b c``)."""
    words = [value] if isinstance(value, str) else list(value)
    return tuple(s.strip() for w in words for s in str(w).split(",") if s.strip())


_KIND = {"int": "int", "float": "float", "bool": "bool (true/false)"}


def _one_line(error: pydantic.ValidationError, cls: type) -> str:
    """A pydantic ``ValidationError`` as one line: the unknown options with the valid ones, or the
    first bad option with the type it expects."""
    errors = error.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "unexpected_keyword_argument")
    if unknown:
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        return f"unknown {cls.__name__} option(s) {', '.join(unknown)}; valid: {valid}"
    first = errors[0]
    if first["type"] == "value_error" and "error" in first.get("ctx", {}):
        return str(first["ctx"]["error"])  # raised by the class's own checks (__post_init__): its own words
    name = ".".join(str(p) for p in first["loc"]) or cls.__name__
    kind = next((v for k, v in _KIND.items() if first["type"].startswith(k)), None)
    what = f"expected {kind}" if kind else first["msg"]
    return f"option {name}={first.get('input')!r}: {what}"


def config_class(cls: type) -> type:
    """``cls`` as a validated config class (see the module docstring); use as a decorator.

    Its ``__post_init__`` runs after validation, on typed values: it holds only the checks
    between fields or against a list of names."""
    pcls = pydantic.dataclasses.dataclass(cls, config=_PYDANTIC_CONFIG)
    hints = {name: f.annotation for name, f in pcls.__pydantic_fields__.items()}
    init = pcls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs = {k: _from_words(hints[k], v) if k in hints else v for k, v in kwargs.items()}
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as e:
            raise ValueError(_one_line(e, pcls)) from None

    pcls.__init__ = __init__
    return pcls


def field_help(cls: type) -> list[str]:
    """One ``--name (default …): description`` line per field of config class ``cls``."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(f"  --{f.name} (default {default!r}): {describe(cls, f.name)}")
    return out


def describe(cls: type, name: str) -> str:
    """The description of field ``name`` of config class ``cls`` ('' where it has none)."""
    info = getattr(cls, "__pydantic_fields__", {}).get(name)
    return (info.description or "") if info is not None else ""


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(obj: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of ``obj``."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def check_keys(cls: type, values: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming any key of ``values`` that is not a field of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on (read from their metadata:
    nothing is imported, so a Ray-free stage records Ray's version without loading it)."""
    out = {"python": platform.python_version()}
    for dist in ("numpy", "pyarrow", "torch", "torchvision", "ray"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # the core runs without Ray (e.g. on a bare GPU box)
            pass
    out["dtd_ray"] = __version__
    return out
