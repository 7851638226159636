"""The sweep's command line: ``--config`` names a preset or YAML file, every other flag overrides it."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from dtd_ray import config as config_lib
from dtd_ray.ray.sweep.config import MODE_OPTIONS, RETRAIN_MODES, ModelSpec, RetrainSpec, SweepConfig, list_presets, load_config
from dtd_ray.ray.sweep.driver import run_sweep


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
    """Parse the command line (``config.run_cli``), resolve the config and call ``run(cfg)`` (default :func:`run_sweep`).

    Only the options present on the command line override the config's values (a flag's
    dataclass default must not replace the preset's value).
    """
    argv = list(sys.argv[1:] if argv is None else argv)

    def _run(cli_cfg: SweepConfig) -> Any:
        given = config_lib.option_names(SweepConfig, argv)
        overrides = {n: getattr(cli_cfg, n) for n in given if n != "config"}
        cfg = load_config(cli_cfg.config, overrides)
        return (run or run_sweep)(cfg)

    return config_lib.run_cli(SweepConfig, _run, summary=help_text(summary), argv=argv)
