"""Extract per-instance features and ranked top-k indices to Parquet records.

    python jobs/extract.py --model cifar_resnet20 \
        --weights ../shared/data/cifar_resnets/resnet20-12fca82f.th \
        --dataset imagefolder:../shared/data/cifar10 --output runs/cifar10

Connects to the Ray cluster named by RAY_ADDRESS (as under `ray job submit`), or
starts a local one. Writes <output>/records/model=<tag>/split=<split>/ and a
manifest per partition; a rerun skips finished partitions. `--help` lists every option.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray import config as config_lib  # noqa: E402
from dtd_ray.ray import session  # noqa: E402
from dtd_ray.ray.extract import ExtractConfig, check_extract, run_extract  # noqa: E402


def run(cfg: ExtractConfig) -> None:
    plan = check_extract(cfg)  # bad names and paths fail here, before Ray starts
    with session.start(verbose=cfg.verbose):
        run_extract(cfg, plan=plan)


if __name__ == "__main__":
    try:
        config_lib.run_cli(ExtractConfig, run, summary=__doc__.strip().splitlines()[0])
    except (ValueError, OSError, RuntimeError) as e:  # OSError: also an object store that fails mid-run
        # A user's mistake gets one line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
