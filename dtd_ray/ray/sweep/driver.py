"""The sweep: models × datasets × k × strategies × retrain modes on Ray, one row per trial.

The main job of dtd-ray (``jobs/sweep.py``). A config (a named preset shipped in
``dtd_ray/presets/`` or a YAML file, plus command-line overrides) lists the models,
datasets, the k grid, the selection strategies and the retrain modes. The driver

1. extracts the records of every (model, dataset) *unit* (``dtd_ray.ray.extract``;
   finished partitions are skipped),
2. decomposes each unit once for the whole grid (``dtd_ray.stages.decompose``: freq/, maps/,
   eval/ for every strategy and every k1, k2 ≤ k1; skipped when done with the same
   config and the same records),
3. runs the trials: one per (unit, strategy, k, retrain mode) with k1 = k2 = k for
   ``frequency`` (k1 = -1 for the k1-independent strategies). Mode ``none`` is the
   decomposed head evaluated on cached features: its rows come straight from
   decompose's evaluation, no Tune trial. Modes ``head`` and ``finetune`` are Ray Tune
   trials of :mod:`dtd_ray.train.retrain`'s trainables (per-epoch reports, checkpoints),
4. prints a summary table.

Output layout under ``<output>``::

    sweep_config.json                     the resolved config of the last run, its units and trial counts
    records/model=<key>/split=<split>/    extraction records (see dtd_ray.ray.extract)
    decompose/{freq,maps,eval,analysis}/  the reduce and the grid evaluation (see jobs/decompose.py)
    decompose/_sweep/<key>.json           the decompose config and records hashes a rerun compares
    trials/<trial_id>.parquet             one row per finished trial (schema.TRIALS_SCHEMA)
    tune/<experiment>/                    Ray Tune's experiment folders (checkpoints, logs)

Resume: every stage is idempotent. ``trial_id`` is a hash of what a trial computes (its
model, weights, dataset, splits, strategy, k1, k2, mode and training options; never
its resources), each trial's row is written atomically as its own file the moment the
trial finishes, and a rerun skips the trials whose file exists, so an interrupted
driver recomputes only the unfinished trials (from scratch) and never duplicates a row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtd_ray.io import tables
from dtd_ray import config as config_lib
from dtd_ray.core.kgrid import parse_k_grid
from dtd_ray.ray import cluster
from dtd_ray.io import records
from dtd_ray.io import schema
from dtd_ray.core import selection
from dtd_ray.io import storage

log = logging.getLogger(__name__)

RETRAIN_MODES = ("none", "head", "finetune")

# ----------------------------------------------------------------------------- config


@dataclass
class ModelSpec:
    name: str = "cifar_resnet20"  # backbone registry name (dtd_ray.models.backbones.list_backbones())
    weights: str | None = "default"  # "default", a checkpoint file (may use ${data_root}), an http(s) URL, "torchvision:<ENUM>", null (random init)
    normalization: str | None = None  # override the weights' mean/std: cifar10, imagenet, cifar100, fashion-mnist
    tag: str | None = None  # records partition and `model` column (default: name); unique within a sweep
    datasets: tuple[str, ...] | None = None  # this model's datasets (default: the sweep's datasets)
    batch_size: int | None = None  # extraction batch size (default: the sweep's extract_batch_size)

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            self.datasets = (self.datasets,)
        if self.datasets is not None:
            self.datasets = tuple(self.datasets)

    @property
    def key(self) -> str:
        return self.tag or self.name


@dataclass
class RetrainSpec:
    k: Any = None  # k values of this mode, a subset of the sweep's k grid (default: the whole grid)
    strategies: tuple[str, ...] | None = None  # strategies of this mode (default: all of the sweep's)
    models: tuple[str, ...] | None = None  # model tags of this mode (default: every model of the sweep)
    epochs: int | None = None  # training epochs (default: head 10, finetune 1)
    lr: float | None = None  # Adam learning rate (default: head 1e-2, finetune 1e-4)
    batch_size: int | None = None  # training batch size (default: head 512, finetune 128)
    weight_decay: float | None = None  # weight decay (default 0)
    augment: str | None = None  # finetune: training augmentation, "cifar" or "none" (default "cifar")
    precision: str | None = None  # finetune: "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32", "bf16", "fp16" (default "auto")
    max_train_rows: int | None = None  # finetune: train on a seeded random subset of N rows (smoke runs)
    max_eval_rows: int | None = None  # finetune: evaluate on a seeded random subset of N rows (smoke runs)
    cpus: float | None = None  # CPUs per trial (default: decided on the driver from the cluster)
    gpus: float | None = None  # finetune: GPUs per trial (default: 1 when the cluster has GPUs, else 0)
    max_concurrent: int | None = None  # trials of this mode at once (default: decided on the driver)

    def __post_init__(self) -> None:
        if isinstance(self.strategies, str):
            self.strategies = tuple(s for s in self.strategies.split(",") if s)
        if self.strategies is not None:
            self.strategies = tuple(self.strategies)
        if isinstance(self.models, str):
            self.models = tuple(s for s in self.models.split(",") if s)
        if self.models is not None:
            self.models = tuple(self.models)


# Options each mode accepts, and its defaults (None: not applicable).
MODE_OPTIONS = {
    "none": ("k", "strategies", "models"),
    "head": ("k", "strategies", "models", "epochs", "lr", "batch_size", "weight_decay", "cpus", "max_concurrent"),
    "finetune": tuple(f.name for f in dataclasses.fields(RetrainSpec)),
}
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {"epochs": 0},
    "head": {"epochs": 10, "lr": 1e-2, "batch_size": 512, "weight_decay": 0.0},
    "finetune": {"epochs": 1, "lr": 1e-4, "batch_size": 128, "weight_decay": 0.0, "augment": "cifar",
                 "precision": "auto"},
}


@dataclass
class SweepConfig:
    config: str = "quickstart"  # preset name (quickstart, cifar10_resnets, imagenet_resnets) or a YAML file; the options below override it
    name: str | None = None  # sweep name (default: the preset or file name); the default output is runs/<name>
    output: str | None = None  # output root, local path or URI (default runs/<name>, git-ignored); under `ray job submit` use an absolute path or s3://…
    data_root: str = "../shared/data"  # replaces ${data_root} in datasets and weights
    datasets: tuple[str, ...] = ("fashion-mnist",)  # datasets of every model without its own: imagefolder:PATH | cifar10:PATH | cifar100:PATH | fashion-mnist[:PATH]
    models: Any = ()  # model entries (see "Model entries"); on the command line a name or a list of names selects entries of the config
    k: Any = "1..10"  # k grid, k1 = k2 = k: a list, "1..10", "1..10,20" or "5..100:5"
    strategies: tuple[str, ...] = selection.STRATEGIES  # selection strategies: frequency, weight_l1, contribution, random
    retrain: Any = field(default_factory=lambda: {"none": {}})  # retrain mode -> options (see "Retrain modes"); flags merge into the config's
    modes: tuple[str, ...] | None = None  # run only these of the configured retrain modes, e.g. none,head (default: all)
    train_split: str = "train"  # split the maps are selected from and heads are retrained on
    eval_split: str = "test"  # split every accuracy is measured on
    select_augment: str | None = None  # select the maps from an augmented pass of train_split ("cifar", as the paper's maps)
    correct_only: bool = False  # count only correctly classified instances when selecting maps
    kmax: int = 64  # ranked feature indices stored per instance (≥ the largest k of frequency)
    extract_batch_size: int = 256  # images per extraction batch (use 1024+ on a GPU)
    use_gpu: bool | None = None  # None: GPUs when the cluster has some; true: wait for the autoscaler to add a GPU node
    gpu_wait_s: float = 900.0  # with use_gpu true and no GPU yet: seconds to wait for one
    seed: int = 0  # seed of the random strategy, augmentation and training
    max_failures: int = 1  # retries of a failed trial (from its last checkpoint)
    overwrite: bool = False  # recompute extraction, decomposition and trials even when finished
    dry_run: bool = False  # print the plan (units and trials) and exit without running anything
    report: bool = True  # write report.md and plots/ into a local output after the trials (jobs/report.py)

    def __post_init__(self) -> None:
        # Light, idempotent normalisation only: the values may still be raw (a model name
        # given on the command line); resolve_config / plan_sweep validate the rest.
        for name in ("datasets", "strategies", "modes"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = tuple(s for s in v.split(",") if s)
            if isinstance(v, list):
                v = tuple(v)
            setattr(self, name, v)
        for name in ("use_gpu", "correct_only", "overwrite", "dry_run", "report"):
            setattr(self, name, _as_bool(getattr(self, name), name, allow_none=name == "use_gpu"))
        if isinstance(self.models, (tuple, str, dict)):
            self.models = [self.models] if isinstance(self.models, (str, dict)) else list(self.models)
        if self.retrain is None:
            self.retrain = {}


def _as_bool(v: Any, name: str, *, allow_none: bool = False) -> bool | None:
    """``True``/``False`` from a bool or the words a command line or YAML may carry ("true", "no", "1", …)."""
    if v is None and allow_none:
        return None
    parsed = config_lib.parse_bool(v)
    if parsed is not None:
        return parsed
    if allow_none and isinstance(v, str) and v.strip().lower() in ("none", "null", "auto", ""):
        return None
    raise ValueError(f"{name} must be true or false{' (or null)' if allow_none else ''}, got {v!r}")


def list_presets() -> list[str]:
    from importlib import resources

    return sorted(p.name[: -len(".yaml")] for p in resources.files("dtd_ray.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_config_file(spec: str) -> tuple[dict[str, Any], str]:
    """``(values, name)`` of a preset name or a YAML file (``yaml.safe_load``; no code runs)."""
    import yaml

    if spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec:
        fs, path = storage.resolve(spec)
        if not storage.exists(fs, path):
            raise FileNotFoundError(f"config file not found: {spec}")
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
        name = os.path.basename(path).rsplit(".", 1)[0]
    else:
        from importlib import resources

        res = resources.files("dtd_ray.presets") / f"{spec}.yaml"
        if not res.is_file():
            raise ValueError(f"unknown preset {spec!r}; presets: {', '.join(list_presets())} (or pass a .yaml file)")
        text = res.read_text()
        name = spec
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config {spec}: the top level must be a mapping of options")
    return values, name


def _select_models(entries: list[Any], names: list[str]) -> list[Any]:
    """The config's model entries whose tag or name is in ``names`` (in ``names``' order)."""
    out = []
    for n in names:
        hit = [e for e in entries if isinstance(e, dict) and n in (e.get("tag"), e.get("name"))]
        if not hit:
            have = [e.get("tag") or e.get("name") for e in entries if isinstance(e, dict)]
            raise ValueError(f"--models {n!r}: no such model entry in the config; entries: {', '.join(have) or '(none)'}")
        out.extend(h for h in hit if h not in out)
    return out


def merge_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply command-line ``overrides`` to a config's ``values``.

    ``models`` given as names selects entries of the config (as dicts: replaces them);
    ``retrain`` merges per mode (a mode's options update the config's); every other
    option replaces the config's value.
    """
    out = dict(values)
    for key, v in overrides.items():
        if key == "models":
            names = [v] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else None
            if names is not None and all(isinstance(n, str) for n in names):
                names = [s for n in names for s in n.split(",") if s]
                out["models"] = _select_models(list(values.get("models") or []), names)
            else:
                out["models"] = v
        elif key == "retrain" and isinstance(v, dict):
            base = {m: dict(o or {}) for m, o in (values.get("retrain") or {}).items()}
            for mode, opts in v.items():
                base[mode] = {**base.get(mode, {}), **(opts or {})}
            out["retrain"] = base
        else:
            out[key] = v
    return out


