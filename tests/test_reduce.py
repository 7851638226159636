"""Frequency tables: hand-computed cases, the one-pass grid, streaming and Ray paths, JSON maps, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dtd_ray.io import records
from dtd_ray.core import counting, partials
from dtd_ray.ray import reduce_on_ray
from dtd_ray.stages import reduce as stage_reduce
from dtd_ray.io import maptables
from dtd_ray.io import schema
from dtd_ray.io import storage


def rank(features: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference ranking: |f| descending, ties by lower index (as the extraction stores it)."""
    n, m = features.shape
    order = np.lexsort((np.broadcast_to(np.arange(m), (n, m)), -np.abs(features)), axis=-1)[:, :kmax]
    return order.astype(np.int32), np.take_along_axis(features, order, 1).astype(np.float32)


def write_partition(root, *, model, split, labels, features, kmax, preds=None, num_classes=None, files=1, **extra):
    """A finished records partition (``files`` Parquet files + manifest) from labels and features."""
    n, m = features.shape
    idx, val = rank(features, kmax)
    arrays = {
        schema.SAMPLE_ID: np.arange(n),
        schema.LABEL: labels,
        schema.PRED: labels if preds is None else preds,
        schema.TOPK_IDX: idx,
        schema.TOPK_VAL: val,
        schema.FEATURES: features.astype(np.float32),
    }
    fs, path = storage.resolve(records.partition_uri(str(root), model=model, split=split))
    fs.create_dir(path, recursive=True)
    for i, part in enumerate(np.array_split(np.arange(n), files)):
        pq.write_table(records.records_to_table({k: v[part] for k, v in arrays.items()}), f"{path}/part-{i:05d}.parquet")
    manifest = {"rows": n, "kmax": kmax, "feature_dim": m, "num_classes": num_classes or int(labels.max()) + 1, **extra}
    storage.write_json(fs, f"{path}/{schema.MANIFEST_NAME}", manifest)
    return arrays


# --------------------------------------------------------------------------- hand-computed

# C = 2, m = 4, kmax = 3. Class 0: A = [2, 0, 1], B = [2, 1, 3]; class 1: D = [3, 2, 0].
HAND_IDX = np.array([[2, 0, 1], [2, 1, 3], [3, 2, 0]], dtype=np.int32)
HAND_LAB = np.array([0, 0, 1], dtype=np.int32)
HAND_VAL = np.array([[5.0, 3.0, 1.0], [4.0, 2.0, 1.0], [6.0, 2.0, 1.0]], dtype=np.float32)
HAND_COUNTS = {
    1: [[0, 0, 2, 0], [0, 0, 0, 1]],
    2: [[1, 1, 2, 0], [0, 0, 1, 1]],
    3: [[1, 2, 2, 1], [1, 0, 1, 1]],
}


def test_hand_computed_tables_for_every_k1():
    ft = counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX, topk_val=HAND_VAL, num_classes=2, feature_dim=4)
    assert ft.k1_grid.tolist() == [1, 2, 3]
    for k1, expected in HAND_COUNTS.items():
        np.testing.assert_array_equal(ft.for_k1(k1), expected)
    np.testing.assert_array_equal(ft.n_instances, [2, 1])
    # mass[y, j] = Σ |value| over the class's top-kmax entries
    np.testing.assert_allclose(ft.mass, [[3.0, 3.0, 9.0, 1.0], [1.0, 0.0, 2.0, 6.0]])


def test_grid_subset_equals_full_pass_and_cumsum_definition():
    rng = np.random.default_rng(0)
    f = rng.random((300, 12))
    y = rng.integers(0, 4, 300).astype(np.int32)
    idx, val = rank(f, 10)
    full = counting.reduce_arrays(labels=y, topk_idx=idx, topk_val=val, num_classes=4, feature_dim=12)
    sub = counting.reduce_arrays(labels=y, topk_idx=idx, topk_val=val, num_classes=4, feature_dim=12, k1_grid=[3, 7, 10])
    for k1 in (3, 7, 10):
        np.testing.assert_array_equal(sub.for_k1(k1), full.for_k1(k1))
        # definition: count[y, j] = #{i in y : j in top-k1(i)}
        direct = np.zeros((4, 12), np.int64)
        for i in range(300):
            direct[y[i], idx[i, :k1]] += 1
        np.testing.assert_array_equal(full.for_k1(k1), direct)
    with pytest.raises(ValueError, match="not in the reduced grid"):
        sub.for_k1(5)


