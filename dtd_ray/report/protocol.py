"""The tests a sceptical reviewer asks for: choices made on the validation split, C1 against
like-for-like controls with the seeds' variance, the whole (k1, k2) grid, matched ablations, and
depth as a trend.

* :func:`choose_on_val` — where a retrain mode ran several lrs, each cell keeps the row with the
  best validation accuracy (the row itself kept the epoch best on validation): test never chooses.
* :func:`c1_table` — C1 by two measures side by side: the head retrained alone (the original
  filters) and the whole network fine-tuned, each against the full head trained the same way
  (the control, strategy ``full``) and against the original head; fine-tuning's intervals come
  from a two-level bootstrap (seeds, then test images: :func:`dtd_ray.core.stats.two_level_estimate`);
  verdicts at every margin of :data:`MARGINS` (non-inferiority: the null is the margin).
* :func:`kgrid_tables` — frequency maps at every (k1, k2 ≤ k1), k1 chosen per k2 on validation,
  and the paired test difference against k1 = k2.
* :func:`ablation_rows` — the matched ablations per model (k selected against k random others,
  mean and permutation; the frequency map's k against top-|W|'s and contribution's k).
* :func:`depth_trend` — the gap's and Ψ's least-squares slope over every depth with its interval,
  and each step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dtd_ray.core import selection, stats
from dtd_ray.report.evidence import SCALE, Evidence

MARGINS = (0.5, 1.0)  # points: C1's non-inferiority margins (0.5 is a ~6 % relative rise in ResNet-20's error)
CELL = ["model", "strategy", "k1", "k2", "retrain_mode", "map_seed", "seed"]


# ----------------------------------------------------------------------------- choices on validation


def choose_on_val(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(chosen rows, what was chosen)``: per cell (:data:`CELL`) with rows of several lrs, the row with the
    highest ``acc_val`` (ties: the smaller lr); without a validation split the smallest lr, said so.

    The second frame has one line per (model, mode) with several lrs: how often each lr won, the median
    epoch kept, and on which split the choice was made."""
    if trials.empty or "lr" not in trials:
        return trials, pd.DataFrame()
    t = trials.assign(_lr=trials["lr"].fillna(-1.0), _val=trials.get("acc_val", pd.Series(np.nan, index=trials.index)))
    t = t.sort_values(["_val", "_lr"], ascending=[False, True], na_position="last", kind="stable")
    chosen = t.drop_duplicates(CELL, keep="first").drop(columns=["_lr", "_val"]).sort_index()
    multi = trials.groupby(CELL, dropna=False)["lr"].transform("nunique") > 1
    rows = []
    for (model, mode), d in chosen[chosen.index.isin(trials.index[multi])].groupby(["model", "retrain_mode"]):
        has_val = d["acc_val"].notna().all() if "acc_val" in d else False
        wins = d["lr"].value_counts().sort_index()
        rows.append({"model": model, "mode": mode, "cells": len(d),
                     "lr chosen (cells)": ", ".join(f"{lr:g}: {n}" for lr, n in wins.items()),
                     "median epoch kept": float(d["best_epoch"].median()) if "best_epoch" in d else np.nan,
                     "chosen on": str(d["val_split"].iloc[0]) if has_val else "nothing (no validation split): smallest lr"})
    return chosen, pd.DataFrame(rows)


# ----------------------------------------------------------------------------- per-row outcomes


def _seed_outcomes(ev: Evidence, rows: pd.DataFrame, model: str) -> dict[int, np.ndarray]:
    """Seed -> the row's 0/1 outcomes (N,) (rows of one cell, one per seed)."""
    n = len(ev.instances[model])
    out = {}
    for _, r in rows.iterrows():
        data = r.get("outcomes")
        if data is None or (isinstance(data, float) and np.isnan(data)) or len(data) * 8 - n not in range(8):
            continue
        out[int(r["seed"])] = stats.unpack_outcomes(bytes(data), n=n).astype(np.float64)
    return out


def _arm(trials: pd.DataFrame, model: str, strategy: str, k2: int | None, mode: str) -> pd.DataFrame:
    t = trials[(trials["model"] == model) & (trials["strategy"] == strategy) & (trials["retrain_mode"] == mode)]
    return t if k2 is None else t[t["k2"] == k2]


def _paired(ev: Evidence, model: str, a: dict[int, np.ndarray], b: dict[int, np.ndarray] | np.ndarray
            ) -> tuple[stats.Estimate, int] | None:
    """``mean(a) − mean(b)`` in points with its two-level interval over the seeds both arms share
    (``b`` an array: one vector for every seed, e.g. the original head)."""
    seeds = sorted(a) if isinstance(b, np.ndarray) else sorted(set(a) & set(b))
    if not seeds:
        return None
    diff = np.stack([a[s] - (b if isinstance(b, np.ndarray) else b[s]) for s in seeds])
    return stats.two_level_estimate(values=diff, counts=ev.counts(model)).scaled(SCALE), len(seeds)