def load_config(spec: str = "quickstart", overrides: dict[str, Any] | None = None) -> SweepConfig:
    """The :class:`SweepConfig` of a preset or YAML file with ``overrides`` applied, validated.

    Unknown keys (top level, model entries, retrain modes and their options) raise a
    ``ValueError`` naming the key and the valid ones.
    """
    values, name = read_config_file(spec)
    if "config" in values:
        raise ValueError(f"config {spec}: 'config' is a command-line option, not a config key")
    try:
        config_lib.check_keys(SweepConfig, values)
    except ValueError as e:
        raise ValueError(f"config {spec}: {e}") from None
    overrides = dict(overrides or {})
    overrides.pop("config", None)
    config_lib.check_keys(SweepConfig, overrides)
    merged = merge_overrides(values, overrides)
    merged.setdefault("name", name)
    if merged.get("name") is None:
        merged["name"] = name
    cfg = SweepConfig(config=spec, **merged)
    resolve_models(cfg)  # fail early on a bad model entry
    resolve_retrain(cfg, parse_k_grid(cfg.k, name="k"))
    return cfg


def _substitute(value: str | None, data_root: str, where: str) -> str | None:
    if value is None:
        return None
    out = str(value).replace("${data_root}", data_root.rstrip("/"))
    left = re.search(r"\$\{[^}]*\}", out)
    if left:
        raise ValueError(f"{where}: unknown placeholder {left.group(0)} (only ${{data_root}} is replaced)")
    return out


