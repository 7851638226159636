"""Train a CIFAR-style ResNet on a dataset source; writes a checkpoint and its record.

    python jobs/train.py --model cifar_resnet20 --dataset fashion-mnist --epochs 15 \
        --output results/backbones

Runs as a Ray task (on a GPU when the cluster has one) or, with `--ray false`, in this
process. The checkpoint loads with `get_backbone(model, weights=<path>)`. `--help`
lists every option.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray import config as config_lib  # noqa: E402
from dtd_ray.ray import session  # noqa: E402
from dtd_ray.ray.train import run_train  # noqa: E402
from dtd_ray.train.backbone import TrainConfig  # noqa: E402


def run(cfg: TrainConfig) -> None:
    if not cfg.ray:
        run_train(cfg)
        return
    with session.start(verbose=cfg.verbose):
        run_train(cfg)


if __name__ == "__main__":
    try:
        config_lib.run_cli(TrainConfig, run, summary=__doc__.strip().splitlines()[0])
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
