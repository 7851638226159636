"""Column names and Arrow types of every Parquet dataset dtd-ray writes.

One definition, imported by writers, readers and tests. Every dataset is Hive
partitioned (``key=value`` folders) so ``pandas.read_parquet(path)`` reads it
without Ray; files and folders whose names start with ``_`` (manifests, staging
folders) are ignored by pyarrow's dataset discovery.

Vector columns are variable-size ``list<…>`` rather than ``fixed_size_list``:
records of models with different feature dimensions then share one schema and a
whole ``records/`` folder reads as one table. The dimension is in the manifest.
"""

from __future__ import annotations

import pyarrow as pa

from dtd_ray.core import holdout

SCHEMA_VERSION = 1

# --- records/model=…/split=…/ : one row per instance (extraction) -------------
SAMPLE_ID = "sample_id"
LABEL = "label"
PRED = "pred"
TOPK_IDX = "topk_idx"  # the top-kmax feature indices, ranked by |f| desc, ties by lower index
TOPK_VAL = "topk_val"  # the feature values at those indices, same order
FEATURES = "features"  # the full penultimate feature vector (input of the final linear layer)

RECORDS_SCHEMA = pa.schema(
    [
        pa.field(SAMPLE_ID, pa.int64(), nullable=False),
        pa.field(LABEL, pa.int32(), nullable=False),
        pa.field(PRED, pa.int32(), nullable=False),
        pa.field(TOPK_IDX, pa.list_(pa.int32()), nullable=False),
        pa.field(TOPK_VAL, pa.list_(pa.float32()), nullable=False),
        pa.field(FEATURES, pa.list_(pa.float32()), nullable=False),
    ]
)
RECORDS_PARTITIONING = ("model", "split")
# The record columns worth Parquet's dictionary encoding: few distinct values (classes, feature indices).
# pyarrow's default tries it on every column, and on the float ones it only burns time before falling
# back: these alone wrote faster and smaller files (measured per row, at 64 and 2,048 features).
RECORDS_DICTIONARY_COLUMNS = (LABEL, PRED, f"{TOPK_IDX}.list.element")


def split_key(split: str, *, augment: str | None, seed: int, val_fraction: float | None = None) -> str:
    """The records split of an extraction pass: ``split``, or ``<split>_aug<seed>`` for an augmented pass;
    with a ``val_fraction`` the part left for fitting once the validation split is held out
    (:mod:`dtd_ray.core.holdout`): ``train_fit90`` for 10 %, ``train_aug0_fit90``."""
    key = f"{split}_aug{seed}" if augment else split
    if val_fraction is None:
        return key
    return f"{key}_fit{holdout.percent_label(1.0 - float(val_fraction))}"


def val_key(split: str, *, val_fraction: float) -> str:
    """The name of the validation split held out of ``split``: ``train_val10`` for 10 %."""
    return f"{split}_val{holdout.percent_label(val_fraction)}"


# --- freq/ : class × feature occurrence counts, per k1 (reduce) ---------------
FREQ_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("k1", pa.int32()),
        pa.field("class", pa.int32()),
        pa.field("feature", pa.int32()),
        pa.field("count", pa.int64()),
    ]
)

# --- maps/ : class → ranked influential features (reduce / selection) ---------
MAPS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("strategy", pa.string()),
        pa.field("k1", pa.int32()),
        pa.field("k2", pa.int32()),
        pa.field("class", pa.int32()),
        pa.field("rank", pa.int32()),
        pa.field("feature", pa.int32()),
        pa.field("count", pa.int64()),
    ]
)

MANIFEST_NAME = "_manifest.json"
STAGING_PREFIX = "_staging"


def partition_path(root: str, **keys: object) -> str:
    """``root/k1=v1/k2=v2`` in the order given (Hive layout)."""
    parts = [root.rstrip("/")] + [f"{k}={v}" for k, v in keys.items()]
    return "/".join(parts)

# --- maps/ as written by decompose: MAPS_SCHEMA plus the strategy's ranking score ---
# (``count`` is the frequency count for ``frequency`` rows and null for the other
# strategies; ``k1`` is -1 for strategies whose map does not depend on k1.)
# ``map_seed`` is the seed of a random map (one map per seed), -1 for every other strategy.
MAPS_SCORED_SCHEMA = pa.schema(list(MAPS_SCHEMA) + [pa.field("score", pa.float64()), pa.field("map_seed", pa.int32())])