def resolve_models(cfg: SweepConfig) -> list[ModelSpec]:
    """The model entries as :class:`ModelSpec` with ``${data_root}`` replaced; unknown keys refused."""
    if not cfg.models:
        raise ValueError("the sweep has no models (set `models:` in the config)")
    specs: list[ModelSpec] = []
    valid = ", ".join(f.name for f in dataclasses.fields(ModelSpec))
    for i, entry in enumerate(cfg.models):
        if isinstance(entry, ModelSpec):
            entry = dataclasses.asdict(entry)
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"models[{i}] is not a mapping (name, weights, …): {entry!r}")
        unknown = sorted(set(entry) - {f.name for f in dataclasses.fields(ModelSpec)})
        label = entry.get("tag") or entry.get("name") or f"#{i}"
        if unknown:
            raise ValueError(f"models[{i}] ({label}): unknown option(s) {', '.join(unknown)}; valid: {valid}")
        if "name" not in entry:
            raise ValueError(f"models[{i}]: 'name' (a backbone registry name) is required")
        spec = ModelSpec(**entry)
        spec.weights = _substitute(spec.weights, cfg.data_root, f"models[{i}].weights")
        if spec.datasets is not None:
            spec.datasets = tuple(_substitute(d, cfg.data_root, f"models[{i}].datasets") for d in spec.datasets)
        specs.append(spec)
    return specs


