"""Uncertainty of the report's numbers: the paired percentile bootstrap, and the verdict it decides.

Every accuracy in the report is a mean of per-instance outcomes over one test set, and
every comparison it makes (full − decomposed, one depth against another, one strategy
against another, a retrained head against the decomposed one) compares two such means
*on the same test images*. Resampling the images once and applying the same resample to
both numbers keeps their correlation (a pairwise bootstrap), so the interval of a
difference is much tighter than two independent intervals would suggest — and honest.

Built bottom-up:

* :func:`bootstrap_counts` — ``B`` resamples of ``n`` instances as multiplicity counts
  (a multinomial draw per resample), shared by every statistic of one test set;
* :func:`resampled_means` — ``mean_b = Σ_i c_bi · v_i / n`` for every resample;
* :func:`percentile_interval` — the ``(α/2, 1 − α/2)`` quantiles of the resampled values;
* :func:`estimate` — point estimate + interval of a linear statistic ``mean(v)``;
  differences are linear too: pass ``v = a − b`` (paired);
* :func:`seed_counts` / :func:`two_level_estimate` — where a number is a mean over
  training seeds as well as over test images (fine-tuning runs), a two-level bootstrap:
  resample the seeds, then the images, so the interval carries both variances;
* :func:`verdict` — "supported" / "contradicted" / "not resolved" from an interval;
* :func:`pack_outcomes` / :func:`unpack_outcomes` — per-instance 0/1 outcomes stored as
  bits (a trial row carries its own, 1.25 kB for 10,000 test images); :func:`outcomes_text`
  the same as base64 text, for a Tune metric.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

N_BOOT = 2000  # resamples per interval (the issue asks for ≥ 1,000; 2,000 keeps the 95 % ends stable to ~0.05 points)
LEVEL = 0.95  # two-sided confidence level of every interval


def bootstrap_counts(*, n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` multiplicities of ``n`` draws with replacement from ``n`` instances.

    Row ``b`` is ``Multinomial(n, (1/n, …, 1/n))``: ``c_bi`` is how often instance ``i``
    is drawn in resample ``b`` (``Σ_i c_bi = n``). Drawn from ``numpy.random.default_rng(seed)``,
    so every statistic computed with the same counts shares the same resamples (paired).
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float32)


def resampled_means(*, values: Any, counts: np.ndarray, totals: np.ndarray | None = None) -> np.ndarray:
    """``mean_b = Σ_i c_bi · v_i / Σ_i c_bi`` for every resample ``b`` (B,); NaN values are not allowed.

    ``totals`` may pass ``Σ_i c_bi`` (B,) where the caller keeps it (it is ``n`` for every row of
    :func:`bootstrap_counts`)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] != counts.shape[1]:
        raise ValueError(f"values have shape {v.shape}, the resamples are over {counts.shape[1]} instances")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    c = counts.astype(np.float64, copy=False)  # float64 counts (as Evidence keeps them) are used as they are
    return (c @ v) / (c.sum(axis=1) if totals is None else totals)


