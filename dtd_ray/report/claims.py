"""The report's "what the data says": plain statements computed from the tables, none written by hand.

Each statement names the numbers it rests on and whether they support the paper's
claims (the gap to the full head and Ψ shrink with depth; the frequency maps beat
random ones; retraining recovers the gap), including where they do not. (The module
is not called ``findings`` so that ``dtd_ray.report.findings`` is unambiguously the function.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from dtd_ray.report.tables import MODE_LABELS, accuracy_at, accuracy_by_k


def trend(values: Sequence[float]) -> str:
    """'decreasing' / 'increasing' (strictly monotone), else 'not monotone'; 'one point' for < 2 values."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    if len(v) < 2:
        return "one point"
    dif = np.diff(v)
    if (dif < 0).all():
        return "decreasing"
    if (dif > 0).all():
        return "increasing"
    return "not monotone"


def _shrinks_overall(acc: pd.DataFrame, mdf: pd.DataFrame) -> int:
    """k values at which the deepest model's gap is smaller than the shallowest's (frequency)."""
    first, last = mdf.iloc[0], mdf.iloc[-1]
    n = 0
    for kk in sorted(set(acc["k"])):
        g0 = first["acc_full"] - accuracy_at(acc, first["model"], "frequency", kk)
        g1 = last["acc_full"] - accuracy_at(acc, last["model"], "frequency", kk)
        n += int(g1 < g0)
    return n


def findings(trials: pd.DataFrame, models: pd.DataFrame, *, k: int) -> list[str]:
    """Plain statements computed from the tables (what the data supports, and what it does not)."""
    out: list[str] = []
    acc = accuracy_by_k(trials)
    for dataset, mdf in models.groupby("dataset", sort=False):
        mdf = mdf.dropna(subset=["depth"]).sort_values("depth")
        if len(mdf) >= 2:
            gaps = [r["acc_full"] - accuracy_at(acc, r["model"], "frequency", k) for _, r in mdf.iterrows()]
            depths = ", ".join(f"{int(d)}: {g:.2f}" for d, g in zip(mdf["depth"], gaps))
            t = trend(gaps)
            verdict = {"decreasing": "shrinks with depth in every step (supports the paper's claim)",
                       "increasing": "grows with depth (does not support the claim that it shrinks)",
                       "not monotone": "does not shrink monotonically with depth (the claim is not supported "
                                       "in every step)",
                       "one point": "cannot be judged"}[t]
            out.append(f"{dataset}: the gap full − decomposed (frequency, k = {k}, points) by depth {depths} — {verdict}.")
            by_k: dict[str, list[int]] = {}
            for kk in sorted(set(acc["k"])):
                g = [r["acc_full"] - accuracy_at(acc, r["model"], "frequency", kk) for _, r in mdf.iterrows()]
                by_k.setdefault(trend(g), []).append(int(kk))
            out.append(f"{dataset}: over the whole k grid (frequency) the gap shrinks with depth in every step at k = "
                       f"{by_k.get('decreasing', []) or 'none'}; not monotone at k = {by_k.get('not monotone', []) or 'none'}"
                       f"; grows at k = {by_k.get('increasing', []) or 'none'}; first to last depth it shrinks at "
                       f"{_shrinks_overall(acc, mdf)} of {len(set(acc['k']))} k values.")
            psis = list(mdf["psi_mean"])
            if np.isfinite(psis).all():
                t = trend(psis)
                # Smaller Ψ: a class's mass sits on fewer features (the paper: deeper networks have
                # lower-dimensional, more disentangled final representations).
                verdict = {"decreasing": "falls with depth in every step (supports the paper's claim that deeper "
                                         "networks concentrate each class on fewer features)",
                           "increasing": "rises with depth (does not support the claim that deeper networks "
                                         "concentrate each class on fewer features)",
                           "not monotone": "does not fall monotonically with depth (the claim that deeper networks "
                                           "concentrate each class on fewer features is not supported in every step)",
                           "one point": "cannot be judged"}[t]
                out.append(f"{dataset}: Ψ (q = 0.9, mean of the per-class medians) by depth "
                           + ", ".join(f"{int(d)}: {p:.3f}" for d, p in zip(mdf["depth"], psis))
                           + f" — {verdict}.")
    # Frequency vs random, at every k of every model.
    piv = acc.pivot_table(index=["model", "k"], columns="strategy", values="acc_decomposed")
    if {"frequency", "random"} <= set(piv.columns):
        better = (piv["frequency"] > piv["random"]).mean() * 100
        out.append(f"frequency beats random at {better:.0f} % of the (model, k) points; mean margin "
                   f"{(piv['frequency'] - piv['random']).mean():.1f} points.")
    if {"frequency", "contribution"} <= set(piv.columns):
        d = piv["contribution"] - piv["frequency"]
        out.append(f"contribution vs frequency: better at {(d > 0).mean() * 100:.0f} % of the points, "
                   f"mean difference {d.mean():+.2f} points.")
    # Retraining recovery at k.
    for mode in ("head", "finetune"):
        r = trials[(trials["retrain_mode"] == mode) & (trials["k2"] == k) & (trials["strategy"] == "frequency")]
        if len(r):
            rec = r["acc_retrained"] - r["acc_decomposed"]
            left = r["acc_full"] - r["acc_retrained"]
            out.append(f"{MODE_LABELS[mode]} (frequency, k = {k}): +{rec.mean():.2f} points on average over "
                       f"{len(r)} model(s); remaining gap to the full head {left.mean():.2f} points "
                       f"(min {left.min():.2f}, max {left.max():.2f}).")
    return out