def resolve_retrain(cfg: SweepConfig, grid: list[int]) -> dict[str, RetrainSpec]:
    """The retrain modes to run, each with its options filled from :data:`MODE_DEFAULTS`."""
    if not isinstance(cfg.retrain, dict):
        raise ValueError(f"retrain must be a mapping mode -> options, got {cfg.retrain!r}")
    modes = cfg.modes if cfg.modes is not None else tuple(cfg.retrain)
    for m in list(cfg.retrain) + list(modes):
        if m not in RETRAIN_MODES:
            raise ValueError(f"unknown retrain mode {m!r}; valid: {', '.join(RETRAIN_MODES)}")
    missing = [m for m in modes if m not in cfg.retrain]
    if missing:
        raise ValueError(f"--modes {','.join(missing)}: not under `retrain` in the config "
                         f"(configured: {', '.join(cfg.retrain) or 'none'}); add it with --retrain")
    out: dict[str, RetrainSpec] = {}
    for mode in modes:
        opts = dict(cfg.retrain[mode] or {})
        if not isinstance(opts, dict):
            raise ValueError(f"retrain.{mode} must be a mapping of options, got {opts!r}")
        unknown = sorted(set(opts) - set(MODE_OPTIONS[mode]))
        if unknown:
            raise ValueError(f"retrain.{mode}: unknown option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(MODE_OPTIONS[mode])}")
        spec = RetrainSpec(**opts)
        for k, v in MODE_DEFAULTS[mode].items():
            if getattr(spec, k) is None:
                setattr(spec, k, v)
        if spec.augment == "none":
            spec.augment = None
        if spec.augment not in (None, "cifar"):
            raise ValueError(f"retrain.{mode}.augment must be 'cifar' or 'none', got {spec.augment!r}")
        if spec.precision not in (None, "auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"retrain.{mode}.precision must be auto, fp32, bf16 or fp16, got {spec.precision!r}")
        if spec.k is not None:
            spec.k = parse_k_grid(spec.k, name=f"retrain.{mode}.k")
        bad = [s for s in (spec.strategies or ()) if s not in selection.STRATEGIES]
        if bad:
            raise ValueError(f"retrain.{mode}.strategies: unknown strategy {bad[0]!r}; "
                             f"valid: {', '.join(selection.STRATEGIES)}")
        if mode != "none" and (int(spec.epochs) < 1 or float(spec.lr) <= 0 or int(spec.batch_size) < 1):
            raise ValueError(f"retrain.{mode}: epochs and batch_size must be ≥ 1 and lr > 0")
        out[mode] = spec
    return out


# ----------------------------------------------------------------------------- plan


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


@dataclass
class Plan:
    cfg: SweepConfig
    output: str  # absolute local path or URI
    grid: list[int]
    units: list[Unit]
    modes: dict[str, RetrainSpec]
    trials: list[TrialSpec]
    extract_plans: dict[str, Any] = field(default_factory=dict)

    def trials_of(self, mode: str, unit: str | None = None) -> list[TrialSpec]:
        return [t for t in self.trials if t.mode == mode and (unit is None or t.unit == unit)]


def resolve_output(cfg: SweepConfig) -> str:
    out = cfg.output or f"runs/{cfg.name}"
    if "://" in out:
        return out.rstrip("/")
    return os.path.abspath(os.path.expanduser(out))


def trial_identity(cfg: SweepConfig, unit: Unit, mode: str, spec: RetrainSpec, strategy: str, k: int) -> dict[str, Any]:
    k1 = selection.K1_NOT_APPLICABLE if strategy in selection.K1_INDEPENDENT else k
    ident: dict[str, Any] = {
        "v": schema.TRIALS_SCHEMA_VERSION,
        "model": unit.key,
        "backbone": unit.model.name,
        "weights": unit.model.weights,
        "normalization": unit.model.normalization,
        "dataset": unit.dataset,
        "kmax": cfg.kmax,
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "select_augment": cfg.select_augment,
        "correct_only": cfg.correct_only,
        "seed": cfg.seed,
        "strategy": strategy,
        "k1": k1,
        "k2": k,
        "mode": mode,
    }
    if mode != "none":
        ident.update(epochs=int(spec.epochs), lr=float(spec.lr), batch_size=int(spec.batch_size),
                     weight_decay=float(spec.weight_decay or 0.0))
    if mode == "finetune":
        ident.update(augment=spec.augment, precision=spec.precision, max_train_rows=spec.max_train_rows,
                     max_eval_rows=spec.max_eval_rows)
    return ident


def plan_sweep(cfg: SweepConfig, *, check_inputs: bool = True) -> Plan:
    """Validate the whole sweep and list its units and trials, before Ray starts.

    With ``check_inputs`` also checks checkpoints, datasets, splits and the output
    (``dtd_ray.ray.extract.check_extract``): a missing checkpoint is one clear line.
    """
    if not cfg.name:
        cfg.name = "sweep"  # built directly rather than by load_config
    grid = parse_k_grid(cfg.k, name="k")
    strategies = tuple(cfg.strategies)
    bad = [s for s in strategies if s not in selection.STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"unknown strategy {bad[0] if bad else '(none)'!r}; valid: {', '.join(selection.STRATEGIES)}")
    if "frequency" in strategies and grid[-1] > cfg.kmax:
        raise ValueError(f"k={grid[-1]} > kmax={cfg.kmax}: frequency maps need k1 ≤ kmax (raise --kmax)")
    if cfg.train_split == cfg.eval_split:
        raise ValueError(f"train_split and eval_split are both {cfg.train_split!r}")
    models = resolve_models(cfg)
    modes = resolve_retrain(cfg, grid)
    if not modes:
        raise ValueError("no retrain mode to run (retrain: is empty or --modes selects none)")
    output = resolve_output(cfg)

    units: list[Unit] = []
    for m in models:
        dsets = m.datasets if m.datasets is not None else tuple(
            _substitute(d, cfg.data_root, "datasets") for d in cfg.datasets)
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

    trials: list[TrialSpec] = []
    for mode, spec in modes.items():
        ks = grid if spec.k is None else [k for k in spec.k if k in grid]
        if spec.k is not None and len(ks) < len(spec.k):
            off = [k for k in spec.k if k not in grid]
            print(f"[sweep] note: retrain.{mode}.k {off} not in the k grid {grid}: skipped", flush=True)
        strats = strategies if spec.strategies is None else tuple(s for s in spec.strategies if s in strategies)
        tags = {m.key for m in models}
        if spec.models is not None and not set(spec.models) <= tags:
            off = sorted(set(spec.models) - tags)
            print(f"[sweep] note: retrain.{mode}.models {off} not among the sweep's models: skipped", flush=True)
        for u in units:
            if spec.models is not None and u.model.key not in spec.models:
                continue
            for s in strats:
                for k in ks:
                    ident = trial_identity(cfg, u, mode, spec, s, k)
                    trials.append(TrialSpec(trial_id=config_lib.config_hash(ident), unit=u.key, mode=mode,
                                            strategy=s, k=k, k1=ident["k1"], identity=ident))
    plan = Plan(cfg=cfg, output=output, grid=grid, units=units, modes=modes, trials=trials)
    if check_inputs:
        _check_inputs(plan)
    return plan


def _check_inputs(plan: Plan) -> None:
    from dtd_ray.ray.extract import check_extract

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
            plan.extract_plans[u.key] = check_extract(extract_config(plan, u))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"model {u.key} on {u.dataset}: {e}{job_hint}") from None
    if _under_ray_job() and "://" not in (cfg.output or "") and not os.path.isabs(cfg.output or "runs"):
        print(f"[sweep] warning: output {cfg.output or f'runs/{cfg.name}'!r} is relative and this driver runs under "
              f"`ray job submit`: results land in {plan.output} (inside the job's copy of the project); "
              "pass --output /abs/path or s3://…", flush=True)


def extract_config(plan: Plan, unit: Unit, *, use_gpu: bool | None = None):
    from dtd_ray.ray.extract import ExtractConfig

    cfg = plan.cfg
    splits = tuple(dict.fromkeys((cfg.train_split, cfg.eval_split)))
    return ExtractConfig(
        model=unit.model.name,
        weights=unit.weights_abs,
        normalization=unit.model.normalization,
        dataset=unit.dataset_abs,
        splits=splits,
        output=plan.output,
        tag=unit.key,
        kmax=cfg.kmax,
        batch_size=unit.model.batch_size or cfg.extract_batch_size,
        use_gpu=use_gpu,
        seed=cfg.seed,
        overwrite=cfg.overwrite,
    )


def decompose_config(plan: Plan, unit: Unit):
    from dtd_ray.stages.decompose import DecomposeConfig

    cfg = plan.cfg
    grid = plan.grid
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
        strategies=tuple(cfg.strategies),
        k1=list(grid),
        k2_max=int(grid[-1]),
        seed=cfg.seed,
        analysis_k=analysis_k,
        print_k=list(grid),
        output=f"{plan.output}/decompose",
    )


