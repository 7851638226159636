"""The one config and command-line layer: every job's options are parsed and typed here.

Configs are dataclasses with commented defaults; :func:`run_cli` turns ``--name value`` flags
into one (typed by :func:`coerce_values`, unknown names refused) and :func:`to_dict` /
:func:`config_hash` / :func:`versions` record what ran beside every output."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import platform
import re
import sys
from importlib import metadata
from typing import Any

import numpy as np

from dtd_ray import __version__


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


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field of dataclass ``cls`` in its source (``name: T = v  # comment``)."""
    comments: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def parse_bool(value: Any) -> bool | None:
    """``True``/``False`` from a bool, a 0/1 integer, or a word a command line or YAML carries
    (true/yes/on/1, false/no/off/0, any case); ``None`` when ``value`` is none of these."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return None


_NONE_WORDS = ("none", "null")


def coerce_value(name: str, annotation: Any, value: Any) -> Any:
    """``value`` converted to the type a config field declares (``bool``, ``int``, ``float``,
    optionally ``| None``), or a one-line ``ValueError``; fields of other types pass unchanged.

    fire passes ``--overwrite false`` as the string ``"false"`` (truthy: a finished partition
    would be deleted) and ``--kmax abc`` as ``"abc"`` (a TypeError deep inside). ``none`` /
    ``null`` mean ``None`` where the field allows it (and ``auto`` or an empty word for an optional bool).
    """
    kinds = {t.strip() for t in str(annotation).split("|")}
    base = kinds - {"None"}
    if len(base) != 1 or not (base <= {"bool", "int", "float"}):
        return value
    (kind,) = base
    if "None" in kinds and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if kinds == {"bool", "None"} and isinstance(value, str) and value.strip().lower() in ("auto", ""):
        return None  # an optional switch (use_gpu): None means "decide from the cluster"
    if kind == "bool":
        parsed = parse_bool(value)
        ok = parsed is not None
        out = parsed
    elif kind == "int":
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            out, ok = int(value), True
        elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            out, ok = int(value), True
        else:
            ok = isinstance(value, (float, np.floating)) and float(value).is_integer()
            out = int(value) if ok else value
    else:
        try:
            out, ok = float(value), not isinstance(value, bool)
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise ValueError(f"option {name}={value!r}: expected {kind}" + (" (true/false)" if kind == "bool" else ""))
    return out


def coerce_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (option name → raw value) with every typed field of dataclass ``cls`` converted."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return {k: coerce_value(k, types[k], v) if k in types else v for k, v in values.items()}


def coerce_option_types(cfg: Any) -> None:
    """Convert the typed fields of a config instance in place (see :func:`coerce_value`).

    :func:`run_cli` converts every option before a config is built, whatever its class;
    a config's ``__post_init__`` calls this too, so that one built in code is checked alike.
    """
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, coerce_value(f.name, f.type, getattr(cfg, f.name)))


def option_names(cls: type, argv: list[str]) -> list[str]:
    """The names of the options of dataclass ``cls`` present in ``argv``, in order, as :func:`run_cli`
    reads them (``--name value``, ``--name=value``, ``--flag``, ``--noflag``; dashes as underscores).

    A stray positional word or a name that is not a field raises a one-line ``ValueError``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}: options are --name value (see --help)")
        name = tok[2:].split("=", 1)[0].replace("-", "_")
        if name.startswith("no") and name[2:].lstrip("_") in names:
            name = name[2:].lstrip("_")
        check_keys(cls, {name: None})
        out.append(name)
        has_value = "=" in tok or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        i += 2 if has_value and "=" not in tok else 1
    return out


def run_cli(cls: type, run: Any, *, summary: str, argv: list[str] | None = None) -> Any:
    """Parse ``--flag value`` options into dataclass ``cls`` with fire and call ``run`` on it.

    ``--help`` lists every field with its default and the comment beside it. Unknown flags
    and stray positional words are refused before anything runs (fire alone would run the
    function first and complain about leftovers after).
    """
    import fire  # the CLI: imported where a command line is parsed, not by every library import

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "-help") for a in argv):
        comments = field_comments(cls)
        print(f"{summary}\n\nOptions (all --name value):")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"  --{f.name} (default {default!r}): {comments.get(f.name, '')}")
        return None
    option_names(cls, argv)  # refuse stray words and unknown names before anything runs

    def main(**flags: Any) -> Any:
        # Typed here, for every config class alike: no class can forget to (``--ray false`` is False).
        return run(cls(**coerce_values(cls, flags)))

    return fire.Fire(main, command=argv)
