"""The sweep's stages in order: extraction, decomposition, mode ``none`` rows, Tune trials, summary.

:func:`run_sweep` runs a :class:`~dtd_ray.ray.sweep.plan.SweepPlan` on the running Ray
cluster; every stage skips what an earlier run finished (see :mod:`dtd_ray.ray.sweep`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dtd_ray import config as config_lib
from dtd_ray.core import selection
from dtd_ray.io import layout, maptables, records, schema, storage
from dtd_ray.ray import cluster
from dtd_ray.ray.decompose_on_ray import decompose_on_ray
from dtd_ray.ray.extract import run_extract
from dtd_ray.ray.sweep.spec import RETRAIN_MODES, SweepConfig
from dtd_ray.ray.sweep.plan import SweepPlan, TrialSpec, Unit, decompose_config, describe, extract_config, plan_sweep
from dtd_ray.ray.sweep.store import finished_trial_ids, read_trials, timestamp, trials_root, write_trial_row
from dtd_ray.ray.sweep.tune import run_tune
from dtd_ray.report import ReportConfig, make_report
from dtd_ray.report.protocol import choose_on_val
from dtd_ray.report.atlas import AtlasConfig, build_atlas


def run_extraction(plan: SweepPlan, units: list[Unit], *, use_gpu: bool) -> None:
    """Extract every unit's partitions (finished ones are skipped) before any trial starts."""
    for u in units:
        print(f"[sweep] extract {u.key} ({u.model.name} on {u.dataset})", flush=True)
        ecfg = dataclasses.replace(extract_config(plan, u, use_gpu=use_gpu), shared_fs=plan.cfg.shared_fs)
        run_extract(ecfg, plan=plan.extract_checks.get(u.key))


@dataclass
class Decomposed:
    """One unit's decomposition: its evaluation table and its class maps."""

    eval: pd.DataFrame  # decompose's eval table (fractions)
    maps: Any  # list[ClassMap] or a maps/ DataFrame
    status: str
    eval_val: pd.DataFrame | None = None  # the same on the validation split (val_fraction)

    def class_map(self, strategy: str, k1: int, k: int, map_seed: int = selection.SEED_NOT_APPLICABLE) -> np.ndarray:
        if strategy == selection.FULL:  # the control: every class keeps all m features
            C = int(self.eval["head_macs_full"].iloc[0]) // k
            return selection.full_map(num_classes=C, feature_dim=k)
        if isinstance(self.maps, pd.DataFrame):
            return maptables.map_from_table(self.maps, strategy=strategy, k1=k1, k2=k, map_seed=map_seed).idx
        for cm in self.maps:
            if cm.strategy == strategy and cm.k1 == k1 and cm.k2 >= k and cm.seed == map_seed:
                return cm.top(k).idx
        raise ValueError(f"no {strategy} map with k1={k1}, map_seed={map_seed} and length ≥ {k}")

    def eval_row(self, strategy: str, k1: int, k: int, map_seed: int = selection.SEED_NOT_APPLICABLE, *,
                 val: bool = False) -> dict[str, Any]:
        df = self.eval_val if val else self.eval
        if df is None:
            return {}
        if strategy == selection.FULL:  # the full head: what every row knows of it, and all m features
            r = df.iloc[0].to_dict()
            return {**r, "acc_decomposed": r["acc_full"], "head_macs_decomposed": r["head_macs_full"],
                    "channels_used": k, "outcomes": None}
        r = df[(df["strategy"] == strategy) & (df["k1"] == k1) & (df["k2"] == k) & (df["map_seed"] == map_seed)]
        if r.empty:
            raise ValueError(f"decompose evaluated no ({strategy}, k1={k1}, k2={k}, map_seed={map_seed})")
        return r.iloc[0].to_dict()


def _records_hashes(plan: SweepPlan, unit: Unit) -> dict[str, Any]:
    cfg = plan.cfg
    out = {}
    splits = {cfg.train_split, cfg.eval_split}
    if cfg.select_augment:
        splits.add(schema.split_key(cfg.train_split, augment=cfg.select_augment, seed=cfg.seed))
    for s in sorted(splits):
        man = records.read_manifest(f"{plan.output}/records", model=unit.key, split=s)
        out[s] = None if man is None else man.get("config_hash")
    return out


DECOMPOSE_SCHEMAS = {"eval": schema.EVAL_SCHEMA, "instances": schema.INSTANCES_SCHEMA,
                     "essentiality": schema.ESSENTIALITY_SCHEMA}


