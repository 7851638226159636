"""The per-instance evidence behind the report's intervals, read from a sweep folder.

A sweep keeps, for every evaluation instance (rows sorted by ``sample_id``):

* each trial row's 0/1 outcomes (``trials/``, column ``outcomes``, packed bits): the
  decomposed head's in mode ``none``, the retrained network's in ``head`` / ``finetune``;
* the full head's outcome and Ψ (``decompose/instances/``);
* the essentiality test's outcomes (``decompose/essentiality/``).

Every number the report compares is a mean over one test set, and every comparison is
between two numbers on the *same* test images (two heads, two strategies, two depths of
one dataset). :class:`Evidence` therefore draws one set of bootstrap resamples per test
set (:func:`dtd_ray.core.stats.bootstrap_counts`, keyed by its sample ids) and applies it
to every statistic of that set: the intervals of differences are paired.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dtd_ray.core import stats
from dtd_ray.io import layout, storage

SCALE = 100.0  # accuracies and their differences in points of %
ESSENTIALITY_COLUMNS = ("clean", "selected_noise", "others_noise", "mean_selected", "mean_random",
                        "permute_selected", "permute_random")


@dataclass
class Evidence:
    """Per-instance outcomes of one sweep and the bootstrap resamples of its test sets."""

    trials: pd.DataFrame
    instances: dict[str, pd.DataFrame]  # model -> its eval instances, sorted by sample_id
    essentiality: pd.DataFrame
    n_boot: int = stats.N_BOOT
    seed: int = 0
    _counts: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _outcomes: dict[tuple, list] | None = field(default=None, repr=False)

    @classmethod
    def read(cls, root: str, trials: pd.DataFrame, *, n_boot: int = stats.N_BOOT, seed: int = 0,
             selection: dict | None = None) -> "Evidence":
        """``selection`` (:func:`dtd_ray.io.layout.sweep_selection`): the tables of that selection only."""
        inst = layout.of_selection(layout.read_table(storage.join(root, "decompose", "instances")), selection)
        by_model = {str(m): d.sort_values("sample_id").reset_index(drop=True) for m, d in inst.groupby("model")} \
            if not inst.empty else {}
        ess = layout.of_selection(layout.read_table(storage.join(root, "decompose", "essentiality")), selection)
        return cls(trials=trials, instances=by_model, essentiality=ess, n_boot=n_boot, seed=seed)

    # ------------------------------------------------------------------ test sets

    def has(self, model: str) -> bool:
        return model in self.instances

    def test_set(self, model: str) -> str:
        """A key of the model's evaluation instances (their sample ids): equal keys, same images."""
        ids = self.instances[model]["sample_id"].to_numpy(np.int64)
        return hashlib.sha1(ids.tobytes()).hexdigest()[:16]

    def same_test_set(self, models: list[str]) -> bool:
        return all(self.has(m) for m in models) and len({self.test_set(m) for m in models}) == 1

    def counts(self, model: str) -> np.ndarray:
        """The resamples of the model's test set (shared by every model evaluated on the same images)."""
        key = self.test_set(model)
        if key not in self._counts:
            # float64 once (2,000 × 10,000 × 8 B = 160 MB per test set) rather than per statistic
            self._counts[key] = stats.bootstrap_counts(n=len(self.instances[model]), n_boot=self.n_boot,
                                                       seed=self.seed).astype(np.float64)
        return self._counts[key]

    # ------------------------------------------------------------------ per-instance values

    def full(self, model: str) -> np.ndarray:
        """The full head's 0/1 outcomes (N,)."""
        return self.instances[model]["correct_full"].to_numpy(np.float64)

    def psi(self, model: str) -> np.ndarray:
        """Ψ per instance (N,); NaN for an instance without L1 mass."""
        return self.instances[model]["psi"].to_numpy(np.float64)

    def outcome(self, model: str, strategy: str, k: int, mode: str = "none") -> np.ndarray | None:
        """Per-instance outcomes of a trial (N,); for ``random`` their mean over the map seeds.

        ``None`` where the sweep holds no such row, or a row without outcomes for every instance.
        """
        if not self.has(model) or "outcomes" not in self.trials:
            return None
        if self._outcomes is None:  # indexed once: filtering the trial table per call is slow
            t = self.trials
            self._outcomes = {}
            for key, data in zip(zip(t["model"], t["strategy"], t["k2"].astype(int), t["retrain_mode"]), t["outcomes"]):
                self._outcomes.setdefault(key, []).append(data)
        rows = self._outcomes.get((model, strategy, int(k), mode))
        if not rows:
            return None
        n = len(self.instances[model])
        vals = []
        for data in rows:
            if data is None or (isinstance(data, float) and np.isnan(data)) or len(data) * 8 - n not in range(8):
                return None
            vals.append(stats.unpack_outcomes(bytes(data), n=n).astype(np.float64))
        return np.mean(vals, axis=0)

    def essential(self, model: str, strategy: str) -> pd.DataFrame | None:
        """Per instance: ``clean``, ``selected_noise``, ``others_noise`` and, where the sweep has them, the
        matched ablations (``mean_selected`` …; :data:`dtd_ray.io.schema.ESSENTIALITY_SCHEMA`); random: the
        mean over its map seeds."""
        e = self.essentiality
        if e.empty:
            return None
        d = e[(e["model"] == model) & (e["strategy"] == strategy)]
        if d.empty:
            return None
        cols = [c for c in ESSENTIALITY_COLUMNS if c in d and d[c].notna().all()]
        return d.groupby("sample_id", sort=True)[cols].mean()

    # ------------------------------------------------------------------ estimates

    def estimate(self, values: np.ndarray, model: str, *, scale: float = SCALE) -> stats.Estimate:
        """``mean(values)`` × ``scale`` with its interval over the model's test set resamples.

        Instances where ``values`` is NaN (Ψ without mass) are left out of every resample.
        """
        v = np.asarray(values, dtype=np.float64)
        c = self.counts(model)
        ok = np.isfinite(v)
        if not ok.all():
            return stats.estimate(values=v[ok], counts=c[:, ok]).scaled(scale)
        return stats.estimate(values=v, counts=c, totals=np.full(c.shape[0], float(c.shape[1]))).scaled(scale)


def evidence_or_none(root: str, trials: pd.DataFrame, *, selection: dict | None = None) -> Evidence | None:
    """:meth:`Evidence.read`, or ``None`` for a sweep folder without per-instance tables."""
    try:
        fs, path = storage.resolve(root.rstrip("/"))
        if not storage.exists(fs, f"{path}/decompose/instances"):
            return None
    except (OSError, ValueError):
        return None
    return Evidence.read(root, trials, selection=selection)


__all__ = ["ESSENTIALITY_COLUMNS", "Evidence", "SCALE", "evidence_or_none"]
