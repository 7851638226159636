"""The sweep's plan: its (model, dataset) units and its trials, validated before Ray starts.

A trial's id hashes :func:`trial_identity` (what the trial computes, never its resources):
a rerun finds the rows of finished trials under the same ids and skips them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from dtd_ray import config as config_lib
from dtd_ray.core import selection
from dtd_ray.core.kgrid import k_shares, parse_k_grid
from dtd_ray.io import schema
from dtd_ray.ray.extract import ExtractCheck, ExtractConfig, check_extract
from dtd_ray.ray.sweep.spec import ModelSpec, RetrainSpec, SweepConfig, resolve_models, resolve_retrain, substitute
from dtd_ray.stages.decompose import DecomposeConfig


def dataset_name(spec: str) -> str:
    """A short name for a dataset source: the folder name for image folders, else the kind."""
    kind, _, path = spec.partition(":")
    if kind == "imagefolder" and path:
        return os.path.basename(path.rstrip("/")) or kind
    return kind


def _is_local_file(weights: str | None) -> bool:
    if weights in (None, "default"):
        return False
    w = str(weights)
    return not (w.startswith("torchvision:") or "://" in w or re.fullmatch(r"\w+_Weights\.\w+", w))


def _abs_weights(weights: str | None) -> str | None:
    return os.path.abspath(os.path.expanduser(weights)) if _is_local_file(weights) else weights


def _abs_dataset(spec: str) -> str:
    kind, sep, path = spec.partition(":")
    if not sep or not path or "://" in path:
        return spec
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"


def _under_ray_job() -> bool:
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


@dataclass
class Unit:
    """One (model, dataset) pair: one records partition, one decomposition."""

    key: str  # records partition key (the `model` column)
    model: ModelSpec
    dataset: str  # as configured (after ${data_root})
    dataset_abs: str  # local paths made absolute (what remote code reads)
    weights_abs: str | None

    @property
    def dataset_short(self) -> str:
        return dataset_name(self.dataset)


@dataclass
class TrialSpec:
    trial_id: str
    unit: str
    mode: str
    strategy: str
    k: int
    k1: int
    identity: dict[str, Any]  # what trial_id hashes
    map_seed: int = selection.SEED_NOT_APPLICABLE  # the random map's seed (one trial per seed)
    lr: float | None = None  # the training lr (one trial per value of a mode's lr list); None: mode none
    seed: int = 0  # the training seed (one trial per value of a mode's seeds)


@dataclass
class SweepPlan:
    """The resolved sweep: its output, k grid, units, retrain modes and trials."""

    cfg: SweepConfig
    output: str  # absolute local path or URI
    grid: list[int]  # every k of the sweep (the union of the units' grids)
    units: list[Unit]
    modes: dict[str, RetrainSpec]
    trials: list[TrialSpec]
    extract_checks: dict[str, ExtractCheck] = field(default_factory=dict)  # unit key -> its checked inputs
    grids: dict[str, list[int]] = field(default_factory=dict)  # unit key -> its k grid (shares of m resolved)

    def trials_of(self, mode: str, unit: str | None = None) -> list[TrialSpec]:
        return [t for t in self.trials if t.mode == mode and (unit is None or t.unit == unit)]


def resolve_output(cfg: SweepConfig) -> str:
    out = cfg.output or f"runs/{cfg.name}"
    if "://" in out:
        return out.rstrip("/")
    return os.path.abspath(os.path.expanduser(out))


def map_seeds(cfg: SweepConfig, strategy: str) -> list[int]:
    """The map seeds of a strategy's trials: ``seed … seed+random_seeds−1`` for random, else the one -1."""
    if strategy == "random":
        return [cfg.seed + i for i in range(cfg.random_seeds)]
    return [selection.SEED_NOT_APPLICABLE]


def mode_lrs(spec: RetrainSpec) -> list[float]:
    """A retrain mode's learning rates: its ``lr`` list, or the one value."""
    return [float(v) for v in spec.lr] if isinstance(spec.lr, (list, tuple)) else [float(spec.lr)]


def mode_seeds(cfg: SweepConfig, spec: RetrainSpec) -> list[int]:
    """A retrain mode's training seeds: its ``seeds``, else the sweep's ``seed``."""
    return [int(s) for s in spec.seeds] if spec.seeds else [int(cfg.seed)]


