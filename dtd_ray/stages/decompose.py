"""Decompose: records → frequency tables, class maps of every strategy, and their evaluation.

The stages behind ``jobs/decompose.py`` (see its docstring for the output layout):
reduce the selection split's records to per-class frequency tables for a k1 grid,
select the maps of every strategy, evaluate every (strategy, k1, k2 ≤ k1) decomposed
head on the cached features of the evaluation split, and run the essentiality test
and Ψ. Ray is never imported here: ``engine="ray"`` and ``extract_missing`` run through
the :class:`RayHooks` that :mod:`dtd_ray.ray.decompose_on_ray` passes in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from dtd_ray import console
from dtd_ray import config as config_lib
from dtd_ray.config import config_class
from dtd_ray.core import analysis, counting, heads, holdout, selection
from dtd_ray.core.kgrid import parse_k_grid
from dtd_ray.io import layout, maptables, records, schema, storage
from dtd_ray.models.linear_head import load_head
from dtd_ray.stages import decompose_analysis
from dtd_ray.stages import reduce as stage_reduce
from dtd_ray.stages.decompose_summary import print_report


@config_class
class DecomposeConfig:
    records: Annotated[str, Field(description="records root (the extract job's <output>/records), local path or URI")] = "runs/cifar10/records"
    model: Annotated[str, Field(description="model partition (tag) in the records")] = "cifar_resnet20"
    split: Annotated[str, Field(description="split whose cached features evaluate the decomposed heads")] = "test"
    select_split: Annotated[str, Field(description="split the maps are selected from")] = "train"
    select_augment: Annotated[str | None, Field(description="select from an augmented pass: \"cifar\" reads split <select_split>_aug<select_seed>")] = None
    select_seed: Annotated[int, Field(description="seed of that augmented pass (as jobs/extract.py --seed)")] = 0
    extract_missing: Annotated[bool, Field(description="run the augmented extraction (Ray) when its records are missing")] = False
    correct_only: Annotated[bool, Field(description="count only correctly classified selection instances")] = False
    val_fraction: Annotated[float | None, Field(description="hold this share of select_split out (dtd_ray.core.holdout, seeded by select_seed): the maps are selected from the rest, and every head is also evaluated on the held-out un-augmented rows (eval table split <select_split>_val<pct>)")] = None
    strategies: Annotated[tuple[str, ...], Field(description="selection strategies to compare (or glm too)")] = selection.DEFAULT_STRATEGIES
    k1: Annotated[Any, Field(description="k1 grid: None = 1..kmax, \"1..64\", \"5..100:5\" or \"5,10,20\"")] = None
    k2_max: Annotated[int | None, Field(description="map length of the k1-independent strategies (default: the largest k1)")] = None
    seed: Annotated[int, Field(description="first seed of the random strategy's maps and of the essentiality test's noise")] = 0
    random_seeds: Annotated[int, Field(description="random maps drawn (seeds seed … seed+n−1); the report gives their mean ± sd")] = 10
    noise_seeds: Annotated[int, Field(description="noise draws of the essentiality test (seeds seed … seed+n−1), averaged")] = 5
    maps_json: Annotated[tuple[str, ...], Field(description="reference-format JSON maps ({\"<class>\": [idx, ...]}) to evaluate as well")] = ()
    export_json: Annotated[Any, Field(description="k values (k1 = k2) whose maps are also written as reference JSON, e.g. \"5,10,20\"")] = None
    engine: Annotated[str, Field(description="reduce with \"numpy\" (streaming, one node) or \"ray\" (Ray Data map_batches)")] = "numpy"
    head: Annotated[str | None, Field(description=".npz with weight (C, m) and bias (C,); default: the head stored beside the selection records")] = None
    analysis_k: Annotated[int | None, Field(description="k1 = k2 of the essentiality test and channel analysis per strategy; None skips")] = 5
    psi_q: Annotated[float, Field(description="Ψ: fraction of the L1 mass to reach")] = 0.9
    eval_dtype: Annotated[str, Field(description="precision of the grid evaluator: \"float64\" or \"float32\" (faster; jobs/bench_decompose.py measures it)")] = "float64"
    print_k: Annotated[Any, Field(description="k values in the printed table (default: 1, 2, 3, 5, 8, 10, 16, 20, 32, 50, 64, … of the grid)")] = None
    output: Annotated[str, Field(description="output root (see the module docstring)")] = "runs/cifar10/decompose"
    verbose: Annotated[bool, Field(description="show Ray's and Tune's own INFO output")] = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in selection.STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; valid: {', '.join(selection.STRATEGIES)}")
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
        holdout.check_fraction(self.val_fraction)

    @property
    def val_key(self) -> str | None:
        """The validation split's name in the eval tables (``train_val10``), or ``None`` without one."""
        if self.val_fraction is None:
            return None
        return schema.val_key(self.select_split, val_fraction=self.val_fraction)

    @property
    def select_key(self) -> str:
        """The records split the maps come from (``train_aug0`` for an augmented pass with seed 0;
        ``train_fit90`` with a 10 % validation split held out)."""
        return schema.split_key(self.select_split, augment=self.select_augment, seed=self.select_seed,
                                val_fraction=self.val_fraction)

    @property
    def select_records(self) -> str:
        """The records partition the maps are counted from (the selection split before any holdout)."""
        return schema.split_key(self.select_split, augment=self.select_augment, seed=self.select_seed)

    def partition(self, *, eval_tables: bool = False) -> str:
        """``select_split=<s>/correct_only=<b>`` (and ``/split=<e>`` for the tables of the evaluation):
        this decomposition's folders in every table (:mod:`dtd_ray.io.layout`)."""
        return layout.partition(select_split=self.select_key, correct_only=self.correct_only,
                                split=self.split if eval_tables else None)

    def path_of(self, table: str, *, val: bool = False) -> str:
        """Where ``table`` (freq, maps, eval, instances, analysis, essentiality) of this decomposition
        goes, relative to the output (``val``: the eval table of the validation split)."""
        split = (self.val_key if val else self.split) if table in layout.EVAL_TABLES else None
        return layout.table_path(table, model=self.model, select_split=self.select_key,
                                 correct_only=self.correct_only, split=split)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RayHooks:
    """The two steps of a decomposition that run on Ray, passed in by :mod:`dtd_ray.ray.decompose_on_ray`.

    This module never imports Ray: ``reduce`` is the Ray Data reduce (``engine="ray"``) and
    ``extract_select`` makes a missing augmented selection pass (``extract_missing``).
    """

    reduce: Callable[..., counting.FreqTables]
    extract_select: Callable[["DecomposeConfig", dict[str, Any]], dict[str, Any]]


