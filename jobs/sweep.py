"""The dtd-ray sweep: models × datasets × k × strategies × retrain modes, one Parquet row per trial.

    python jobs/sweep.py                                   # the quickstart preset, local Ray
    python jobs/sweep.py --config cifar10_resnets --models cifar_resnet20 --k 5
    ray job submit --working-dir . -- python jobs/sweep.py --config cifar10_resnets \
        --data_root /data --output s3://bucket/dtd/cifar10_resnets

Connects to the Ray cluster named by RAY_ADDRESS (as under `ray job submit`), or starts
a local one. Extracts each model's records (finished partitions skipped), decomposes
them for the whole k grid, runs the retrain trials on Ray Tune and writes
<output>/trials/<trial_id>.parquet (read it with pandas.read_parquet), then prints a
summary table. A rerun resumes: finished trials are skipped. `--config` takes a preset
name or a YAML file; every other option overrides the config's value.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray.ray import session, sweep  # noqa: E402


def run(cfg: sweep.SweepConfig) -> None:
    plan = sweep.plan_sweep(cfg)  # bad names, keys and paths fail here, before Ray starts
    if cfg.dry_run:
        print(sweep.describe(plan))
        return
    with session.start(verbose=cfg.verbose):
        sweep.run_sweep(cfg, plan=plan)


if __name__ == "__main__":
    try:
        sweep.main(summary=__doc__.strip().splitlines()[0], run=run)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: also an object store that fails mid-run
        # A user's mistake (or failed trials) gets one line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
