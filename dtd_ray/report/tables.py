"""A sweep folder's tables, read back, and the report's tables computed from them.

Reads what :mod:`dtd_ray.ray.sweep` wrote under its output root (see
:mod:`dtd_ray.report`); every table here is a plain function of the trial rows and
the analysis rows, so the markdown, the findings and the plots all share one set of
numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from dtd_ray.core import selection
from dtd_ray.io import layout, schema, storage

MODE_LABELS = {"none": "decomposed", "head": "head retrained", "finetune": "fine-tuned"}


# ----------------------------------------------------------------------------- reading


@dataclass
class SweepOutput:
    root: str
    config: dict[str, Any]  # sweep_config.json
    trials: pd.DataFrame  # one row per cell: lr chosen on validation (protocol.choose_on_val), no controls
    analysis: pd.DataFrame
    maps_files: dict[str, str]  # model -> maps parquet
    with_controls: pd.DataFrame | None = None  # ``trials`` and the full-head control rows (strategy full)
    choices: pd.DataFrame | None = None  # what the validation split chose (protocol.choose_on_val)
    eval_test: pd.DataFrame | None = None  # decompose's eval table of the sweep's selection, eval split
    eval_val: pd.DataFrame | None = None  # … and on the validation split (None without one)


def read_dir(path: str) -> pd.DataFrame:
    """The Parquet files directly in folder ``path`` (a local path or a URI), one DataFrame."""
    files = storage.list_files(path, suffix=".parquet")
    if not files:
        return pd.DataFrame()
    fs, _ = storage.resolve(path)
    return pd.concat([pd.read_parquet(storage.resolve(f)[1], filesystem=fs) for f in files], ignore_index=True)


def read_sweep(root: str) -> SweepOutput:
    """The tables of a sweep's output folder (a local path or a URI such as ``s3://bucket/run``);
    a one-line ``FileNotFoundError`` if it holds no trials. ``maps_files`` are paths or URIs like ``root``."""
    root = root.rstrip("/")
    from dtd_ray.report.protocol import choose_on_val  # protocol reads this module's tables

    raw = read_dir(storage.join(root, "trials"))
    if raw.empty:
        raise FileNotFoundError(f"{root}/trials holds no trial rows: run `python jobs/sweep.py --output {root}` first")
    fs, path = storage.resolve(root)
    config = storage.read_json(fs, f"{path}/sweep_config.json") or {}
    sel = layout.sweep_selection(config)
    analysis = layout.of_selection(layout.read_table(storage.join(root, "decompose", "analysis")), sel)
    chosen, choices = choose_on_val(raw)
    trials = chosen[chosen["strategy"] != selection.FULL].reset_index(drop=True)
    maps_files = {m: f for m in sorted(set(trials["model"]))
                  if (f := layout.sweep_maps_file(root, model=str(m), sweep_config=config)) is not None}
    ev = layout.of_selection(layout.read_table(storage.join(root, "decompose", "eval")), sel)
    eval_split = (config.get("config") or {}).get("eval_split", "test")
    val_split = next((v for v in raw.get("val_split", pd.Series(dtype=str)).dropna().unique()), None)
    split = ev["split"] if "split" in ev else pd.Series("", index=ev.index)
    return SweepOutput(root=root, config=config, trials=trials, analysis=analysis, maps_files=maps_files,
                       with_controls=chosen.reset_index(drop=True), choices=choices,
                       eval_test=ev[split == eval_split].reset_index(drop=True) if len(ev) else ev,
                       eval_val=ev[split == val_split].reset_index(drop=True) if (len(ev) and val_split) else None)



def copy_tables(src: str, dst: str) -> None:
    """Copy the small tables a report is made from (not records) from sweep folder ``src`` to ``dst``
    (either may be a URI)."""
    sfs, spath = storage.resolve(src)
    for rel in ("decompose/analysis", "decompose/eval", "decompose/maps", "decompose/instances",
                "decompose/essentiality", "localisation"):
        if sfs.get_file_info(f"{spath}/{rel}").type == pafs.FileType.Directory:
            storage.copy_tree(storage.join(src, rel), storage.join(dst, rel))
    # The trial rows as one file (a sweep keeps one per trial, so that a rerun can tell which finished;
    # a report's folder needs none of that, and a thousand small files cost more than their rows).
    rows = read_dir(storage.join(src, "trials"))
    if len(rows):
        dfs, dpath = storage.resolve(storage.join(dst, "trials"))
        if storage.exists(dfs, dpath):
            storage.remove_tree(dfs, dpath)  # rows of an earlier report would stay beside the new ones
        storage.write_parquet(dfs, f"{dpath}/trials.parquet", trials_table(rows))
    if storage.exists(sfs, f"{spath}/sweep_config.json"):
        storage.copy_file(storage.join(src, "sweep_config.json"), storage.join(dst, "sweep_config.json"))


def trials_table(rows: pd.DataFrame) -> pa.Table:
    """Trial rows as a table of ``schema.TRIALS_SCHEMA``; columns a row set lacks (a sweep from before
    they existed) are null."""
    present = [f for f in schema.TRIALS_SCHEMA if f.name in rows.columns]
    t = pa.Table.from_pandas(rows[[f.name for f in present]], schema=pa.schema(present), preserve_index=False)
    cols = [t.column(f.name) if f.name in rows.columns else pa.nulls(len(rows), type=f.type)
            for f in schema.TRIALS_SCHEMA]
    return pa.Table.from_arrays(cols, schema=schema.TRIALS_SCHEMA)


EXTRACTION_FILE = "extraction.json"  # the extraction table kept beside a report whose folder has no records


def extraction_table(root: str) -> pd.DataFrame:
    """One row per extracted (model, split): rows, seconds, images/s, width m, actors and device, from the
    records' manifests under ``root/records``; else from ``root/extraction.json`` (a report's copy)."""
    fs, path = storage.resolve(root.rstrip("/"))
    rows = []
    if storage.exists(fs, f"{path}/records"):
        for info in fs.get_file_info(pafs.FileSelector(f"{path}/records", recursive=True)):
            if info.type != pafs.FileType.File or info.base_name != schema.MANIFEST_NAME:
                continue
            man = storage.read_json(fs, info.path) or {}
            sec = float(man.get("seconds") or 0.0)
            rows.append({"model": man.get("model"), "split": man.get("split"), "m": man.get("feature_dim"),
                         "rows": man.get("rows"), "seconds": round(sec, 1),
                         "images/s": round((man.get("rows") or 0) / sec, 1) if sec else None,
                         "actors": man.get("num_actors"), "gpu": bool(man.get("use_gpu")),
                         "finished_at": man.get("finished_at")})
    else:
        rows = (storage.read_json(fs, f"{path}/{EXTRACTION_FILE}") or {}).get("rows", [])
    out = pd.DataFrame(rows)
    return out.sort_values(["model", "split"]).reset_index(drop=True) if len(out) else out


# ----------------------------------------------------------------------------- tables


def depth_of(backbone: str) -> int | None:
    """The depth in a ResNet or DenseNet name (``cifar_resnet56`` → 56, ``resnet50`` → 50,
    ``cifar_resnet20_proj`` → 20, ``cifar_densenet40_k12`` → 40), else None."""
    m = re.search(r"(?:resnet|densenet)(\d+)(?:_|$)", backbone)
    return int(m.group(1)) if m else None


# Name fragment -> family, the first that matches (ShuffleNetV2 before ShuffleNet, ResNeXt before ResNet).
_FAMILIES = (("shufflenetv2", "ShuffleNetV2"), ("shufflenet_v2", "ShuffleNetV2"), ("shufflenet", "ShuffleNet v1"),
             ("densenet", "DenseNet"), ("resnext", "ResNeXt"), ("wide_resnet", "Wide ResNet"), ("resnet", "ResNet"),
             ("mobilenet", "MobileNet"), ("efficientnet", "EfficientNet"), ("regnet", "RegNet"),
             ("convnext", "ConvNeXt"), ("vgg", "VGG"))


def family_of(backbone: str) -> str:
    """The architecture family of a backbone name (``cifar_densenet40_k12`` → DenseNet); the name itself if unknown."""
    return next((fam for frag, fam in _FAMILIES if frag in backbone), backbone)


def series_of(backbone: str) -> str:
    """The backbone name without its depth: the models of one series differ only in depth
    (``cifar_resnet20`` and ``cifar_resnet56`` → ``cifar_resnet``; ``cifar_resnet20_proj`` → ``cifar_resnet_proj``)."""
    d = depth_of(backbone)
    return backbone if d is None else re.sub(rf"(resnet|densenet){d}(?=_|$)", r"\1", backbone, count=1)


def depth_series(models: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``(label, models by depth)`` for each series of ≥ 2 depths on one dataset: the models that differ
    only in depth (one checkpoint family). The label is the dataset, with the series where it has several."""
    out = []
    for dataset, ddf in models.groupby("dataset", sort=False):
        ddf = ddf.dropna(subset=["depth"])
        groups = list(ddf.groupby("series", sort=False)) if "series" in ddf else [(None, ddf)]
        groups = [(s, g.sort_values("depth")) for s, g in groups if g["depth"].nunique() >= 2]
        for series, g in groups:
            out.append((dataset if len(groups) == 1 else f"{dataset} {series}", g))
    return out