def trial_identity(cfg: SweepConfig, unit: Unit, mode: str, spec: RetrainSpec, strategy: str, k: int,
                   map_seed: int = selection.SEED_NOT_APPLICABLE, *, lr: float | None = None,
                   seed: int | None = None) -> dict[str, Any]:
    """What a trial computes, the dict its ``trial_id`` hashes (changing it changes every committed id).

    ``lr`` and ``seed`` are the trial's own (default: the mode's one lr, the sweep's seed)."""
    k1 = selection.K1_NOT_APPLICABLE if strategy in selection.K1_INDEPENDENT + (selection.FULL,) else k
    ident: dict[str, Any] = {
        "v": schema.TRIALS_SCHEMA_VERSION,
        "model": unit.key,
        "backbone": unit.model.name,
        "weights": unit.model.weights,
        "normalization": unit.model.normalization,
        "dataset": unit.dataset,
        "kmax": cfg.kmax,
        # set only: the trial ids of sweeps from before these options stay as they were
        **{k: getattr(unit.model, k) for k in ("input_size", "resize") if getattr(unit.model, k) is not None},
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "select_augment": cfg.select_augment,
        "correct_only": cfg.correct_only,
        "seed": int(cfg.seed if seed is None else seed),
        "strategy": strategy,
        "k1": k1,
        "k2": k,
        "mode": mode,
    }
    if cfg.val_fraction is not None:  # set only: the ids of sweeps without a validation split stay
        ident["val_fraction"] = float(cfg.val_fraction)
    if ident["seed"] != int(cfg.seed):
        # a training seed of retrain.<mode>.seeds: the sweep's seed still draws the validation split, the
        # augmented pass and the random maps, so it is named too (where the two agree, "seed" says both)
        ident["sweep_seed"] = int(cfg.seed)
    if map_seed != selection.SEED_NOT_APPLICABLE:
        ident["map_seed"] = int(map_seed)
    if mode != "none":
        ident.update(epochs=int(spec.epochs), lr=float(mode_lrs(spec)[0] if lr is None else lr),
                     batch_size=int(spec.batch_size),
                     weight_decay=float(spec.weight_decay or 0.0))
    if mode == "finetune":
        ident.update(augment=spec.augment, precision=spec.precision, max_train_rows=spec.max_train_rows,
                     max_eval_rows=spec.max_eval_rows)
    return ident


def plan_sweep(cfg: SweepConfig, *, check_inputs: bool = True) -> SweepPlan:
    """Validate the whole sweep and list its units and trials, before Ray starts.

    With ``check_inputs`` also checks checkpoints, datasets, splits and the output
    (``dtd_ray.ray.extract.check_extract``): a missing checkpoint is one clear line.
    """
    if not cfg.name:
        cfg.name = "sweep"  # built directly rather than by load_config
    strategies = tuple(cfg.strategies)
    bad = [s for s in strategies if s not in selection.STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"unknown strategy {bad[0] if bad else '(none)'!r}; valid: {', '.join(selection.STRATEGIES)}")
    if cfg.random_seeds < 1 or cfg.noise_seeds < 1:
        raise ValueError(f"random_seeds={cfg.random_seeds} and noise_seeds={cfg.noise_seeds} must be ≥ 1")
    if cfg.train_split == cfg.eval_split:
        raise ValueError(f"train_split and eval_split are both {cfg.train_split!r}")
    models = resolve_models(cfg)
    modes = resolve_retrain(cfg)
    if not modes:
        raise ValueError("no retrain mode to run (retrain: is empty or --modes selects none)")
    output = resolve_output(cfg)
    units = _units(cfg, models)
    plan = SweepPlan(cfg=cfg, output=output, grid=[], units=units, modes=modes, trials=[])
    if check_inputs:
        _check_inputs(plan)  # also gives each unit's feature width, which a share of m needs
    shares = bool(k_shares(cfg.k, name="k")) or any(k_shares(sp.k, name=f"retrain.{md}.k") for md, sp in modes.items())
    for u in units:
        m = _feature_dim(plan, u) if shares else None
        g = parse_k_grid(cfg.k, name="k" if m is None else f"k (m = {m}, {u.key})", m=m)
        if "frequency" in strategies and g[-1] > cfg.kmax:
            raise ValueError(f"k={g[-1]} > kmax={cfg.kmax}{f' ({u.key})' if shares else ''}: "
                             "frequency maps need k1 ≤ kmax (raise --kmax)")
        plan.grids[u.key] = g
    plan.grid = sorted({k for g in plan.grids.values() for k in g})
    plan.trials = _trials(cfg, plan, models, strategies, shares)
    return plan


