"""Selection strategies: each on a case whose answer is known, tie-breaks, nesting, maps/ table."""

from __future__ import annotations

import numpy as np
import pytest

from dtd_ray.core import counting
from dtd_ray.io import maptables
from dtd_ray.io import schema
from dtd_ray.core import selection
from dtd_ray.core.selection import K1_NOT_APPLICABLE


def freq_tables(counts, mass=None, n=None, feature_sum=None):
    counts = np.asarray(counts, dtype=np.int32)[None]
    C = counts.shape[1]
    return counting.FreqTables(
        k1_grid=np.array([3]),
        counts=counts,
        n_instances=np.asarray(n if n is not None else [5] * C, dtype=np.int64),
        kmax=3,
        mass=None if mass is None else np.asarray(mass, dtype=np.float64),
        feature_sum=feature_sum,
    )


# --------------------------------------------------------------------------- frequency


def test_frequency_ranks_by_count():
    ft = freq_tables([[0, 4, 1, 3, 2], [5, 0, 0, 1, 2]], mass=np.zeros((2, 5)))
    cm = selection.select_frequency(freq=ft, k1=3, k2=3)
    np.testing.assert_array_equal(cm.idx, [[1, 3, 4], [0, 4, 3]])
    np.testing.assert_array_equal(cm.count, [[4, 3, 2], [5, 2, 1]])
    assert cm.strategy == "frequency" and cm.k1 == 3 and cm.k2 == 3


