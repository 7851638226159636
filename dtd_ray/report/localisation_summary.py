"""The localisation summary: the table, the findings and the report section, with paired intervals.

Reads what :mod:`dtd_ray.stages.localise` wrote (``<root>/localisation/<model>.parquet``, one
row per image and method). Every mean is over the same images of one model, and every
comparison (selected − another method) is paired over those images: one set of bootstrap
resamples per model (:func:`dtd_ray.core.stats.bootstrap_counts`) serves every number of
that model, so the interval of a difference keeps the two scores' correlation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dtd_ray.core import stats
from dtd_ray.data import canvas as canvas_lib
from dtd_ray.io import storage
from dtd_ray.report.tables import markdown_table

METHOD_ORDER = ("selected", "random", "weight_l1", "contribution", "cam", "uniform")
METHOD_LABELS = {
    "selected": "selected (frequency map)",
    "random": "random channels",
    "weight_l1": "top-|W| channels",
    "contribution": "contribution map",
    "cam": "CAM (all channels, W-weighted)",
    "uniform": "uniform map",
}
SCORES = (("energy_in_box", "energy-in-box", 1.0), ("pointing", "pointing game", 100.0))  # column, name, scale


def _methods(df: pd.DataFrame) -> list[str]:
    have = set(df["method"])
    return [m for m in METHOD_ORDER if m in have] + sorted(have - set(METHOD_ORDER))


def _wide(d: pd.DataFrame, column: str) -> pd.DataFrame:
    """One model's scores as images × methods (a one-line error where a method misses an image)."""
    w = d.pivot_table(index="image", columns="method", values=column, aggfunc="first")
    if w.isna().any().any():
        raise ValueError(f"{d['model'].iloc[0]}: {column} is missing for some (image, method): the rows are not paired")
    return w


def _counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    return stats.bootstrap_counts(n=n, n_boot=n_boot, seed=seed)