def test_small_buffer_many_flushes_gives_same_tables():
    rng = np.random.default_rng(1)
    f = rng.random((1000, 16))
    y = rng.integers(0, 3, 1000).astype(np.int32)
    idx, val = rank(f, 8)
    ref = counting.reduce_arrays(labels=y, topk_idx=idx, topk_val=val, num_classes=3, feature_dim=16)
    acc = counting.CountAccumulator(num_classes=3, feature_dim=16, k1_grid=np.arange(1, 9), kmax=8, buffer_bytes=1)
    for s in range(0, 1000, 77):
        acc.add(labels=y[s : s + 77], topk_idx=idx[s : s + 77], topk_val=val[s : s + 77])
    got = acc.result()
    np.testing.assert_array_equal(got.counts, ref.counts)
    np.testing.assert_allclose(got.mass, ref.mass)


def test_correct_only_counts_only_correct_instances():
    preds = np.array([0, 1, 1], dtype=np.int32)  # instance B (class 0) is misclassified
    ft = counting.reduce_arrays(
        labels=HAND_LAB, topk_idx=HAND_IDX, topk_val=HAND_VAL, preds=preds, num_classes=2, feature_dim=4, correct_only=True
    )
    np.testing.assert_array_equal(ft.for_k1(3), [[1, 1, 1, 0], [1, 0, 1, 1]])
    np.testing.assert_array_equal(ft.n_instances, [1, 1])
    assert ft.options["correct_only"] is True and ft.options["rows_used"] == 2
    with pytest.raises(ValueError, match="pred"):
        counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX, num_classes=2, feature_dim=4, correct_only=True)


def test_feature_sums_per_class():
    rng = np.random.default_rng(2)
    f = rng.random((50, 6))
    y = rng.integers(0, 3, 50).astype(np.int32)
    idx, val = rank(f, 6)
    ft = counting.reduce_arrays(
        labels=y, topk_idx=idx, topk_val=val, features=f, num_classes=3, feature_dim=6, with_feature_sums=True
    )
    for c in range(3):
        np.testing.assert_allclose(ft.feature_sum[c], f[y == c].sum(0))
        np.testing.assert_allclose(ft.class_mean_features()[c], f[y == c].mean(0))


# --------------------------------------------------------------------------- partitions


def test_streaming_partition_equals_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    f = rng.random((900, 20)).astype(np.float32)
    y = rng.integers(0, 5, 900).astype(np.int32)
    preds = np.where(rng.random(900) < 0.8, y, (y + 1) % 5).astype(np.int32)
    arr = write_partition(tmp_path, model="m", split="train", labels=y, features=f, kmax=12, preds=preds, files=3,
                          num_classes=5, config={"augment": "cifar", "seed": 7})
    for correct_only in (False, True):
        ref = counting.reduce_arrays(
            labels=y, topk_idx=arr[schema.TOPK_IDX], topk_val=arr[schema.TOPK_VAL], preds=preds, features=f,
            num_classes=5, feature_dim=20, correct_only=correct_only, with_feature_sums=True,
        )
        got = stage_reduce.reduce_partition(str(tmp_path), model="m", split="train", batch_rows=100,
                                      correct_only=correct_only, with_feature_sums=True)
        np.testing.assert_array_equal(got.counts, ref.counts)
        np.testing.assert_allclose(got.mass, ref.mass, rtol=1e-12)
        np.testing.assert_allclose(got.feature_sum, ref.feature_sum, rtol=1e-12)
        assert got.options["select_split"] == "train" and got.options["correct_only"] is correct_only
        assert got.options["augment"] == "cifar" and got.options["seed"] == 7
    with pytest.raises(FileNotFoundError, match="no finished records"):
        stage_reduce.reduce_partition(str(tmp_path), model="m", split="test")
    with pytest.raises(ValueError, match="exceeds the records' kmax=12"):
        stage_reduce.reduce_partition(str(tmp_path), model="m", split="train", k1_grid=[5, 13])


