"""The report's plots, drawn with matplotlib's object-oriented API.

A :class:`matplotlib.figure.Figure` made directly (never pyplot) holds no global
backend state, so the plots draw the same in a terminal, a test or a Ray worker
without a display; ``savefig`` renders PNGs with the Agg canvas.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dtd_ray.core import selection
from dtd_ray.report.evidence import Evidence
from dtd_ray.report.tables import accuracy_at, accuracy_by_k, depth_series

# Stable colours per strategy across every plot.
STRATEGY_COLORS = {"frequency": "tab:blue", "weight_l1": "tab:orange", "contribution": "tab:green",
                   "random": "tab:gray", "glm": "tab:purple"}


def plt_cmap(i: int, n: int) -> tuple:
    """Colour ``i`` of ``n`` from viridis (distinct from the strategies' colours)."""
    return matplotlib.colormaps["viridis"](i / max(1, n - 1) * 0.9)


def figure_legend(fig: Figure, axes: list[Axes], **kw) -> None:
    """One legend for the whole figure, below the panels, so that it covers no data."""
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles[lab], labels[lab] = h, lab
    if handles:
        fig.legend(list(handles.values()), list(labels.values()), loc="outside lower center",
                   ncol=min(len(handles), 3), fontsize=7, **kw)


def legend_below(ax: Axes, *, ncol: int = 2) -> None:
    """The axis' legend under it, outside the data (constrained layout makes room)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=7)


def accuracy_interval(ev: Evidence | None, model: str, strategy: str, k: int, mode: str = "none",
                      *, full: bool = False) -> tuple[float, float] | None:
    """The 95 % bootstrap interval (%) of one accuracy, or of the gap full − it (``full``); None without outcomes."""
    if ev is None or not ev.has(model):
        return None
    v = ev.outcome(model, strategy, k, mode)
    if v is None:
        return None
    e = ev.estimate(ev.full(model) - v if full else v, model)
    return e.lo, e.hi


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


def plot_accuracy_vs_k(trials: pd.DataFrame, models: pd.DataFrame, path: str, *, evidence: Evidence | None = None) -> None:
    """Decomposed accuracy against k per model, one line per strategy, the full head dotted.

    Bands: the 95 % bootstrap interval over the test images (``evidence``); for random, ± one
    sd over its map seeds (the spread of the strategy, which is larger than either interval)."""
    acc = accuracy_by_k(trials)
    fig, pairs = per_model_axes(models, xlabel="k1 = k2 = k (features per class)")
    for ax, mr in pairs:
        d = acc[acc["model"] == mr["model"]]
        for s, ds in d.groupby("strategy", sort=False):
            col = STRATEGY_COLORS.get(s)
            ds = ds.sort_values("k")
            label = s + (f" (mean ± sd, {int(ds['seeds'].max())} seeds)" if ds["seeds"].max() > 1 else " (95 % CI)")
            ax.plot(ds["k"], ds["acc_decomposed"], marker="o", ms=3, label=label, color=col)
            if ds["seeds"].max() > 1:
                lo, hi = ds["acc_decomposed"] - ds["acc_decomposed_sd"], ds["acc_decomposed"] + ds["acc_decomposed_sd"]
            else:
                ci = [accuracy_interval(evidence, mr["model"], s, int(kk)) for kk in ds["k"]]
                if any(c is None for c in ci):
                    continue
                lo, hi = [c[0] for c in ci], [c[1] for c in ci]
            ax.fill_between(ds["k"], lo, hi, color=col, alpha=0.25, lw=0)
        ax.axhline(mr["acc_full"], color="black", ls=":", lw=1, label="full head")
    figure_legend(fig, [ax for ax, _ in pairs])
    fig.suptitle("Decomposed head accuracy against k (no retraining)", fontsize=10)
    fig.savefig(path)


def plot_gap_vs_depth(trials: pd.DataFrame, models: pd.DataFrame, path: str, *, k: int,
                      evidence: Evidence | None = None) -> bool:
    """The gap to the full head against depth: per strategy at ``k`` (random on its own axis, so that
    its large gap does not flatten the others), and per k for the frequency maps; bars: 95 %
    bootstrap intervals (random: ± sd over its map seeds).

    Returns False (and draws nothing) when no series of checkpoints has two depths."""
    series = depth_series(models)  # one line per series of checkpoints that differ only in depth
    if not series:
        return False
    m = pd.concat([md for _, md in series])
    acc = accuracy_by_k(trials)
    fig = figure(11.0, 3.6)
    ax1, ax_r, ax2 = fig.subplots(1, 3)
    several = len(series) > 1
    for dataset, md in series:
        suffix = f" ({dataset})" if several else ""
        for s in selection.STRATEGIES:
            rows = [acc[(acc["model"] == mr["model"]) & (acc["strategy"] == s) & (acc["k"] == k)] for _, mr in md.iterrows()]
            if not all(len(r) for r in rows):
                continue
            gaps = np.array([mr["acc_full"] - float(r["acc_decomposed"].iloc[0]) for (_, mr), r in zip(md.iterrows(), rows)])
            if s == "random":
                err = [float(r["acc_decomposed_sd"].iloc[0]) for r in rows]
                ax_r.errorbar(md["depth"], gaps, yerr=err, marker="o", capsize=3, color=STRATEGY_COLORS[s],
                              label=f"random, ± sd over seeds{suffix}")
                continue
            ci = [accuracy_interval(evidence, mr["model"], s, k, full=True) for _, mr in md.iterrows()]
            yerr = None if any(c is None for c in ci) else \
                [gaps - np.array([c[0] for c in ci]), np.array([c[1] for c in ci]) - gaps]
            ax1.errorbar(md["depth"], gaps, yerr=yerr, marker="o", capsize=3, label=f"{s}{suffix}",
                         color=STRATEGY_COLORS.get(s))
        ks = sorted(set(acc["k"]))
        shown = [x for x in (1, 2, 3, 5, 10, 20) if x in ks]
        for kk in shown:
            gaps = np.array([mr["acc_full"] - accuracy_at(acc, mr["model"], "frequency", kk) for _, mr in md.iterrows()])
            ci = [accuracy_interval(evidence, mr["model"], "frequency", kk, full=True) for _, mr in md.iterrows()]
            yerr = None if any(c is None for c in ci) else \
                [gaps - np.array([c[0] for c in ci]), np.array([c[1] for c in ci]) - gaps]
            ax2.errorbar(md["depth"], gaps, yerr=yerr, marker="s", ms=4, capsize=2, label=f"k = {kk}{suffix}",
                         color=plt_cmap(shown.index(kk), len(shown)))
    ax1.set_title(f"gap at k = {k} (95 % CI)", fontsize=9)
    ax_r.set_title(f"gap at k = {k}, random maps", fontsize=9)
    ax2.set_title("gap of the frequency maps by k (95 % CI)", fontsize=9)
    for ax in (ax1, ax_r, ax2):
        ax.set_xlabel("depth")
        ax.set_ylabel("full − decomposed (points)")
        ax.set_xticks(sorted(set(m["depth"].astype(int))))
        ax.grid(alpha=0.3)
        legend_below(ax)
    fig.savefig(path)
    return True


def plot_psi_vs_depth(models: pd.DataFrame, path: str, *, evidence: Evidence | None = None) -> bool:
    """Ψ against depth per dataset; bars: the 95 % bootstrap interval of the mean over instances
    (``evidence``), else min–max over the per-class medians. False when there is no Ψ with a depth."""
    series = [(label, md) for label, md in depth_series(models.dropna(subset=["psi_mean"]))]
    if not series:
        return False
    m = pd.concat([md for _, md in series])
    fig = figure(4.6, 3.6)
    ax = fig.subplots()
    ci = evidence is not None and all(evidence.has(x) for x in m["model"])
    for dataset, md in series:
        if ci:
            est = [evidence.estimate(evidence.psi(x), x, scale=1.0) for x in md["model"]]
            err = [[v - e.lo for v, e in zip(md["psi_mean"], est)], [e.hi - v for v, e in zip(md["psi_mean"], est)]]
        else:
            err = [md["psi_mean"] - md["psi_min"], md["psi_max"] - md["psi_mean"]]
        ax.errorbar(md["depth"], md["psi_mean"], yerr=err, marker="o", capsize=3, label=dataset)
    ax.set_xlabel("depth")
    ax.set_ylabel("Ψ (q = 0.9), mean over instances\n" + ("bars: 95 % CI" if ci else "bars: min–max over classes"))
    ax.set_title("Ψ: share of features holding 90 % of the L1 mass\n(smaller = more concentrated)", fontsize=9)
    ax.set_xticks(sorted(set(m["depth"].astype(int))))
    ax.grid(alpha=0.3)
    figure_legend(fig, [ax])
    fig.savefig(path)
    return True


def plot_retraining(trials: pd.DataFrame, models: pd.DataFrame, path: str, *, evidence: Evidence | None = None) -> bool:
    """Head-retrained (and fine-tuned) accuracy beside the decomposed one per model; bars: 95 %
    bootstrap intervals of the retrained accuracy (random: ± sd over its map seeds); False without retraining."""
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
            if h["seeds"].max() > 1:
                yerr = h["acc_retrained_sd"].to_numpy()
            else:
                ci = [accuracy_interval(evidence, mr["model"], s, int(kk), "head") for kk in h["k"]]
                yerr = None if any(c is None for c in ci) else \
                    [h["acc_retrained"] - [c[0] for c in ci], [c[1] for c in ci] - h["acc_retrained"]]
            ax.errorbar(h["k"], h["acc_retrained"], yerr=yerr, color=col, marker="o", ms=3, capsize=2, label=s)
            f = fine[(fine["model"] == mr["model"]) & (fine["strategy"] == s)]
            if len(f):
                ax.plot(f["k"], f["acc_retrained"], color=col, marker="*", ms=14, ls="none", mec="black", zorder=5)
        ax.axhline(mr["acc_full"], color="black", ls=":", lw=1)
    figure_legend(fig, [ax for ax, _ in pairs], title="solid: head retrained (bars: 95 % CI; random: mean ± sd over "
                  "seeds); dotted: before; ★: fine-tuned; black dotted: full head", title_fontsize=7)
    fig.suptitle("Retraining recovery", fontsize=10)
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
    figure_legend(fig, [ax])
    fig.savefig(path)


def plot_accuracy_vs_share(trials: pd.DataFrame, models: pd.DataFrame, path: str, *, strategy: str = "frequency") -> bool:
    """Decomposed accuracy (``strategy``, no retraining) against k and against k/m, one line per model:
    the two axes on which models of different widths m may or may not fall onto one curve. Below it,
    the same as the gap full − decomposed. False where the sweep has no rows of ``strategy``."""
    acc = accuracy_by_k(trials)
    acc = acc[acc["strategy"] == strategy]
    if acc.empty:
        return False
    fig = figure(10.5, 7.0)
    axes = fig.subplots(2, 2, squeeze=False)
    n = len(models)
    markers = "osD^v<>ph*"
    for i, (_, mr) in enumerate(models.iterrows()):
        d = acc[acc["model"] == mr["model"]].sort_values("k")
        if d.empty:
            continue
        share = 100.0 * d["k"] / float(mr["feature_dim"])
        label = f"{mr['model']} (m = {int(mr['feature_dim'])})"
        style = dict(marker=markers[i % len(markers)], ms=3, lw=1.2, color=plt_cmap(i, n), label=label)
        for row, y in ((0, d["acc_decomposed"]), (1, mr["acc_full"] - d["acc_decomposed"])):
            axes[row][0].plot(d["k"], y, **style)
            axes[row][1].plot(share, y, **style)
    for row, ylabel in ((0, "decomposed test accuracy (%)"), (1, "gap full − decomposed (points)")):
        for col, xlabel in ((0, "k (features per class)"), (1, "k / m (% of the penultimate width)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
    figure_legend(fig, [axes[0][0]])
    fig.suptitle(f"Decomposed head ({strategy}) against k and against k / m, one line per model", fontsize=10)
    fig.savefig(path)
    return True


def plot_kgrid(grids: dict[str, dict], models: pd.DataFrame, path: str) -> bool:
    """Per model, a heat map of the frequency map's decomposed test accuracy (%) at every (k1, k2 ≤ k1),
    with the k1 the validation split chose per k2 ringed. False (nothing drawn) without grids."""
    shown = models[models["model"].isin([m for m, g in grids.items() if not g["test"].empty])]
    if shown.empty:
        return False
    fig, pairs = per_model_axes(shown, xlabel="k2")
    for ax, mr in pairs:
        g = grids[mr["model"]]
        t = g["test"]
        ax.grid(False)
        im = ax.imshow(t.to_numpy(), origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(t.columns)), [str(c) for c in t.columns], fontsize=7)
        ax.set_yticks(range(len(t.index)), [str(i) for i in t.index], fontsize=7)
        ax.set_ylabel("k1")
        ch = g["choice"]
        if len(ch):
            cols, rows = list(t.columns), list(t.index)
            ax.scatter([cols.index(k2) for k2 in ch["k2"]], [rows.index(k1) for k1 in ch["k1 (val)"]], s=40,
                       facecolors="none", edgecolors="red", linewidths=1.2, label="k1 chosen on validation")
        fig.colorbar(im, ax=ax, shrink=0.8, label="test accuracy (%)")
    figure_legend(fig, [ax for ax, _ in pairs])
    fig.savefig(path)
    return True
