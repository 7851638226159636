"""The paired bootstrap (core.stats) against direct references."""

import numpy as np
import pytest

from dtd_ray.core import stats


def test_bootstrap_counts_are_resamples():
    c = stats.bootstrap_counts(n=50, n_boot=300, seed=1)
    assert c.shape == (300, 50) and (c.sum(axis=1) == 50).all() and (c >= 0).all()
    # every instance is drawn about once per resample on average
    assert abs(c.mean() - 1.0) < 1e-6
    np.testing.assert_array_equal(c, stats.bootstrap_counts(n=50, n_boot=300, seed=1))
    with pytest.raises(ValueError, match="n >= 1"):
        stats.bootstrap_counts(n=0)


def test_resampled_means_match_index_resampling():
    # the multiplicity form equals the mean over an explicit resample drawn with those counts
    rng = np.random.default_rng(0)
    v = rng.random(40)
    c = stats.bootstrap_counts(n=40, n_boot=5, seed=3)
    ref = [np.repeat(v, c[b].astype(int)).mean() for b in range(5)]
    np.testing.assert_allclose(stats.resampled_means(values=v, counts=c), ref)
    with pytest.raises(ValueError, match="NaN"):
        stats.resampled_means(values=np.r_[v[:-1], np.nan], counts=c)


def test_interval_matches_normal_theory_for_a_proportion():
    # a 0/1 outcome with p = 0.9 over n = 10,000: the 95 % interval is ≈ ±1.96·sqrt(p(1−p)/n) = ±0.0059
    n = 10_000
    v = np.zeros(n)
    v[: int(0.9 * n)] = 1
    est = stats.estimate(values=v, counts=stats.bootstrap_counts(n=n, seed=0))
    half = 1.96 * np.sqrt(0.9 * 0.1 / n)
    assert est.value == pytest.approx(0.9)
    assert est.lo == pytest.approx(0.9 - half, abs=0.0012) and est.hi == pytest.approx(0.9 + half, abs=0.0012)


def test_paired_difference_is_tighter_than_unpaired():
    # two heads that agree on all but 30 of 10,000 images (20 gained, 10 lost): the paired
    # interval of the difference (0.1 points) is narrow; intervals of each mean overlap widely
    n = 10_000
    rng = np.random.default_rng(5)
    a = (rng.random(n) < 0.9).astype(float)
    b = a.copy()
    wrong = np.flatnonzero(a == 0)[:20]
    right = np.flatnonzero(a == 1)[:10]
    b[wrong], b[right] = 1, 0
    c = stats.bootstrap_counts(n=n, seed=1)
    d = stats.estimate(values=b - a, counts=c)
    ea, eb = stats.estimate(values=a, counts=c), stats.estimate(values=b, counts=c)
    assert d.value == pytest.approx(10 / n)
    assert (d.hi - d.lo) < 0.2 * (ea.hi - ea.lo)
    assert not (eb.lo > ea.hi)  # unpaired: overlapping intervals


def test_verdict():
    E = stats.Estimate
    assert stats.verdict(E(1.0, 0.5, 1.5), expect="positive") == "supported"
    assert stats.verdict(E(-1.0, -1.5, -0.5), expect="positive") == "contradicted"
    assert stats.verdict(E(0.1, -0.2, 0.4), expect="positive") == "not resolved"
    assert stats.verdict(E(-1.0, -1.5, -0.5), expect="negative") == "supported"
    assert E(1.0, 0.5, 1.5).text() == "1.00 [0.50, 1.50]"
    with pytest.raises(ValueError, match="expect"):
        stats.verdict(E(0, 0, 0), expect="up")


def test_pack_round_trip():
    o = np.random.default_rng(2).random(10_003) < 0.5
    data = stats.pack_outcomes(o)
    assert len(data) == 1251
    np.testing.assert_array_equal(stats.unpack_outcomes(data, n=len(o)), o)
    np.testing.assert_array_equal(stats.unpack_outcomes(stats.outcomes_from_text(stats.outcomes_text(o)), n=len(o)), o)
    with pytest.raises(ValueError, match="cannot hold"):
        stats.unpack_outcomes(data, n=20_000)


# ----------------------------------------------------------------------------- two-level bootstrap


def test_two_level_estimate_matches_a_loop_over_resamples():
    rng = np.random.default_rng(0)
    S, N, B = 3, 200, 300
    v = rng.integers(0, 2, (S, N)).astype(float) - rng.integers(0, 2, (S, N))
    counts = stats.bootstrap_counts(n=N, n_boot=B, seed=4)
    draws = stats.seed_counts(n_seeds=S, n_boot=B)
    theta = []
    for b in range(B):
        idx = np.repeat(np.arange(N), counts[b].astype(int))  # the resampled images
        seeds = np.repeat(np.arange(S), draws[b].astype(int))  # the resampled seeds
        theta.append(np.mean([v[s][idx].mean() for s in seeds]))
    lo, hi = np.quantile(theta, [0.025, 0.975])
    est = stats.two_level_estimate(values=v, counts=counts, seed_draws=draws)
    assert est.value == pytest.approx(v.mean())
    assert (est.lo, est.hi) == pytest.approx((lo, hi))


def test_two_level_interval_carries_the_seed_variance():
    rng = np.random.default_rng(1)
    N = 2000
    counts = stats.bootstrap_counts(n=N, n_boot=1000, seed=0)
    base = rng.integers(0, 2, N).astype(float)
    same = np.stack([base, base, base])
    spread = np.stack([base, (rng.random(N) < 0.3).astype(float), np.ones(N)])  # seeds far apart
    one = stats.two_level_estimate(values=base[None], counts=counts)
    plain = stats.estimate(values=base, counts=counts)
    assert (one.lo, one.hi) == pytest.approx((plain.lo, plain.hi))  # one seed: the image bootstrap
    eq = stats.two_level_estimate(values=same, counts=counts)
    assert (eq.lo, eq.hi) == pytest.approx((one.lo, one.hi))  # identical seeds: the image interval
    wide = stats.two_level_estimate(values=spread, counts=counts)
    assert wide.hi - wide.lo > 3 * (one.hi - one.lo)


def test_seed_counts_rows_sum_to_the_seeds():
    d = stats.seed_counts(n_seeds=3, n_boot=50)
    assert d.shape == (50, 3) and (d.sum(1) == 3).all()
    with pytest.raises(ValueError, match="expected"):
        stats.two_level_estimate(values=np.zeros(5), counts=stats.bootstrap_counts(n=5, n_boot=4))
