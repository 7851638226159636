"""Decompose: records → frequency tables, class maps of every strategy, and their evaluation.

The stages behind ``jobs/decompose.py`` (see its docstring for the output layout):
reduce the selection split's records to per-class frequency tables for a k1 grid,
select the maps of every strategy, evaluate every (strategy, k1, k2 ≤ k1) decomposed
head on the cached features of the evaluation split, and run the essentiality test
and Ψ. Ray is never imported here: ``engine="ray"`` and ``extract_missing`` run through
the :class:`RayHooks` that :mod:`dtd_ray.ray.decompose` passes in.
"""


from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dtd_ray import config as config_lib
from dtd_ray.core import analysis, counting, heads, selection
from dtd_ray.core.kgrid import parse_k_grid
from dtd_ray.io import records, schema, storage, tables
from dtd_ray.models.linear_head import load_head
from dtd_ray.stages import reduce as stage_reduce


@dataclass
class DecomposeConfig:
    records: str = "runs/cifar10/records"  # records root (the extract job's <output>/records), local path or URI
    model: str = "cifar_resnet20"  # model partition (tag) in the records
    split: str = "test"  # split whose cached features evaluate the decomposed heads
    select_split: str = "train"  # split the maps are selected from
    select_augment: str | None = None  # select from an augmented pass: "cifar" reads split <select_split>_aug<select_seed>
    select_seed: int = 0  # seed of that augmented pass (as jobs/extract.py --seed)
    extract_missing: bool = False  # run the augmented extraction (Ray) when its records are missing
    correct_only: bool = False  # count only correctly classified selection instances
    strategies: tuple[str, ...] = selection.DEFAULT_STRATEGIES  # selection strategies to compare (or glm too)
    k1: Any = None  # k1 grid: None = 1..kmax, "1..64", "5..100:5" or "5,10,20"
    k2_max: int | None = None  # map length of the k1-independent strategies (default: the largest k1)
    seed: int = 0  # first seed of the random strategy's maps and of the essentiality test's noise
    random_seeds: int = 10  # random maps drawn (seeds seed … seed+n−1); the report gives their mean ± sd
    noise_seeds: int = 5  # noise draws of the essentiality test (seeds seed … seed+n−1), averaged
    maps_json: tuple[str, ...] = ()  # reference-format JSON maps ({"<class>": [idx, ...]}) to evaluate as well
    export_json: Any = None  # k values (k1 = k2) whose maps are also written as reference JSON, e.g. "5,10,20"
    engine: str = "numpy"  # reduce with "numpy" (streaming, one node) or "ray" (Ray Data map_batches)
    head: str | None = None  # .npz with weight (C, m) and bias (C,); default: the backbone of the records' manifest
    analysis_k: int | None = 5  # k1 = k2 of the essentiality test and channel analysis per strategy; None skips
    psi_q: float = 0.9  # Ψ: fraction of the L1 mass to reach
    eval_dtype: str = "float64"  # precision of the grid evaluator: "float64" or "float32" (about 2x faster)
    print_k: Any = None  # k values in the printed table (default: 1, 2, 3, 5, 8, 10, 16, 20, 32, 50, 64, … of the grid)
    output: str = "runs/cifar10/decompose"  # output root (see the module docstring)
    verbose: bool = False  # show Ray's and Tune's own INFO output

    def __post_init__(self) -> None:
        config_lib.coerce_option_types(self)  # --correct_only false, --psi_q abc: bools/numbers, or one line
        if isinstance(self.strategies, str):
            self.strategies = tuple(s for s in self.strategies.split(",") if s)
        self.strategies = tuple(self.strategies)
        unknown = [s for s in self.strategies if s not in selection.STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; valid: {', '.join(selection.STRATEGIES)}")
        if isinstance(self.maps_json, str):
            self.maps_json = tuple(s for s in self.maps_json.split(",") if s)
        self.maps_json = tuple(self.maps_json)
        if self.engine not in ("numpy", "ray"):
            raise ValueError(f"engine must be 'numpy' or 'ray', got {self.engine!r}")
        if self.select_augment not in (None, "cifar"):
            raise ValueError(f"select_augment must be None or 'cifar', got {self.select_augment!r}")
        if self.eval_dtype not in ("float64", "float32"):
            raise ValueError(f"eval_dtype must be 'float64' or 'float32', got {self.eval_dtype!r}")
        if not 0.0 < self.psi_q <= 1.0:
            raise ValueError(f"psi_q={self.psi_q} is outside (0, 1]")
        if self.random_seeds < 1 or self.noise_seeds < 1:
            raise ValueError(f"random_seeds={self.random_seeds} and noise_seeds={self.noise_seeds} must be ≥ 1")

    @property
    def select_key(self) -> str:
        """The records split the maps come from (``train_aug0`` for an augmented pass with seed 0)."""
        return schema.split_key(self.select_split, augment=self.select_augment, seed=self.select_seed)

    @property
    def select_stem(self) -> str:
        return f"{self.model}__{self.select_key}" + ("__correct" if self.correct_only else "")

    @property
    def select_partition(self) -> str:
        """``select_split=<s>/correct_only=<b>``: the Hive folders of freq/ and maps/."""
        return f"select_split={self.select_key}/correct_only={str(self.correct_only).lower()}"

    @property
    def eval_stem(self) -> str:
        return f"{self.model}__{self.split}__{self.select_key}" + ("__correct" if self.correct_only else "")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RayHooks:
    """The two steps of a decomposition that run on Ray, passed in by :mod:`dtd_ray.ray.decompose`.

    This module never imports Ray: ``reduce`` is the Ray Data reduce (``engine="ray"``) and
    ``extract_select`` makes a missing augmented selection pass (``extract_missing``).
    """

    reduce: Callable[..., counting.FreqTables]
    extract_select: Callable[["DecomposeConfig", dict[str, Any]], dict[str, Any]]


def _need_hooks(hooks: RayHooks | None, what: str) -> RayHooks:
    if hooks is None:
        raise RuntimeError(f"{what} runs on Ray: use jobs/decompose.py or dtd_ray.ray.decompose.run_decompose")
    return hooks


def ensure_select_records(cfg: DecomposeConfig, eval_manifest: dict[str, Any], *,
                          hooks: RayHooks | None = None) -> dict[str, Any]:
    """The selection partition's manifest; runs the augmented extraction if asked and missing."""
    man = records.read_manifest(cfg.records, model=cfg.model, split=cfg.select_key)
    if man is not None:
        return man
    hint = ""
    if cfg.select_augment:
        if cfg.extract_missing:
            return _need_hooks(hooks, "--extract_missing").extract_select(cfg, eval_manifest)
        hint = (
            f"; run jobs/extract.py --splits {cfg.select_split} --augment {cfg.select_augment} "
            f"--seed {cfg.select_seed} (or pass --extract_missing)"
        )
    uri = records.partition_uri(cfg.records, model=cfg.model, split=cfg.select_key)
    raise FileNotFoundError(f"no finished records at {uri}{hint}")


def needs_ray(cfg: DecomposeConfig) -> bool:
    """Whether ``cfg`` may run Ray work (the entry point starts Ray only then)."""
    return cfg.engine == "ray" or (cfg.select_augment is not None and cfg.extract_missing)


def check_shapes(*, w: np.ndarray, b: np.ndarray, manifests: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """``(C, m)`` after checking that the head and every partition agree (one-line ``ValueError`` otherwise)."""
    C, m = w.shape
    if b.shape != (C,):
        raise ValueError(f"head bias has shape {b.shape}, weight {w.shape}")
    for name, man in manifests.items():
        if int(man["feature_dim"]) != m or int(man["num_classes"]) != C:
            raise ValueError(
                f"records {name} have C={man['num_classes']}, m={man['feature_dim']}; the head has C={C}, m={m}"
            )
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ValueError("the head's weight or bias contains NaN/inf")
    return C, m


# --------------------------------------------------------------------------- stages


def reduce_stage(cfg: DecomposeConfig, *, grid: np.ndarray, hooks: RayHooks | None = None) -> counting.FreqTables:
    kw = dict(
        model=cfg.model,
        split=cfg.select_key,
        k1_grid=[int(k) for k in grid],
        correct_only=cfg.correct_only,
        with_feature_sums="contribution" in cfg.strategies,
    )
    if cfg.engine == "ray":
        return _need_hooks(hooks, "engine='ray'").reduce(cfg.records, **kw)
    return stage_reduce.reduce_partition(cfg.records, **kw)


def imported_maps(cfg: DecomposeConfig, *, C: int, m: int) -> list[selection.ClassMap]:
    out = []
    for path in cfg.maps_json:
        idx = tables.read_map_json(path, num_classes=C, feature_dim=m)
        stem = os.path.basename(path).rsplit(".", 1)[0]
        out.append(selection.imported_map(idx, name=f"json:{stem}"))
    return out


def eval_table(rows: list[dict[str, Any]], cfg: DecomposeConfig, maps: list[selection.ClassMap]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    # an imported map's order is the file's, not a ranking: only its full length is evaluated
    full_only = {cm.strategy: cm.k2 for cm in maps if not cm.nested}
    if full_only:
        keep = [full_only.get(s, k2) == k2 for s, k2 in zip(df["strategy"], df["k2"])]
        df = df[np.asarray(keep, dtype=bool)]
    df.insert(0, "model", cfg.model)
    df.insert(1, "split", cfg.split)
    df.insert(2, "select_split", cfg.select_key)
    df.insert(3, "correct_only", cfg.correct_only)
    return df.reset_index(drop=True)


def analysis_stage(
    cfg: DecomposeConfig,
    *,
    maps: list[selection.ClassMap],
    f: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    sample_id: np.ndarray,
) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, Any]]:
    """Per strategy at k1 = k2 = analysis_k: essentiality per class (mean over ``noise_seeds``
    draws), channel use; Ψ of the features. The third value also carries the per-instance
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
        pr = analysis.pruning_summary(idx=cm.idx, feature_dim=m)
        per_instance.append(pd.DataFrame({
            "model": cfg.model, "strategy": cm.strategy, "map_seed": np.int32(cm.seed), "k2": np.int32(cm.k2),
            schema.SAMPLE_ID: sample_id, schema.LABEL: y.astype(np.int32), "clean": ess["outcome_clean"],
            "selected_noise": ess["outcome_selected_noise"], "others_noise": ess["outcome_others_noise"]}))
        frames.append(
            pd.DataFrame(
                {
                    "model": cfg.model,
                    "split": cfg.split,
                    "select_split": cfg.select_key,
                    "correct_only": cfg.correct_only,
                    "strategy": cm.strategy,
                    "k1": cm.k1,
                    "map_seed": cm.seed,
                    "k2": cm.k2,
                    "class": np.arange(C),
                    "n": ess["n"],
                    "noise_seeds": len(noise_seeds),
                    "acc_clean": ess["acc_clean"],
                    "acc_selected_noise": ess["acc_selected_noise"],
                    "acc_others_noise": ess["acc_others_noise"],
                    "acc_selected_noise_sd": ess["acc_selected_noise_sd"],
                    "acc_others_noise_sd": ess["acc_others_noise_sd"],
                    "psi_median": ps["psi_median"],
                }
            )
        )
        summary.append(
            {
                "strategy": cm.strategy,
                "k1": cm.k1,
                "map_seed": cm.seed,
                "k2": cm.k2,
                "channels_used": pr["channels_used"],
                "channels_unused": pr["channels_unused"],
                "mean_acc_clean": float(np.nanmean(ess["acc_clean"])),
                "mean_acc_selected_noise": float(np.nanmean(ess["acc_selected_noise"])),
                "mean_acc_others_noise": float(np.nanmean(ess["acc_others_noise"])),
            }
        )
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    ps["essentiality"] = pd.concat(per_instance, ignore_index=True) if per_instance else pd.DataFrame()
    ps["psi"] = analysis.psi(values=f, q=cfg.psi_q)
    return df, summary, ps


def _print_ks(cfg: DecomposeConfig, grid: np.ndarray) -> list[int]:
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


def _write_parquet(table: pa.Table, root: str, rel: str) -> str:
    fs, path = storage.resolve(root)
    return storage.write_parquet(fs, f"{path}/{rel}", table)


def run_decompose(cfg: DecomposeConfig, *, hooks: RayHooks | None = None) -> dict[str, Any]:
    """The whole job; returns a summary with the evaluation DataFrame under ``"eval"``.

    ``hooks`` carries the Ray steps (``engine="ray"``, ``extract_missing``); without them
    those options are refused in one line.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    storage.check_writable(cfg.output)
    eval_man = records.read_manifest(cfg.records, model=cfg.model, split=cfg.split)
    if eval_man is None:
        uri = records.partition_uri(cfg.records, model=cfg.model, split=cfg.split)
        raise FileNotFoundError(f"no finished records at {uri}; run jobs/extract.py first")
    sel_man = ensure_select_records(cfg, eval_man, hooks=hooks)
    w, b, head_source = load_head(manifest=sel_man, head=cfg.head)
    C, m = check_shapes(w=w, b=b, manifests={cfg.split: eval_man, cfg.select_key: sel_man})
    kmax = int(sel_man["kmax"])
    grid = np.asarray(parse_k_grid(cfg.k1, kmax=kmax, name="k1"), dtype=np.int64)
    for option in ("export_json", "print_k"):  # checked now: a late error would follow overwritten files
        spec = getattr(cfg, option)
        if spec is None:
            continue
        try:
            ks = parse_k_grid(spec, name="k")
        except ValueError as e:
            raise ValueError(f"{option}={spec!r}: {e}") from None
        if ks[-1] > grid[-1]:
            raise ValueError(f"{option}={spec!r}: k={ks[-1]} is beyond the k1 grid (largest k1 {grid[-1]})")
    if cfg.k2_max is not None and not 1 <= cfg.k2_max <= m:
        raise ValueError(f"k2_max={cfg.k2_max} is outside [1, {m}] (the feature dimension)")
    if cfg.analysis_k is not None:
        if "frequency" in cfg.strategies and cfg.analysis_k not in set(grid.tolist()):
            raise ValueError(f"analysis_k={cfg.analysis_k} is not in the k1 grid {cfg.k1!r}")
        if not 1 <= cfg.analysis_k <= int(cfg.k2_max or grid[-1]):
            longest = int(cfg.k2_max or grid[-1])
            raise ValueError(f"analysis_k={cfg.analysis_k} is outside the maps' lengths 1..{longest}")
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    freq = reduce_stage(cfg, grid=grid, hooks=hooks)
    timings["reduce"] = time.perf_counter() - t
    warnings = list(freq.warnings)

    t = time.perf_counter()
    glm_data: dict[str, Any] = {}
    if "glm" in cfg.strategies:  # the path is fitted on the selection split's cached features
        sel = records.load_records(cfg.records, model=cfg.model, split=cfg.select_key,
                                   columns=[schema.LABEL, schema.PRED, schema.FEATURES])
        # a boolean mask copies: the loaded arrays are read-only views of Arrow buffers
        keep = sel[schema.PRED] == sel[schema.LABEL] if cfg.correct_only else np.ones(len(sel[schema.LABEL]), bool)
        glm_data = {"features": sel[schema.FEATURES][keep], "labels": sel[schema.LABEL][keep].astype(np.int64)}
    maps = selection.select_maps(
        strategies=cfg.strategies, freq=freq, weight=w, k1_grid=grid, k2_max=cfg.k2_max, seed=cfg.seed,
        random_seeds=cfg.random_seeds, **glm_data,
    )
    maps += imported_maps(cfg, C=C, m=m)
    timings["select"] = time.perf_counter() - t

    t = time.perf_counter()
    ev = records.load_records(
        cfg.records, model=cfg.model, split=cfg.split, columns=[schema.LABEL, schema.PRED, schema.FEATURES]
    )
    f, y = ev[schema.FEATURES], ev[schema.LABEL].astype(np.int64)  # sorted by sample_id (load_records)
    timings["load_eval"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = heads.evaluate_grid(features=f, labels=y, weight=w, bias=b, maps=maps, dtype=np.dtype(cfg.eval_dtype),
                               outcomes=True)
    timings["evaluate"] = time.perf_counter() - t
    # a head that is not the one the records were extracted with gives wrong numbers silently: check
    pred = (f.astype(np.float64) @ w.T + b).argmax(1)
    disagree = float((pred != ev[schema.PRED]).mean())
    if disagree > 1e-3:
        warnings.append(
            f"the head's argmax disagrees with the records' pred on {disagree:.2%} of {cfg.split}: wrong head?"
        )
    negative = int((f < 0).sum())
    if negative:
        warnings.append(f"{negative} negative feature value(s) in {cfg.split}")
    df = eval_table(rows, cfg, maps)

    adf, asummary, psi_info = pd.DataFrame(), [], None
    if cfg.analysis_k is not None:
        t = time.perf_counter()
        adf, asummary, psi_info = analysis_stage(cfg, maps=maps, f=f, y=y, w=w, b=b,
                                                 sample_id=ev[schema.SAMPLE_ID])
        warnings += psi_info["warnings"]
        timings["analysis"] = time.perf_counter() - t

    # ---- write: data files first, the manifest last
    written = {
        "freq": _write_parquet(
            tables.freq_to_table(freq, model=cfg.model), cfg.output,
            f"freq/{cfg.select_partition}/{cfg.model}.parquet",
        ),
        "maps": _write_parquet(
            tables.maps_to_table(maps, model=cfg.model), cfg.output,
            f"maps/{cfg.select_partition}/{cfg.model}.parquet",
        ),
        "eval": _write_parquet(
            pa.Table.from_pandas(df[schema.EVAL_SCHEMA.names], schema=schema.EVAL_SCHEMA, preserve_index=False),
            cfg.output,
            f"eval/{cfg.eval_stem}.parquet",
        ),
    }
    instances = pd.DataFrame({"model": cfg.model, "split": cfg.split, schema.SAMPLE_ID: ev[schema.SAMPLE_ID],
                              schema.LABEL: y.astype(np.int32), "correct_full": pred == y,
                              "psi": analysis.psi(values=f, q=cfg.psi_q) if psi_info is None else psi_info["psi"]})
    written["instances"] = _write_parquet(
        pa.Table.from_pandas(instances, schema=schema.INSTANCES_SCHEMA, preserve_index=False), cfg.output,
        f"instances/{cfg.eval_stem}.parquet",
    )
    if not adf.empty:
        written["analysis"] = _write_parquet(
            pa.Table.from_pandas(adf, preserve_index=False), cfg.output, f"analysis/{cfg.eval_stem}.parquet"
        )
        written["essentiality"] = _write_parquet(
            pa.Table.from_pandas(psi_info["essentiality"], schema=schema.ESSENTIALITY_SCHEMA, preserve_index=False),
            cfg.output, f"essentiality/{cfg.eval_stem}.parquet",
        )
    if cfg.export_json is not None:
        written["json"] = export_json(cfg, maps=maps, kmax=int(grid[-1]))
    timings["total"] = time.perf_counter() - t0
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "config": config_lib.to_dict(cfg),
        "selection": {
            **freq.options,
            "select_split": cfg.select_key,
            "correct_only": cfg.correct_only,
            "records_config": sel_man.get("config"),
            "k1_grid": [int(k) for k in grid],
            "n_instances_per_class": freq.n_instances.tolist(),
            "tie_break": {
                "frequency": "count desc, then class mass Σ|f| over top-kmax desc, then lower index",
                "weight_l1": "|W| desc, then W desc, then lower index",
                "contribution": "mean W·f desc, then lower index",
                "random": "per-class permutation from numpy default_rng(map_seed), map_seed = seed … seed+random_seeds−1",
                "glm": "entry step on the elastic-net path desc λ, then |W| at entry desc, then lower index",
            },
            "k1_not_applicable": selection.K1_NOT_APPLICABLE,
        },
        "head": {"source": head_source, "num_classes": C, "feature_dim": m},
        "eval": {"split": cfg.split, "rows": int(len(y)), "acc_full": float(df["acc_full"].iloc[0])},
        "analysis": asummary,
        "psi": None if psi_info is None else {
            "q": cfg.psi_q,
            "psi_median": [v if np.isfinite(v) else None for v in psi_info["psi_median"].tolist()],
        },
        "warnings": warnings,
        "outputs": written,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "versions": config_lib.versions(),
    }
    fs, path = storage.resolve(cfg.output)
    storage.write_json(fs, f"{path}/_manifests/{cfg.eval_stem}.json", manifest)

    print_report(cfg, df=df, maps=maps, grid=grid, manifest=manifest,
                 psi_median=None if psi_info is None else psi_info["psi_median"])
    return {"eval": df, "analysis": adf, "manifest": manifest, "freq": freq, "maps": maps}


def print_report(
    cfg: DecomposeConfig,
    *,
    df: pd.DataFrame,
    maps: list[selection.ClassMap],
    grid: np.ndarray,
    manifest: dict[str, Any],
    psi_median: np.ndarray | None,
) -> None:
    """The comparison tables (accuracy, channels used), imported maps, essentiality, Ψ, warnings."""
    m = int(manifest["head"]["feature_dim"])
    n = int(manifest["eval"]["rows"])
    asummary, warnings, timings = manifest["analysis"], manifest["warnings"], manifest["timings_s"]
    written = manifest["outputs"]
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


def export_json(cfg: DecomposeConfig, *, maps: list[selection.ClassMap], kmax: int) -> list[str]:
    """Write each strategy's map at k1 = k2 = k for the requested k as reference JSON."""
    ks = [int(k) for k in parse_k_grid(cfg.export_json, kmax=kmax, name="k1")]
    fs, path = storage.resolve(cfg.output)
    out = []
    for cm in maps:
        if not cm.nested:
            continue
        for k in ks:
            if (cm.k1 != selection.K1_NOT_APPLICABLE and cm.k1 != k) or cm.k2 < k:
                continue
            k1 = k if cm.k1 != selection.K1_NOT_APPLICABLE else "na"
            target = f"{path}/json/{cfg.select_stem}/{cfg.model}_{cm.strategy}_{k1}_{k}_indices.json"
            tables.write_map_json(target, cm.top(k).idx)
            out.append(target)
    return out
