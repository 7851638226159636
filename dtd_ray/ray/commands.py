"""The jobs that start Ray, as :class:`dtd_ray.cli.Command`: sweep, extract, pack, decompose, train.

Each checks its inputs before Ray starts, then starts (or joins) Ray in :func:`session.start`:
the only place, with the tests and the benchmarks, where this package calls ``ray.init``.
``jobs/<name>.py`` and ``dtd-ray <name>`` run them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dtd_ray import config as config_lib
from dtd_ray.cli import Command
from dtd_ray.ray import session
from dtd_ray.ray.decompose_on_ray import decompose_on_ray
from dtd_ray.ray.extract import ExtractConfig, check_extract, run_extract
from dtd_ray.ray.pack import PackConfig, plan_pack, run_pack
from dtd_ray.ray.sweep import describe, plan_sweep, run_sweep
from dtd_ray.ray.sweep.spec import MODE_OPTIONS, RETRAIN_MODES, ModelSpec, RetrainSpec, SweepConfig, list_presets, load_config
from dtd_ray.ray.train_on_ray import train_on_ray
from dtd_ray.stages.decompose import DecomposeConfig, needs_ray, run_decompose
from dtd_ray.train.backbone import TrainConfig


def sweep(cfg: SweepConfig) -> None:
    plan = plan_sweep(cfg)  # bad names, keys and paths fail here, before Ray starts
    if cfg.dry_run:
        print(describe(plan))
        return
    with session.start(verbose=cfg.verbose):
        run_sweep(cfg, plan=plan)


def sweep_config(flags: dict[str, Any]) -> SweepConfig:
    """The flags given on the command line applied over ``--config``'s preset or file: only the
    options present override the config's values (a default must not replace the preset's)."""
    flags = dict(flags)
    return load_config(str(flags.pop("config", SweepConfig.config)), flags)


def sweep_help() -> str:
    """The part of the sweep's ``--help`` above the options: model entries, retrain modes, presets."""
    lines = ["Model entries (models: [{name: …, …}]):"]
    for f in dataclasses.fields(ModelSpec):
        lines.append(f"  {f.name} (default {f.default!r}): {config_lib.describe(ModelSpec, f.name)}")
    lines += ["", "Retrain modes (retrain: {none: {…}, head: {…}, finetune: {…}}): none = the decomposed head "
              "evaluated on cached features (rows from decompose, no training); head = retrain the decomposed "
              "head on cached features; finetune = fine-tune the whole network through the decomposed head. "
              "Options:"]
    for f in dataclasses.fields(RetrainSpec):
        modes = [m for m in RETRAIN_MODES if f.name in MODE_OPTIONS[m]]
        lines.append(f"  {f.name} [{'/'.join(modes)}]: {config_lib.describe(RetrainSpec, f.name)}")
    lines += ["", f"Presets: {', '.join(list_presets())}"]
    return "\n".join(lines)


def extract(cfg: ExtractConfig) -> None:
    plan = check_extract(cfg)  # bad names and paths fail here, before Ray starts
    with session.start(verbose=cfg.verbose):
        run_extract(cfg, plan=plan)


def pack(cfg: PackConfig) -> None:
    planned = plan_pack(cfg)  # the folder is listed and the output checked before Ray starts
    with session.start(verbose=cfg.verbose):
        run_pack(cfg, planned=planned)


def decompose(cfg: DecomposeConfig) -> None:
    if not needs_ray(cfg):
        run_decompose(cfg)
        return
    with session.start(verbose=cfg.verbose):
        decompose_on_ray(cfg)


def train(cfg: TrainConfig) -> None:
    if not cfg.ray:
        train_on_ray(cfg)  # in this process: no Ray started
        return
    with session.start(verbose=cfg.verbose):
        train_on_ray(cfg)


SWEEP = Command(
    summary="The dtd-ray sweep: models × datasets × k × strategies × retrain modes, one Parquet row per trial.",
    config=SweepConfig, run=sweep, build=sweep_config, help=sweep_help())
EXTRACT = Command(summary="Extract per-instance features and ranked top-k indices to Parquet records.",
                  config=ExtractConfig, run=extract)
PACK = Command(summary="Pack an image folder into Parquet shards of encoded images (read them as parquet:OUTPUT).",
               config=PackConfig, run=pack)
DECOMPOSE = Command(
    summary="Decompose: records → frequency tables, class maps of every strategy, and their evaluation.",
    config=DecomposeConfig, run=decompose)
TRAIN = Command(summary="Train a CIFAR-style ResNet on a dataset source; writes a checkpoint and its record.",
                config=TrainConfig, run=train)