def _need_hooks(hooks: RayHooks | None, what: str) -> RayHooks:
    if hooks is None:
        raise RuntimeError(f"{what} runs on Ray: use jobs/decompose.py or dtd_ray.ray.decompose_on_ray.decompose_on_ray")
    return hooks


def ensure_select_records(cfg: DecomposeConfig, eval_manifest: dict[str, Any], *,
                          hooks: RayHooks | None = None) -> dict[str, Any]:
    """The selection partition's manifest; runs the augmented extraction if asked and missing."""
    man = records.read_manifest(cfg.records, model=cfg.model, split=cfg.select_records)
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
    uri = records.partition_uri(cfg.records, model=cfg.model, split=cfg.select_records)
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
        split=cfg.select_records,
        k1_grid=[int(k) for k in grid],
        correct_only=cfg.correct_only,
        with_feature_sums="contribution" in cfg.strategies,
        val_fraction=cfg.val_fraction,
        val_seed=cfg.select_seed,
    )
    if cfg.engine == "ray":
        return _need_hooks(hooks, "engine='ray'").reduce(cfg.records, **kw)
    return stage_reduce.reduce_partition(cfg.records, **kw)


def imported_maps(cfg: DecomposeConfig, *, C: int, m: int) -> list[selection.ClassMap]:
    out = []
    for path in cfg.maps_json:
        idx = maptables.read_map_json(path, num_classes=C, feature_dim=m)
        stem = os.path.basename(path).rsplit(".", 1)[0]
        out.append(selection.imported_map(idx, name=f"json:{stem}"))
    return out


def eval_table(rows: list[dict[str, Any]], cfg: DecomposeConfig, maps: list[selection.ClassMap], *,
               split: str | None = None) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    # an imported map's order is the file's, not a ranking: only its full length is evaluated
    full_only = {cm.strategy: cm.k2 for cm in maps if not cm.nested}
    if full_only:
        keep = [full_only.get(s, k2) == k2 for s, k2 in zip(df["strategy"], df["k2"])]
        df = df[np.asarray(keep, dtype=bool)]
    df.insert(0, "model", cfg.model)
    df.insert(1, "split", split or cfg.split)
    df.insert(2, "select_split", cfg.select_key)
    df.insert(3, "correct_only", cfg.correct_only)
    return df.reset_index(drop=True)