def run_decomposition(plan: SweepPlan, unit: Unit) -> Decomposed:
    """Decompose one unit for the whole grid, or load the result of an identical earlier run."""
    dcfg = decompose_config(plan, unit)
    fs, root = storage.resolve(dcfg.output)
    marker_path = f"{root}/_sweep/{unit.key}.json"
    # the tables' columns too: a decomposition written before a column was added is computed again
    want = {"decompose_config": config_lib.to_dict(dcfg), "records": _records_hashes(plan, unit),
            "columns": {name: list(sch.names) for name, sch in DECOMPOSE_SCHEMAS.items()}}
    old = storage.read_json(fs, marker_path)
    eval_path, maps_path = f"{root}/{dcfg.path_of('eval')}", f"{root}/{dcfg.path_of('maps')}"
    if (old is not None and not plan.cfg.overwrite and old.get("decompose_config") == want["decompose_config"]
            and old.get("records") == want["records"] and old.get("columns") == want["columns"]
            and storage.exists(fs, eval_path)
            and storage.exists(fs, maps_path)):
        print(f"[sweep] decompose {unit.key}: finished earlier with the same config and records, skipped", flush=True)
        ev = layout.read_table(storage.join(dcfg.output, dcfg.path_of("eval")))
        maps = pq.read_table(maps_path, filesystem=fs).to_pandas()
        val = layout.read_table(storage.join(dcfg.output, dcfg.path_of("eval", val=True))) if dcfg.val_key else None
        return Decomposed(eval=ev, maps=maps, status="skipped", eval_val=val)
    res = decompose_on_ray(dcfg, brief=not plan.cfg.verbose)
    want["records"] = _records_hashes(plan, unit)  # an augmented pass may have been extracted just now
    storage.write_json(fs, marker_path, {**want, "finished_at": timestamp()})
    return Decomposed(eval=res["eval"], maps=res["maps"], status="written", eval_val=res.get("eval_val"))


def base_row(plan: SweepPlan, unit: Unit, t: TrialSpec, dec: Decomposed) -> dict[str, Any]:
    """The columns of a trial's row known before it runs (decompose's evaluation, in percent)."""
    cfg = plan.cfg
    ev = dec.eval_row(t.strategy, t.k1, t.k, t.map_seed)
    ev_val = dec.eval_row(t.strategy, t.k1, t.k, t.map_seed, val=True)
    spec = plan.modes[t.mode]
    sel_split = schema.split_key(cfg.train_split, augment=cfg.select_augment, seed=cfg.seed,
                                 val_fraction=cfg.val_fraction)
    return {
        "trial_id": t.trial_id,
        "sweep": cfg.name,
        "model": unit.key,
        "backbone": unit.model.name,
        "weights": unit.model.weights,
        "dataset": unit.dataset_short,
        "dataset_uri": unit.dataset,
        "select_split": sel_split,
        "eval_split": cfg.eval_split,
        "correct_only": bool(cfg.correct_only),
        "strategy": t.strategy,
        "k1": int(t.k1),
        "k2": int(t.k),
        "retrain_mode": t.mode,
        "epochs": int(spec.epochs or 0),
        "lr": None if t.mode == "none" else float(t.lr),
        "batch_size": None if t.mode == "none" else int(spec.batch_size),
        "weight_decay": None if t.mode == "none" else float(spec.weight_decay or 0.0),
        "seed": int(t.seed),
        "map_seed": int(t.map_seed),
        "val_split": None if cfg.val_fraction is None else schema.val_key(cfg.train_split, val_fraction=cfg.val_fraction),
        # mode none: the decomposed head on the validation split; a retrain trial replaces it by its own
        "acc_val": 100.0 * float(ev_val["acc_decomposed"]) if (ev_val and t.mode == "none") else None,
        "n_eval": int(ev["n_instances"]),
        "acc_full": 100.0 * float(ev["acc_full"]),
        "acc_decomposed": 100.0 * float(ev["acc_decomposed"]),
        "head_macs_full": int(ev["head_macs_full"]),
        "head_macs_decomposed": int(ev["head_macs_decomposed"]),
        "channels_used": int(ev["channels_used"]),
        # mode none: the decomposed head's per-instance outcomes; a retrain trial replaces them by its own
        "outcomes": ev["outcomes"] if t.mode == "none" else None,
    }


def write_eval_only_rows(plan: SweepPlan, unit: Unit, dec: Decomposed, todo: set[str]) -> int:
    """Mode ``none``: the rows come from decompose's evaluation; no Tune trial."""
    n = 0
    for t in plan.trials_of("none", unit.key):
        if t.trial_id not in todo:
            continue
        row = base_row(plan, unit, t, dec)
        row.update(use_gpu=False, config=json.dumps({"identity": t.identity}, sort_keys=True), finished_at=timestamp())
        write_trial_row(plan.output, row)
        n += 1
    if n:
        print(f"[sweep] none {unit.key}: {n} evaluation row(s) -> {trials_root(plan.output)}", flush=True)
    return n


