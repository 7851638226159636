"""The k-grid grammar: one parser for every k option (sweep ``k``, decompose ``k1``, ``print_k``, ``export_json``).

Accepted forms: an int (``5``), a list of ints or parts (``[5, 10]``), or text made of
comma-separated parts, each ``a``, ``a..b`` (inclusive), ``a..b:step`` or ``p%``
(``"1..10,20"``, ``"5..100:5"``, ``"5,10"``, ``"1..10,5%"``). ``None`` means every k in ``1..kmax``.

A part ``p%`` is a share of the feature width m: ``k = max(1, ⌊p·m/100 + ½⌋)`` (rounded half up),
so one grid names comparable k values for networks of different widths; it resolves only where
m is known (:func:`parse_k_grid` with ``m``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_PART = re.compile(r"(\d+)(?:\.\.(\d+)(?::(\d+))?)?")
_SHARE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def k_of_share(share: float, *, m: int) -> int:
    """``max(1, ⌊share·m/100 + ½⌋)``: the k that is ``share`` percent of ``m`` features."""
    return max(1, int(np.floor(float(share) * int(m) / 100.0 + 0.5)))


def _parts(spec: Any, name: str) -> list[Any]:
    if _is_int(spec):
        return [int(spec)]
    if isinstance(spec, str):
        return [p for p in spec.replace(" ", "").split(",") if p]
    if isinstance(spec, (list, tuple, np.ndarray)):
        return list(spec)
    raise ValueError(f"{name} grid {spec!r} is not an int, a list or 'a..b,c' text")


def k_shares(spec: Any, *, name: str = "k") -> list[float]:
    """The ``p%`` parts of ``spec`` as numbers (``[]`` for a grid of counts); every part is checked."""
    if spec is None:
        return []
    shares = []
    for p in _parts(spec, name):
        if _is_int(p):
            continue
        s = str(p)
        if (m := _SHARE.fullmatch(s)) is not None:
            v = float(m.group(1))
            if not 0 < v <= 100:
                raise ValueError(f"{name} grid part {s!r}: a share of m must be in (0, 100] %")
            shares.append(v)
        elif not _PART.fullmatch(s):
            raise ValueError(f"{name} grid part {s!r} is not 'a', 'a..b', 'a..b:step' or 'p%'")
    return shares


def parse_k_grid(spec: Any, *, kmax: int | None = None, name: str = "k", m: int | None = None) -> list[int]:
    """The sorted unique k values of ``spec``, each ≥ 1 and, where ``kmax`` is given, ≤ ``kmax``.

    ``grid = sorted(⋃_parts range(a, b + 1, step) ∪ {k_of_share(p, m) : p% parts})``. A ``p%``
    part needs the feature width ``m``. Raises a one-line ``ValueError`` naming the option
    (``name``) and the offending part.
    """
    if spec is None:
        if kmax is None:
            raise ValueError(f"the {name} grid is empty")
        return list(range(1, int(kmax) + 1))
    values: set[int] = set()
    shares = k_shares(spec, name=name)
    if shares:
        if m is None:
            raise ValueError(f"{name} grid {spec!r} has a share of the feature width m ({shares[0]:g}%), "
                             "which resolves only where m is known")
        values.update(k_of_share(p, m=m) for p in shares)
    for p in _parts(spec, name):
        if _is_int(p):
            values.add(int(p))
            continue
        s = str(p)
        if _SHARE.fullmatch(s):
            continue
        mt = _PART.fullmatch(s)
        lo = int(mt.group(1))
        hi = int(mt.group(2)) if mt.group(2) else lo
        step = int(mt.group(3) or 1)
        if hi < lo or step < 1:
            raise ValueError(f"{name} grid {s!r}: need lo ≤ hi and step ≥ 1")
        values.update(range(lo, hi + 1, step))
    if not values:
        raise ValueError(f"the {name} grid is empty")
    grid = sorted(values)
    if grid[0] < 1:
        raise ValueError(f"{name}={grid[0]} is not ≥ 1")
    if kmax is not None and grid[-1] > kmax:
        raise ValueError(f"{name}={grid[-1]} exceeds the records' kmax={kmax} (the top-k lists are that long)")
    return grid
