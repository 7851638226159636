"""The k-grid grammar: one parser for every k option (sweep ``k``, decompose ``k1``, ``print_k``, ``export_json``).

Accepted forms: an int (``5``), a list of ints or parts (``[5, 10]``), or text made of
comma-separated parts, each ``a``, ``a..b`` (inclusive) or ``a..b:step``
(``"1..10,20"``, ``"5..100:5"``, ``"5,10"``). ``None`` means every k in ``1..kmax``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

_PART = re.compile(r"(\d+)(?:\.\.(\d+)(?::(\d+))?)?")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def parse_k_grid(spec: Any, *, kmax: int | None = None, name: str = "k") -> list[int]:
    """The sorted unique k values of ``spec``, each ≥ 1 and, where ``kmax`` is given, ≤ ``kmax``.

    ``grid = sorted(⋃_parts range(a, b + 1, step))``. Raises a one-line ``ValueError``
    naming the option (``name``) and the offending part.
    """
    if spec is None:
        if kmax is None:
            raise ValueError(f"the {name} grid is empty")
        return list(range(1, int(kmax) + 1))
    if _is_int(spec):
        parts: list[Any] = [int(spec)]
    elif isinstance(spec, str):
        parts = [p for p in spec.replace(" ", "").split(",") if p]
    elif isinstance(spec, (list, tuple, np.ndarray)):
        parts = list(spec)
    else:
        raise ValueError(f"{name} grid {spec!r} is not an int, a list or 'a..b,c' text")
    values: set[int] = set()
    for p in parts:
        if _is_int(p):
            values.add(int(p))
            continue
        s = str(p)
        m = _PART.fullmatch(s)
        if not m:
            raise ValueError(f"{name} grid part {s!r} is not 'a', 'a..b' or 'a..b:step'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3) or 1)
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