@dataclass(frozen=True)
class Inputs:
    """What a decomposition reads before it computes: both partitions' manifests and the head."""

    eval_manifest: dict[str, Any]
    select_manifest: dict[str, Any]
    weight: np.ndarray  # (C, m) float64
    bias: np.ndarray  # (C,)
    head_source: str
    grid: np.ndarray  # the k1 grid


def load_inputs(cfg: DecomposeConfig, *, hooks: RayHooks | None = None) -> Inputs:
    """The manifests and the stored head, with every option checked against them (one line each)."""
    storage.check_writable(cfg.output)
    layout.refuse_flat(cfg.output)  # an output of an earlier version: migrate it first, never write beside it
    eval_man = records.read_manifest(cfg.records, model=cfg.model, split=cfg.split)
    if eval_man is None:
        uri = records.partition_uri(cfg.records, model=cfg.model, split=cfg.split)
        raise FileNotFoundError(f"no finished records at {uri}; run jobs/extract.py first")
    sel_man = ensure_select_records(cfg, eval_man, hooks=hooks)
    w, b, head_source = load_head(root=cfg.records, manifest=sel_man, head=cfg.head)
    _, m = check_shapes(w=w, b=b, manifests={cfg.split: eval_man, cfg.select_key: sel_man})
    grid = np.asarray(parse_k_grid(cfg.k1, kmax=int(sel_man["kmax"]), name="k1"), dtype=np.int64)
    check_k_options(cfg, grid=grid, m=m)
    return Inputs(eval_manifest=eval_man, select_manifest=sel_man, weight=w, bias=b, head_source=head_source,
                  grid=grid)


def check_k_options(cfg: DecomposeConfig, *, grid: np.ndarray, m: int) -> None:
    """The k options against the k1 grid and the width ``m``, before anything is written."""
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
        longest = int(cfg.k2_max or grid[-1])
        if not 1 <= cfg.analysis_k <= longest:
            raise ValueError(f"analysis_k={cfg.analysis_k} is outside the maps' lengths 1..{longest}")


def select_stage(cfg: DecomposeConfig, *, inputs: Inputs, freq: counting.FreqTables) -> list[selection.ClassMap]:
    """The maps of every strategy (glm fitted on the selection split's cached features) and the imported ones."""
    glm_data: dict[str, Any] = {}
    if "glm" in cfg.strategies:
        sel = records.load_records(cfg.records, model=cfg.model, split=cfg.select_records,
                                   columns=[schema.LABEL, schema.PRED, schema.FEATURES])
        # a boolean mask copies: the loaded arrays are read-only views of Arrow buffers
        keep = sel[schema.PRED] == sel[schema.LABEL] if cfg.correct_only else np.ones(len(sel[schema.LABEL]), bool)
        keep &= ~holdout.val_mask(sample_id=sel[schema.SAMPLE_ID], fraction=cfg.val_fraction, seed=cfg.select_seed)
        glm_data = {"features": sel[schema.FEATURES][keep], "labels": sel[schema.LABEL][keep].astype(np.int64)}
    maps = selection.select_maps(
        strategies=cfg.strategies, freq=freq, weight=inputs.weight, k1_grid=inputs.grid, k2_max=cfg.k2_max,
        seed=cfg.seed, random_seeds=cfg.random_seeds, **glm_data,
    )
    C, m = inputs.weight.shape
    return maps + imported_maps(cfg, C=C, m=m)


def val_eval_stage(cfg: DecomposeConfig, *, maps: list[selection.ClassMap], w: np.ndarray, b: np.ndarray
                   ) -> pd.DataFrame | None:
    """Every head of the grid on the validation split (the held-out, un-augmented rows of
    ``select_split``): what the report chooses k1 on. ``None`` without a ``val_fraction``."""
    if cfg.val_fraction is None:
        return None
    tr = records.load_records(cfg.records, model=cfg.model, split=cfg.select_split,
                              columns=[schema.LABEL, schema.FEATURES])
    val = holdout.val_mask(sample_id=tr[schema.SAMPLE_ID], fraction=cfg.val_fraction, seed=cfg.select_seed)
    if not val.any():
        raise ValueError(f"val_fraction={cfg.val_fraction} holds out no row of {cfg.select_split} "
                         f"({len(val)} rows): raise it or drop it")
    rows = heads.evaluate_grid(features=tr[schema.FEATURES][val], labels=tr[schema.LABEL][val].astype(np.int64),
                               weight=w, bias=b, maps=maps, dtype=np.dtype(cfg.eval_dtype), outcomes=True)
    return eval_table(rows, cfg, maps, split=cfg.val_key)