def c1_table(trials: pd.DataFrame, ev: Evidence | None, *, k: int, models: list[str] | None = None) -> pd.DataFrame:
    """C1 at ``k`` (frequency map), one line per (model, measure); see the module docstring.

    Measures: ``A − B`` where A is the full head and B the decomposed head, trained the same way
    (``head``: retrained alone on cached features, the original filters; ``finetune``: the whole
    network; the control is strategy ``full``), and against the original full head. ``models``: their
    order (default: as the rows come)."""
    if ev is None or trials.empty:
        return pd.DataFrame()
    rows = []
    for model in (models if models is not None else dict.fromkeys(trials["model"])):
        if not ev.has(model):
            continue
        full0 = ev.full(model)
        for mode in ("head", "finetune"):
            dec = _seed_outcomes(ev, _arm(trials, model, "frequency", k, mode), model)
            if not dec:
                continue
            ctrl = _seed_outcomes(ev, _arm(trials, model, selection.FULL, None, mode), model)
            label = "head retrained alone" if mode == "head" else "whole network fine-tuned"
            pairs = [("full head trained the same way", ctrl)] if ctrl else []
            pairs.append(("original full head", full0))
            for what, ref in pairs:
                res = _paired(ev, model, ref, dec) if isinstance(ref, dict) else _paired(ev, model, dec, ref)
                if res is None:
                    continue
                est, n_seeds = res
                if not isinstance(ref, dict):  # dec − full0 was computed: report full − decomposed (+ 0.0: no −0)
                    est = stats.Estimate(-est.value + 0.0, -est.hi + 0.0, -est.lo + 0.0)
                row = {"model": model, "training": label, "reference": what, "seeds": n_seeds,
                       "full − decomposed [95 % CI]": est.text()}
                for mg in MARGINS:
                    row[f"< {mg:g} point"] = stats.verdict(est, expect="negative", null=mg)
                row["_est"] = est
                rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the (k1, k2) grid


def kgrid_tables(eval_test: pd.DataFrame, eval_val: pd.DataFrame, *, model: str, k2_max: int = 10,
                 n_boot: int = stats.N_BOOT) -> dict[str, Any]:
    """The frequency map's decomposed accuracy (%) at every (k1, k2 ≤ k1) of one model, and k1 per k2 chosen
    on the validation split with its test difference against k1 = k2 (paired percentile bootstrap).

    Returns ``{"test": (k1 × k2) DataFrame, "val": the same on validation (or None), "choice": per k2
    the k1 chosen, its test accuracy, k1 = k2's, the difference [95 % CI] and what it says}``."""
    def grid(df: pd.DataFrame) -> pd.DataFrame:
        d = df[(df["model"] == model) & (df["strategy"] == "frequency") & (df["k2"] <= k2_max)]
        return d.pivot_table(index="k1", columns="k2", values="acc_decomposed", aggfunc="first") * 100

    test = grid(eval_test)
    val = grid(eval_val) if eval_val is not None and not eval_val.empty else None
    rows = []
    if val is not None and not val.empty:
        t = eval_test[(eval_test["model"] == model) & (eval_test["strategy"] == "frequency")]
        n = int(t["n_instances"].iloc[0])
        counts = stats.bootstrap_counts(n=n, n_boot=n_boot, seed=0)

        def outcomes(k1: int, k2: int) -> np.ndarray:
            r = t[(t["k1"] == k1) & (t["k2"] == k2)].iloc[0]
            return stats.unpack_outcomes(bytes(r["outcomes"]), n=n).astype(np.float64)

        for k2 in test.columns:
            col = val[k2].dropna()
            if k2 not in col.index:
                continue
            best = float(col.max())
            k1 = int(min(i for i, v in col.items() if v == best))  # ties: the smallest k1
            est = stats.estimate(values=outcomes(k1, int(k2)) - outcomes(int(k2), int(k2)), counts=counts).scaled(SCALE)
            says = ("k1 = k2 chosen on validation" if k1 == k2 else
                    {"supported": f"k1 = {k1} better than k1 = k2: \"k2 = k1 is best\" contradicted",
                     "contradicted": f"k1 = {k1} worse than k1 = k2 on test",
                     "not resolved": "not resolved"}[stats.verdict(est, expect="positive")])
            rows.append({"k2": int(k2), "k1 (val)": k1, "test at k1": float(test.loc[k1, k2]),
                         "test at k1 = k2": float(test.loc[k2, k2]), "difference [95 % CI]": est.text(),
                         "says": says})
    return {"test": test, "val": val, "choice": pd.DataFrame(rows)}