# Cached features of the units whose head trials share one Tuner (they sit in the object store
# together). A Tuner costs seconds to start, so small units share one; an ImageNet-size unit
# (1.28 M × 2048 float32 ≈ 10 GB) gets its own.
HEAD_DATA_BYTES = 2 * 2**30


def head_groups(plan: SweepPlan, units: list[Unit], *, budget: int = HEAD_DATA_BYTES) -> list[list[Unit]]:
    """``units`` in order, cut into groups whose cached train + eval features fit ``budget`` bytes together."""
    groups: list[list[Unit]] = []
    used = 0
    for u in units:
        size = 0
        for split in (plan.cfg.train_split, plan.cfg.eval_split):
            man = records.read_manifest(f"{plan.output}/records", model=u.key, split=split) or {}
            size += int(man.get("rows", 0)) * int(man.get("feature_dim", 0)) * 4
        if groups and used + size <= budget:
            groups[-1].append(u)
            used += size
        else:
            groups.append([u])
            used = size
    return groups


def _tune(plan: SweepPlan, mode: str, todo: list[TrialSpec], decs: dict[str, Decomposed], *, use_gpu: bool,
          units: list[Unit] | None = None) -> list[str]:
    """:func:`~dtd_ray.ray.sweep.tune.run_tune` with each trial's class map and known row from ``decs``."""
    by_key = {u.key: u for u in plan.units}
    maps = {t.trial_id: decs[t.unit].class_map(t.strategy, t.k1, t.k, t.map_seed) for t in todo}
    rows = {t.trial_id: base_row(plan, by_key[t.unit], t, decs[t.unit]) for t in todo}
    return run_tune(plan, mode, todo, maps=maps, rows=rows, use_gpu=use_gpu, units=units)


