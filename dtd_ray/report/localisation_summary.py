"""The localisation summary: the table, the findings and the report section, with paired intervals.

Reads what :mod:`dtd_ray.stages.localise` wrote (``<root>/localisation/<model>__<background>.parquet``,
one row per image and method). Every mean is over the same images of one (model, background), and
every comparison (selected − another method; the selected-channel CAM − the CAM) is paired over
those images: one set of bootstrap resamples per (model, background)
(:func:`dtd_ray.core.stats.bootstrap_counts`) serves every number of it, so the interval of a
difference keeps the two scores' correlation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dtd_ray.core import stats
from dtd_ray.data import canvas as canvas_lib
from dtd_ray.io import storage
from dtd_ray.report.tables import markdown_table

METHOD_ORDER = ("selected", "other_class", "background_class", "random", "weight_l1", "contribution", "cam_selected",
                "cam", "uniform")
METHOD_LABELS = {
    "selected": "selected (frequency map)",
    "other_class": "another class's selected channels",
    "background_class": "the background class's selected channels",
    "random": "random channels",
    "weight_l1": "top-|W| channels",
    "contribution": "contribution map",
    "cam_selected": "CAM on the selected channels (W-weighted)",
    "cam": "CAM (all channels, W-weighted)",
    "uniform": "uniform map",
}
# The comparisons made: (subject, alternative) for every alternative a sweep has; the claim is "subject is better".
PAIRS_EXTRA = (("cam_selected", "cam"),)
GROUP = ["model", "background"]
SCORES = (("energy_in_box", "energy-in-box", 1.0), ("pointing", "pointing game", 100.0))  # column, name, scale


def _methods(df: pd.DataFrame) -> list[str]:
    have = set(df["method"])
    return [m for m in METHOD_ORDER if m in have] + sorted(have - set(METHOD_ORDER))


def _wide(d: pd.DataFrame, column: str) -> pd.DataFrame:
    """One model's scores as images × methods (a one-line error where a method misses an image)."""
    if d.duplicated(["image", "method"]).any():
        raise ValueError(f"{d['model'].iloc[0]} ({d['background'].iloc[0]}): an (image, method) appears twice: "
                         "rows of two runs are mixed in localisation/")
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
    for (model, bg), d in df.groupby(GROUP, sort=False):
        e, p = _wide(d, "energy_in_box"), _wide(d, "pointing")
        counts = _counts(len(e), n_boot, seed)
        empty = d.groupby("method")["empty_maps"].sum() / d.groupby("method")["n_maps"].sum() * 100
        for m in _methods(d):
            ee = stats.estimate(values=e[m].to_numpy(), counts=counts)
            pe = stats.estimate(values=p[m].to_numpy(), counts=counts).scaled(100.0)
            rows.append({"model": model, "background": bg, "method": m, "images": len(e),
                         "energy_in_box": ee.value, "energy_lo": ee.lo, "energy_hi": ee.hi,
                         "pointing": pe.value, "pointing_lo": pe.lo, "pointing_hi": pe.hi,
                         "empty_maps": float(empty.get(m, np.nan))})
    return pd.DataFrame(rows)


