"""Small helpers shared by every stage's config dataclass: resolve, hash, record versions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from typing import Any


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
