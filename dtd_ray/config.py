"""Small helpers shared by every stage's config dataclass: resolve, hash, record versions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
from typing import Any

import numpy as np


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
    """Versions of the packages whose behaviour a result depends on."""
    import numpy
    import pyarrow

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}
    for mod in ("torch", "torchvision", "ray"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:  # the core runs without Ray (e.g. on a bare GPU box)
            pass
    from dtd_ray import __version__

    out["dtd_ray"] = __version__
    return out


def field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field of dataclass ``cls`` in its source (``name: T = v  # comment``)."""
    import inspect
    import re

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


def coerce_option_types(cfg: Any) -> None:
    """Turn command-line strings into the types a config dataclass's fields declare, or refuse in one line.

    fire passes ``--overwrite false`` as the string ``"false"`` (truthy: the finished partition
    would be deleted) and ``--kmax abc`` as ``"abc"`` (a TypeError deep inside). Fields annotated
    ``bool``, ``int`` or ``float`` (optionally ``| None``) are converted; others are left alone.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds = {t.strip() for t in str(f.type).split("|")}
        base = kinds - {"None"}
        if len(base) != 1 or not (base <= {"bool", "int", "float"}):
            continue
        (kind,) = base
        if value is None and "None" in kinds:
            continue
        if kind == "bool":
            parsed = parse_bool(value)
            ok = parsed is not None
            value = parsed if ok else value
        elif kind == "int":
            if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
                value, ok = int(value), True
            elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
                value, ok = int(value), True
            else:
                ok = isinstance(value, (float, np.floating)) and float(value).is_integer()
                value = int(value) if ok else value
        else:
            try:
                value, ok = float(value), not isinstance(value, bool)
            except (TypeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(f"option {f.name}={getattr(cfg, f.name)!r}: expected {kind}"
                             + (" (true/false)" if kind == "bool" else ""))
        setattr(cfg, f.name, value)


def run_cli(cls: type, run: Any, *, summary: str, argv: list[str] | None = None) -> Any:
    """Parse ``--flag value`` options into dataclass ``cls`` with fire and call ``run`` on it.

    ``--help`` lists every field with its default and the comment beside it. Unknown flags
    and stray positional words are refused before anything runs (fire alone would run the
    function first and complain about leftovers after).
    """
    import sys

    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "-help") for a in argv):
        comments = field_comments(cls)
        print(f"{summary}\n\nOptions (all --name value):")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            print(f"  --{f.name} (default {default!r}): {comments.get(f.name, '')}")
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}: options are --name value (see --help)")
        name = tok[2:].split("=", 1)[0].replace("-", "_")
        if name.startswith("no") and name[2:].lstrip("_") in names:
            name = name[2:].lstrip("_")
        check_keys(cls, {name: None})
        has_value = "=" in tok or (i + 1 < len(argv) and not argv[i + 1].startswith("--"))
        i += 2 if has_value and "=" not in tok else 1

    def main(**flags: Any) -> Any:
        return run(cls(**flags))

    return fire.Fire(main, command=argv)