def accuracy_by_k(trials: pd.DataFrame, *, mode: str = "none", value: str = "acc_decomposed") -> pd.DataFrame:
    """Rows (model, strategy, k) of one retrain mode with ``value`` (k1 = k2 = k): the mean over a
    strategy's rows — its map seeds (random: one map per seed) and its training seeds, where a mode ran
    several — and ``<value>_sd`` their sd; ``seeds`` counts the rows."""
    d = trials[trials["retrain_mode"] == mode]
    g = d.assign(k=d["k2"]).groupby(["model", "strategy", "k"], sort=True)[value]
    out = g.mean().reset_index()
    out[f"{value}_sd"] = g.std(ddof=1).fillna(0.0).to_numpy()
    out["seeds"] = g.size().to_numpy()
    return out


def accuracy_at(acc: pd.DataFrame, model: str, strategy: str, k: int) -> float:
    """One decomposed accuracy of an :func:`accuracy_by_k` table; NaN where that point was not run."""
    a = acc[(acc["model"] == model) & (acc["strategy"] == strategy) & (acc["k"] == k)]["acc_decomposed"]
    return float(a.iloc[0]) if len(a) else np.nan


def _num_classes(d: pd.DataFrame) -> int:
    r = d.iloc[0]
    return int(r["head_macs_decomposed"] // max(1, int(r["k2"])))


def model_table(trials: pd.DataFrame, analysis: pd.DataFrame, *, psi: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per model: backbone, depth, full accuracy, feature dim, Ψ.

    Ψ is the share of the m features that hold 90 % of an instance's L1 mass (smaller: more
    concentrated): ``psi[model]``, the mean over the test instances, where given (the report's
    intervals resample exactly that mean); else the mean over classes of the per-class medians.
    ``psi_min``/``psi_max`` are the smallest and largest per-class medians.
    """
    rows = []
    psi_ = psi or {}
    for model, d in trials.groupby("model", sort=False):
        backbone = str(d["backbone"].iloc[0])
        m = int(d["head_macs_full"].iloc[0] // max(1, _num_classes(d)))
        a = analysis[analysis["model"] == model] if not analysis.empty else analysis
        psi = a.drop_duplicates("class")["psi_median"] if not a.empty else pd.Series(dtype=float)
        rows.append({"model": model, "backbone": backbone, "depth": depth_of(backbone),
                     "family": family_of(backbone), "series": series_of(backbone),
                     "dataset": str(d["dataset"].iloc[0]), "acc_full": float(d["acc_full"].iloc[0]),
                     "feature_dim": m,
                     "psi_mean": float(psi_[model]) if psi_ and model in psi_ else
                     (float(psi.mean()) if len(psi) else np.nan),
                     "psi_min": float(psi.min()) if len(psi) else np.nan,
                     "psi_max": float(psi.max()) if len(psi) else np.nan})
    out = pd.DataFrame(rows)
    if not out.empty:
        # widths first: a sweep of one family and width keeps its depth order
        out = out.sort_values(["dataset", "feature_dim", "family", "series", "depth", "model"],
                              na_position="last").reset_index(drop=True)
    return out


def mixed_models(models: pd.DataFrame) -> bool:
    """Whether a model table's models differ in family or in width m (then the report compares across them)."""
    return "family" in models and (models["family"].nunique() > 1 or models["feature_dim"].nunique() > 1)


def headline_table(trials: pd.DataFrame, models: pd.DataFrame, *, k: int) -> pd.DataFrame:
    """Per model at k1 = k2 = k: full, decomposed per strategy, head-retrained and fine-tuned (frequency), Ψ, cost."""
    rows = []
    mixed = mixed_models(models)
    for _, mr in models.iterrows():
        d = trials[(trials["model"] == mr["model"]) & (trials["k2"] == k)]
        row: dict[str, Any] = {"model": mr["model"]}
        if mixed:  # a sweep across families and widths says which is which
            row.update(family=mr["family"], m=int(mr["feature_dim"]))
        row.update(depth=mr["depth"], full=mr["acc_full"])
        none = d[d["retrain_mode"] == "none"].groupby("strategy")["acc_decomposed"].mean()  # random: mean over seeds
        for s in selection.STRATEGIES:
            if s in none.index:
                row[s] = float(none[s])
        if "frequency" in none.index:
            row["gap (frequency)"] = mr["acc_full"] - float(none["frequency"])
        for mode in ("head", "finetune"):
            r = d[(d["retrain_mode"] == mode) & (d["strategy"] == "frequency")]["acc_retrained"]
            if len(r):  # several training seeds: their mean
                row[f"{MODE_LABELS[mode]} (frequency)"] = float(r.mean())
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