def localisation_differences(df: pd.DataFrame, *, n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per (model, background), alternative X and score: ``selected − X`` paired over images (and the
    selected-channel CAM − the CAM), its interval and verdict.

    Columns: ``model, background, subject, method, score, diff, lo, hi, verdict`` (energy-in-box in its
    own units, pointing in points of %); verdict of the claim "subject localises better than X"
    (:func:`dtd_ray.core.stats.verdict`, expect positive)."""
    rows: list[dict[str, Any]] = []
    for (model, bg), d in df.groupby(GROUP, sort=False):
        have = set(d["method"])
        if "selected" not in have:
            continue
        wide = {col: _wide(d, col) for col, _, _ in SCORES}
        counts = _counts(len(wide["energy_in_box"]), n_boot, seed)
        pairs = [("selected", x) for x in _methods(d) if x != "selected"]
        pairs += [(a, b) for a, b in PAIRS_EXTRA if {a, b} <= have]
        for subject, m in pairs:
            for col, name, scale in SCORES:
                w = wide[col]
                est = stats.estimate(values=(w[subject] - w[m]).to_numpy(), counts=counts).scaled(scale)
                rows.append({"model": model, "background": bg, "subject": subject, "method": m, "score": name,
                             "diff": est.value, "lo": est.lo, "hi": est.hi,
                             "verdict": stats.verdict(est, expect="positive")})
    return pd.DataFrame(rows)


def energy_by_outcome(df: pd.DataFrame, *, methods: tuple[str, ...] = ("selected", "cam"), n_boot: int = stats.N_BOOT,
                      seed: int = 0) -> pd.DataFrame:
    """Per (model, background, method): mean energy-in-box on the canvases the model classifies correctly and
    on those it gets wrong, and correct − wrong with its interval (one resample of all canvases per draw, the
    group means taken within it)."""
    rows: list[dict[str, Any]] = []
    for (model, bg), d in df.groupby(GROUP, sort=False):
        e = _wide(d, "energy_in_box")
        first = d.drop_duplicates("image").set_index("image").loc[e.index]
        ok = (first["pred"] == first["label"]).to_numpy()
        if ok.all() or not ok.any():
            continue
        c = _counts(len(e), n_boot, seed).astype(np.float64)
        for m in [x for x in methods if x in e]:
            v = e[m].to_numpy()
            right = (c[:, ok] @ v[ok]) / c[:, ok].sum(1)
            wrong = (c[:, ~ok] @ v[~ok]) / c[:, ~ok].sum(1)
            lo, hi = stats.percentile_interval(right - wrong)
            est = stats.Estimate(float(v[ok].mean() - v[~ok].mean()), lo, hi)
            rows.append({"model": model, "background": bg, "method": METHOD_LABELS.get(m, m),
                         "correct": float(v[ok].mean()), "wrong": float(v[~ok].mean()),
                         "images wrong": int((~ok).sum()), "correct − wrong [95 % CI]": est.text("{:.3f}")})
    return pd.DataFrame(rows)


def localisation_findings(df: pd.DataFrame, *, n_boot: int = stats.N_BOOT, seed: int = 0,
                          differences: pd.DataFrame | None = None) -> list[str]:
    """One line per model and alternative X: selected − X for both scores, with the 95 % interval
    and the verdict of "selected localises better than X" (supported / contradicted / not resolved)."""
    # ``differences``: this df's localisation_differences where the caller has them already
    diffs = localisation_differences(df, n_boot=n_boot, seed=seed) if differences is None else differences
    out = []
    for (model, bg, subject, m), g in diffs.groupby(["model", "background", "subject", "method"], sort=False):
        parts = []
        for _, r in g.iterrows():
            unit, fmt = (" points", "{:+.1f}") if r["score"] == "pointing game" else ("", "{:+.3f}")
            est = stats.Estimate(r["diff"], r["lo"], r["hi"])
            parts.append(f"{r['score']} {est.text(fmt)}{unit}: {r['verdict']}")
        out.append(f"{model}, {bg} background: {METHOD_LABELS.get(subject, subject)} localises better than "
                   f"{METHOD_LABELS.get(m, m)} — " + "; ".join(parts))
    return out


def read_localisation(root: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows under ``<root>/localisation/`` (empty where there are none) and its ``localise_config.json``."""
    where = storage.join(root.rstrip("/"), "localisation")
    fs, path = storage.resolve(where)
    if not storage.exists(fs, path):
        return pd.DataFrame(), {}
    files = [f for f in storage.list_files(where, suffix=".parquet") if not f.rsplit("/", 1)[-1].startswith("_")]
    # <model>__<background>.parquet; a <model>.parquet of an earlier version is read only where no newer
    # file of that model exists (its rows would be paired with another run's images)
    stems = [f.rsplit("/", 1)[-1][: -len(".parquet")] for f in files]
    newer = {s.split("__", 1)[0] for s in stems if "__" in s}
    files = [f for f, s in zip(files, stems) if "__" in s or s not in newer]
    frames = [pd.read_parquet(storage.resolve(f)[1], filesystem=fs) for f in files]
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
    settings = df.groupby(GROUP, sort=False)[["canvas", "k", "seed"]].first()
    n_img = df.groupby(GROUP, sort=False)["image"].nunique()
    s0 = settings.iloc[0]
    split = cfg.get("split", "test")
    area = float(df.loc[df["method"] == "uniform", "energy_in_box"].mean()) if (df["method"] == "uniform").any() \
        else float(((df["x1"] - df["x0"]) * (df["y1"] - df["y0"])).mean() / s0["canvas"] ** 2)
    backgrounds = list(dict.fromkeys(df["background"]))
    L.append(f"Does a class's map put its mass on the object? Each `{split}` image is pasted unchanged at a seeded "
             f"random position (seed {int(s0['seed'])}) on a {int(s0['canvas'])} × {int(s0['canvas'])} canvas whose "
             "background comes from an image of another class: "
             + "; ".join(f"`{b}`: {canvas_lib.DESCRIPTIONS.get(b, b)}" for b in backgrounds)
             + f" ({', '.join(f'{m} {b}: {n:,}' for (m, b), n in n_img.items())} images). Each model runs fully "
             f"convolutionally on the canvas. For the image's true class y, each map below (last block, before "
             f"pooling; k = {int(s0['k'])}) is upsampled bilinearly to the canvas and scored by **energy-in-box** (the "
             "share of its positive mass inside the pasted image's box; a map with no positive mass scores 0) and the "
             "**pointing game** (1 if its maximum lies in the box). The class-specific controls score *another* "
             "class's selected channels on the same canvas: a class y' that is neither y nor the background's "
             "(seeded per image), and the background donor's class. `random`: the mean score of "
             f"{int(df.loc[df['method'] == 'random', 'n_maps'].max()) if (df['method'] == 'random').any() else 0} "
             "random channel sets per class; `cam`: Σ_j W[y, j] A_j over all channels (Zhou et al.); `cam_selected` "
             "the same sum over the selected channels only; `uniform`: a constant map, i.e. the box's share of the "
             f"canvas ({100 * area:.1f} %), the chance level of both scores. Intervals: 95 %, percentile bootstrap over "
             f"the images ({stats.N_BOOT} resamples, paired across methods).")
    L += ["", "What this can show and what it cannot: the pasted image is the one region of the canvas with its own "
          "sharp content, so any map driven by image structure rather than class (edges, texture) also scores above "
          "chance, which is why random channels and the uniform map are not enough of a control. The other classes' "
          "selected channels are: if the selected channels of class y sit on a y object more than another class's "
          "selected channels do, the map is class-specific on this test; if they sit there as much, the test shows "
          "only that selected channels follow salient structure. Scrambled and noise backgrounds change what is "
          "salient off the object. No canvas says which part of an object a channel encodes, and a box holds "
          "background pixels of the pasted image too."]
    t = localisation_table(df)
    show = pd.DataFrame({
        # A "|" inside a cell ends it in markdown: escaped.
        "model": t["model"], "background": t["background"],
        "method": t["method"].map(lambda m: METHOD_LABELS.get(m, m).replace("|", "\\|")),
        "energy-in-box": [_interval(r.energy_in_box, r.energy_lo, r.energy_hi, "{:.3f}") for r in t.itertuples()],
        "pointing (%)": [_interval(r.pointing, r.pointing_lo, r.pointing_hi, "{:.1f}") for r in t.itertuples()],
        "empty maps (%)": t["empty_maps"],
    })
    L += ["", markdown_table(show)]
    acc = df[df["method"] == df["method"].iloc[0]].groupby(GROUP, sort=False).apply(
        lambda g: float((g["pred"] == g["label"]).mean() * 100), include_groups=False)
    L.append("On the canvases the models classify " + ", ".join(f"{m} ({b}) {a:.1f} %" for (m, b), a in acc.items())
             + " of the images correctly (the maps are scored for the true class either way).")
    by = energy_by_outcome(df)
    if len(by):
        L += ["", "Energy-in-box on the canvases classified correctly against those classified wrongly (a map that "
              "tracks the evidence the model uses should sit on the object more often where the model is right):", "",
              markdown_table(by, floatfmt="{:.3f}")]
    facts = localisation_findings(df, differences=differences)
    if facts:
        L += ["", "Each comparison, paired over the images (energy-in-box in its units, pointing in points of %); the "
              "verdict is that of \"the first localises better than the second\":", ""]
        L += [f"- {f}" for f in facts]
    L.append("")
    return L


__all__ = ["METHOD_LABELS", "METHOD_ORDER", "energy_by_outcome", "localisation_differences", "localisation_findings",
           "localisation_section", "localisation_table", "read_localisation"]
