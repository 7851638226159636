"""The report's plots, drawn with matplotlib's object-oriented API.

A :class:`matplotlib.figure.Figure` made directly (never pyplot) holds no global
backend state, so the plots draw the same in a terminal, a test or a Ray worker
without a display; ``savefig`` renders PNGs with the Agg canvas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dtd_ray.core import selection
from dtd_ray.report.tables import accuracy_at, accuracy_by_k

# Stable colours per strategy across every plot.
STRATEGY_COLORS = {"frequency": "tab:blue", "weight_l1": "tab:orange", "contribution": "tab:green",
                   "random": "tab:gray"}


def figure(w: float, h: float) -> Figure:
    """A ``w × h`` inch figure at the report's resolution, laid out by matplotlib's constrained layout."""
    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def per_model_axes(models: pd.DataFrame, *, xlabel: str) -> tuple[Figure, list[tuple[Axes, pd.Series]]]:
    """A figure with one subplot per model (3 per row; 4 models in 2 × 2), titled and labelled;
    returns ``(fig, [(ax, model row), …])`` with the spare subplots hidden."""
    n = len(models)
    cols = 2 if n == 4 else min(n, 3)
    rows = (n + cols - 1) // cols
    fig = figure(3.6 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    pairs = list(zip(axes, (mr for _, mr in models.iterrows())))
    for ax, mr in pairs:
        ax.set_title(mr["model"], fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    return fig, pairs


def plot_accuracy_vs_k(trials: pd.DataFrame, models: pd.DataFrame, path: str) -> None:
    """Decomposed accuracy against k per model, one line per strategy, the full head dotted."""
    acc = accuracy_by_k(trials)
    fig, pairs = per_model_axes(models, xlabel="k1 = k2 = k (features per class)")
    for ax, mr in pairs:
        d = acc[acc["model"] == mr["model"]]
        for s, ds in d.groupby("strategy", sort=False):
            ax.plot(ds["k"], ds["acc_decomposed"], marker="o", ms=3, label=s, color=STRATEGY_COLORS.get(s))
        ax.axhline(mr["acc_full"], color="black", ls=":", lw=1, label=f"full ({mr['acc_full']:.2f})")
    pairs[0][0].legend(fontsize=7)
    fig.suptitle("Decomposed head accuracy against k (no retraining)", fontsize=10)
    fig.savefig(path)


def plot_gap_vs_depth(trials: pd.DataFrame, models: pd.DataFrame, path: str, *, k: int) -> bool:
    """The gap to the full head against depth: per strategy at ``k``, and per k for the frequency maps.

    Returns False (and draws nothing) when no backbone name carries a depth."""
    m = models.dropna(subset=["depth"])
    if m.empty:
        return False
    acc = accuracy_by_k(trials)
    fig = figure(8.0, 3.2)
    ax1, ax2 = fig.subplots(1, 2)
    for dataset, md in m.groupby("dataset", sort=False):
        md = md.sort_values("depth")
        for s in selection.STRATEGIES:
            gaps = [mr["acc_full"] - accuracy_at(acc, mr["model"], s, k) for _, mr in md.iterrows()]
            if np.isfinite(gaps).any():
                ax1.plot(md["depth"], gaps, marker="o", label=f"{s}" + (f" ({dataset})" if m["dataset"].nunique() > 1 else ""),
                         color=STRATEGY_COLORS.get(s))
        ks = sorted(set(acc["k"]))
        for kk in [x for x in (1, 2, 3, 5, 10, 20) if x in ks]:
            gaps = [mr["acc_full"] - accuracy_at(acc, mr["model"], "frequency", kk) for _, mr in md.iterrows()]
            ax2.plot(md["depth"], gaps, marker="o", label=f"k = {kk}")
    ax1.set_title(f"gap to the full head at k = {k}", fontsize=9)
    ax2.set_title("gap to the full head, frequency strategy", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("depth")
        ax.set_ylabel("full − decomposed (points)")
        ax.set_xticks(sorted(set(m["depth"].astype(int))))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path)
    return True


def plot_psi_vs_depth(models: pd.DataFrame, path: str) -> bool:
    """Ψ against depth per dataset (bars: min–max over classes); False when there is no Ψ with a depth."""
    m = models.dropna(subset=["depth", "psi_mean"])
    if m.empty:
        return False
    fig = figure(4.2, 3.2)
    ax = fig.subplots()
    for dataset, md in m.groupby("dataset", sort=False):
        md = md.sort_values("depth")
        err = [md["psi_mean"] - md["psi_min"], md["psi_max"] - md["psi_mean"]]
        ax.errorbar(md["depth"], md["psi_mean"], yerr=err, marker="o", capsize=3, label=dataset)
    ax.set_xlabel("depth")
    ax.set_ylabel("Ψ (q = 0.9): mean over classes\nbars: min–max over classes")
    ax.set_title("Ψ: share of features holding 90 % of a class's mass", fontsize=9)
    ax.set_xticks(sorted(set(m["depth"].astype(int))))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return True


def plot_retraining(trials: pd.DataFrame, models: pd.DataFrame, path: str) -> bool:
    """Head-retrained (and fine-tuned) accuracy beside the decomposed one per model; False without retraining."""
    if not trials["retrain_mode"].isin(["head", "finetune"]).any():
        return False
    fig, pairs = per_model_axes(models, xlabel="k")
    acc = accuracy_by_k(trials)
    head = accuracy_by_k(trials, mode="head", value="acc_retrained")
    fine = accuracy_by_k(trials, mode="finetune", value="acc_retrained")
    for ax, mr in pairs:
        for s in selection.STRATEGIES:
            col = STRATEGY_COLORS.get(s)
            h = head[(head["model"] == mr["model"]) & (head["strategy"] == s)]
            if h.empty:
                continue
            d = acc[(acc["model"] == mr["model"]) & (acc["strategy"] == s) & acc["k"].isin(h["k"])]
            ax.plot(d["k"], d["acc_decomposed"], color=col, ls=":", marker=".", lw=1)
            ax.plot(h["k"], h["acc_retrained"], color=col, marker="o", ms=3, label=s)
            f = fine[(fine["model"] == mr["model"]) & (fine["strategy"] == s)]
            if len(f):
                ax.plot(f["k"], f["acc_retrained"], color=col, marker="*", ms=14, ls="none", mec="black", zorder=5)
        ax.axhline(mr["acc_full"], color="black", ls=":", lw=1)
    pairs[0][0].legend(fontsize=7, title="solid: head retrained\ndotted: before\n★: fine-tuned", title_fontsize=6)
    fig.suptitle("Retraining recovery (black dotted: full head)", fontsize=10)
    fig.savefig(path)
    return True


def plot_head_cost(trials: pd.DataFrame, models: pd.DataFrame, path: str) -> None:
    """Accuracy against the head's multiply-adds per instance (frequency maps, no retraining)."""
    fig = figure(4.8, 3.4)
    ax = fig.subplots()
    acc = trials[(trials["retrain_mode"] == "none") & (trials["strategy"] == "frequency")]
    for i, (_, mr) in enumerate(models.iterrows()):
        d = acc[acc["model"] == mr["model"]].sort_values("k2")
        if d.empty:
            continue
        line, = ax.plot(d["head_macs_decomposed"], d["acc_decomposed"], marker="o", ms=3, label=mr["model"])
        ax.plot([d["head_macs_full"].iloc[0]], [mr["acc_full"]], marker="s", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("head multiply-adds per instance (C·k2; squares: full head C·m)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Head cost: frequency maps, no retraining", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path)