def describe(plan: Plan) -> str:
    head = (f"[sweep] {plan.cfg.name}: {len(plan.units)} unit(s) × k {plan.grid} × strategies "
            f"{','.join(plan.cfg.strategies)} × modes {','.join(plan.modes)} -> {len(plan.trials)} trials; "
            f"output {plan.output}")
    lines = [head]
    for u in plan.units:
        lines.append(f"[sweep]   {u.key}: {u.model.name} weights={u.model.weights} on {u.dataset}")
    for mode in plan.modes:
        n = len(plan.trials_of(mode))
        lines.append(f"[sweep]   mode {mode}: {n} trial(s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- trials/ storage


def trials_root(output: str) -> str:
    return f"{output.rstrip('/')}/trials"


def finished_trial_ids(output: str) -> set[str]:
    """Trial ids with a row file under ``<output>/trials`` (temporary ``_…`` files ignored)."""
    fs, path = storage.resolve(trials_root(output))
    if not storage.exists(fs, path):
        return set()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return {
        i.base_name[: -len(".parquet")]
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))
    }


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema.TRIALS_SCHEMA}
    return pa.Table.from_pydict(cols, schema=schema.TRIALS_SCHEMA)


def write_trial_row(output: str, row: dict[str, Any]) -> str:
    """Write one trial's row as ``trials/<trial_id>.parquet`` atomically; returns the path."""
    fs, path = storage.resolve(trials_root(output))
    return storage.write_parquet(fs, f"{path}/{row['trial_id']}.parquet", rows_to_table([row]))


def read_trials(output: str, trial_ids: list[str] | None = None) -> pd.DataFrame:
    """The rows under ``<output>/trials`` (optionally only ``trial_ids``) as a DataFrame."""
    fs, path = storage.resolve(trials_root(output))
    if not storage.exists(fs, path):
        return rows_to_table([]).to_pandas()
    import pyarrow.dataset as pads

    ds = pads.dataset(path, filesystem=fs, format="parquet", schema=schema.TRIALS_SCHEMA)
    if trial_ids is not None:
        import pyarrow.compute as pc

        table = ds.to_table(filter=pc.field("trial_id").isin(list(trial_ids)))
    else:
        table = ds.to_table()
    return table.to_pandas()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------- stages


def run_extraction(plan: Plan, units: list[Unit], *, use_gpu: bool) -> None:
    """Extract every unit's partitions (finished ones are skipped) before any trial starts."""
    from dtd_ray.ray.extract import run_extract

    for u in units:
        print(f"[sweep] extract {u.key} ({u.model.name} on {u.dataset})", flush=True)
        run_extract(extract_config(plan, u, use_gpu=use_gpu), plan=plan.extract_plans.get(u.key))


@dataclass
class Decomposed:
    eval: pd.DataFrame  # decompose's eval table (fractions)
    maps: Any  # list[ClassMap] or a maps/ DataFrame
    status: str

    def class_map(self, strategy: str, k1: int, k: int) -> np.ndarray:
        if isinstance(self.maps, pd.DataFrame):
            return tables.map_from_table(self.maps, strategy=strategy, k1=k1, k2=k).idx
        for cm in self.maps:
            if cm.strategy == strategy and cm.k1 == k1 and cm.k2 >= k:
                return cm.top(k).idx
        raise ValueError(f"no {strategy} map with k1={k1} and length ≥ {k}")

    def eval_row(self, strategy: str, k1: int, k: int) -> dict[str, Any]:
        df = self.eval
        r = df[(df["strategy"] == strategy) & (df["k1"] == k1) & (df["k2"] == k)]
        if r.empty:
            raise ValueError(f"decompose evaluated no ({strategy}, k1={k1}, k2={k})")
        return r.iloc[0].to_dict()


def _records_hashes(plan: Plan, unit: Unit) -> dict[str, Any]:
    cfg = plan.cfg
    out = {}
    splits = {cfg.train_split, cfg.eval_split}
    if cfg.select_augment:
        splits.add(schema.split_key(cfg.train_split, augment=cfg.select_augment, seed=cfg.seed))
    for s in sorted(splits):
        man = records.read_manifest(f"{plan.output}/records", model=unit.key, split=s)
        out[s] = None if man is None else man.get("config_hash")
    return out


def run_decomposition(plan: Plan, unit: Unit) -> Decomposed:
    """Decompose one unit for the whole grid, or load the result of an identical earlier run."""
    from dtd_ray.ray.decompose import run_decompose

    dcfg = decompose_config(plan, unit)
    fs, root = storage.resolve(dcfg.output)
    marker_path = f"{root}/_sweep/{unit.key}.json"
    want = {"decompose_config": config_lib.to_dict(dcfg), "records": _records_hashes(plan, unit)}
    old = storage.read_json(fs, marker_path)
    eval_path = f"{root}/eval/{dcfg.eval_stem}.parquet"
    maps_path = f"{root}/maps/{dcfg.select_partition}/{unit.key}.parquet"
    if (old is not None and not plan.cfg.overwrite and old.get("decompose_config") == want["decompose_config"]
            and old.get("records") == want["records"] and storage.exists(fs, eval_path)
            and storage.exists(fs, maps_path)):
        print(f"[sweep] decompose {unit.key}: finished earlier with the same config and records, skipped", flush=True)
        ev = pq.read_table(eval_path, filesystem=fs).to_pandas()
        maps = pq.read_table(maps_path, filesystem=fs).to_pandas()
        return Decomposed(eval=ev, maps=maps, status="skipped")
    print(f"[sweep] decompose {unit.key}", flush=True)
    res = run_decompose(dcfg)
    want["records"] = _records_hashes(plan, unit)  # an augmented pass may have been extracted just now
    storage.write_json(fs, marker_path, {**want, "finished_at": _now()})
    return Decomposed(eval=res["eval"], maps=res["maps"], status="written")