def localisation_table(df: pd.DataFrame, *, n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per model and method: images, mean energy-in-box and pointing accuracy (%) with 95 % intervals.

    Columns: ``model, method, images, energy_in_box, energy_lo, energy_hi, pointing, pointing_lo,
    pointing_hi, empty_maps`` (maps with no positive mass, % of the maps scored; each scored 0).
    Intervals: percentile bootstrap over the model's images (:mod:`dtd_ray.core.stats`)."""
    rows: list[dict[str, Any]] = []
    for model, d in df.groupby("model", sort=False):
        e, p = _wide(d, "energy_in_box"), _wide(d, "pointing")
        counts = _counts(len(e), n_boot, seed)
        empty = d.groupby("method")["empty_maps"].sum() / d.groupby("method")["n_maps"].sum() * 100
        for m in _methods(d):
            ee = stats.estimate(values=e[m].to_numpy(), counts=counts)
            pe = stats.estimate(values=p[m].to_numpy(), counts=counts).scaled(100.0)
            rows.append({"model": model, "method": m, "images": len(e),
                         "energy_in_box": ee.value, "energy_lo": ee.lo, "energy_hi": ee.hi,
                         "pointing": pe.value, "pointing_lo": pe.lo, "pointing_hi": pe.hi,
                         "empty_maps": float(empty.get(m, np.nan))})
    return pd.DataFrame(rows)


def localisation_differences(df: pd.DataFrame, *, n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per model, alternative X and score: ``selected − X`` paired over images, its interval and verdict.

    Columns: ``model, method, score, diff, lo, hi, verdict`` (energy-in-box in its own units,
    pointing in points of %); verdict of the claim "selected localises better than X"
    (:func:`dtd_ray.core.stats.verdict`, expect positive)."""
    rows: list[dict[str, Any]] = []
    for model, d in df.groupby("model", sort=False):
        if "selected" not in set(d["method"]):
            continue
        wide = {col: _wide(d, col) for col, _, _ in SCORES}
        counts = _counts(len(wide["energy_in_box"]), n_boot, seed)
        for m in [x for x in _methods(d) if x != "selected"]:
            for col, name, scale in SCORES:
                w = wide[col]
                est = stats.estimate(values=(w["selected"] - w[m]).to_numpy(), counts=counts).scaled(scale)
                rows.append({"model": model, "method": m, "score": name, "diff": est.value, "lo": est.lo,
                             "hi": est.hi, "verdict": stats.verdict(est, expect="positive")})
    return pd.DataFrame(rows)


def localisation_findings(df: pd.DataFrame, *, n_boot: int = stats.N_BOOT, seed: int = 0,
                          differences: pd.DataFrame | None = None) -> list[str]:
    """One line per model and alternative X: selected − X for both scores, with the 95 % interval
    and the verdict of "selected localises better than X" (supported / contradicted / not resolved)."""
    # ``differences``: this df's localisation_differences where the caller has them already
    diffs = localisation_differences(df, n_boot=n_boot, seed=seed) if differences is None else differences
    out = []
    for (model, m), g in diffs.groupby(["model", "method"], sort=False):
        parts = []
        for _, r in g.iterrows():
            unit, fmt = (" points", "{:+.1f}") if r["score"] == "pointing game" else ("", "{:+.3f}")
            est = stats.Estimate(r["diff"], r["lo"], r["hi"])
            parts.append(f"{r['score']} {est.text(fmt)}{unit}: {r['verdict']}")
        out.append(f"{model}: selected localises better than {METHOD_LABELS.get(m, m)} — " + "; ".join(parts))
    return out


def read_localisation(root: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows under ``<root>/localisation/`` (empty where there are none) and its ``localise_config.json``."""
    where = storage.join(root.rstrip("/"), "localisation")
    fs, path = storage.resolve(where)
    if not storage.exists(fs, path):
        return pd.DataFrame(), {}
    files = storage.list_files(where, suffix=".parquet")
    frames = [pd.read_parquet(storage.resolve(f)[1], filesystem=fs) for f in files
              if not f.rsplit("/", 1)[-1].startswith("_")]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return df, storage.read_json(fs, f"{path}/localise_config.json") or {}


def _interval(v: float, lo: float, hi: float, fmt: str) -> str:
    return stats.Estimate(v, lo, hi).text(fmt)


def localisation_section(root: str, *, differences: pd.DataFrame | None = None) -> list[str]:
    """Markdown lines of the report's "## Localisation" section, or ``[]`` where ``<root>/localisation/`` holds no rows."""
    df, cfg = read_localisation(root)
    if df.empty:
        return []
    L = ["## Localisation", ""]
    settings = df.groupby("model", sort=False)[["canvas", "background", "k", "seed"]].first()
    n_img = df.groupby("model", sort=False)["image"].nunique()
    s0 = settings.iloc[0]
    # Described from the rows themselves (the config names only the latest run's settings).
    bg = canvas_lib.DESCRIPTIONS.get(s0["background"], f"`{s0['background']}`") \
        if len(settings.drop_duplicates()) == 1 else "one of the backgrounds listed below"
    split = cfg.get("split", "test")
    area = float(df.loc[df["method"] == "uniform", "energy_in_box"].mean()) if (df["method"] == "uniform").any() \
        else float(((df["x1"] - df["x0"]) * (df["y1"] - df["y0"])).mean() / s0["canvas"] ** 2)
    L.append(f"Does a class's map put its mass on the object? Each `{split}` image "
             f"({', '.join(f'{m}: {n:,}' for m, n in n_img.items())} images) is pasted unchanged at a seeded random "
             f"position (seed {int(s0['seed'])}) on a {int(s0['canvas'])} × {int(s0['canvas'])} canvas whose background "
             f"is {bg}; each model runs fully convolutionally on the canvas. For the image's true class y, each map "
             f"below (last block, before pooling; k = {int(s0['k'])}) is upsampled bilinearly to the canvas and scored by "
             "**energy-in-box** (the share of its positive mass inside the pasted image's box; a map with no positive "
             "mass scores 0) and the **pointing game** (1 if its maximum lies in the box). `random`: the mean score of "
             f"{int(df.loc[df['method'] == 'random', 'n_maps'].max()) if (df['method'] == 'random').any() else 0} "
             "random channel sets per class; `cam`: Σ_j W[y, j] A_j over all channels (Zhou et al.); `uniform`: a "
             f"constant map, i.e. the box's share of the canvas ({100 * area:.1f} %), the chance level of both scores. "
             f"Intervals: 95 %, percentile bootstrap over the images ({stats.N_BOOT} resamples, paired across methods).")
    if len(settings.drop_duplicates()) > 1:
        L.append("")
        L.append("The models were measured with different settings: " + "; ".join(
            f"{m}: canvas {int(r['canvas'])}, {r['background']}, k = {int(r['k'])}, seed {int(r['seed'])}"
            for m, r in settings.iterrows()) + ".")
    t = localisation_table(df)
    show = pd.DataFrame({
        # A "|" inside a cell ends it in markdown: escaped.
        "model": t["model"], "method": t["method"].map(lambda m: METHOD_LABELS.get(m, m).replace("|", "\\|")),
        "energy-in-box": [_interval(r.energy_in_box, r.energy_lo, r.energy_hi, "{:.3f}") for r in t.itertuples()],
        "pointing (%)": [_interval(r.pointing, r.pointing_lo, r.pointing_hi, "{:.1f}") for r in t.itertuples()],
        "empty maps (%)": t["empty_maps"],
    })
    L += ["", markdown_table(show)]
    acc = df[df["method"] == df["method"].iloc[0]].groupby("model", sort=False).apply(
        lambda g: float((g["pred"] == g["label"]).mean() * 100), include_groups=False)
    L.append("On the canvases the models classify " + ", ".join(f"{m} {a:.1f} %" for m, a in acc.items())
             + " of the images correctly (the maps are scored for the true class either way).")
    facts = localisation_findings(df, differences=differences)
    if facts:
        L += ["", "Selected − each alternative, paired over the images (energy-in-box in its units, pointing in points "
              "of %); the verdict is that of \"selected localises better than X\":", ""]
        L += [f"- {f}" for f in facts]
    L.append("")
    return L


__all__ = ["METHOD_LABELS", "METHOD_ORDER", "localisation_differences", "localisation_findings",
           "localisation_section", "localisation_table", "read_localisation"]