def evaluation_warnings(cfg: DecomposeConfig, *, f: np.ndarray, pred: np.ndarray, records_pred: np.ndarray) -> list[str]:
    """A head that is not the one the records were extracted with gives wrong numbers silently: say so."""
    out = []
    disagree = float((pred != records_pred).mean())
    if disagree > 1e-3:
        out.append(f"the head's argmax disagrees with the records' pred on {disagree:.2%} of {cfg.split}: wrong head?")
    negative = int((f < 0).sum())
    if negative:
        out.append(f"{negative} negative feature value(s) in {cfg.split}")
    return out


def write_tables(cfg: DecomposeConfig, *, freq: counting.FreqTables, maps: list[selection.ClassMap],
                 df: pd.DataFrame, instances: pd.DataFrame, adf: pd.DataFrame,
                 essentiality: pd.DataFrame | None) -> dict[str, str]:
    """Every table in its partition (:mod:`dtd_ray.io.layout`); the manifest comes after them."""
    tables = {
        "freq": maptables.freq_to_table(freq, model=cfg.model),
        "maps": maptables.maps_to_table(maps, model=cfg.model),
        "eval": pa.Table.from_pandas(df[schema.EVAL_SCHEMA.names], schema=schema.EVAL_SCHEMA, preserve_index=False),
        "instances": pa.Table.from_pandas(instances, schema=schema.INSTANCES_SCHEMA, preserve_index=False),
    }
    if not adf.empty:
        tables["analysis"] = pa.Table.from_pandas(adf, preserve_index=False)
        tables["essentiality"] = pa.Table.from_pandas(essentiality, schema=schema.ESSENTIALITY_SCHEMA,
                                                      preserve_index=False)
    return {name: layout.write_table(t, cfg.output, cfg.path_of(name)) for name, t in tables.items()}


