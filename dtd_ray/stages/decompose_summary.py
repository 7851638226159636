"""What ``jobs/decompose.py`` prints: the comparison of the strategies at k1 = k2 = k, the
imported maps, the essentiality test, Ψ and the warnings of one decomposition."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dtd_ray.core import selection
from dtd_ray.core.kgrid import parse_k_grid


def _print_ks(cfg: Any, grid: np.ndarray) -> list[int]:
    if cfg.print_k is not None:
        return [int(k) for k in parse_k_grid(cfg.print_k, kmax=int(grid[-1]), name="k1")]
    nice = {1, 2, 3, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 200, 256, 500, 512, 1000, 1024, 2048}
    g = [int(k) for k in grid]
    return g if len(g) <= 12 else [k for k in g if k in nice or k == g[-1]]


def comparison_tables(df: pd.DataFrame, ks: list[int], strategies: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy (%) and channels used per strategy at k1 = k2 = k (k1-independent strategies: k2 = k)."""
    diag = df[df["strategy"].isin(strategies) & df["k2"].isin(ks)]
    diag = diag[(diag["k1"] == diag["k2"]) | (diag["k1"] == selection.K1_NOT_APPLICABLE)]
    acc = (diag.pivot_table(index="k2", columns="strategy", values="acc_decomposed", aggfunc="first") * 100).round(2)
    acc = acc[[s for s in strategies if s in acc.columns]]
    acc.insert(0, "full", round(float(df["acc_full"].iloc[0]) * 100, 2))
    used = diag.pivot_table(index="k2", columns="strategy", values="channels_used", aggfunc="first")
    used = used[[s for s in strategies if s in used.columns]].astype(int)
    acc.index.name = used.index.name = "k"
    acc.columns.name = used.columns.name = None
    return acc, used


def print_report(
    cfg: Any,  # a DecomposeConfig
    *,
    df: pd.DataFrame,
    maps: list[selection.ClassMap],
    grid: np.ndarray,
    manifest: dict[str, Any],
    psi_median: np.ndarray | None,
    brief: bool = False,
) -> None:
    """The comparison tables (accuracy, channels used), imported maps, essentiality, Ψ, warnings;
    ``brief``: the warnings only."""
    m = int(manifest["head"]["feature_dim"])
    n = int(manifest["eval"]["rows"])
    asummary, warnings, timings = manifest["analysis"], manifest["warnings"], manifest["timings_s"]
    written = manifest["outputs"]
    if brief:
        for w_ in warnings:
            print(f"[decompose] warning: {w_}", flush=True)
        return
    ks = _print_ks(cfg, grid)
    print(f"[decompose] {cfg.model}: maps from {cfg.select_key}"
          f"{' (correct only)' if cfg.correct_only else ''}, evaluated on {cfg.split} ({n} instances); "
          f"accuracy % at k1 = k2 = k (k1-independent strategies: k2 = k):")
    acc_t, used_t = comparison_tables(df, ks, cfg.strategies)
    print(acc_t.to_string())
    print(f"[decompose] channels used |∪ I_y| (of m = {m}; the rest could be pruned):")
    print(used_t.to_string())
    for name in [cm.strategy for cm in maps if not cm.nested]:
        r = df[df["strategy"] == name].iloc[-1]
        print(f"[decompose] {name} (k2={int(r['k2'])}): {100 * r['acc_decomposed']:.2f} %, "
              f"channels used {int(r['channels_used'])}")
    if asummary and psi_median is not None:
        # the random strategy has one row per map seed: print their mean
        ess = pd.DataFrame(asummary).drop(columns=["map_seed"]).groupby("strategy", sort=False).mean()
        for c in ("mean_acc_clean", "mean_acc_selected_noise", "mean_acc_others_noise"):
            ess[c] = (ess[c] * 100).round(2)
        ess.columns = [c.replace("mean_acc_", "acc%_") for c in ess.columns]
        print(f"[decompose] essentiality at k = {cfg.analysis_k} (mean per-class accuracy on {cfg.split}; "
              f"noise N(0,1) in the selected / the other features; mean of {cfg.noise_seeds} noise draw(s)"
              f"{f' and {cfg.random_seeds} random maps' if 'random' in cfg.strategies else ''}):")
        print(ess.to_string())
        if np.isfinite(psi_median).any():
            print(f"[decompose] Ψ (q = {cfg.psi_q}) of the penultimate features, median per class: "
                  f"{np.nanmin(psi_median):.3f}..{np.nanmax(psi_median):.3f}")
    for w_ in warnings:
        print(f"[decompose] warning: {w_}")
    print(f"[decompose] {len(df)} rows -> {written['eval']} ({timings['total']:.1f} s; reduce {timings['reduce']:.2f} s, "
          f"evaluate {timings['evaluate']:.2f} s)", flush=True)
