"""A sweep folder's tables, read back, and the report's tables computed from them.

Reads what :mod:`dtd_ray.ray.sweep` wrote under its output root (see
:mod:`dtd_ray.report`); every table here is a plain function of the trial rows and
the analysis rows, so the markdown, the findings and the plots all share one set of
numbers.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dtd_ray.core import selection

MODE_LABELS = {"none": "decomposed", "head": "head retrained", "finetune": "fine-tuned"}


# ----------------------------------------------------------------------------- reading


@dataclass
class SweepOutput:
    root: str
    config: dict[str, Any]  # sweep_config.json
    trials: pd.DataFrame
    analysis: pd.DataFrame
    maps_files: dict[str, str]  # model -> maps parquet


def _read_dir(path: str) -> pd.DataFrame:
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def read_sweep(root: str) -> SweepOutput:
    """The tables of a sweep's output folder; a one-line ``FileNotFoundError`` if it holds no trials."""
    root = root.rstrip("/")
    trials = _read_dir(os.path.join(root, "trials"))
    if trials.empty:
        raise FileNotFoundError(f"{root}/trials holds no trial rows: run `python jobs/sweep.py --output {root}` first")
    cfg_path = os.path.join(root, "sweep_config.json")
    config = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    analysis = _read_dir(os.path.join(root, "decompose", "analysis"))
    maps_files = {}
    for f in sorted(glob.glob(os.path.join(root, "decompose", "maps", "**", "*.parquet"), recursive=True)):
        maps_files[os.path.splitext(os.path.basename(f))[0]] = f
    return SweepOutput(root=root, config=config, trials=trials, analysis=analysis, maps_files=maps_files)


def copy_tables(src: str, dst: str) -> None:
    """Copy the small tables a report is made from (not records) from sweep folder ``src`` to ``dst``."""
    for rel in ("trials", "decompose/analysis", "decompose/eval", "decompose/maps"):
        s, d = os.path.join(src, rel), os.path.join(dst, rel)
        if os.path.isdir(s):
            if os.path.isdir(d):
                shutil.rmtree(d)
            shutil.copytree(s, d)
    if os.path.exists(os.path.join(src, "sweep_config.json")):
        shutil.copy2(os.path.join(src, "sweep_config.json"), os.path.join(dst, "sweep_config.json"))


# ----------------------------------------------------------------------------- tables


def depth_of(backbone: str) -> int | None:
    """The depth in a backbone name (``cifar_resnet56`` → 56, ``resnet50`` → 50), else None."""
    m = re.search(r"resnet(\d+)$", backbone)
    return int(m.group(1)) if m else None


def accuracy_by_k(trials: pd.DataFrame, *, mode: str = "none", value: str = "acc_decomposed") -> pd.DataFrame:
    """Rows (model, strategy, k) of one retrain mode with ``value`` (k1 = k2 = k)."""
    d = trials[trials["retrain_mode"] == mode]
    return d.assign(k=d["k2"]).groupby(["model", "strategy", "k"], sort=True)[value].first().reset_index()


def accuracy_at(acc: pd.DataFrame, model: str, strategy: str, k: int) -> float:
    """One decomposed accuracy of an :func:`accuracy_by_k` table; NaN where that point was not run."""
    a = acc[(acc["model"] == model) & (acc["strategy"] == strategy) & (acc["k"] == k)]["acc_decomposed"]
    return float(a.iloc[0]) if len(a) else np.nan


def _num_classes(d: pd.DataFrame) -> int:
    r = d.iloc[0]
    return int(r["head_macs_decomposed"] // max(1, int(r["k2"])))


def model_table(trials: pd.DataFrame, analysis: pd.DataFrame) -> pd.DataFrame:
    """One row per model: backbone, depth, full accuracy, feature dim, Ψ (mean over classes of the per-class median)."""
    rows = []
    for model, d in trials.groupby("model", sort=False):
        backbone = str(d["backbone"].iloc[0])
        m = int(d["head_macs_full"].iloc[0] // max(1, _num_classes(d)))
        a = analysis[analysis["model"] == model] if not analysis.empty else analysis
        psi = a.drop_duplicates("class")["psi_median"] if not a.empty else pd.Series(dtype=float)
        rows.append({"model": model, "backbone": backbone, "depth": depth_of(backbone),
                     "dataset": str(d["dataset"].iloc[0]), "acc_full": float(d["acc_full"].iloc[0]),
                     "feature_dim": m, "psi_mean": float(psi.mean()) if len(psi) else np.nan,
                     "psi_min": float(psi.min()) if len(psi) else np.nan,
                     "psi_max": float(psi.max()) if len(psi) else np.nan})
    out = pd.DataFrame(rows)
    if not out.empty:
        out = out.sort_values(["dataset", "depth", "model"], na_position="last").reset_index(drop=True)
    return out


def headline_table(trials: pd.DataFrame, models: pd.DataFrame, *, k: int) -> pd.DataFrame:
    """Per model at k1 = k2 = k: full, decomposed per strategy, head-retrained and fine-tuned (frequency), Ψ, cost."""
    rows = []
    for _, mr in models.iterrows():
        d = trials[(trials["model"] == mr["model"]) & (trials["k2"] == k)]
        row: dict[str, Any] = {"model": mr["model"], "depth": mr["depth"], "full": mr["acc_full"]}
        none = d[d["retrain_mode"] == "none"].set_index("strategy")["acc_decomposed"]
        for s in selection.STRATEGIES:
            if s in none.index:
                row[s] = float(none[s])
        if "frequency" in none.index:
            row["gap (frequency)"] = mr["acc_full"] - float(none["frequency"])
        for mode in ("head", "finetune"):
            r = d[(d["retrain_mode"] == mode) & (d["strategy"] == "frequency")]["acc_retrained"]
            if len(r):
                row[f"{MODE_LABELS[mode]} (frequency)"] = float(r.iloc[0])
        row["Ψ"] = mr["psi_mean"]
        if len(d):
            row["head MACs"] = f"{int(d['head_macs_decomposed'].iloc[0])} / {int(d['head_macs_full'].iloc[0])}"
            row["channels used"] = int(d[(d["strategy"] == "frequency")]["channels_used"].iloc[0]) \
                if (d["strategy"] == "frequency").any() else None
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame, *, floatfmt: str = "{:.2f}") -> str:
    """``df`` as a GitHub markdown table; NaN and None as empty cells."""
    if df.empty:
        return "(no rows)\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, (float, np.floating)):
                cells.append("" if not np.isfinite(v) else floatfmt.format(v))
            elif v is None:
                cells.append("")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
