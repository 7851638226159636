"""The validation split's rule (dtd_ray.core.holdout) against a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pytest

from dtd_ray.core import holdout
from dtd_ray.io import schema

MASK64 = 2**64 - 1


def splitmix64_reference(x: int) -> int:
    """Steele, Lea and Flood's finaliser, written out in Python integers."""
    z = x & MASK64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_splitmix64_matches_the_reference():
    xs = [0, 1, 2, 12345, 2**63 - 1, 2**63, MASK64]
    got = holdout.splitmix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [splitmix64_reference(x) for x in xs]


def test_uniform_is_the_documented_formula():
    ids = np.array([0, 7, 49_999, -3], dtype=np.int64)
    for seed in (0, 5):
        want = [(splitmix64_reference((int(i) & MASK64) + (seed + 1) * 0x9E3779B97F4A7C15) >> 11) / 2**53
                for i in ids]
        np.testing.assert_array_equal(holdout.holdout_uniform(sample_id=ids, seed=seed), want)


def test_val_share_is_binomial_and_seeded():
    ids = np.arange(50_000)
    m0 = holdout.val_mask(sample_id=ids, fraction=0.1, seed=0)
    assert abs(int(m0.sum()) - 5_000) < 4 * np.sqrt(50_000 * 0.1 * 0.9)  # within 4 sd
    m1 = holdout.val_mask(sample_id=ids, fraction=0.1, seed=1)
    assert not np.array_equal(m0, m1)
    assert abs(int((m0 & m1).sum()) - 500) < 4 * np.sqrt(50_000 * 0.01)  # independent draws: 1 % in both
    # classes listed in blocks (image folders): every block gets its share, not the first rows
    blocks = m0.reshape(10, 5_000).mean(1)
    assert np.all(np.abs(blocks - 0.1) < 0.02)


def test_membership_depends_on_the_id_alone():
    ids = np.arange(50_000)
    full = holdout.val_mask(sample_id=ids, fraction=0.1, seed=0)
    rng = np.random.default_rng(3)
    sub = np.sort(rng.choice(ids, 20_000, replace=False))  # a train_rows subset, or rows in another order
    np.testing.assert_array_equal(holdout.val_mask(sample_id=sub, fraction=0.1, seed=0), full[sub])
    shuffled = rng.permutation(ids)
    np.testing.assert_array_equal(holdout.val_mask(sample_id=shuffled, fraction=0.1, seed=0), full[shuffled])
    # a larger share holds out a superset
    assert (holdout.val_mask(sample_id=ids, fraction=0.2, seed=0) >= full).all()


def test_no_fraction_holds_nothing_out_and_bad_ones_are_one_line():
    assert not holdout.val_mask(sample_id=np.arange(10), fraction=None, seed=0).any()
    for bad in (0, -0.1, 0.6, 1.0):
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0.5\]"):
            holdout.check_fraction(bad)


def test_split_names():
    assert schema.split_key("train", augment=None, seed=0, val_fraction=0.1) == "train_fit90"
    assert schema.split_key("train", augment="cifar", seed=0, val_fraction=0.1) == "train_aug0_fit90"
    assert schema.split_key("train", augment=None, seed=0) == "train"
    assert schema.val_key("train", val_fraction=0.1) == "train_val10"
    assert schema.val_key("train", val_fraction=0.125) == "train_val12.5"