def test_ray_path_equals_numpy_pass(tmp_path, ray_local):
    rng = np.random.default_rng(4)
    f = rng.random((700, 16)).astype(np.float32)
    y = rng.integers(0, 4, 700).astype(np.int32)
    preds = np.where(rng.random(700) < 0.7, y, (y + 1) % 4).astype(np.int32)
    write_partition(tmp_path, model="m", split="train", labels=y, features=f, kmax=10, preds=preds, files=3, num_classes=4)
    for kw in ({"k1_grid": None}, {"k1_grid": [2, 5, 10], "correct_only": True, "with_feature_sums": True}):
        ref = stage_reduce.reduce_partition(str(tmp_path), model="m", split="train", **kw)
        got = reduce_on_ray.reduce_on_ray(str(tmp_path), model="m", split="train", batch_rows=128, **kw)
        np.testing.assert_array_equal(got.k1_grid, ref.k1_grid)
        np.testing.assert_array_equal(got.counts, ref.counts)
        np.testing.assert_array_equal(got.n_instances, ref.n_instances)
        np.testing.assert_allclose(got.mass, ref.mass, rtol=1e-12)
        if ref.feature_sum is not None:
            np.testing.assert_allclose(got.feature_sum, ref.feature_sum, rtol=1e-12)
        assert got.options["rows_used"] == ref.options["rows_used"]


@pytest.mark.parametrize(("C", "m", "rows"), [(3, 8, 200), (40, 300, 25)])  # dense and sort-based partials
def test_sparse_partials_merge_to_the_same_tables(C, m, rows):
    rng = np.random.default_rng(5)
    f = rng.random((4 * rows, m))
    y = rng.integers(0, C, 4 * rows).astype(np.int32)
    preds = np.where(rng.random(4 * rows) < 0.6, y, 0).astype(np.int32)
    idx, val = rank(f, 8)
    kw = dict(num_classes=C, feature_dim=m, k1_grid=[1, 4, 8], correct_only=True, with_feature_sums=True)
    ref = counting.reduce_arrays(labels=y, topk_idx=idx, topk_val=val, preds=preds, features=f, **kw)
    acc = counting.CountAccumulator(num_classes=C, feature_dim=m, k1_grid=np.array([1, 4, 8]), kmax=8,
                                  correct_only=True, with_feature_sums=True)
    parts = []
    for s in range(0, 4 * rows, rows):
        batch = {schema.LABEL: y[s : s + rows], schema.TOPK_IDX: idx[s : s + rows], schema.TOPK_VAL: val[s : s + rows],
                 schema.PRED: preds[s : s + rows], schema.FEATURES: f[s : s + rows]}
        parts.append(partials.partial_counts(batch, kmax=8, **kw))
        assert len(parts[-1]["key"]) <= rows * 8 * 2 + C + C * m + 3  # sparse: bounded by the batch
    # two partials joined into one batch (keys repeat) and two on their own
    acc.add_partial({k: np.concatenate([parts[0][k], parts[1][k]]) for k in parts[0]})
    acc.add_partial(parts[2])
    acc.add_partial(parts[3])
    got = acc.result()
    np.testing.assert_array_equal(got.counts, ref.counts)
    np.testing.assert_array_equal(got.n_instances, ref.n_instances)
    np.testing.assert_allclose(got.mass, ref.mass, rtol=1e-12)
    np.testing.assert_allclose(got.feature_sum, ref.feature_sum, rtol=1e-12)
    assert got.options["rows_used"] == ref.options["rows_used"]


# --------------------------------------------------------------------------- bad input


def test_bad_records_are_refused_in_one_line():
    kw = dict(num_classes=2, feature_dim=4)
    with pytest.raises(ValueError, match="label 2 is outside"):
        counting.reduce_arrays(labels=np.array([0, 0, 2]), topk_idx=HAND_IDX, **kw)
    with pytest.raises(ValueError, match="feature index 5 is outside"):
        counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX + 2, **kw)
    dup = HAND_IDX.copy()
    dup[1, 2] = 2
    with pytest.raises(ValueError, match="repeat a feature index"):
        counting.reduce_arrays(labels=HAND_LAB, topk_idx=dup, **kw)
    nan = HAND_VAL.copy()
    nan[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX, topk_val=nan, **kw)
    with pytest.raises(ValueError, match="larger than the feature dimension"):
        counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX, num_classes=2, feature_dim=2)
    with pytest.raises(ValueError, match="exceeds the records' kmax=3"):
        counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX, k1_grid=4, **kw)