def decompose_manifest(cfg: DecomposeConfig, *, inputs: Inputs, freq: counting.FreqTables, df: pd.DataFrame,
                       n_eval: int, asummary: list[dict[str, Any]], psi_info: dict[str, Any] | None,
                       warnings: list[str], written: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    C, m = inputs.weight.shape
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "config": config_lib.to_dict(cfg),
        "selection": {
            **freq.options,
            "select_split": cfg.select_key,
            "correct_only": cfg.correct_only,
            "records_config": inputs.select_manifest.get("config"),
            "k1_grid": [int(k) for k in inputs.grid],
            "n_instances_per_class": freq.n_instances.tolist(),
            "tie_break": TIE_BREAKS,
            "k1_not_applicable": selection.K1_NOT_APPLICABLE,
        },
        "head": {"source": inputs.head_source, "num_classes": C, "feature_dim": m},
        "eval": {"split": cfg.split, "rows": n_eval, "acc_full": float(df["acc_full"].iloc[0])},
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


TIE_BREAKS = {
    "frequency": "count desc, then class mass Σ|f| over top-kmax desc, then lower index",
    "weight_l1": "|W| desc, then W desc, then lower index",
    "contribution": "mean W·f desc, then lower index",
    "random": "per-class permutation from numpy default_rng(map_seed), map_seed = seed … seed+random_seeds−1",
    "glm": "entry step on the elastic-net path desc λ, then |W| at entry desc, then lower index",
}


def run_decompose(cfg: DecomposeConfig, *, hooks: RayHooks | None = None, brief: bool = False) -> dict[str, Any]:
    """The whole job; returns a summary with the evaluation DataFrame under ``"eval"``.

    ``hooks`` carries the Ray steps (``engine="ray"``, ``extract_missing``); without them
    those options are refused in one line. The steps show as one progress display; ``brief``
    (a sweep's decomposition) leaves out the comparison tables, keeping the warnings.
    """
    t0 = time.perf_counter()
    clock = {"start": t0}
    steps = ["load", "reduce", "select", "load_eval", "evaluate"] + (["analysis"] if cfg.analysis_k is not None else [])
    bar = console.progress(total=len(steps) + 1, desc=f"[decompose] {cfg.model}", unit="step")

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - clock["start"]
        clock["start"] = now
        bar.update(1)

    timings: dict[str, float] = {}
    try:
        out = _run_steps(cfg, hooks=hooks, lap=lap, timings=timings, t0=t0, bar=bar)
    finally:
        bar.close()
    print_report(cfg, df=out["eval"], maps=out["maps"], grid=out.pop("grid"), manifest=out["manifest"],
                 psi_median=out.pop("psi_median"), brief=brief)
    return out


def _run_steps(cfg: DecomposeConfig, *, hooks: RayHooks | None, lap: Any, timings: dict[str, float], t0: float,
               bar: Any) -> dict[str, Any]:
    """The steps of :func:`run_decompose`, each ended by ``lap(name)``."""
    inputs = load_inputs(cfg, hooks=hooks)
    lap("load")
    freq = reduce_stage(cfg, grid=inputs.grid, hooks=hooks)
    lap("reduce")
    maps = select_stage(cfg, inputs=inputs, freq=freq)
    lap("select")
    ev = records.load_records(cfg.records, model=cfg.model, split=cfg.split,
                              columns=[schema.LABEL, schema.PRED, schema.FEATURES])
    f, y = ev[schema.FEATURES], ev[schema.LABEL].astype(np.int64)  # sorted by sample_id (load_records)
    lap("load_eval")
    w, b = inputs.weight, inputs.bias
    rows = heads.evaluate_grid(features=f, labels=y, weight=w, bias=b, maps=maps, dtype=np.dtype(cfg.eval_dtype),
                               outcomes=True)
    lap("evaluate")
    pred = (f.astype(np.float64) @ w.T + b).argmax(1)
    warnings = list(freq.warnings) + evaluation_warnings(cfg, f=f, pred=pred, records_pred=ev[schema.PRED])
    df = eval_table(rows, cfg, maps)
    df_val = val_eval_stage(cfg, maps=maps, w=w, b=b)
    adf, asummary, psi_info = pd.DataFrame(), [], None
    if cfg.analysis_k is not None:
        adf, asummary, psi_info = decompose_analysis.analysis_stage(
            cfg, maps=maps, f=f, y=y, w=w, b=b, sample_id=ev[schema.SAMPLE_ID], means=decompose_analysis.select_means(cfg))
        warnings += psi_info["warnings"]
        lap("analysis")
    instances = pd.DataFrame({"model": cfg.model, "split": cfg.split, schema.SAMPLE_ID: ev[schema.SAMPLE_ID],
                              schema.LABEL: y.astype(np.int32), "correct_full": pred == y,
                              "psi": analysis.psi(values=f, q=cfg.psi_q) if psi_info is None else psi_info["psi"],
                              "psi_q80": analysis.psi(values=f, q=0.8), "psi_q95": analysis.psi(values=f, q=0.95),
                              "psi_weighted": analysis.weighted_psi(features=f, labels=y, weight=w, q=cfg.psi_q)})
    written: dict[str, Any] = write_tables(cfg, freq=freq, maps=maps, df=df, instances=instances, adf=adf,
                                           essentiality=None if psi_info is None else psi_info["essentiality"])
    if df_val is not None:
        table = pa.Table.from_pandas(df_val[schema.EVAL_SCHEMA.names], schema=schema.EVAL_SCHEMA, preserve_index=False)
        written["eval_val"] = layout.write_table(table, cfg.output, cfg.path_of("eval", val=True))
    if cfg.export_json is not None:
        written["json"] = export_json(cfg, maps=maps, kmax=int(inputs.grid[-1]))
    timings["total"] = time.perf_counter() - t0
    manifest = decompose_manifest(cfg, inputs=inputs, freq=freq, df=df, n_eval=int(len(y)), asummary=asummary,
                                  psi_info=psi_info, warnings=warnings, written=written, timings=timings)
    fs, path = storage.resolve(cfg.output)
    storage.write_json(fs, f"{path}/_manifests/{cfg.partition(eval_tables=True)}/{cfg.model}.json", manifest)
    bar.set_postfix_str(f"{len(df)} rows -> {written['eval']}")
    bar.update(1)
    return {"eval": df, "eval_val": df_val, "analysis": adf, "manifest": manifest, "freq": freq, "maps": maps,
            "grid": inputs.grid,
            "psi_median": None if psi_info is None else psi_info["psi_median"]}


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
            target = f"{path}/json/{cfg.partition()}/{cfg.model}_{cm.strategy}_{k1}_{k}_indices.json"
            maptables.write_map_json(target, cm.top(k).idx)
            out.append(target)
    return out
