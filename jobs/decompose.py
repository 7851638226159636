"""Decompose: records → frequency tables, class maps of every strategy, and their evaluation.

    python jobs/decompose.py --records runs/cifar10/records --model cifar_resnet20 \
        --output runs/cifar10/decompose

Reads the selection split's records (``--select_split``, train by default) once and
counts the per-class top-k1 frequencies of every k1 of the grid; selects the maps of
every strategy (frequency, weight_l1, contribution, random); evaluates every
(strategy, k1, k2 ≤ k1) decomposed head on the cached features of ``--split``; runs
the essentiality test and Ψ at ``--analysis_k``. Writes under ``<output>``::

    freq/select_split=<s>/correct_only=<b>/<model>.parquet   model, k1, class, feature, count (non-zero counts)
    maps/select_split=<s>/correct_only=<b>/<model>.parquet   model, strategy, k1, k2, class, rank, feature, count,
                                                 score, map_seed (random: one map per seed, --random_seeds)
    eval/<model>__<split>__<select>.parquet      one row per (strategy, k1, map_seed, k2), selection options as
                                                 columns, and each instance's outcome (packed bits, by sample_id)
    instances/<model>__<split>__<select>.parquet one row per evaluation instance: the full head's outcome and Ψ
    analysis/<model>__<split>__<select>.parquet  per strategy and class at k1 = k2 = analysis_k (mean over
                                                 --noise_seeds draws)
    essentiality/<model>__<split>__<select>.parquet  the essentiality test per instance
    json/<model>__<select>/<model>_<strategy>_<k1>_<k2>_indices.json   (--export_json)
    _manifests/<model>__<split>__<select>.json   resolved config, selection options, warnings, timings (written last)

and prints the comparison table. ``freq/`` and ``maps/`` are Hive-partitioned by the
selection options, so ``pandas.read_parquet(<output>/maps)`` keeps them apart;
``<select>`` in the other names is the selection split, with ``__correct`` appended
when only correctly classified instances count. k1 = -1 marks strategies whose map
does not depend on k1. The head
(W, b) comes from the backbone named in the records' manifest, or from ``--head``
(an .npz with ``weight`` and ``bias``). `--help` lists every option.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtd_ray import config as config_lib  # noqa: E402
from dtd_ray.stages.decompose import DecomposeConfig, needs_ray, run_decompose  # noqa: E402
from dtd_ray.ray import decompose as ray_decompose  # noqa: E402
from dtd_ray.ray import session  # noqa: E402


def run(cfg: DecomposeConfig) -> None:
    if not needs_ray(cfg):
        run_decompose(cfg)
        return
    with session.start(verbose=cfg.verbose):
        ray_decompose.run_decompose(cfg)


if __name__ == "__main__":
    try:
        config_lib.run_cli(DecomposeConfig, run, summary=__doc__.strip().splitlines()[0])
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        # A user's mistake gets one line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