# ----------------------------------------------------------------------------- matched ablations

ABLATIONS = {
    "mean": "set to the training mean",
    "permute": "taken from a permuted instance",
}


def ablation_rows(ev: Evidence | None, models: list[str], *, k: int) -> list[dict[str, Any]]:
    """Per model: accuracy with k random other features ablated − with the k selected (frequency) ablated, for
    each ablation; and with top-|W|'s / contribution's k ablated − with frequency's k (mean ablation).
    Positive: the frequency map's features matter more. ``[]`` without the ablation columns."""
    out: list[dict[str, Any]] = []
    if ev is None:
        return out
    for m in models:
        fq = ev.essential(m, "frequency")
        if fq is None or "mean_selected" not in fq:
            continue
        for kind, how in ABLATIONS.items():
            est = ev.estimate((fq[f"{kind}_random"] - fq[f"{kind}_selected"]).to_numpy(), m)
            out.append({"model": m, "measure": f"k random others − k selected, {how} (k = {k}, points)", "est": est})
        for other, name in (("weight_l1", "top-|W|"), ("contribution", "contribution")):
            od = ev.essential(m, other)
            if od is None or "mean_selected" not in od:
                continue
            est = ev.estimate((od["mean_selected"] - fq["mean_selected"]).to_numpy(), m)
            out.append({"model": m, "measure": f"{name}'s k − frequency's k, set to the training mean (points)",
                        "est": est})
    return out


# ----------------------------------------------------------------------------- depth as a trend


