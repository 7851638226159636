"""Decompose: records → frequency tables, class maps of every strategy, and their evaluation.

    python jobs/decompose.py --records runs/cifar10/records --model cifar_resnet20 \
        --output runs/cifar10/decompose

Reads the selection split's records (``--select_split``, train by default) once and
counts the per-class top-k1 frequencies of every k1 of the grid; selects the maps of
every strategy (frequency, weight_l1, contribution, random); evaluates every
(strategy, k1, k2 ≤ k1) decomposed head on the cached features of ``--split``; runs
the essentiality test and Ψ at ``--analysis_k``. Writes under ``<output>``, every table
Hive-partitioned by its selection (``S`` = ``select_split=<s>/correct_only=<b>``, ``E`` = ``S/split=<split>``;
the partition columns live in the folder names, see ``dtd_ray.io.layout``)::

    freq/S/<model>.parquet          model, k1, class, feature, count (non-zero counts)
    maps/S/<model>.parquet          model, strategy, k1, k2, class, rank, feature, count, score, map_seed
                                    (random: one map per seed, --random_seeds)
    eval/E/<model>.parquet          one row per (strategy, k1, map_seed, k2) and each instance's outcome
                                    (packed bits, by sample_id)
    instances/E/<model>.parquet     one row per evaluation instance: the full head's outcome and Ψ
    analysis/E/<model>.parquet      per strategy and class at k1 = k2 = analysis_k (mean over --noise_seeds draws)
    essentiality/E/<model>.parquet  the essentiality test per instance
    json/S/<model>_<strategy>_<k1>_<k2>_indices.json   (--export_json)
    _manifests/E/<model>.json       resolved config, selection options, warnings, timings (written last)

and prints the comparison table. ``pandas.read_parquet(<output>/eval)`` reads a table with its
partition columns. k1 = -1 marks strategies whose map does not depend on k1. The head (W, b) is
the one extraction stored beside the records (``_head.npz`` in each partition), or ``--head``
(an .npz with ``weight`` and ``bias``). `--help` lists every option.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("decompose")  # the same command as `dtd-ray decompose`