def base_row(plan: Plan, unit: Unit, t: TrialSpec, dec: Decomposed) -> dict[str, Any]:
    """The columns of a trial's row known before it runs (decompose's evaluation, in percent)."""
    cfg = plan.cfg
    ev = dec.eval_row(t.strategy, t.k1, t.k)
    spec = plan.modes[t.mode]
    sel_split = schema.split_key(cfg.train_split, augment=cfg.select_augment, seed=cfg.seed)
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
        "lr": None if t.mode == "none" else float(spec.lr),
        "batch_size": None if t.mode == "none" else int(spec.batch_size),
        "weight_decay": None if t.mode == "none" else float(spec.weight_decay or 0.0),
        "seed": int(cfg.seed),
        "n_eval": int(ev["n_instances"]),
        "acc_full": 100.0 * float(ev["acc_full"]),
        "acc_decomposed": 100.0 * float(ev["acc_decomposed"]),
        "head_macs_full": int(ev["head_macs_full"]),
        "head_macs_decomposed": int(ev["head_macs_decomposed"]),
        "channels_used": int(ev["channels_used"]),
    }


def write_eval_only_rows(plan: Plan, unit: Unit, dec: Decomposed, todo: set[str]) -> int:
    """Mode ``none``: the rows come from decompose's evaluation; no Tune trial."""
    n = 0
    for t in plan.trials_of("none", unit.key):
        if t.trial_id not in todo:
            continue
        row = base_row(plan, unit, t, dec)
        row.update(use_gpu=False, config=json.dumps({"identity": t.identity}, sort_keys=True), finished_at=_now())
        write_trial_row(plan.output, row)
        n += 1
    if n:
        print(f"[sweep] none {unit.key}: {n} evaluation row(s) -> {trials_root(plan.output)}", flush=True)
    return n


# ----------------------------------------------------------------------------- Tune


def _run_trial(config: dict[str, Any], *, mode: str, params: dict[str, dict[str, Any]], data: dict | None = None) -> None:
    """The Tune trainable of every retrain trial: looks up the trial's config by its id."""
    from dtd_ray.train import retrain

    p = params[config["trial_id"]]
    if mode == "head":
        retrain.head_trainable(p, data=data)
    else:
        retrain.finetune_trainable(p)


def _trial_name(trial) -> str:  # Tune names trial folders by this (stable, short)
    return str(trial.config["trial_id"])


