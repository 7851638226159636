"""The analyses of a decomposition at k1 = k2 = analysis_k: essentiality, matched ablations, Ψ.

Called by :func:`dtd_ray.stages.decompose.run_decompose` after the grid's evaluation, on
the evaluation split's cached features; the arithmetic is :mod:`dtd_ray.core.analysis`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dtd_ray.core import analysis, holdout, selection
from dtd_ray.io import records, schema

# ``cfg`` below is a dtd_ray.stages.decompose.DecomposeConfig (not imported: that module imports this one)

def select_means(cfg: Any) -> np.ndarray:
    """The mean feature vector (m,) of the selection records the maps were counted from (the
    validation split held out): the value a mean-ablation puts in."""
    sel = records.load_records(cfg.records, model=cfg.model, split=cfg.select_records, columns=[schema.FEATURES])
    keep = ~holdout.val_mask(sample_id=sel[schema.SAMPLE_ID], fraction=cfg.val_fraction, seed=cfg.select_seed)
    return sel[schema.FEATURES][keep].astype(np.float64).mean(0)



def analysis_stage(
    cfg: Any,
    *,
    maps: list[selection.ClassMap],
    f: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    sample_id: np.ndarray,
    means: np.ndarray,
) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, Any]]:
    """Per strategy at k1 = k2 = analysis_k: essentiality per class (mean over ``noise_seeds``
    draws), the matched ablations per instance (``means``: the selection split's feature
    means), channel use; Ψ of the features. The third value also carries the per-instance
    essentiality (``"essentiality"``, :data:`schema.ESSENTIALITY_SCHEMA` columns) and Ψ (``"psi"``)."""
    C, m = w.shape
    k = cfg.analysis_k
    ps = analysis.psi_by_class(values=f, labels=y, num_classes=C, q=cfg.psi_q)
    noise_seeds = [cfg.seed + i for i in range(cfg.noise_seeds)]
    frames, summary, per_instance = [], [], []
    for cm in maps:
        if cm.nested:
            if (cm.k1 != selection.K1_NOT_APPLICABLE and cm.k1 != k) or cm.k2 < k:
                continue
            cm = cm.top(k)
        ess = analysis.essentiality_test(features=f, labels=y, weight=w, bias=b, idx=cm.idx, seeds=noise_seeds)
        abl = {kind: analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=b, idx=cm.idx, kind=kind,
                                                means=means, seeds=noise_seeds) for kind in ("mean", "permute")}
        pr = analysis.pruning_summary(idx=cm.idx, feature_dim=m)
        per_instance.append(pd.DataFrame({
            "model": cfg.model, "strategy": cm.strategy, "map_seed": np.int32(cm.seed), "k2": np.int32(cm.k2),
            schema.SAMPLE_ID: sample_id, schema.LABEL: y.astype(np.int32), "clean": ess["outcome_clean"],
            "selected_noise": ess["outcome_selected_noise"], "others_noise": ess["outcome_others_noise"],
            **{f"{kind}_{s}": abl[kind][s] for kind in abl for s in ("selected", "random")}}))
        frames.append(pd.DataFrame({
            "model": cfg.model, "split": cfg.split, "select_split": cfg.select_key, "correct_only": cfg.correct_only,
            "strategy": cm.strategy, "k1": cm.k1, "map_seed": cm.seed, "k2": cm.k2, "class": np.arange(C),
            "n": ess["n"], "noise_seeds": len(noise_seeds),
            **{c: ess[c] for c in ("acc_clean", "acc_selected_noise", "acc_others_noise", "acc_selected_noise_sd",
                                   "acc_others_noise_sd")},
            "psi_median": ps["psi_median"]}))
        summary.append({
            "strategy": cm.strategy, "k1": cm.k1, "map_seed": cm.seed, "k2": cm.k2,
            "channels_used": pr["channels_used"], "channels_unused": pr["channels_unused"],
            **{f"mean_{c}": float(np.nanmean(ess[c])) for c in ("acc_clean", "acc_selected_noise", "acc_others_noise")},
            **{f"acc_{kind}_{s}": float(abl[kind][s].mean()) for kind in abl for s in ("selected", "random")}})
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    ps["essentiality"] = pd.concat(per_instance, ignore_index=True) if per_instance else pd.DataFrame()
    ps["psi"] = analysis.psi(values=f, q=cfg.psi_q)
    return df, summary, ps
