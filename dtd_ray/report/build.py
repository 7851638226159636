"""The sweep report: markdown tables and PNG plots from a sweep's output folder.

Reads what :mod:`dtd_ray.ray.sweep` wrote under its output root::

    sweep_config.json                        the resolved config (models, weights, datasets, k grid)
    trials/<trial_id>.parquet                one row per trial (accuracies in %)
    decompose/analysis/<model>__….parquet    Ψ and the essentiality test per class at k = 5
    decompose/maps/…/<model>.parquet         the class maps (for the activation maps)

and writes ``report.md`` and ``plots/*.png`` (by default next to them):

- accuracy against k2 per model, one line per strategy (``accuracy_vs_k.png``);
- the gap to the full head against depth at a fixed k (``gap_vs_depth.png``);
- Ψ against depth (``psi_vs_depth.png``);
- retraining recovery (``retraining.png``) and head cost (``head_cost.png``);
- class-specific activation maps (``cam_<model>.png``): for a few test images per
  class, the class's selected channels of the last block (before pooling) summed
  and upsampled over the image, beside the same with the random strategy's channels.

The numbers in the markdown come from the tables; the "what the data says" lines are
computed from them (nothing is written in by hand). When the report goes to another
folder than the sweep's, the small tables it was made from (trials, analysis, maps,
eval, the resolved config) are copied beside it so that folder stands alone.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dtd_ray.io import tables
from dtd_ray import config as config_lib
from dtd_ray.core import selection

log = logging.getLogger(__name__)

# Stable colours per strategy across every plot.
STRATEGY_COLORS = {"frequency": "tab:blue", "weight_l1": "tab:orange", "contribution": "tab:green",
                   "random": "tab:gray"}
MODE_LABELS = {"none": "decomposed", "head": "head retrained", "finetune": "fine-tuned"}


@dataclass
class ReportConfig:
    sweep: str = "runs/quickstart"  # the sweep's output folder (sweep_config.json, trials/, decompose/)
    output: str | None = None  # where report.md and plots/ go (default: the sweep folder); another folder also gets the tables
    k: int = 5  # the fixed k of the depth plots and the headline table (must be in the sweep's grid)
    cam_images: int = 2  # test images per class in the activation maps (0: no activation maps)
    cam_models: tuple[str, ...] | None = None  # models (tags) to draw activation maps for (default: every model)
    cam_strategy: str = "frequency"  # the strategy whose selected channels the activation maps show
    cam_classes: int = 10  # at most this many classes (rows) per activation-map figure
    cam_correct_only: bool = True  # show only test images the model classifies correctly

    def __post_init__(self) -> None:
        config_lib.coerce_option_types(self)  # --cam_correct_only false, --k abc: typed, or one line
        if isinstance(self.cam_models, str):
            self.cam_models = tuple(s for s in self.cam_models.split(",") if s)
        if self.cam_models is not None:
            self.cam_models = tuple(self.cam_models)
        if self.cam_images < 0 or self.cam_classes < 1 or self.k < 1:
            raise ValueError("cam_images must be >= 0, cam_classes and k >= 1")


# ----------------------------------------------------------------------------- pure functions


def depth_of(backbone: str) -> int | None:
    """The depth in a backbone name (``cifar_resnet56`` → 56, ``resnet50`` → 50), else None."""
    m = re.search(r"resnet(\d+)$", backbone)
    return int(m.group(1)) if m else None


def last_block_maps(backbone: Any, x: torch.Tensor) -> torch.Tensor:
    """The output ``A`` (N, C, h, w) of the backbone's last conv block (before pooling), via a forward hook.

    ``backbone.blocks`` names the stages in forward order (see :class:`dtd_ray.models.backbones.Backbone`).
    """
    if not getattr(backbone, "blocks", None):
        raise ValueError(f"{getattr(backbone, 'name', 'backbone')} names no blocks: no channel maps")
    name, block = list(backbone.blocks.items())[-1]
    out: list[torch.Tensor] = []
    h = block.register_forward_hook(lambda _m, _i, o: out.append(o.detach()))
    try:
        with torch.inference_mode():
            backbone.forward_features(x)
    finally:
        h.remove()
    if not out or out[0].ndim != 4:
        raise ValueError(f"block {name!r} gave no (N, C, h, w) output")
    return out[0]


def class_activation_maps(*, feature_maps: Any, channels: Any, size: int) -> np.ndarray:
    """``M_n = up(Σ_{c ∈ channels[n]} A[n, c])``: the chosen channels summed, upsampled to ``size``².

    ``feature_maps`` A is (N, C, h, w); ``channels`` is (N, k) channel indices per
    instance (its class's map). ``up`` is bilinear interpolation (align_corners False)
    to ``size × size``. Returns (N, size, size) float32, not normalised.
    """
    a = torch.as_tensor(np.asarray(feature_maps), dtype=torch.float32)
    idx = torch.as_tensor(np.asarray(channels), dtype=torch.long)
    if a.ndim != 4 or idx.ndim != 2 or idx.shape[0] != a.shape[0]:
        raise ValueError(f"need feature maps (N, C, h, w) and channels (N, k), got {tuple(a.shape)} and {tuple(idx.shape)}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= a.shape[1]):
        raise ValueError(f"channel index out of range [0, {a.shape[1]})")
    picked = torch.gather(a, 1, idx[:, :, None, None].expand(-1, -1, a.shape[2], a.shape[3]))
    summed = picked.sum(1, keepdim=True)
    up = F.interpolate(summed, size=(size, size), mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


def accuracy_by_k(trials: pd.DataFrame, *, mode: str = "none", value: str = "acc_decomposed") -> pd.DataFrame:
    """Rows (model, strategy, k) of one retrain mode with ``value`` (k1 = k2 = k)."""
    d = trials[trials["retrain_mode"] == mode]
    out = d.assign(k=d["k2"]).groupby(["model", "strategy", "k"], sort=True)[value].first().reset_index()
    return out


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


def _num_classes(d: pd.DataFrame) -> int:
    r = d.iloc[0]
    return int(r["head_macs_decomposed"] // max(1, int(r["k2"])))


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


def findings(trials: pd.DataFrame, models: pd.DataFrame, *, k: int) -> list[str]:
    """Plain statements computed from the tables (what the data supports, and what it does not)."""
    out: list[str] = []
    acc = accuracy_by_k(trials)
    for dataset, mdf in models.groupby("dataset", sort=False):
        mdf = mdf.dropna(subset=["depth"]).sort_values("depth")
        if len(mdf) >= 2:
            gaps = []
            for _, r in mdf.iterrows():
                a = acc[(acc["model"] == r["model"]) & (acc["strategy"] == "frequency") & (acc["k"] == k)]["acc_decomposed"]
                gaps.append(r["acc_full"] - float(a.iloc[0]) if len(a) else np.nan)
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
                g = [r["acc_full"] - _acc(acc, r["model"], "frequency", kk) for _, r in mdf.iterrows()]
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


# ----------------------------------------------------------------------------- reading


def _read_dir(path: str) -> pd.DataFrame:
    files = sorted(glob.glob(os.path.join(path, "*.parquet")))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


@dataclass
class SweepOutput:
    root: str
    config: dict[str, Any]  # sweep_config.json
    trials: pd.DataFrame
    analysis: pd.DataFrame
    maps_files: dict[str, str]  # model -> maps parquet


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


# ----------------------------------------------------------------------------- plots


def _figure(w: float, h: float):
    # Object-oriented matplotlib (no pyplot): no global backend state, safe in Ray workers.
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _per_model_axes(models: pd.DataFrame, *, xlabel: str):
    """A figure with one subplot per model (3 per row; 4 models in 2 × 2), titled and labelled;
    returns ``(fig, [(ax, model row), …])`` with the spare subplots hidden."""
    n = len(models)
    cols = 2 if n == 4 else min(n, 3)
    rows = (n + cols - 1) // cols
    fig = _figure(3.6 * cols, 3.0 * rows)
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
    acc = accuracy_by_k(trials)
    fig, pairs = _per_model_axes(models, xlabel="k1 = k2 = k (features per class)")
    for ax, mr in pairs:
        d = acc[acc["model"] == mr["model"]]
        for s, ds in d.groupby("strategy", sort=False):
            ax.plot(ds["k"], ds["acc_decomposed"], marker="o", ms=3, label=s, color=STRATEGY_COLORS.get(s))
        ax.axhline(mr["acc_full"], color="black", ls=":", lw=1, label=f"full ({mr['acc_full']:.2f})")
    pairs[0][0].legend(fontsize=7)
    fig.suptitle("Decomposed head accuracy against k (no retraining)", fontsize=10)
    fig.savefig(path)


def plot_gap_vs_depth(trials: pd.DataFrame, models: pd.DataFrame, path: str, *, k: int) -> bool:
    m = models.dropna(subset=["depth"])
    if m.empty:
        return False
    acc = accuracy_by_k(trials)
    fig = _figure(8.0, 3.2)
    ax1, ax2 = fig.subplots(1, 2)
    for dataset, md in m.groupby("dataset", sort=False):
        md = md.sort_values("depth")
        for s in selection.STRATEGIES:
            gaps = [mr["acc_full"] - _acc(acc, mr["model"], s, k) for _, mr in md.iterrows()]
            if np.isfinite(gaps).any():
                ax1.plot(md["depth"], gaps, marker="o", label=f"{s}" + (f" ({dataset})" if m["dataset"].nunique() > 1 else ""),
                         color=STRATEGY_COLORS.get(s))
        ks = sorted(set(acc["k"]))
        for kk in [x for x in (1, 2, 3, 5, 10, 20) if x in ks]:
            gaps = [mr["acc_full"] - _acc(acc, mr["model"], "frequency", kk) for _, mr in md.iterrows()]
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


def _shrinks_overall(acc: pd.DataFrame, mdf: pd.DataFrame) -> int:
    """k values at which the deepest model's gap is smaller than the shallowest's (frequency)."""
    first, last = mdf.iloc[0], mdf.iloc[-1]
    n = 0
    for kk in sorted(set(acc["k"])):
        g0 = first["acc_full"] - _acc(acc, first["model"], "frequency", kk)
        g1 = last["acc_full"] - _acc(acc, last["model"], "frequency", kk)
        n += int(g1 < g0)
    return n


def _acc(acc: pd.DataFrame, model: str, strategy: str, k: int) -> float:
    a = acc[(acc["model"] == model) & (acc["strategy"] == strategy) & (acc["k"] == k)]["acc_decomposed"]
    return float(a.iloc[0]) if len(a) else np.nan


def plot_psi_vs_depth(models: pd.DataFrame, path: str) -> bool:
    m = models.dropna(subset=["depth", "psi_mean"])
    if m.empty:
        return False
    fig = _figure(4.2, 3.2)
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
    if not trials["retrain_mode"].isin(["head", "finetune"]).any():
        return False
    fig, pairs = _per_model_axes(models, xlabel="k")
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
    fig = _figure(4.8, 3.4)
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


# ----------------------------------------------------------------------------- activation maps


def _exists(p: str | None) -> bool:
    return bool(p) and "://" not in p and os.path.exists(p)


def _resolve_path(p: str | None) -> str | None:
    """A configured local path as it exists from here: as given (relative to the working
    folder, as the sweep read it), else against the project folder, else unchanged."""
    if p is None or "://" in p or os.path.isabs(p) or os.path.exists(p) or p in ("default",):
        return p
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cand = os.path.join(project, p)
    return cand if os.path.exists(cand) else p


def cam_figure(
    *,
    unit: dict[str, Any],
    maps_file: str,
    k: int,
    strategy: str,
    n_images: int,
    max_classes: int,
    split: str,
    path: str,
    correct_only: bool = True,
) -> dict[str, Any]:
    """Draw the activation-map figure of one model; returns what it showed (or why not)."""
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.data.sources import parse_source, prepare_batch
    from dtd_ray.models.runtime import normalize_images

    # The sweep's absolute paths where they exist here, else the configured ones from here.
    weights = unit.get("weights_abs") if _exists(unit.get("weights_abs")) else _resolve_path(unit.get("weights"))
    backbone = get_backbone(unit["backbone"], weights=weights, normalization=unit.get("normalization"))
    backbone.eval()
    maps = pd.read_parquet(maps_file)
    k1 = k if strategy == "frequency" else selection.K1_NOT_APPLICABLE
    sel = tables.map_from_table(maps, strategy=strategy, k1=k1, k2=k).idx
    rnd = tables.map_from_table(maps, strategy="random", k1=selection.K1_NOT_APPLICABLE, k2=k).idx \
        if (maps["strategy"] == "random").any() else \
        selection.select_random(num_classes=sel.shape[0], feature_dim=backbone.feature_dim, k2=k, seed=0).idx
    kind, sep, where = str(unit["dataset"]).partition(":")
    if sep and _exists(str(unit.get("dataset_abs", "")).partition(":")[2]):
        src = parse_source(unit["dataset_abs"])
    else:
        src = parse_source(f"{kind}:{_resolve_path(where)}" if sep and "://" not in where else unit["dataset"])
    cols = src.read_numpy(split)
    labels = np.asarray(cols["label"])
    C = min(backbone.num_classes, max_classes)
    pre = backbone.preprocessing
    mean = torch.tensor(pre.mean, dtype=torch.float32)
    std = torch.tensor(pre.std, dtype=torch.float32)
    picked: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # class, image, cam sel, cam rnd
    with torch.inference_mode():
        for c in range(C):
            rows = np.flatnonzero(labels == c)[: 8 * max(1, n_images)]
            if not len(rows):
                continue
            batch = {name: np.asarray(v)[rows] for name, v in cols.items()}
            prep = prepare_batch(batch, preprocessing=pre)
            ok = prep["ok"]
            imgs = prep["image"][ok]
            x = normalize_images(torch.from_numpy(np.ascontiguousarray(imgs)), mean=mean, std=std)
            a = last_block_maps(backbone, x)
            if a.shape[1] != backbone.feature_dim:
                raise ValueError(f"{unit['key']}: the last block has {a.shape[1]} channels but the head "
                                 f"reads {backbone.feature_dim} features; channel maps do not match the map")
            pred = backbone.head(a.mean((2, 3))).argmax(1).numpy()
            good = np.flatnonzero((pred == c) | (not correct_only))[:n_images]
            if not len(good):
                continue
            cs = class_activation_maps(feature_maps=a[good], channels=np.repeat(sel[c][None], len(good), 0),
                                       size=imgs.shape[1])
            cr = class_activation_maps(feature_maps=a[good], channels=np.repeat(rnd[c][None], len(good), 0),
                                       size=imgs.shape[1])
            for j, g in enumerate(good):
                picked.append((c, imgs[g], cs[j], cr[j]))
    if not picked:
        return {"model": unit["key"], "shown": 0,
                "reason": "no correctly classified test image" if correct_only else "no test image"}
    classes = list(src.classes)[:C]
    rows_c = sorted({p[0] for p in picked})
    ncol = 3 * n_images
    fig = _figure(1.25 * ncol, 1.3 * len(rows_c) + 0.5)
    axes = fig.subplots(len(rows_c), ncol, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    # One colour scale per image for both maps (the larger of the two maxima), so the
    # random channels' map is drawn weaker where its activations are weaker.
    ratio = []
    for r, c in enumerate(rows_c):
        items = [p for p in picked if p[0] == c]
        for j, (_, img, ms, mr_) in enumerate(items):
            vmax = max(float(ms.max()), float(mr_.max()), 1e-8)
            ratio.append(float(ms.sum()) / max(float(mr_.sum()), 1e-8))
            grey = img[..., 0] if img.shape[-1] == 1 else None
            for col, (m, title) in enumerate([(None, "image"), (ms, f"{strategy} k={k}"), (mr_, f"random k={k}")]):
                ax = axes[r, 3 * j + col]
                if grey is not None:
                    ax.imshow(grey, cmap="gray")
                else:
                    ax.imshow(img)
                if m is not None:
                    ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
                if r == 0:
                    ax.set_title(title, fontsize=7)
            axes[r, 3 * j].text(-0.1, 0.5, classes[c] if j == 0 else "", transform=axes[r, 3 * j].transAxes,
                                ha="right", va="center", fontsize=7)
    fig.suptitle(f"{unit['key']}: last-block channels of the class's map (k = {k}) vs random channels", fontsize=9)
    fig.savefig(path)
    return {"model": unit["key"], "shown": len(picked), "classes": len(rows_c),
            "mass_ratio_median": float(np.median(ratio))}


# ----------------------------------------------------------------------------- the report


def _md_table(df: pd.DataFrame, *, floatfmt: str = "{:.2f}") -> str:
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


def make_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write ``report.md`` and ``plots/*.png``; returns paths, findings and the headline table."""
    t0 = time.perf_counter()
    sw = read_sweep(cfg.sweep)
    out = (cfg.output or sw.root).rstrip("/")
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    if os.path.abspath(out) != os.path.abspath(sw.root):
        copy_tables(sw.root, out)
    trials = sw.trials
    ks = sorted(set(int(x) for x in trials["k2"]))
    if cfg.k not in ks:
        raise ValueError(f"--k {cfg.k} is not in the sweep's k grid {ks}")
    models = model_table(trials, sw.analysis)
    head = headline_table(trials, models, k=cfg.k)
    facts = findings(trials, models, k=cfg.k)
    plots: dict[str, str] = {}

    def _p(name: str) -> str:
        return os.path.join(out, "plots", name)

    print(f"[report] {len(trials)} trial rows, {len(models)} model(s) -> {out}", flush=True)
    plot_accuracy_vs_k(trials, models, _p("accuracy_vs_k.png"))
    plots["Accuracy against k"] = "plots/accuracy_vs_k.png"
    if plot_gap_vs_depth(trials, models, _p("gap_vs_depth.png"), k=cfg.k):
        plots["Gap to the full head against depth"] = "plots/gap_vs_depth.png"
    if plot_psi_vs_depth(models, _p("psi_vs_depth.png")):
        plots["Ψ against depth"] = "plots/psi_vs_depth.png"
    if plot_retraining(trials, models, _p("retraining.png")):
        plots["Retraining recovery"] = "plots/retraining.png"
    plot_head_cost(trials, models, _p("head_cost.png"))
    plots["Head cost"] = "plots/head_cost.png"

    cams: list[dict[str, Any]] = []
    units = {u["key"]: u for u in sw.config.get("resolved", {}).get("units", [])}
    eval_split = sw.config.get("config", {}).get("eval_split", "test")
    if cfg.cam_images > 0:
        for model in (cfg.cam_models if cfg.cam_models is not None else list(models["model"])):
            if model not in units or model not in sw.maps_files:
                cams.append({"model": model, "shown": 0, "reason": "no resolved unit or maps for it in the sweep folder"})
                continue
            print(f"[report] activation maps of {model}", flush=True)
            try:
                info = cam_figure(unit=units[model], maps_file=sw.maps_files[model], k=cfg.k, strategy=cfg.cam_strategy,
                                  n_images=cfg.cam_images, max_classes=cfg.cam_classes, split=eval_split,
                                  path=_p(f"cam_{model}.png"), correct_only=cfg.cam_correct_only)
            except (FileNotFoundError, ValueError, OSError) as e:
                # The tables and the other plots need neither weights nor images: say why and go on.
                info = {"model": model, "shown": 0, "reason": str(e).splitlines()[0]}
            if info.get("shown"):
                plots[f"Activation maps, {model}"] = f"plots/cam_{model}.png"
            else:
                print(f"[report] no activation maps for {model}: {info.get('reason')}", flush=True)
            cams.append(info)

    md = _render(cfg, sw, trials, models, head, facts, plots, cams, ks)
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write(md)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out, "report_config.json"), "w") as f:
        json.dump({"config": {**cfg.__dict__, "cam_models": list(cfg.cam_models) if cfg.cam_models else None},
                   "cams": cams}, f, indent=2)
    print(f"[report] wrote {path} and {len(plots)} plot(s) in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"report": path, "plots": {k: os.path.join(out, v) for k, v in plots.items()}, "findings": facts,
            "headline": head, "models": models, "cams": cams}