def trial_resources(mode: str, spec: RetrainSpec, info: cluster.Cluster, *, use_gpu: bool) -> tuple[dict[str, float], int, bool, int]:
    """``(resources, max_concurrent, trial_uses_gpu, cpu_threads)`` of a mode's trials.

    Decided here, on the driver: a GPU only for finetune and only where the cluster has
    GPUs (Ray would wait forever for one that never comes); fractional CPUs on small
    machines, so that trials never starve each other or the driver on 2 cores.
    """
    small = info.cpus_per_node < 4
    cpus = float(spec.cpus) if spec.cpus is not None else (0.5 if small else 1.0)
    gpus = 0.0
    if mode == "finetune":
        gpus = float(spec.gpus) if spec.gpus is not None else (1.0 if use_gpu else 0.0)
        if gpus > 0 and not use_gpu:
            raise RuntimeError(f"retrain.finetune.gpus={gpus} but this sweep runs without GPUs "
                               "(the cluster has none; a trial would wait forever): pass --use_gpu true "
                               "on an autoscaling cluster, or drop gpus")
    if spec.max_concurrent is not None:
        conc = int(spec.max_concurrent)
    elif mode == "finetune" and gpus > 0:
        conc = 0  # bounded by the GPUs (0: no limit beyond resources)
    elif mode == "finetune":
        conc = info.nodes  # a CPU finetune uses every core of its node
    else:
        conc = max(1, int(info.cpus // max(cpus, 1.0)))
    threads = info.cpus_per_node if (mode == "finetune" and gpus == 0) else max(1, int(cpus))
    return {"cpu": cpus, "gpu": gpus}, conc, gpus > 0, threads


def trainable_config(plan: Plan, unit: Unit, t: TrialSpec, idx: np.ndarray, *, use_gpu: bool, threads: int) -> dict:
    cfg = plan.cfg
    spec = plan.modes[t.mode]
    common = {
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "idx": np.asarray(idx).astype(int).tolist(),
        "epochs": int(spec.epochs),
        "lr": float(spec.lr),
        "batch_size": int(spec.batch_size),
        "weight_decay": float(spec.weight_decay or 0.0),
        "seed": int(cfg.seed),
    }
    if t.mode == "head":
        return {"records": f"{plan.output}/records", "model": unit.key, **common, "use_gpu": False,
                "cpu_threads": int(threads)}
    return {
        "model": unit.model.name,
        "weights": unit.weights_abs,
        "normalization": unit.model.normalization,
        "dataset": unit.dataset_abs,
        **common,
        "augment": spec.augment,
        "precision": spec.precision,
        "max_train_rows": spec.max_train_rows,
        "max_eval_rows": spec.max_eval_rows,
        "use_gpu": bool(use_gpu),
        "cpu_threads": int(threads),
    }


def head_data(plan: Plan, unit: Unit) -> dict[str, np.ndarray]:
    """Cached features, labels and the original head of one unit (put in the object store once)."""
    from dtd_ray.models.linear_head import load_head

    root = f"{plan.output}/records"
    tr = records.load_records(root, model=unit.key, split=plan.cfg.train_split, columns=[schema.LABEL, schema.FEATURES])
    ev = records.load_records(root, model=unit.key, split=plan.cfg.eval_split, columns=[schema.LABEL, schema.FEATURES])
    man = records.read_manifest(root, model=unit.key, split=plan.cfg.train_split)
    w, b, _ = load_head(manifest=man)
    return {
        "train_features": tr[schema.FEATURES].astype(np.float32, copy=False),
        "train_labels": tr[schema.LABEL].astype(np.int64),
        "eval_features": ev[schema.FEATURES].astype(np.float32, copy=False),
        "eval_labels": ev[schema.LABEL].astype(np.int64),
        "weight": w.astype(np.float32),
        "bias": b.astype(np.float32),
    }


def _make_row_writer(output: str, rows: dict[str, dict[str, Any]], configs: dict[str, dict], total: int):
    """A Tune callback (on the driver) that prints progress and writes each trial's row as it finishes."""
    from ray import tune

    class RowWriter(tune.Callback):
        def __init__(self) -> None:
            self.history: dict[str, list[dict[str, Any]]] = {}
            self.done = 0
            self.failed: list[str] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            tid = trial.config["trial_id"]
            self.history.setdefault(tid, []).append(dict(result))
            r = rows[tid]
            acc = result.get("acc_eval")
            print(f"[sweep] {r['retrain_mode']} {r['model']} {r['strategy']} k={r['k2']}: epoch "
                  f"{result.get('epoch', '?')}/{r['epochs']} acc {acc if acc is None else f'{acc:.2f}'} % "
                  f"(decomposed {r['acc_decomposed']:.2f} %, full {r['acc_full']:.2f} %)", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            tid = trial.config["trial_id"]
            hist = [h for h in self.history.get(tid, []) if "acc_eval" in h]
            if not hist:
                self.failed.append(tid)
                print(f"[sweep] trial {tid} finished without reporting acc_eval: no row written", flush=True)
                return
            first, last = hist[0], hist[-1]
            ckpt = getattr(trial, "checkpoint", None)
            row = dict(rows[tid])
            row.update(
                acc_decomposed_init=_float(first.get("acc_decomposed_init")),
                acc_retrained=_float(last.get("acc_eval")),
                acc_by_epoch=[float(h["acc_eval"]) for h in hist],
                loss=_float(last.get("loss")),
                seconds=_float(last.get("time_total_s", sum(float(h.get("seconds") or 0) for h in hist))),
                checkpoint=getattr(ckpt, "path", None),
                config=json.dumps(configs[tid], sort_keys=True, default=str),
                finished_at=_now(),
            )
            path = write_trial_row(output, row)
            self.done += 1
            print(f"[sweep] trial {tid} done ({self.done}/{total}): {row['retrain_mode']} {row['model']} "
                  f"{row['strategy']} k={row['k2']} acc {row['acc_retrained']:.2f} % -> {path}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            tid = trial.config["trial_id"]
            self.failed.append(tid)
            print(f"[sweep] trial {tid} failed ({rows[tid]['retrain_mode']} {rows[tid]['model']} "
                  f"{rows[tid]['strategy']} k={rows[tid]['k2']}); see {getattr(trial, 'path', '')}", flush=True)

    return RowWriter()


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def run_tune(plan: Plan, mode: str, todo: list[TrialSpec], decs: dict[str, Decomposed], *, use_gpu: bool,
             unit: Unit | None = None) -> list[str]:
    """One Tuner over ``todo`` (trials of ``mode``); returns the ids of failed trials."""
    from ray import tune

    if not todo:
        return []
    spec = plan.modes[mode]
    info = cluster.probe()
    resources, conc, trial_gpu, threads = trial_resources(mode, spec, info, use_gpu=use_gpu)
    units = {u.key: u for u in plan.units}
    params: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    for t in todo:
        u = units[t.unit]
        dec = decs[t.unit]
        idx = dec.class_map(t.strategy, t.k1, t.k)
        params[t.trial_id] = trainable_config(plan, u, t, idx, use_gpu=trial_gpu, threads=threads)
        rows[t.trial_id] = {**base_row(plan, u, t, dec), "use_gpu": trial_gpu}
        configs[t.trial_id] = {"identity": t.identity,
                               "trainable": {k: v for k, v in params[t.trial_id].items() if k != "idx"}}
    data = head_data(plan, unit) if (mode == "head" and unit is not None) else None
    kwargs: dict[str, Any] = {"mode": mode, "params": params}
    if data is not None:
        kwargs["data"] = data
    trainable = tune.with_resources(tune.with_parameters(_run_trial, **kwargs), resources)
    name = f"{plan.cfg.name}-{mode}-{unit.key if unit else 'all'}-{time.strftime('%Y%m%d-%H%M%S')}"
    writer = _make_row_writer(plan.output, rows, configs, len(todo))
    print(f"[sweep] {mode}{' ' + unit.key if unit else ''}: {len(todo)} Tune trial(s), {resources} each"
          f"{f', at most {conc} at once' if conc else ''} -> {plan.output}/tune/{name}", flush=True)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search([t.trial_id for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=conc or None,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            storage_path=f"{plan.output}/tune",
            name=name,
            callbacks=[writer],
            failure_config=tune.FailureConfig(max_failures=plan.cfg.max_failures),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    failed = set(writer.failed)
    for r in grid:
        if r.error is not None:
            failed.add(r.config.get("trial_id") if r.config else "?")
    done = finished_trial_ids(plan.output)
    failed |= {t.trial_id for t in todo if t.trial_id not in done}
    return sorted(failed)


# ----------------------------------------------------------------------------- driver


def save_resolved_config(plan: Plan) -> str:
    fs, path = storage.resolve(plan.output)
    target = f"{path}/sweep_config.json"
    storage.write_json(fs, target, {
        "config": config_lib.to_dict(plan.cfg),
        "resolved": {
            "output": plan.output,
            "k": plan.grid,
            "units": [{"key": u.key, "backbone": u.model.name, "weights": u.model.weights,
                       "normalization": u.model.normalization, "dataset": u.dataset,
                       "weights_abs": u.weights_abs, "dataset_abs": u.dataset_abs} for u in plan.units],
            "modes": {m: config_lib.to_dict(s) for m, s in plan.modes.items()},
            "trials": {m: len(plan.trials_of(m)) for m in plan.modes},
        },
        "versions": config_lib.versions(),
        "started_at": _now(),
    })
    return target


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per (model, strategy, k): acc_full, acc_decomposed and acc_retrained per retrain mode (%)."""
    if df.empty:
        return pd.DataFrame(columns=["model", "strategy", "k", "acc_full", "acc_decomposed"])
    d = df.assign(k=df["k2"])
    base = d.groupby(["model", "strategy", "k"], sort=True)[["acc_full", "acc_decomposed"]].first()
    modes = [m for m in RETRAIN_MODES if m != "none" and m in set(d["retrain_mode"])]
    for m in modes:
        s = d[d["retrain_mode"] == m].set_index(["model", "strategy", "k"])["acc_retrained"]
        base[f"acc_retrained[{m}]"] = s
    return base.round(2).reset_index()


def run_sweep(cfg: SweepConfig, *, plan: Plan | None = None) -> dict[str, Any]:
    """The whole sweep on the running Ray cluster (the entry point calls ``ray.init``).

    Returns ``{"trials": DataFrame of this sweep's rows, "summary": DataFrame, "output": str,
    "ran": {mode: trials run}, "skipped": int, "report": report.md path or None}``; raises ``RuntimeError`` if trials failed
    (after every other trial finished and was written).
    """
    t0 = time.perf_counter()
    plan = plan or plan_sweep(cfg)
    print(describe(plan), flush=True)
    storage.check_writable(plan.output)
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
                for u in units:
                    todo = [t for t in plan.trials_of("head", u.key) if t.trial_id in todo_ids]
                    f = run_tune(plan, "head", todo, decs, use_gpu=use_gpu, unit=u)
                    ran["head"] += len(todo) - len(f)
                    failed += f
            if "finetune" in plan.modes:
                todo = [t for t in plan.trials_of("finetune") if t.trial_id in todo_ids and t.unit in decs]
                f = run_tune(plan, "finetune", todo, decs, use_gpu=use_gpu)
                ran["finetune"] += len(todo) - len(f)
                failed += f
        finally:
            if use_gpu:
                cluster.release_gpu_request()

    df = read_trials(plan.output, ids)
    summary = summary_table(df)
    seconds = time.perf_counter() - t0
    print(f"[sweep] summary (accuracy %, {len(df)} of {len(ids)} trial rows; k1 = k2 = k):", flush=True)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(summary.to_string(index=False), flush=True)
    print(f"[sweep] done: ran {sum(ran.values())} trial(s) ({', '.join(f'{m} {n}' for m, n in ran.items())}), "
          f"skipped {skipped}, failed {len(failed)}, {seconds:.1f} s -> {trials_root(plan.output)}", flush=True)
    report = None
    if cfg.report and "://" not in plan.output and len(df):
        from dtd_ray.report import ReportConfig, make_report

        grid = sorted(set(int(k) for k in df["k2"]))
        # The report's fixed k: 5 (the paper's headline k and decompose's analysis k) when swept.
        report = make_report(ReportConfig(sweep=plan.output, k=5 if 5 in grid else grid[len(grid) // 2]))["report"]
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) failed ({', '.join(failed[:5])}{', …' if len(failed) > 5 else ''}); "
                           f"rerun the same command to retry them (finished trials are kept)")
    return {"trials": df, "summary": summary, "output": plan.output, "ran": ran, "skipped": skipped, "report": report}


# ----------------------------------------------------------------------------- command line


def given_flags(argv: list[str]) -> set[str]:
    """Names of the options present in ``argv`` (as config.run_cli parses them)."""
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    out = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        name = tok[2:].split("=", 1)[0].replace("-", "_")
        if name.startswith("no") and name[2:].lstrip("_") in names:
            name = name[2:].lstrip("_")
        out.add(name)
    return out


def help_text(summary: str) -> str:
    """The part of ``--help`` above the options: model entries, retrain modes, presets."""
    lines = [summary, "", "Model entries (models: [{name: …, …}]):"]
    mc = config_lib.field_comments(ModelSpec)
    for f in dataclasses.fields(ModelSpec):
        lines.append(f"  {f.name} (default {f.default!r}): {mc.get(f.name, '')}")
    modes = ("Retrain modes (retrain: {none: {…}, head: {…}, finetune: {…}}): none = the decomposed head "
             "evaluated on cached features (rows from decompose, no training); head = retrain the decomposed "
             "head on cached features; finetune = fine-tune the whole network through the decomposed head. "
             "Options:")
    lines += ["", modes]
    rc = config_lib.field_comments(RetrainSpec)
    for f in dataclasses.fields(RetrainSpec):
        modes = [m for m in RETRAIN_MODES if f.name in MODE_OPTIONS[m]]
        lines.append(f"  {f.name} [{'/'.join(modes)}]: {rc.get(f.name, '')}")
    lines += ["", f"Presets: {', '.join(list_presets())}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, summary: str = "The dtd-ray sweep", run: Any = None) -> Any:
    """Parse the command line (``config.run_cli``), resolve the config and call ``run(cfg)``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    given = given_flags(argv)

    def _run(cli_cfg: SweepConfig) -> Any:
        overrides = {n: getattr(cli_cfg, n) for n in given if n != "config"}
        cfg = load_config(cli_cfg.config, overrides)
        return (run or run_sweep)(cfg)

    return config_lib.run_cli(SweepConfig, _run, summary=help_text(summary), argv=argv)


__all__ = [
    "MODE_DEFAULTS",
    "RETRAIN_MODES",
        "ModelSpec",
    "Plan",
    "RetrainSpec",
    "SweepConfig",
    "list_presets",
    "load_config",
    "main",
    "plan_sweep",
    "read_trials",
    "run_sweep",
    "summary_table",
]