def test_frequency_tie_break_mass_then_lower_index():
    # class 0: features 1, 2, 3 tie at count 2; mass prefers 3 over 1 and 2; 1 and 2 tie in mass → lower index 1
    # class 1: all counts tie and all masses tie → lower index first
    counts = [[0, 2, 2, 2, 1], [1, 1, 1, 1, 1]]
    mass = [[9.0, 1.0, 1.0, 5.0, 7.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    cm = selection.select_frequency(freq=freq_tables(counts, mass), k1=3, k2=3)
    np.testing.assert_array_equal(cm.idx, [[3, 1, 2], [0, 1, 2]])
    # without mass (tables read back from freq/) ties fall to the lower index
    cm = selection.select_frequency(freq=freq_tables(counts), k1=3, k2=3)
    np.testing.assert_array_equal(cm.idx, [[1, 2, 3], [0, 1, 2]])


def test_frequency_prefix_is_nested_and_equals_direct_selection():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, (6, 40))  # many ties
    mass = rng.integers(0, 3, (6, 40)).astype(float)  # ties in mass too
    ft = freq_tables(counts, mass)
    full = selection.select_frequency(freq=ft, k1=3, k2=3)
    # reference: a plain lexsort on (count desc, mass desc, index asc)
    ref = np.lexsort((np.broadcast_to(np.arange(40), (6, 40)), -mass, -counts), axis=-1)[:, :3]
    np.testing.assert_array_equal(full.idx, ref)
    np.testing.assert_array_equal(full.top(2).idx, full.idx[:, :2])
    for k in range(1, 41):
        np.testing.assert_array_equal(
            selection._rank_by_int_then_order(counts, selection.frequency_tie_order(ft), k=k),
            np.lexsort((np.broadcast_to(np.arange(40), (6, 40)), -mass, -counts), axis=-1)[:, :k],
        )


def test_frequency_on_reduced_records_hand_case():
    # class 0 instances rank [2, 0, 1], [2, 1, 3]: at k1 = 2 counts 2:2, 0:1, 1:1;
    # 0 and 1 tie in count and in mass (3.0 each) → lower index 0
    idx = np.array([[2, 0, 1], [2, 1, 3], [3, 2, 0]], dtype=np.int32)
    val = np.array([[5.0, 3.0, 1.0], [4.0, 2.0, 1.0], [6.0, 2.0, 1.0]], dtype=np.float32)
    ft = counting.reduce_arrays(labels=np.array([0, 0, 1]), topk_idx=idx, topk_val=val, num_classes=2, feature_dim=4)
    cm = selection.select_frequency(freq=ft, k1=2, k2=2)
    np.testing.assert_array_equal(cm.idx, [[2, 0], [3, 2]])
    cm = selection.select_frequency(freq=ft, k1=3, k2=2)  # counts 1:2, 2:2 → mass 9 (feature 2) first
    np.testing.assert_array_equal(cm.idx, [[2, 1], [3, 2]])


def test_frequency_bad_k_and_empty_class():
    ft = freq_tables([[1, 2, 3, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="k2=4 > k1=3"):
        selection.select_frequency(freq=ft, k1=3, k2=4)
    with pytest.raises(ValueError, match="not ≥ 1"):
        selection.select_frequency(freq=ft, k1=3, k2=0)
    with pytest.raises(ValueError, match="not in the reduced grid"):
        selection.select_frequency(freq=ft, k1=2, k2=2)
    empty = freq_tables([[1, 2, 3, 0], [0, 0, 0, 0]], n=[3, 0])
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no selection instances"):
        selection.select_frequency(freq=empty, k1=3, k2=2)


# --------------------------------------------------------------------------- other strategies


def test_weight_l1_known_answer_and_tie_break():
    w = np.array([[0.1, -3.0, 3.0, 2.0, -2.0], [1.0, 1.0, -1.0, 0.0, 0.5]])
    cm = selection.select_weight_l1(weight=w, k2=4)
    # class 0: |W| 3, 3 (positive index 2 first), then 2 (positive 3 first), -2
    # class 1: |W| 1, 1, 1 → W desc (1, 1 before -1) → lower index
    np.testing.assert_array_equal(cm.idx, [[2, 1, 3, 4], [0, 1, 2, 4]])
    np.testing.assert_allclose(cm.score, [[3, 3, 2, 2], [1, 1, 1, 0.5]])
    assert cm.k1 == K1_NOT_APPLICABLE and cm.count is None
    with pytest.raises(ValueError, match="exceeds the 5 ranked features"):
        selection.select_weight_l1(weight=w, k2=6)


def test_contribution_known_answer():
    w = np.array([[1.0, -2.0, 0.5, 3.0], [2.0, 1.0, 1.0, -1.0]])
    mean_f = np.array([[1.0, 1.0, 4.0, 0.1], [0.0, 2.0, 2.0, 5.0]])
    # contributions: class 0 [1, -2, 2, 0.3] → 2, 0, 3 ; class 1 [0, 2, 2, -5] → 1, 2 (tie, lower index), 0
    cm = selection.select_contribution(weight=w, class_mean_features=mean_f, k2=3)
    np.testing.assert_array_equal(cm.idx, [[2, 0, 3], [1, 2, 0]])
    np.testing.assert_allclose(cm.score, [[2.0, 1.0, 0.3], [2.0, 2.0, 0.0]])
    # |W| alone would pick feature 3 first for class 0: contribution differs from weight_l1
    assert selection.select_weight_l1(weight=w, k2=1).idx[0, 0] == 3


def test_contribution_from_reduced_feature_sums():
    rng = np.random.default_rng(1)
    f = rng.random((60, 8))
    y = rng.integers(0, 3, 60).astype(np.int32)
    w = rng.standard_normal((3, 8))
    idx = np.argsort(-f, axis=1, kind="stable")[:, :8].astype(np.int32)
    ft = counting.reduce_arrays(labels=y, topk_idx=idx, topk_val=np.take_along_axis(f, idx, 1), features=f,
                              num_classes=3, feature_dim=8, with_feature_sums=True)
    (cm,) = selection.select_maps(strategies=["contribution"], freq=ft, weight=w, k2_max=4)
    for c in range(3):
        direct = (w[c] * f[y == c]).mean(0)  # mean over the class's instances of W[y, j] f_j
        np.testing.assert_array_equal(cm.idx[c], np.argsort(-direct, kind="stable")[:4])


def test_random_is_seeded_nested_and_valid():
    a = selection.select_random(num_classes=5, feature_dim=30, k2=10, seed=3)
    b = selection.select_random(num_classes=5, feature_dim=30, k2=10, seed=3)
    c = selection.select_random(num_classes=5, feature_dim=30, k2=10, seed=4)
    short = selection.select_random(num_classes=5, feature_dim=30, k2=4, seed=3)
    np.testing.assert_array_equal(a.idx, b.idx)
    assert not np.array_equal(a.idx, c.idx)
    np.testing.assert_array_equal(short.idx, a.idx[:, :4])  # nested over k2
    for row in a.idx:
        assert len(set(row.tolist())) == 10 and row.min() >= 0 and row.max() < 30


def test_rank_rows_is_lexicographic_with_lower_index_last():
    k1 = np.array([[1, 2, 2, 1]])
    k2 = np.array([[0.0, 1.0, 1.0, 5.0]])
    np.testing.assert_array_equal(selection.rank_rows([k1, k2], k=4), [[1, 2, 3, 0]])
    with pytest.raises(ValueError, match="outside"):
        selection.rank_rows([k1], k=5)


# --------------------------------------------------------------------------- grid and table


def test_select_maps_structure_and_table_round_trip():
    rng = np.random.default_rng(2)
    f = rng.random((120, 10))
    y = rng.integers(0, 3, 120).astype(np.int32)
    idx = np.argsort(-f, axis=1, kind="stable")[:, :6].astype(np.int32)
    ft = counting.reduce_arrays(labels=y, topk_idx=idx, topk_val=np.take_along_axis(f, idx, 1), features=f,
                              num_classes=3, feature_dim=10, with_feature_sums=True)
    w = rng.standard_normal((3, 10))
    maps = selection.select_maps(strategies=selection.DEFAULT_STRATEGIES, freq=ft, weight=w, seed=0)
    freq_maps = [m for m in maps if m.strategy == "frequency"]
    assert [m.k1 for m in freq_maps] == [1, 2, 3, 4, 5, 6] and [m.k2 for m in freq_maps] == [1, 2, 3, 4, 5, 6]
    others = [m for m in maps if m.strategy != "frequency"]
    assert [(m.strategy, m.k1, m.k2) for m in others] == [
        ("weight_l1", -1, 6), ("contribution", -1, 6), ("random", -1, 6)
    ]
    table = maptables.maps_to_table(maps, model="toy")
    assert table.schema.equals(schema.MAPS_SCORED_SCHEMA)
    assert table.num_rows == sum(m.idx.size for m in maps)
    df = table.to_pandas()
    assert df[df.strategy == "frequency"]["count"].notna().all() and df[df.strategy != "frequency"]["count"].isna().all()
    for m in maps:
        for k2 in (1, m.k2):
            back = maptables.map_from_table(table, strategy=m.strategy, k1=m.k1, k2=k2, num_classes=3)
            np.testing.assert_array_equal(back.idx, m.idx[:, :k2])
    with pytest.raises(ValueError, match="no stored frequency map"):
        maptables.map_from_table(table, strategy="frequency", k1=3, k2=4)
    with pytest.raises(ValueError, match="unknown strategy"):
        selection.select_maps(strategies=["magic"], freq=ft, weight=w)
    with pytest.raises(ValueError, match="head weight has shape"):
        selection.select_maps(strategies=["frequency"], freq=ft, weight=w[:, :5])


def test_imported_map_is_not_a_ranking():
    cm = selection.imported_map(np.array([[1, 2], [3, 4]]), name="json:x")
    assert cm.k1 == K1_NOT_APPLICABLE and not cm.nested
    assert cm.top(2).k2 == 2
    with pytest.raises(ValueError, match="not a ranking"):
        cm.top(1)
