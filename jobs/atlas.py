"""The feature atlas: a static web page per sweep with each class's filters, their top images and their maps.

    python jobs/atlas.py --sweep runs/cifar10_resnets --output results/cifar10_resnets/atlas
    python jobs/atlas.py --sweep s3://bucket/dtd/cifar10_resnets --output atlas/ --k 10 --compare glm

Reads the sweep's trials/, decompose/maps/, records/ (the per-instance features: top images come from
one pass over them) and sweep_config.json; the images and weights its units name give the pictures and
the channel maps (left out, with the reason on the page, where they are missing). Writes index.html and
one WebP per row of images; it opens from the file system and loads nothing from the network. No Ray.
`jobs/sweep.py` writes it into <output>/atlas at the end of a sweep with a local output (`--atlas false`
skips it). `--help` lists every option.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray import config as config_lib  # noqa: E402
from dtd_ray.report.atlas import AtlasConfig, build_atlas  # noqa: E402


def run(cfg: AtlasConfig) -> None:
    build_atlas(cfg)


if __name__ == "__main__":
    try:
        config_lib.run_cli(AtlasConfig, run, summary=__doc__.strip().splitlines()[0])
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
