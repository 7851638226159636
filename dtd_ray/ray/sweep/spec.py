"""The sweep's config: the options, the model entries and the retrain modes, read from a preset or YAML.

:func:`load_config` reads a named preset (``dtd_ray/presets/<name>.yaml``) or a YAML file,
applies the command-line overrides (:func:`merge_overrides`) and validates every key; the
retrain modes' defaults come from :mod:`dtd_ray.train.defaults`, the one table the
trainables read too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import field
from importlib import resources
from typing import Annotated, Any

import yaml
from pydantic import Field

from dtd_ray import config as config_lib
from dtd_ray.config import config_class
from dtd_ray.core import holdout, selection
from dtd_ray.core.kgrid import k_shares, parse_k_grid
from dtd_ray.io import storage
from dtd_ray.models import factories
from dtd_ray.models.runtime import PRECISIONS
from dtd_ray.train import defaults

RETRAIN_MODES = ("none", "head", "finetune")


@config_class
class ModelSpec:
    name: Annotated[str, Field(description="backbone registry name (dtd_ray.models.backbones.list_backbones()), or a model factory: module.path:callable or file.py:callable")] = "cifar_resnet20"
    weights: Annotated[str | None, Field(description="\"default\", a checkpoint file (may use ${data_root}), an http(s) URL, \"torchvision:<ENUM>\", null (random init)")] = "default"
    normalization: Annotated[str | None, Field(description="override the weights' mean/std: cifar10, imagenet, cifar100, fashion-mnist")] = None
    input_size: Annotated[int | None, Field(description="override the input size in px (a model factory's default: 224)")] = None
    resize: Annotated[int | None, Field(description="with input_size: resize the shorter side to this, then center-crop")] = None
    tag: Annotated[str | None, Field(description="records partition and `model` column (default: name); unique within a sweep")] = None
    datasets: Annotated[tuple[str, ...] | None, Field(description="this model's datasets (default: the sweep's datasets)")] = None
    batch_size: Annotated[int | None, Field(description="extraction batch size (default: the sweep's extract_batch_size)")] = None
    strategies: Annotated[tuple[str, ...] | None, Field(description="this model's strategies, a subset of the sweep's (default: all of the sweep's)")] = None

    def __post_init__(self) -> None:
        if self.strategies is not None:
            bad = [s for s in self.strategies if s not in selection.STRATEGIES]
            if bad or not self.strategies:
                raise ValueError(f"model {self.key}: unknown strategy {bad[0] if bad else '(none)'!r}; "
                                 f"valid: {', '.join(selection.STRATEGIES)}")

    @property
    def key(self) -> str:
        return self.tag or (factories.default_tag(self.name) if factories.is_factory(self.name) else self.name)


@config_class
class RetrainSpec:
    k: Annotated[Any, Field(description="k values of this mode (counts or shares of m, \"5%\"), a subset of the sweep's k grid (default: the whole grid)")] = None
    strategies: Annotated[tuple[str, ...] | None, Field(description="strategies of this mode (default: all of the sweep's)")] = None
    models: Annotated[tuple[str, ...] | None, Field(description="model tags of this mode (default: every model of the sweep)")] = None
    epochs: Annotated[int | None, Field(description="training epochs (default: head 10, finetune 1)")] = None
    lr: Annotated[Any, Field(description="Adam learning rate (default: head 1e-2, finetune 1e-4); a list makes a trial per value, and the report keeps the one with the best validation accuracy (val_fraction)")] = None
    seeds: Annotated[tuple[int, ...] | None, Field(description="training seeds, a trial per seed (default: the sweep's seed): order, augmentation, init")] = None
    control: Annotated[bool, Field(description="also train the full head (every class keeps all m features) with the same recipe, per seed and lr: the like-for-like control of the decomposed heads (strategy \"full\")")] = False
    batch_size: Annotated[int | None, Field(description="training batch size (default: head 512, finetune 128)")] = None
    weight_decay: Annotated[float | None, Field(description="weight decay (default 0)")] = None
    augment: Annotated[str | None, Field(description="finetune: training augmentation, \"cifar\" or \"none\" (default \"cifar\")")] = None
    precision: Annotated[str | None, Field(description="finetune: \"auto\" (fp16 autocast + loss scaling on GPU, fp32 on CPU), \"fp32\", \"tf32\", \"bf16\", \"fp16\" (default \"auto\")")] = None
    max_train_rows: Annotated[int | None, Field(description="finetune: train on a seeded random subset of N rows (smoke runs)")] = None
    max_eval_rows: Annotated[int | None, Field(description="finetune: evaluate on a seeded random subset of N rows (smoke runs)")] = None
    cpus: Annotated[float | None, Field(description="CPUs per trial (default: decided on the driver from the cluster)")] = None
    gpus: Annotated[float | None, Field(description="finetune: GPUs per trial (default: 1 when the cluster has GPUs, else 0)")] = None
    max_concurrent: Annotated[int | None, Field(description="trials of this mode at once (default: decided on the driver)")] = None


# The options each mode accepts.
MODE_OPTIONS = {
    "none": ("k", "strategies", "models"),
    "head": ("k", "strategies", "models", "epochs", "lr", "seeds", "control", "batch_size", "weight_decay", "cpus",
             "max_concurrent"),
    "finetune": tuple(f.name for f in dataclasses.fields(RetrainSpec)),
}
# Each mode's defaults: the trainables' own table (mode none trains nothing).
_MODE_DEFAULTS = {"none": {"epochs": 0}, "head": defaults.HEAD, "finetune": defaults.FINETUNE}


@config_class
class SweepConfig:
    config: Annotated[str, Field(description="preset name (quickstart, cifar10_resnets, cifar10_zoo, imagenet_resnets) or a YAML file; the options below override it")] = "quickstart"
    name: Annotated[str | None, Field(description="sweep name (default: the preset or file name); the default output is runs/<name>")] = None
    output: Annotated[str | None, Field(description="output root, local path or URI (default runs/<name>, git-ignored); under `ray job submit` use an absolute path or s3://…")] = None
    shared_fs: Annotated[bool, Field(description="the local output is on a filesystem every node mounts (NFS); without it a local output on a multi-node cluster is refused")] = False
    data_root: Annotated[str, Field(description="replaces ${data_root} in datasets and weights")] = "../shared/data"
    datasets: Annotated[tuple[str, ...], Field(description="datasets of every model without its own: imagefolder:PATH | cifar10:PATH | cifar100:PATH | fashion-mnist[:PATH]")] = ("fashion-mnist",)
    models: Annotated[Any, Field(description="model entries (see \"Model entries\"); on the command line a name or a list of names selects entries of the config")] = ()
    k: Annotated[Any, Field(description="k grid, k1 = k2 = k: a list, \"1..10\", \"1..10,20\", \"5..100:5\", or shares of the feature width m: \"1..10,5%\"")] = "1..10"
    strategies: Annotated[tuple[str, ...], Field(description="selection strategies: frequency, weight_l1, contribution, random; glm is opt-in")] = selection.DEFAULT_STRATEGIES
    retrain: Annotated[Any, Field(description="retrain mode -> options (see \"Retrain modes\"); flags merge into the config's")] = field(default_factory=lambda: {"none": {}})
    modes: Annotated[tuple[str, ...] | None, Field(description="run only these of the configured retrain modes, e.g. none,head (default: all)")] = None
    train_split: Annotated[str, Field(description="split the maps are selected from and heads are retrained on")] = "train"
    train_rows: Annotated[int | None, Field(description="extract and use a seeded random subset of this many train_split rows (None: all); eval_split is always whole")] = None
    eval_split: Annotated[str, Field(description="split every accuracy is measured on")] = "test"
    val_fraction: Annotated[float | None, Field(description="hold this share of train_split out as the validation split (seeded by `seed`, per sample_id; dtd_ray.core.holdout): maps, heads and fine-tuning fit on the rest; lr, best epoch and k1 are chosen on it, never on eval_split")] = None
    select_augment: Annotated[str | None, Field(description="select the maps from an augmented pass of train_split (\"cifar\", as the paper's maps)")] = None
    correct_only: Annotated[bool, Field(description="count only correctly classified instances when selecting maps")] = False
    kmax: Annotated[int, Field(description="ranked feature indices stored per instance (≥ the largest k of frequency)")] = 64
    extract_batch_size: Annotated[int, Field(description="images per extraction batch (use 1024+ on a GPU)")] = 256
    extract_precision: Annotated[str, Field(description="extraction's precision: \"auto\" (fp16 autocast on GPU, fp32 on CPU), \"fp32\", \"tf32\", \"bf16\" or \"fp16\"")] = "auto"
    use_gpu: Annotated[bool | None, Field(description="None: GPUs when the cluster has some; true: wait for the autoscaler to add a GPU node")] = None
    gpu_wait_s: Annotated[float, Field(description="with use_gpu true and no GPU yet: seconds to wait for one")] = 900.0
    seed: Annotated[int, Field(description="seed of the random strategy, augmentation and training")] = 0
    random_seeds: Annotated[int, Field(description="random maps per unit, seeds seed … seed+n−1 (a trial each; the report: mean ± sd)")] = 10
    noise_seeds: Annotated[int, Field(description="noise draws of the essentiality test, averaged")] = 5
    max_failures: Annotated[int, Field(description="retries of a failed trial (from its last checkpoint)")] = 1
    overwrite: Annotated[bool, Field(description="recompute extraction, decomposition and trials even when finished")] = False
    dry_run: Annotated[bool, Field(description="print the plan (units and trials) and exit without running anything")] = False
    report: Annotated[bool, Field(description="write report.md and plots/ into the output (a local folder or s3://…) after the trials (jobs/report.py)")] = True
    atlas: Annotated[bool, Field(description="write the feature atlas into <output>/atlas after the report, for a local output (jobs/atlas.py)")] = True
    verbose: Annotated[bool, Field(description="a line per epoch and per trial, the summary at every k, and Ray's and Tune's own INFO output")] = False

    def __post_init__(self) -> None:
        # models may still be raw (names given on the command line); load_config and
        # plan_sweep validate the entries.
        if self.train_rows is not None and self.train_rows < 1:
            raise ValueError(f"train_rows must be >= 1, got {self.train_rows}")
        holdout.check_fraction(self.val_fraction)
        if self.extract_precision not in PRECISIONS:
            raise ValueError(f"extract_precision must be one of {', '.join(PRECISIONS)}, got {self.extract_precision!r}")
        if isinstance(self.models, (tuple, str, dict)):
            self.models = [self.models] if isinstance(self.models, (str, dict)) else list(self.models)
        if self.retrain is None:
            self.retrain = {}


def list_presets() -> list[str]:
    """The names of the shipped presets (``dtd_ray/presets/<name>.yaml``)."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("dtd_ray.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_config_file(spec: str) -> tuple[dict[str, Any], str]:
    """``(values, name)`` of a preset name or a YAML file (``yaml.safe_load``; no code runs)."""
    if spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec:
        fs, path = storage.resolve(spec)
        if not storage.exists(fs, path):
            raise FileNotFoundError(f"config file not found: {spec}")
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
        name = os.path.basename(path).rsplit(".", 1)[0]
    else:
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
                names = list(config_lib.names(names))
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
    if not k_shares(cfg.k, name="k"):  # a share of m resolves per model, in the plan
        parse_k_grid(cfg.k, name="k")
    resolve_retrain(cfg)
    return cfg