def test_negative_values_and_empty_classes_are_recorded_warnings():
    neg = HAND_VAL.copy()
    neg[2, 0] = -6.0
    ft = counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX, topk_val=neg, num_classes=3, feature_dim=4,
                              features=np.ones((3, 4)), with_feature_sums=True)
    assert any("negative" in w for w in ft.warnings)
    assert any("class(es) [2] have no instances" in w for w in ft.warnings)
    assert ft.mass[1, 3] == 6.0  # |f| in the mass
    with pytest.raises(ValueError, match="no instances"):
        ft.class_mean_features()


# --------------------------------------------------------------------------- outputs


def freq_from_table(table, *, num_classes: int, feature_dim: int, kmax: int | None = None) -> counting.FreqTables:
    """The counts of a ``freq/`` table (Arrow) back as :class:`FreqTables` (the round-trip check's reader).

    Only the counts travel through ``freq/``: the result has no tie-break mass and no
    instance counts (``n_instances`` is the table's k1=min row sums divided by k1).
    """
    df = table.to_pandas()
    grid = np.unique(df["k1"].to_numpy().astype(np.int64))
    if grid.size == 0:
        raise ValueError("empty freq table")
    y = df["class"].to_numpy().astype(np.int64)
    j = df["feature"].to_numpy().astype(np.int64)
    if y.max() >= num_classes or j.max() >= feature_dim:
        raise ValueError(f"freq table has class {y.max()} / feature {j.max()}, expected C={num_classes}, m={feature_dim}")
    counts = np.zeros((grid.size, num_classes, feature_dim), dtype=np.int32)
    g = np.searchsorted(grid, df["k1"].to_numpy())
    counts[g, y, j] = df["count"].to_numpy()
    n = counts[0].sum(axis=1) // grid[0]
    return counting.FreqTables(k1_grid=grid, counts=counts, n_instances=n.astype(np.int64), kmax=int(kmax or grid[-1]))


def test_freq_table_round_trip():
    ft = counting.reduce_arrays(labels=HAND_LAB, topk_idx=HAND_IDX, topk_val=HAND_VAL, num_classes=2, feature_dim=4)
    table = maptables.freq_to_table(ft, model="toy")
    assert table.schema.equals(schema.FREQ_SCHEMA)
    df = table.to_pandas()
    assert (df["count"] > 0).all() and set(df["model"]) == {"toy"}
    assert len(df) == sum(np.count_nonzero(v) for v in HAND_COUNTS.values())
    back = freq_from_table(table, num_classes=2, feature_dim=4)
    np.testing.assert_array_equal(back.counts, ft.counts)
    np.testing.assert_array_equal(back.n_instances, ft.n_instances)


def test_json_map_round_trip(tmp_path):
    idx = np.array([[7, 23, 54], [9, 47, 40]])
    path = str(tmp_path / "m.json")
    maptables.write_map_json(path, idx)
    assert json.loads(open(path).read()) == {"0": [7, 23, 54], "1": [9, 47, 40]}
    np.testing.assert_array_equal(maptables.read_map_json(path, num_classes=2, feature_dim=64), idx)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"0": [1, 2], "1": [3, 4], "2": [5, 6]}, "3 class"),
        ({"0": [1, 2]}, "1 class"),
        ({"0": [1, 2], "1": [3]}, "different lengths"),
        ({"0": [1, 64], "1": [3, 4]}, "outside"),
        ({"0": [1, 1], "1": [3, 4]}, "repeats"),
        ({"a": [1, 2], "1": [3, 4]}, "class indices"),
    ],
)
def test_json_map_that_does_not_fit_is_refused(obj, match):
    with pytest.raises(ValueError, match=match):
        maptables.map_from_json(obj, num_classes=2, feature_dim=64)