def percentile_interval(samples: Any, *, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval ``(q_{α/2}, q_{1−α/2})`` of resampled values, ``α = 1 − level``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} is outside (0, 1)")
    s = np.asarray(samples, dtype=np.float64)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval (same units as the values, e.g. points of %)."""

    value: float
    lo: float
    hi: float

    def excludes(self, x: float = 0.0) -> bool:
        return self.lo > x or self.hi < x

    def text(self, fmt: str = "{:.2f}") -> str:
        """``1.73 [1.32, 2.15]``."""
        return f"{fmt.format(self.value)} [{fmt.format(self.lo)}, {fmt.format(self.hi)}]"

    def scaled(self, factor: float) -> "Estimate":
        return Estimate(self.value * factor, self.lo * factor, self.hi * factor)


def estimate(*, values: Any, counts: np.ndarray, level: float = LEVEL, totals: np.ndarray | None = None) -> Estimate:
    """``mean(values)`` with its percentile-bootstrap interval over the resamples in ``counts``.

    For a paired difference of two means on the same instances pass ``values = a − b``:
    the mean is linear, so the resampled difference is the difference of the resampled means.
    """
    v = np.asarray(values, dtype=np.float64)
    lo, hi = percentile_interval(resampled_means(values=v, counts=counts, totals=totals), level=level)
    return Estimate(float(v.mean()), lo, hi)


def seed_counts(*, n_seeds: int, n_boot: int = N_BOOT, seed: int = 1) -> np.ndarray:
    """``(n_boot, n_seeds)`` multiplicities of the training seeds, resampled with replacement
    (``Multinomial(S, 1/S)`` per row; drawn from ``default_rng([seed, S])``, apart from the image resamples)."""
    if n_seeds < 1 or n_boot < 1:
        raise ValueError(f"need n_seeds >= 1 and n_boot >= 1, got {n_seeds}, {n_boot}")
    rng = np.random.default_rng([int(seed), int(n_seeds)])
    return rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot).astype(np.float64)


def two_level_estimate(*, values: Any, counts: np.ndarray, seed_draws: np.ndarray | None = None,
                       level: float = LEVEL) -> Estimate:
    """The mean over seeds and instances of ``values`` (S, N), with a two-level bootstrap interval.

    Resample ``b`` draws the seeds (``seed_draws[b]``, :func:`seed_counts`) and the instances
    (``counts[b]``, the test set's :func:`bootstrap_counts`, shared with every other statistic
    of that set) and computes

        θ_b = Σ_s (d_bs / S) · Σ_i c_bi v_si / Σ_i c_bi,

    so the interval holds the seed-to-seed variance as well as the test images'. For a paired
    difference of two arms trained with the same seeds pass ``values = a − b`` row by row
    (the seeds are drawn jointly). One seed reduces to :func:`estimate`.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != counts.shape[1]:
        raise ValueError(f"values have shape {v.shape}, expected (seeds, {counts.shape[1]})")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or inf")
    S = v.shape[0]
    d = seed_counts(n_seeds=S, n_boot=counts.shape[0]) if seed_draws is None else np.asarray(seed_draws, np.float64)
    if d.shape != (counts.shape[0], S):
        raise ValueError(f"seed_draws have shape {d.shape}, expected ({counts.shape[0]}, {S})")
    c = counts.astype(np.float64, copy=False)
    per_seed = (c @ v.T) / c.sum(axis=1, keepdims=True)  # (B, S): each seed's mean on resample b's images
    theta = (d * per_seed).sum(axis=1) / S
    lo, hi = percentile_interval(theta, level=level)
    return Estimate(float(v.mean()), lo, hi)


def verdict(est: Estimate, *, expect: str, null: float = 0.0) -> str:
    """What an interval says about a claim that the effect is ``expect`` ("positive"/"negative") of ``null``.

    ``supported`` where the whole interval lies on the claimed side of ``null``;
    ``contradicted`` where it lies wholly on the other side; otherwise ``not resolved``
    (the data cannot tell the effect from no effect).
    """
    if expect not in ("positive", "negative"):
        raise ValueError(f"expect must be 'positive' or 'negative', got {expect!r}")
    above, below = est.lo > null, est.hi < null
    if (above and expect == "positive") or (below and expect == "negative"):
        return "supported"
    if above or below:
        return "contradicted"
    return "not resolved"


def pack_outcomes(outcomes: Any) -> bytes:
    """Per-instance 0/1 outcomes (N,) as bits, first instance in the high bit of the first byte."""
    o = np.asarray(outcomes)
    if o.ndim != 1:
        raise ValueError(f"outcomes have shape {o.shape}, expected (N,)")
    return np.packbits(o.astype(bool)).tobytes()


def unpack_outcomes(data: bytes, *, n: int) -> np.ndarray:
    """The inverse of :func:`pack_outcomes`: a bool array (n,)."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits.size < n or bits.size - n >= 8:
        raise ValueError(f"{len(data)} bytes cannot hold exactly {n} outcomes")
    return bits[:n].astype(bool)


def outcomes_text(outcomes: Any) -> str:
    """:func:`pack_outcomes` as base64 text: a metric a Ray Tune trial can report (JSON-safe)."""
    return base64.b64encode(pack_outcomes(outcomes)).decode("ascii")


def outcomes_from_text(text: str) -> bytes:
    """The packed bits of :func:`outcomes_text`."""
    return base64.b64decode(text.encode("ascii"))
