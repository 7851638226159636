"""Measure localisation: do the selected channels fire on the object? Writes <sweep>/localisation/.

    python jobs/localise.py --sweep results/cifar10_resnets --models cifar_resnet20,cifar_resnet56
    python jobs/localise.py --sweep runs/cifar10_resnets --canvas 96 --background scramble --output runs/loc96

Pastes each test image at a seeded random position on a larger canvas over another class's
blurred image, runs each model of the sweep fully convolutionally on it and scores, per
image, the true class's maps (frequency map, random channels, top-|W|, contribution, CAM,
uniform) by energy-in-box and the pointing game: localisation/<model>.parquet and
localise_config.json. `python jobs/report.py` then summarises them with intervals.
No Ray needed. `--help` lists every option.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray import config as config_lib  # noqa: E402
from dtd_ray.report.localise import LocaliseConfig, run_localise  # noqa: E402


def run(cfg: LocaliseConfig) -> None:
    run_localise(cfg)  # returns what it wrote for library callers; the command prints its own progress


if __name__ == "__main__":
    try:
        config_lib.run_cli(LocaliseConfig, run, summary=__doc__.strip().splitlines()[0])
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # A user's mistake gets one line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
