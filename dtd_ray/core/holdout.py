"""The validation split: a fixed, seeded share of a training split, decided per instance by its id.

Hyper-parameters (the head's lr, its best epoch, k1 for a given k2) are chosen on a split
carved out of train, never on test. Membership is a function of ``(sample_id, seed)``
alone, so the records of a split, a seeded subset of them (``train_rows``), an augmented
pass over them (same ids) and the image source of a fine-tuning trial all agree on which
instance is held out, without passing a list of ids around:

    u(id) = splitmix64(id + (seed + 1) · 0x9E3779B97F4A7C15) / 2⁶⁴,     val  ⇔  u(id) < fraction

splitmix64 is a bijection of 64-bit integers with full avalanche (Steele et al. 2014), so
``u`` is uniform for any set of distinct ids and the held-out count is close to
``fraction · N`` (binomial: 5,000 ± 67 for 10 % of 50,000).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 ``x``:  z ^= z>>30; z *= M1; z ^= z>>27; z *= M2; z ^= z>>31."""
    z = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):  # multiplication modulo 2⁶⁴ is the point
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def holdout_uniform(*, sample_id: np.ndarray, seed: int) -> np.ndarray:
    """``u(id)`` in [0, 1) of every id (float64), as in the module docstring."""
    ids = np.asarray(sample_id).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        z = splitmix64(ids + np.uint64(int(seed) + 1) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)  # the top 53 bits: exact in float64


def check_fraction(fraction: float | None, *, name: str = "val_fraction") -> float | None:
    """``fraction`` as a float in (0, 0.5], or ``None``; anything else is a one-line ``ValueError``."""
    if fraction is None:
        return None
    f = float(fraction)
    if not 0.0 < f <= 0.5:
        raise ValueError(f"{name} must be in (0, 0.5] (a share of the training split), got {fraction}")
    return f


def val_mask(*, sample_id: np.ndarray, fraction: float | None, seed: int) -> np.ndarray:
    """True where an instance belongs to the validation split (all False without a ``fraction``)."""
    ids = np.asarray(sample_id)
    if check_fraction(fraction) is None:
        return np.zeros(len(ids), dtype=bool)
    return holdout_uniform(sample_id=ids, seed=seed) < float(fraction)


def percent_label(fraction: float) -> str:
    """``fraction`` as the percentage that names the splits: 0.1 -> "10", 0.05 -> "5", 0.125 -> "12.5"."""
    return f"{100.0 * float(fraction):g}"


__all__ = ["check_fraction", "holdout_uniform", "percent_label", "splitmix64", "val_mask"]
