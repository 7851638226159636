"""The sweep: models × datasets × k × strategies × retrain modes on Ray, one row per trial.

The main job of dtd-ray (``jobs/sweep.py``, :data:`dtd_ray.ray.commands.SWEEP`). A config (a
named preset shipped in ``dtd_ray/presets/`` or a YAML file, plus command-line overrides) lists
the models, datasets, the k grid, the selection strategies and the retrain modes. The driver

1. extracts the records of every (model, dataset) *unit* (``dtd_ray.ray.extract``;
   finished partitions are skipped),
2. decomposes each unit once for the whole grid (``dtd_ray.ray.decompose_on_ray``: freq/, maps/,
   eval/ for every strategy and every k1, k2 ≤ k1; skipped when done with the same
   config and the same records),
3. runs the trials: one per (unit, strategy, k, retrain mode) with k1 = k2 = k for
   ``frequency`` (k1 = -1 for the k1-independent strategies). Mode ``none`` is the
   decomposed head evaluated on cached features: its rows come straight from
   decompose's evaluation, no Tune trial. Modes ``head`` and ``finetune`` are Ray Tune
   trials of :mod:`dtd_ray.ray.trainables` (per-epoch reports, checkpoints),
4. prints a summary table and writes the report (``dtd_ray.report``).

Modules, in the order a run uses them:

- ``spec``: :class:`SweepConfig`, model entries and retrain modes; presets and YAML files.
- ``plan``: the units and trials of a config (:class:`SweepPlan`), validated before Ray starts.
- ``store``: the trials store, one Parquet row file per finished trial.
- ``tune``: the Ray Tune trials of modes ``head`` and ``finetune``.
- ``driver``: the stages in order (:func:`run_sweep`).

Output layout under ``<output>``::

    sweep_config.json                     the resolved config of the last run, its units and trial counts
    records/model=<key>/split=<split>/    extraction records (see dtd_ray.ray.extract)
    decompose/<table>/select_split=…/…    the reduce, the grid evaluation and the analyses (dtd_ray.io.layout)
    decompose/_sweep/<key>.json           the decompose config and records hashes a rerun compares
    trials/<trial_id>.parquet             one row per finished trial (schema.TRIALS_SCHEMA)
    tune/<experiment>/                    Ray Tune's experiment folders (checkpoints, logs)

Resume: every stage is idempotent. ``trial_id`` is a hash of what a trial computes (its
model, weights, dataset, splits, strategy, k1, k2, mode and training options; never
its resources), each trial's row is written atomically as its own file the moment the
trial finishes, and a rerun skips the trials whose file exists, so an interrupted
driver recomputes only the unfinished trials (from scratch) and never duplicates a row.
"""

from dtd_ray.ray.sweep.spec import RETRAIN_MODES, ModelSpec, RetrainSpec, SweepConfig, list_presets, load_config
from dtd_ray.ray.sweep.driver import run_sweep, summary_table
from dtd_ray.ray.sweep.plan import SweepPlan, TrialSpec, Unit, describe, plan_sweep
from dtd_ray.ray.sweep.store import finished_trial_ids, read_trials, write_trial_row
from dtd_ray.ray.sweep.tune import trial_resources

__all__ = [
    "RETRAIN_MODES",
    "ModelSpec",
    "RetrainSpec",
    "SweepConfig",
    "SweepPlan",
    "TrialSpec",
    "Unit",
    "describe",
    "finished_trial_ids",
    "list_presets",
    "load_config",
    "plan_sweep",
    "read_trials",
    "run_sweep",
    "summary_table",
    "trial_resources",
    "write_trial_row",
]
