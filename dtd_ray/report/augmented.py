"""Where the maps come from: maps selected from an augmented pass of train against the sweep's own.

The paper selected its maps from randomly augmented training images; a sweep selects from the
un-augmented ones unless ``select_augment`` is set. :func:`augmented_section` compares two sweep
folders of the same models, data and test set, one of each kind (``jobs/report.py --augmented``):
the decomposed and the head-retrained accuracy (frequency map at k), each difference paired over
the same test images, and how many of each class's k features the two maps share with each other
and with a published map (``--published model=path.json``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dtd_ray.core import stats
from dtd_ray.io import layout, maptables
from dtd_ray.report.evidence import SCALE, Evidence
from dtd_ray.report.tables import SweepOutput


def _outcomes(trials: pd.DataFrame, *, model: str, k: int, mode: str, n: int) -> np.ndarray | None:
    """The frequency row's outcomes at k (mean over training seeds), or None."""
    r = trials[(trials["model"] == model) & (trials["strategy"] == "frequency") & (trials["k2"] == k)
               & (trials["retrain_mode"] == mode)]
    vals = [stats.unpack_outcomes(bytes(o), n=n).astype(np.float64) for o in r["outcomes"]
            if isinstance(o, (bytes, bytearray, memoryview)) and len(o) * 8 - n in range(8)]
    return np.mean(vals, axis=0) if vals else None


def _map(sw: SweepOutput, model: str, k: int) -> np.ndarray | None:
    f = sw.maps_files.get(model)
    if f is None:
        return None
    return maptables.map_from_table(pd.read_parquet(f), strategy="frequency", k1=k, k2=k).idx


def overlap(a: np.ndarray, b: np.ndarray) -> int:
    """Σ_y |A_y ∩ B_y|: the features two maps of one shape share, class by class (out of C·k)."""
    return int(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)))


def parse_published(spec: str | None) -> dict[str, str]:
    """``"model=path.json[,model=path.json]"`` as ``{model: path}`` (one-line error on a bad entry)."""
    out: dict[str, str] = {}
    for part in [p for p in (spec or "").split(",") if p.strip()]:
        model, sep, path = part.partition("=")
        if not sep or not model.strip() or not path.strip():
            raise ValueError(f"--published entries are model=path.json, got {part!r}")
        out[model.strip()] = path.strip()
    return out


def augmented_table(main: SweepOutput, aug: SweepOutput, ev: Evidence | None, *, k: int,
                    published: dict[str, str] | None = None) -> pd.DataFrame:
    """Per model of both sweeps: (augmented-pass maps) − (this sweep's maps) for the decomposed and the
    head-retrained accuracy with 95 % intervals, and the maps' overlaps."""
    rows: list[dict[str, Any]] = []
    if ev is None:
        return pd.DataFrame()
    for model in [m for m in dict.fromkeys(main.trials["model"]) if m in set(aug.trials["model"]) and ev.has(m)]:
        n = len(ev.instances[model])
        row: dict[str, Any] = {"model": model, "maps": f"{_split(aug)} against {_split(main)}"}
        for mode, label in (("none", "decomposed"), ("head", "head retrained")):
            a = _outcomes(aug.trials, model=model, k=k, mode=mode, n=n)
            b = _outcomes(main.trials, model=model, k=k, mode=mode, n=n)
            if a is None or b is None:
                continue
            est = ev.estimate(a - b, model)
            row[f"{label}: augmented"] = float(a.mean() * SCALE)
            row[f"{label}: this sweep"] = float(b.mean() * SCALE)
            row[f"{label}: difference [95 % CI]"] = est.text()
        ma, mb = _map(aug, model, k), _map(main, model, k)
        if ma is not None and mb is not None:
            row["shared features"] = f"{overlap(ma, mb)} / {ma.size}"
        path = (published or {}).get(model)
        if path and ma is not None and mb is not None:
            pub = maptables.read_map_json(path, num_classes=ma.shape[0], feature_dim=_width(main, model))
            if pub.shape == ma.shape:
                row["published: augmented / this sweep"] = f"{overlap(ma, pub)} / {overlap(mb, pub)} of {pub.size}"
        rows.append(row)
    return pd.DataFrame(rows)


def _width(sw: SweepOutput, model: str) -> int:
    """The model's feature width m: C·m / C, with C = C·k2 / k2 (the trial row's head costs)."""
    t = sw.trials[sw.trials["model"] == model].iloc[0]
    return int(t["head_macs_full"]) // (int(t["head_macs_decomposed"]) // int(t["k2"]))


def _split(sw: SweepOutput) -> str:
    return f"`{layout.sweep_selection(sw.config)['select_split']}`"


def augmented_section(table: pd.DataFrame, *, k: int, aug_root: str, render: Any) -> list[str]:
    """The report's markdown for :func:`augmented_table` (``render``: the report's markdown_table)."""
    if table.empty:
        return []
    return ["## Maps from augmented training images", "",
            f"The paper selected its maps from randomly augmented training images; this sweep from the images as they "
            f"are. `{aug_root}` selected the frequency maps of the same models from one augmented pass (the "
            f"project's seeded CIFAR augmentation: 4-px pad, random crop, flip) of the same training rows (the "
            f"validation split held out the same way). Frequency map at k1 = k2 = {k}; differences augmented − this "
            "sweep in points, paired over the same test images (95 % percentile bootstrap); `shared features`: "
            "Σ_y |A_y ∩ B_y| of the two maps; `published`: the same against the map published with the paper.",
            "", render(table)]


__all__ = ["augmented_section", "augmented_table", "overlap", "parse_published"]