def ols_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``y`` on ``x`` along the last axis: Σ (x − x̄)(y − ȳ) / Σ (x − x̄)²."""
    xc = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64)
    return ((y - y.mean(axis=-1, keepdims=True)) * xc).sum(axis=-1) / (xc ** 2).sum()


def slope_estimate(depths: list[float], vectors: list[np.ndarray], counts: np.ndarray, *, per: float = 10.0,
                   scale: float = SCALE) -> stats.Estimate:
    """The slope (per ``per`` layers) of per-depth means of ``vectors`` (each (N,), one test set) over ``depths``,
    with the percentile interval of the slope over the shared image resamples (paired across depths)."""
    V = np.stack(vectors)  # (D, N)
    c = counts.astype(np.float64, copy=False)
    means = (c @ V.T) / c.sum(axis=1, keepdims=True)  # (B, D)
    x = np.asarray(depths, dtype=np.float64)
    lo, hi = stats.percentile_interval(ols_slope(x, means) * per * scale)
    return stats.Estimate(float(ols_slope(x, V.mean(axis=1)) * per * scale), lo, hi)


def depth_trend(ev: Evidence | None, trials: pd.DataFrame, models: pd.DataFrame, *, k: int) -> list[dict[str, Any]]:
    """For the models of one test set ordered by depth: the slope of the gap full − decomposed (frequency, k;
    decomposed and head retrained) and of Ψ (q = 0.8, 0.9, 0.95, W-weighted) per 10 layers, with intervals.
    Negative slopes: deeper models have a smaller gap / more concentrated features."""
    out: list[dict[str, Any]] = []
    if ev is None or len(models) < 3 or not ev.same_test_set(list(models["model"])):
        return out
    names, depths = list(models["model"]), [float(d) for d in models["depth"]]
    counts = ev.counts(names[0])
    for mode in ("none", "head"):
        vecs = [ev.full(m) - o if (o := ev.outcome(m, "frequency", k, mode)) is not None else None for m in names]
        if any(v is None for v in vecs):
            continue
        what = "decomposed" if mode == "none" else "head retrained"
        out.append({"measure": f"gap full − {what} (frequency, k = {k}): slope, points per 10 layers",
                    "est": slope_estimate(depths, vecs, counts), "fmt": "{:.2f}"})
    for col, label in (("psi_q80", "Ψ at q = 0.8"), ("psi", "Ψ at q = 0.9"), ("psi_q95", "Ψ at q = 0.95"),
                       ("psi_weighted", "W-weighted Ψ (q = 0.9)")):
        if not all(col in ev.instances[m] for m in names):
            continue
        vecs = [ev.instances[m][col].to_numpy(np.float64) for m in names]
        if not all(np.isfinite(v).all() for v in vecs):
            continue
        out.append({"measure": f"{label}: slope per 10 layers", "est": slope_estimate(depths, vecs, counts, scale=1.0),
                    "fmt": "{:.4f}"})
    return out


# ----------------------------------------------------------------------------- the report's sections

# The paper's own numbers that a table of this report can hold (model, k) -> %: its Table's ResNet-20 at k = 3.
PAPER_CELLS = {("cifar_resnet20", 3): 84.16}


def sections(*, c1: pd.DataFrame, kgrid: dict[str, dict[str, Any]], choices: pd.DataFrame,
             val_split: str | None, n_val: int | None, table: Any,
             full_acc: dict[str, tuple[float, float]] | None = None) -> list[str]:
    """The markdown of the report's protocol sections (``table``: the report's markdown_table;
    ``full_acc``: model -> the original head's (validation, test) accuracy, %)."""
    L: list[str] = ["## What the validation split chose", ""]
    if val_split:
        L.append(f"The validation split `{val_split}` ({n_val or '?'} images) is held out of the training split by "
                 "sample id (`dtd_ray.core.holdout`); the maps, the retrained heads and the fine-tuned networks are "
                 "fitted on the rest. It chose each retrained head's epoch (the best validation accuracy, the "
                 "earliest of equals), the head's lr where several were run, and k1 for each k2 in the grid below. "
                 "The test split chose nothing.")
        if full_acc:
            L.append("")
            L.append("The original full head scores " + ", ".join(f"{m} {v:.2f} % (test {t:.2f} %)"
                                                                 for m, (v, t) in full_acc.items())
                     + " on it. A backbone trained on the whole training split (as the public checkpoints were) has "
                     "seen these images: the split is held out of everything this sweep fits, not of the backbone's "
                     "own training, so it ranks choices by how they fit training images. That is a weaker check "
                     "than fresh data, but test stays untouched.")
    else:
        L.append("This sweep has no validation split (`val_fraction`): every retrained head is its last epoch, and "
                 "nothing below is chosen.")
    if len(choices):
        L += ["", table(choices)]
    if len(c1):
        L += ["", "## C1 in full: both measures, their controls, both margins", ""]
        L.append("full − decomposed (frequency map) after retraining, in points, with the 95 % interval. `head "
                 "retrained alone` keeps the original filters (the head is refitted on cached features); `whole "
                 "network fine-tuned` retrains every filter. `full head trained the same way` is the control: the "
                 "full head (all m features per class) trained with the same recipe, epochs and seeds, each arm "
                 "with the lr its validation accuracy chose (fine-tuning ran one lr); `original full head` is the "
                 "network as published. Where there are several training seeds the interval is a two-level "
                 "bootstrap (the seeds resampled, then the test images; `dtd_ray.core.stats.two_level_estimate`), "
                 "so it carries the seed-to-seed variance too — with three seeds only roughly: their resamples "
                 "take 10 distinct combinations and understate the seed variance by about a third, so read "
                 "those intervals as somewhat too narrow. The test "
                 "is non-inferiority: **supported** where the whole interval lies below the margin, "
                 "**contradicted** where it lies wholly above it, else not resolved (its null is the margin, not 0).")
        L += ["", table(c1.drop(columns=["_est"]))]
    if kgrid:
        L += ["", "## The (k1, k2) grid (frequency)", ""]
        L.append("Decomposed test accuracy (%) of the frequency map selected with top-k1 counts and cut to k2 "
                 "features per class (rows k1, columns k2 ≤ k1, up to 10). Below each table: for every k2 the k1 "
                 "with the best *validation* accuracy, its test accuracy against k1 = k2 and the paired "
                 "difference: where the interval excludes 0 in favour of k1 > k2, the paper's \"k2 = k1 is "
                 "best\" is contradicted at that k2. Heat maps: `plots/kgrid.png`.")
        for model, g in kgrid.items():
            if g["test"].empty:
                continue
            t = g["test"].copy()
            t.columns = [f"k2={c}" for c in t.columns]
            t.index = [str(int(i)) for i in t.index]  # a row of floats would print k1 as 1.00
            L += ["", f"**{model}**", "", table(t.rename_axis("k1").reset_index())]
            for (m, k2), paper in PAPER_CELLS.items():
                if m != model or k2 not in g["test"].columns:
                    continue
                col = g["test"][k2].dropna()
                near = [int(k1) for k1, v in col.items() if abs(v - paper) < 0.005]
                best = int((col - paper).abs().idxmin())
                L.append(f"The paper's k = {k2} figure, {paper:.2f}, "
                         + (f"is this table's k2 = {k2} at k1 = {', '.join(map(str, near))}; k1 = k2 reads "
                            f"{g['test'].loc[k2, k2]:.2f}." if near else
                            f"is no cell of this table (k2 = {k2}); the nearest is k1 = {best}, "
                            f"{col[best]:.2f}; k1 = k2 reads {g['test'].loc[k2, k2]:.2f}."))
                L.append("")
            if len(g["choice"]):
                L.append(table(g["choice"]))
    return L


__all__ = ["ABLATIONS", "CELL", "MARGINS", "ablation_rows", "c1_table", "choose_on_val", "depth_trend",
           "kgrid_tables", "ols_slope", "sections", "slope_estimate"]