def save_resolved_config(plan: SweepPlan) -> str:
    """Write ``<output>/sweep_config.json``: the config, its resolved units, modes and trial counts."""
    fs, path = storage.resolve(plan.output)
    target = f"{path}/sweep_config.json"
    storage.write_json(fs, target, {
        "config": config_lib.to_dict(plan.cfg),
        "resolved": {
            "output": plan.output,
            "k": plan.grid,
            "k_by_unit": plan.grids,
            "units": [{"key": u.key, "backbone": u.model.name, "weights": u.model.weights,
                       "normalization": u.model.normalization, "input_size": u.model.input_size,
                       "resize": u.model.resize, "dataset": u.dataset,
                       "weights_abs": u.weights_abs, "dataset_abs": u.dataset_abs} for u in plan.units],
            "modes": {m: config_lib.to_dict(s) for m, s in plan.modes.items()},
            "trials": {m: len(plan.trials_of(m)) for m in plan.modes},
        },
        "versions": config_lib.versions(),
        "started_at": timestamp(),
    })
    return target


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per (model, strategy, k): acc_full, acc_decomposed and acc_retrained per retrain mode (%);
    the random strategy's lines are means over its map seeds, several training seeds are averaged, of
    several lrs each cell keeps the one validation chose, and the full-head controls are left out."""
    if df.empty:
        return pd.DataFrame(columns=["model", "strategy", "k", "acc_full", "acc_decomposed"])
    df, _ = choose_on_val(df)  # several lrs: each cell's best on validation, as the report reads them
    df = df[df["strategy"] != selection.FULL]  # the controls are the report's (C1), not a strategy
    d = df.assign(k=df["k2"])
    keys = ["model", "strategy", "k"]
    one = d.drop_duplicates(keys + ["map_seed"]) if "map_seed" in d else d.drop_duplicates(keys)
    base = one.groupby(keys, sort=True)[["acc_full", "acc_decomposed"]].mean()
    modes = [m for m in RETRAIN_MODES if m != "none" and m in set(d["retrain_mode"])]
    for m in modes:
        base[f"acc_retrained[{m}]"] = d[d["retrain_mode"] == m].groupby(keys)["acc_retrained"].mean()
    return base.round(2).reset_index()


def run_sweep(cfg: SweepConfig, *, plan: SweepPlan | None = None) -> dict[str, Any]:
    """The whole sweep on the running Ray cluster (the entry point calls ``ray.init``).

    Returns ``{"trials": DataFrame of this sweep's rows, "summary": DataFrame, "output": str,
    "ran": {mode: trials run}, "skipped": int, "report": report.md path or None}``; raises ``RuntimeError`` if trials failed
    (after every other trial finished and was written).
    """
    t0 = time.perf_counter()
    plan = plan or plan_sweep(cfg)
    print(describe(plan), flush=True)
    # Up front, before anything is written: records and trial rows are written from every node.
    cluster.check_output(plan.output, shared_fs=cfg.shared_fs)
    storage.check_writable(plan.output)
    layout.refuse_flat(storage.join(plan.output, "decompose"))  # before extraction: an earlier version's output
    save_resolved_config(plan)
    done = set() if cfg.overwrite else finished_trial_ids(plan.output)
    ids = [t.trial_id for t in plan.trials]
    todo_ids = {i for i in ids if i not in done}
    skipped = len(ids) - len(todo_ids)
    if skipped:
        print(f"[sweep] {skipped} of {len(ids)} trial(s) finished earlier (rows in {trials_root(plan.output)}), skipped",
              flush=True)

    ran: dict[str, int] = {m: 0 for m in plan.modes}
    failed: list[str] = []
    # Units with nothing left to do skip extraction and decomposition altogether.
    units = [u for u in plan.units if any(t.unit == u.key and t.trial_id in todo_ids for t in plan.trials)]
    if units:
        use_gpu = cluster.decide_gpu(use_gpu=cfg.use_gpu, wait_s=cfg.gpu_wait_s)
        try:
            # Every extraction finishes before any Tune trial starts: on a small machine, trials
            # holding CPUs while Ray Data waits for them could deadlock.
            run_extraction(plan, units, use_gpu=use_gpu)
            decs = {u.key: run_decomposition(plan, u) for u in units}
            for u in units:
                if "none" in plan.modes:
                    ran["none"] += write_eval_only_rows(plan, u, decs[u.key], todo_ids)
            if "head" in plan.modes:
                for group in head_groups(plan, units):
                    keys = {u.key for u in group}
                    todo = [t for t in plan.trials_of("head") if t.unit in keys and t.trial_id in todo_ids]
                    f = _tune(plan, "head", todo, decs, use_gpu=use_gpu, units=group)
                    ran["head"] += len(todo) - len(f)
                    failed += f
            if "finetune" in plan.modes:
                todo = [t for t in plan.trials_of("finetune") if t.trial_id in todo_ids and t.unit in decs]
                f = _tune(plan, "finetune", todo, decs, use_gpu=use_gpu)
                ran["finetune"] += len(todo) - len(f)
                failed += f
        finally:
            if use_gpu:
                cluster.release_gpu_request()

    df = read_trials(plan.output, ids)
    summary = summary_table(df)
    seconds = time.perf_counter() - t0
    grid = sorted(set(int(k) for k in df["k2"])) if len(df) else []
    # The report's and the atlas' fixed k: 5 (the paper's headline k and decompose's analysis k) when swept.
    fixed_k = (5 if 5 in grid else grid[len(grid) // 2]) if grid else None
    # The headline: every model and strategy at the fixed k; every k with --verbose (and in report.md).
    shown = summary if (cfg.verbose or fixed_k is None) else summary[summary["k"] == fixed_k]
    at = "k1 = k2 = k" if shown is summary else f"k1 = k2 = {fixed_k}; every k: report.md, or --verbose true"
    print(f"[sweep] summary (accuracy %, {len(df)} of {len(ids)} trial rows; {at}):", flush=True)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(shown.to_string(index=False), flush=True)
    print(f"[sweep] done: ran {sum(ran.values())} trial(s) ({', '.join(f'{m} {n}' for m, n in ran.items())}), "
          f"skipped {skipped}, failed {len(failed)}, {seconds:.1f} s -> {trials_root(plan.output)}", flush=True)
    report = None
    if cfg.report and len(df):
        report = make_report(ReportConfig(sweep=plan.output, k=fixed_k))["report"]
    if cfg.atlas and len(df):
        if storage.is_local(plan.output):
            try:
                build_atlas(AtlasConfig(sweep=plan.output, k=fixed_k))
            except (ValueError, FileNotFoundError, OSError) as e:  # the trials and the report stand without it
                print(f"[sweep] warning: atlas not written: {str(e).splitlines()[0]}", flush=True)
        else:  # the page is a folder of files: built locally, where the reader opens it
            print(f"[sweep] atlas: the output is not local; build it with "
                  f"`python jobs/atlas.py --sweep {plan.output} --output <folder>`", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) failed ({', '.join(failed[:5])}{', …' if len(failed) > 5 else ''}); "
                           f"rerun the same command to retry them (finished trials are kept)")
    return {"trials": df, "summary": summary, "output": plan.output, "ran": ran, "skipped": skipped, "report": report}