# --- eval/ : accuracy of decomposed heads on cached features (decompose) ---------
EVAL_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("split", pa.string()),  # the split evaluated
        pa.field("select_split", pa.string()),  # the split the maps were selected from
        pa.field("correct_only", pa.bool_()),  # selection counted only correctly classified instances
        pa.field("strategy", pa.string()),
        pa.field("k1", pa.int32()),  # -1 where the strategy does not depend on k1
        pa.field("map_seed", pa.int32()),  # the random map's seed; -1 for the other strategies
        pa.field("k2", pa.int32()),
        pa.field("n_instances", pa.int64()),
        pa.field("acc_full", pa.float64()),
        pa.field("acc_decomposed", pa.float64()),
        pa.field("head_macs_full", pa.int64()),  # C·m multiply-adds per instance
        pa.field("head_macs_decomposed", pa.int64()),  # C·k2
        pa.field("channels_used", pa.int32()),  # |∪_y I_y|
        pa.field("outcomes", pa.binary()),  # per instance 0/1, sorted by sample_id, packed bits (core.stats)
    ]
)

# --- instances/ : one row per evaluation instance (decompose) -------------------------
# The per-instance numbers the report's paired bootstrap resamples: the full head's outcome
# and Ψ; sorted by sample_id, the order of every ``outcomes`` column.
INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("split", pa.string()),
        pa.field(SAMPLE_ID, pa.int64()),
        pa.field(LABEL, pa.int32()),
        pa.field("correct_full", pa.bool_()),  # the original head's prediction is the label
        pa.field("psi", pa.float64()),  # Ψ: share of the features holding q of the L1 mass (NaN: no mass)
        pa.field("psi_q80", pa.float64()),  # the same at q = 0.8
        pa.field("psi_q95", pa.float64()),  # … and at q = 0.95
        pa.field("psi_weighted", pa.float64()),  # Ψ at q of |W[y, j] f_j|: the own class logit's contributions
    ]
)

# --- essentiality/ : the essentiality test per instance (decompose) ---------------------
ESSENTIALITY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("strategy", pa.string()),
        pa.field("map_seed", pa.int32()),
        pa.field("k2", pa.int32()),
        pa.field(SAMPLE_ID, pa.int64()),
        pa.field(LABEL, pa.int32()),
        pa.field("clean", pa.float64()),  # 0/1: classified as its class with its own features
        pa.field("selected_noise", pa.float64()),  # share of noise seeds still right with I_y replaced by noise
        pa.field("others_noise", pa.float64()),  # the same with the other m − k features replaced
        # matched ablations (core.analysis.ablation_outcomes), shares of the noise seeds still right:
        pa.field("mean_selected", pa.float64()),  # I_y set to the training split's feature means
        pa.field("mean_random", pa.float64()),  # k random other features of the class set to their means
        pa.field("permute_selected", pa.float64()),  # I_y taken from a permuted instance
        pa.field("permute_random", pa.float64()),  # k random other features taken from a permuted instance
    ]
)


# --- localisation/<model>.parquet : the localisation scores per image and method (jobs/localise.py) ---
LOCALISATION_SCHEMA = pa.schema([
    ("model", pa.string()),
    ("image", pa.int32()),  # position in the localisation set (0..n_images−1)
    ("sample_id", pa.int64()),  # the source row's sample_id
    ("label", pa.int16()),  # the true class y (the class whose maps are scored)
    ("pred", pa.int16()),  # the model's prediction on the canvas
    ("method", pa.string()),  # METHODS
    ("energy_in_box", pa.float64()),  # Σ_{p∈box} max(M,0) / Σ_p max(M,0); 0 for a map with no positive mass
    ("pointing", pa.float64()),  # 1 if argmax M is in the box (random: the mean over seeds; uniform: the chance)
    ("empty_maps", pa.int16()),  # how many of the n_maps maps had no positive mass (each scored 0)
    ("n_maps", pa.int16()),  # maps averaged into the row (random_seeds for random, else 1)
    ("k", pa.int16()),
    ("canvas", pa.int16()),
    ("background", pa.string()),
    ("seed", pa.int32()),  # canvas seed (positions, donors, backgrounds)
    ("x0", pa.int16()), ("y0", pa.int16()), ("x1", pa.int16()), ("y1", pa.int16()),  # the box, half-open
    ("donor_sample_id", pa.int64()),  # sample_id of the image whose background was used
    ("donor_label", pa.int16()),  # its class (the background's class; never the label)
    ("other_label", pa.int16()),  # the class whose map method other_class scores: seeded, neither of the two
])