def substitute(value: str | None, data_root: str, where: str) -> str | None:
    """``value`` with ``${data_root}`` replaced; any other ``${…}`` raises naming ``where``."""
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
        spec.weights = substitute(spec.weights, cfg.data_root, f"models[{i}].weights")
        if spec.datasets is not None:
            spec.datasets = tuple(substitute(d, cfg.data_root, f"models[{i}].datasets") for d in spec.datasets)
        specs.append(spec)
    return specs


def resolve_retrain(cfg: SweepConfig) -> dict[str, RetrainSpec]:
    """The retrain modes to run, each with its options filled from :mod:`dtd_ray.train.defaults`."""
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
        for k, v in _MODE_DEFAULTS[mode].items():
            if getattr(spec, k) is None:
                setattr(spec, k, v)
        if spec.augment == "none":
            spec.augment = None
        if spec.augment not in (None, "cifar"):
            raise ValueError(f"retrain.{mode}.augment must be 'cifar' or 'none', got {spec.augment!r}")
        if spec.precision is not None and spec.precision not in PRECISIONS:
            raise ValueError(f"retrain.{mode}.precision must be one of {', '.join(PRECISIONS)}, got {spec.precision!r}")
        if spec.k is not None and not k_shares(spec.k, name=f"retrain.{mode}.k"):
            spec.k = parse_k_grid(spec.k, name=f"retrain.{mode}.k")  # else kept: shares of m resolve per model
        bad = [s for s in (spec.strategies or ()) if s not in selection.STRATEGIES]
        if bad:
            raise ValueError(f"retrain.{mode}.strategies: unknown strategy {bad[0]!r}; "
                             f"valid: {', '.join(selection.STRATEGIES)}")
        if mode != "none":
            lrs = spec.lr if isinstance(spec.lr, (list, tuple)) else [spec.lr]
            try:
                spec.lr = [float(v) for v in lrs] if isinstance(spec.lr, (list, tuple)) else float(spec.lr)
            except (TypeError, ValueError):
                raise ValueError(f"retrain.{mode}.lr must be a number or a list of numbers, got {spec.lr!r}") from None
            if int(spec.epochs) < 1 or int(spec.batch_size) < 1 or not lrs or min(float(v) for v in lrs) <= 0:
                raise ValueError(f"retrain.{mode}: epochs and batch_size must be ≥ 1 and lr > 0")
            if isinstance(spec.lr, list) and len(set(spec.lr)) != len(spec.lr):
                raise ValueError(f"retrain.{mode}.lr lists a value twice: {spec.lr}")
            if spec.seeds is not None and (not spec.seeds or len(set(spec.seeds)) != len(spec.seeds)):
                raise ValueError(f"retrain.{mode}.seeds must be a non-empty list of distinct seeds, got {spec.seeds!r}")
        out[mode] = spec
    return out