def _render(cfg, sw, trials, models, head, facts, plots, cams, ks) -> str:
    name = str(trials["sweep"].iloc[0])
    started = sw.config.get("started_at", "?")
    versions = sw.config.get("versions", {})
    L = [f"# dtd-ray sweep report: {name}", ""]
    again = f"--sweep {sw.root}" + (f" --output {cfg.output}" if cfg.output else "")
    L.append(f"Made by `python jobs/report.py {again}` from {len(trials)} trial rows "
             f"(sweep started {started}; {', '.join(f'{k} {v}' for k, v in versions.items() if k in ('ray', 'torch'))}). "
             f"Accuracies are % on the `{trials['eval_split'].iloc[0]}` split; the maps were selected on "
             f"`{trials['select_split'].iloc[0]}`; k1 = k2 = k.")
    L += ["", f"## Headline at k = {cfg.k}", ""]
    L.append(_md_table(head))
    L.append("Columns: `full` the original head; one column per strategy, the decomposed head without "
             "retraining; `gap` full − frequency; the retrained heads (frequency map); Ψ the mean over classes "
             "of the per-class median Ψ (q = 0.9) of the penultimate features; head MACs decomposed / full per "
             "instance; channels used ∪ I_y.")
    L += ["", "## What the data says", ""]
    L += [f"- {f}" for f in facts] or ["- (too few points)"]
    L += ["", "## Decomposed accuracy against k (no retraining)", ""]
    acc = accuracy_by_k(trials)
    for s in [s for s in selection.STRATEGIES if s in set(acc["strategy"])]:
        piv = acc[acc["strategy"] == s].pivot_table(index="model", columns="k", values="acc_decomposed")
        piv = piv.reindex([m for m in models["model"] if m in piv.index])
        piv.insert(0, "full", models.set_index("model")["acc_full"].reindex(piv.index))
        piv.columns = [str(c) if c == "full" else f"k={c}" for c in piv.columns]
        L += [f"**{s}**", "", _md_table(piv.reset_index())]
    rt = trials[trials["retrain_mode"] != "none"]
    if len(rt):
        L += ["## Retraining", ""]
        t = rt.assign(k=rt["k2"]).pivot_table(index=["model", "strategy", "k"], columns="retrain_mode",
                                              values="acc_retrained", aggfunc="first")
        base = acc.set_index(["model", "strategy", "k"])["acc_decomposed"]
        t.insert(0, "decomposed", base.reindex(t.index))
        t = t[["decomposed"] + [m for m in ("head", "finetune") if m in t.columns]]
        t.columns = [MODE_LABELS.get(c, c) for c in t.columns]
        secs = rt.groupby("retrain_mode")["seconds"].median()
        L.append(_md_table(t.reset_index()))
        L.append("Median trial wall time: " + ", ".join(f"{MODE_LABELS[m]} {s:.1f} s" for m, s in secs.items()) + ".")
        L.append("")
    if not sw.analysis.empty:
        L += [f"## Essentiality and Ψ (k = 5, {sw.analysis['split'].iloc[0]} split)", ""]
        a = sw.analysis.groupby(["model", "strategy"], sort=False)[
            ["acc_clean", "acc_selected_noise", "acc_others_noise"]].mean() * 100
        L.append(_md_table(a.reset_index()))
        L.append("Mean per-class accuracy (%) with the class's k selected features replaced by noise "
                 "(`acc_selected_noise`) against the other m − k features replaced (`acc_others_noise`).")
        L.append("")
    L += ["## Head cost", ""]
    hc = trials[(trials["retrain_mode"] == "none") & (trials["strategy"] == "frequency")]
    hc = hc.assign(k=hc["k2"]).pivot_table(index="model", columns="k", values="channels_used", aggfunc="first")
    if len(hc):
        hc.columns = [f"k={c}" for c in hc.columns]
        L.append("Channels of the last block any class uses (|∪_y I_y|, frequency maps); the decomposed head "
                 "costs C·k multiply-adds per instance against C·m for the full head.")
        L.append("")
        L.append(_md_table(models.set_index("model")[["feature_dim"]].join(hc).reset_index(), floatfmt="{:.0f}"))
    if cams:
        L += ["## Class-specific activation maps", ""]
        L.append(f"For the first {'correctly classified ' if cfg.cam_correct_only else ''}`{sw.config.get('config', {}).get('eval_split', 'test')}` "
                 f"images of each class: the image, the sum of the class's {cfg.cam_strategy} channels (k = {cfg.k}) "
                 "of the last block before pooling, upsampled over it, and the same with the random strategy's "
                 "channels, both on one colour scale per image. `mass ratio`: median over images of the selected "
                 "map's total activation over the random map's.")
        L.append("")
        L.append(_md_table(pd.DataFrame(cams)))
    L += ["## Plots", ""]
    for title, p in plots.items():
        L += [f"### {title}", "", f"![{title}]({p})", ""]
    return "\n".join(L)