# --- trials/<trial_id>.parquet : one row per finished trial (sweep) ------------------
TRIALS_SCHEMA_VERSION = 2  # 2: map_seed (one random map per seed) and per-instance outcomes
# Accuracies are in percent (0–100), as the trainables report them; note that eval/
# (decompose) stores fractions. k1 is -1 for strategies whose map does not depend on k1.
TRIALS_SCHEMA = pa.schema(
    [
        pa.field("trial_id", pa.string()),  # stable hash of what the trial computes
        pa.field("sweep", pa.string()),  # the sweep's name (preset or file name)
        pa.field("model", pa.string()),  # records partition key (the model entry's tag)
        pa.field("backbone", pa.string()),  # backbone registry name
        pa.field("weights", pa.string()),  # weights as configured
        pa.field("dataset", pa.string()),  # short dataset name (cifar10, fashion-mnist, imagenet, …)
        pa.field("dataset_uri", pa.string()),  # the dataset source as configured
        pa.field("select_split", pa.string()),  # records split the maps were selected from
        pa.field("eval_split", pa.string()),  # split every accuracy is measured on
        pa.field("correct_only", pa.bool_()),  # selection counted only correctly classified instances
        pa.field("strategy", pa.string()),
        pa.field("k1", pa.int32()),
        pa.field("k2", pa.int32()),
        pa.field("retrain_mode", pa.string()),  # none | head | finetune
        pa.field("epochs", pa.int32()),  # 0 for mode none
        pa.field("lr", pa.float64()),  # null for mode none
        pa.field("batch_size", pa.int32()),
        pa.field("weight_decay", pa.float64()),
        pa.field("seed", pa.int32()),  # the trial's training seed (order, augmentation): the sweep's, or one of retrain.<mode>.seeds
        pa.field("map_seed", pa.int32()),  # the random map's seed; -1 for the other strategies
        pa.field("n_eval", pa.int64()),  # instances of eval_split in the records
        pa.field("acc_full", pa.float64()),  # the original head on eval_split (cached features)
        pa.field("acc_decomposed", pa.float64()),  # the decomposed head before any training (cached features)
        pa.field("acc_decomposed_init", pa.float64()),  # the trainable's own measurement before training
        pa.field("acc_retrained", pa.float64()),  # at best_epoch (null for mode none)
        pa.field("acc_by_epoch", pa.list_(pa.float64())),  # eval accuracy after each epoch
        pa.field("loss", pa.float64()),  # training loss of the last epoch
        pa.field("head_macs_full", pa.int64()),  # C·m multiply-adds per instance
        pa.field("head_macs_decomposed", pa.int64()),  # C·k2
        pa.field("channels_used", pa.int32()),  # |∪_y I_y|
        # per eval instance (sorted by sample_id) 0/1: the row's final head right (retrained where
        # trained), packed bits (core.stats.pack_outcomes): what the report's paired bootstrap resamples
        pa.field("outcomes", pa.binary()),
        pa.field("seconds", pa.float64()),  # trial wall time (null for mode none)
        pa.field("use_gpu", pa.bool_()),
        pa.field("checkpoint", pa.string()),  # the trial's last epoch's checkpoint (acc_retrained is best_epoch's)
        pa.field("config", pa.string()),  # JSON: everything the trial_id hashes, plus the trainable's config
        pa.field("finished_at", pa.string()),  # UTC, ISO 8601
        # the validation split (val_fraction; null without one): held out of the training split, it
        # chooses what test must not (lr, epoch, k1); accuracies in percent
        pa.field("val_split", pa.string()),  # its name, schema.val_key (train_val10)
        pa.field("acc_val", pa.float64()),  # the row's final head there: decomposed (none), else at best_epoch
        pa.field("acc_val_by_epoch", pa.list_(pa.float64())),  # after each epoch
        pa.field("best_epoch", pa.int32()),  # the epoch of acc_retrained: best acc_val (earliest on ties), else the last
    ]
)