def _units(cfg: SweepConfig, models: list[ModelSpec]) -> list[Unit]:
    """One :class:`Unit` per (model, dataset); tags checked for the partition name and duplicates."""
    units: list[Unit] = []
    for m in models:
        dsets = m.datasets if m.datasets is not None else tuple(
            substitute(d, cfg.data_root, "datasets") for d in cfg.datasets)
        if not dsets:
            raise ValueError(f"model {m.key}: no dataset (set `datasets:`)")
        for d in dsets:
            key = m.key if len(dsets) == 1 else f"{m.key}__{dataset_name(d)}"
            if not re.fullmatch(r"[\w.+-]+", key):
                raise ValueError(f"model tag {key!r} may only use letters, digits, '_', '.', '+', '-' "
                                 "(it names a records partition)")
            units.append(Unit(key=key, model=m, dataset=d, dataset_abs=_abs_dataset(d), weights_abs=_abs_weights(m.weights)))
    keys = [u.key for u in units]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"model tag(s) {', '.join(dup)} appear twice; give the entries distinct `tag:`s")
    return units


def _feature_dim(plan: SweepPlan, unit: Unit) -> int:
    """The unit's feature width m: from its checked inputs, else from the architecture (random init)."""
    if unit.key in plan.extract_checks:
        return int(plan.extract_checks[unit.key].feature_dim)
    from dtd_ray.models.backbones import get_backbone

    return int(get_backbone(unit.model.name, weights=None).feature_dim)


def unit_strategies(cfg: SweepConfig, unit: Unit) -> tuple[str, ...]:
    """The strategies of one unit: its model entry's (within the sweep's), else the sweep's."""
    own = unit.model.strategies
    return tuple(cfg.strategies) if own is None else tuple(s for s in cfg.strategies if s in own)


def _trials(cfg: SweepConfig, plan: SweepPlan, models: list[ModelSpec], strategies: tuple[str, ...],
            shares: bool) -> list[TrialSpec]:
    """Every (unit, mode, strategy, k, map seed) trial; a mode's k (shares resolved per unit) within the unit's grid."""
    trials: list[TrialSpec] = []
    tags = {m.key for m in models}
    for mode, spec in plan.modes.items():
        mode_strats = strategies if spec.strategies is None else tuple(s for s in spec.strategies if s in strategies)
        if spec.models is not None and not set(spec.models) <= tags:
            off = sorted(set(spec.models) - tags)
            print(f"[sweep] note: retrain.{mode}.models {off} not among the sweep's models: skipped", flush=True)
        off_grid: set[int] = set()
        for u in plan.units:
            if spec.models is not None and u.model.key not in spec.models:
                continue
            grid = plan.grids[u.key]
            strats = tuple(s for s in mode_strats if s in unit_strategies(cfg, u))
            m = _feature_dim(plan, u) if shares else None
            wanted = None if spec.k is None else parse_k_grid(spec.k, name=f"retrain.{mode}.k", m=m)
            ks = grid if wanted is None else [k for k in wanted if k in grid]
            off_grid.update(k for k in (wanted or ()) if k not in grid)
            lrs = mode_lrs(spec) if mode != "none" else [None]
            cells = [(s, k, ms) for s in strats for k in ks for ms in map_seeds(cfg, s)]
            if mode != "none" and spec.control:  # the full head, once per (lr, seed): the like-for-like control
                cells.append((selection.FULL, _feature_dim(plan, u), selection.SEED_NOT_APPLICABLE))
            for s, k, ms in cells:
                for lr in lrs:
                    for sd in mode_seeds(cfg, spec):
                        ident = trial_identity(cfg, u, mode, spec, s, k, ms, lr=lr, seed=sd)
                        trials.append(TrialSpec(trial_id=config_lib.config_hash(ident), unit=u.key, mode=mode,
                                                strategy=s, k=k, k1=ident["k1"], identity=ident, map_seed=ms,
                                                lr=ident.get("lr"), seed=ident["seed"]))
        if off_grid:
            print(f"[sweep] note: retrain.{mode}.k {sorted(off_grid)} not in the k grid {plan.grid}: skipped", flush=True)
    return trials


