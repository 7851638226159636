"""The sweep report: report.md with tables and plots/*.png from a sweep's output folder.

    python jobs/report.py --sweep runs/quickstart
    python jobs/report.py --sweep runs/cifar10_resnets --output results/cifar10_resnets

Reads trials/, decompose/analysis/ and decompose/maps/ and the resolved
sweep_config.json; draws accuracy against k (one line per strategy), the gap to the
full head and Ψ against depth, retraining recovery, head cost, and class-specific
activation maps (needs the models' weights and the test images; skipped with a
reason where they are missing). No Ray needed. `jobs/sweep.py` runs it at the end of
every sweep with a local output. `--help` lists every option.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray import config as config_lib  # noqa: E402
from dtd_ray.report import ReportConfig, make_report  # noqa: E402


def run(cfg: ReportConfig) -> None:
    make_report(cfg)  # returns tables for library callers; the command prints its own progress


if __name__ == "__main__":
    try:
        config_lib.run_cli(ReportConfig, run, summary=__doc__.strip().splitlines()[0])
    except (ValueError, FileNotFoundError, PermissionError) as e:
        # A user's mistake gets one line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