def _check_inputs(plan: SweepPlan) -> None:
    """Checkpoints, datasets, splits and the output of every unit (fills ``plan.extract_checks``)."""
    cfg = plan.cfg
    job_hint = ""
    if _under_ray_job():
        job_hint = (f" (this driver runs under `ray job submit` in {os.getcwd()}, a copy of the project: "
                    "pass an absolute --data_root / paths or URIs)")
    for u in plan.units:
        w = u.weights_abs
        if _is_local_file(u.model.weights) and not os.path.isfile(w):
            hint = ""
            if str(u.model.weights).startswith("results/backbones"):
                hint = "; the project's own backbones are trained by jobs/train.py and committed under results/backbones/"
            raise FileNotFoundError(f"checkpoint of model {u.key} not found: {u.model.weights} -> {w}{hint}{job_hint}")
        try:
            plan.extract_checks[u.key] = check_extract(extract_config(plan, u))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"model {u.key} on {u.dataset}: {e}{job_hint}") from None
    if _under_ray_job() and "://" not in (cfg.output or "") and not os.path.isabs(cfg.output or "runs"):
        print(f"[sweep] warning: output {cfg.output or f'runs/{cfg.name}'!r} is relative and this driver runs under "
              f"`ray job submit`: results land in {plan.output} (inside the job's copy of the project); "
              "pass --output /abs/path or s3://…", flush=True)


def extract_config(plan: SweepPlan, unit: Unit, *, use_gpu: bool | None = None) -> ExtractConfig:
    """The extraction config of one unit (both splits, the sweep's kmax and seed)."""
    cfg = plan.cfg
    splits = tuple(dict.fromkeys((cfg.train_split, cfg.eval_split)))
    return ExtractConfig(
        model=unit.model.name,
        weights=unit.weights_abs,
        normalization=unit.model.normalization,
        input_size=unit.model.input_size,
        resize=unit.model.resize,
        dataset=unit.dataset_abs,
        splits=splits,
        output=plan.output,
        tag=unit.key,
        kmax=cfg.kmax,
        batch_size=unit.model.batch_size or cfg.extract_batch_size,
        precision=cfg.extract_precision,
        max_rows=None if cfg.train_rows is None else {cfg.train_split: cfg.train_rows},
        use_gpu=use_gpu,
        seed=cfg.seed,
        overwrite=cfg.overwrite,
    )


def decompose_config(plan: SweepPlan, unit: Unit) -> DecomposeConfig:
    """The decompose config of one unit: every strategy and every k1 of the grid, k2 ≤ k1."""
    cfg = plan.cfg
    grid = plan.grids[unit.key]
    analysis_k = 5 if 5 in grid else None
    return DecomposeConfig(
        records=f"{plan.output}/records",
        model=unit.key,
        split=cfg.eval_split,
        select_split=cfg.train_split,
        select_augment=cfg.select_augment,
        select_seed=cfg.seed,
        extract_missing=cfg.select_augment is not None,
        correct_only=cfg.correct_only,
        val_fraction=cfg.val_fraction,
        strategies=unit_strategies(cfg, unit),
        k1=list(grid),
        k2_max=int(grid[-1]),
        seed=cfg.seed,
        random_seeds=cfg.random_seeds,
        noise_seeds=cfg.noise_seeds,
        analysis_k=analysis_k,
        print_k=list(grid),
        output=f"{plan.output}/decompose",
    )


def describe(plan: SweepPlan) -> str:
    """The plan in a few ``[sweep]`` lines: units, modes and trial counts."""
    head = (f"[sweep] {plan.cfg.name}: {len(plan.units)} unit(s) × k {plan.grid} × strategies "
            f"{','.join(plan.cfg.strategies)} × modes {','.join(plan.modes)} -> {len(plan.trials)} trials; "
            f"output {plan.output}")
    lines = [head]
    per_unit = len({tuple(g) for g in plan.grids.values()}) > 1
    for u in plan.units:
        k_text = f" k {plan.grids[u.key]}" if per_unit else ""
        if u.model.strategies is not None:
            k_text += f" strategies {','.join(unit_strategies(plan.cfg, u))}"
        lines.append(f"[sweep]   {u.key}: {u.model.name} weights={u.model.weights} on {u.dataset}{k_text}")
    for mode in plan.modes:
        n = len(plan.trials_of(mode))
        lines.append(f"[sweep]   mode {mode}: {n} trial(s)")
    return "\n".join(lines)
