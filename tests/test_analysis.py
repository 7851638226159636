"""Analyses on constructed features: head cost, channel use, the essentiality test, Ψ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dtd_ray.core import analysis


def test_channel_usage_and_pruning():
    idx = np.array([[0, 1], [1, 3], [1, 4]])
    np.testing.assert_array_equal(analysis.channel_usage(idx=idx, feature_dim=6), [1, 3, 0, 1, 1, 0])
    s = analysis.pruning_summary(idx=idx, feature_dim=6)
    assert s["channels_used"] == 4 and s["channels_unused"] == 2 and s["unused"] == [2, 5]
    assert s["shared"] == 1 and s["max_classes_per_channel"] == 3
    assert s["unused_fraction"] == pytest.approx(2 / 6)


def essential_case(n=400):
    # class 0 lives on features 0, 1 and class 1 on 2, 3; each instance also carries a little of the other class
    w = np.array([[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]])
    b = np.zeros(2)
    f0 = np.tile([10.0, 10.0, 3.0, 3.0], (n, 1))
    f1 = np.tile([3.0, 3.0, 10.0, 10.0], (n, 1))
    return np.vstack([f0, f1]), np.repeat([0, 1], n), w, b, np.array([[0, 1], [2, 3]])


def test_essentiality_selected_features_are_essential():
    f, y, w, b, idx = essential_case()
    out = analysis.essentiality_test(features=f, labels=y, weight=w, bias=b, idx=idx, seed=0)
    np.testing.assert_array_equal(out["n"], [400, 400])
    np.testing.assert_array_equal(out["acc_clean"], [1.0, 1.0])
    # noise in the selected features: z_y ~ N(0, 50) against the other class's 30 → almost never correct
    assert (out["acc_selected_noise"] < 0.01).all()
    # noise in all other features: the other class's logit ~ N(0, 50) against 100 → always correct
    np.testing.assert_array_equal(out["acc_others_noise"], [1.0, 1.0])
    again = analysis.essentiality_test(features=f, labels=y, weight=w, bias=b, idx=idx, seed=0)
    np.testing.assert_array_equal(again["acc_selected_noise"], out["acc_selected_noise"])
    dec = analysis.essentiality_test(features=f, labels=y, weight=w, bias=b, idx=idx, head="decomposed")
    np.testing.assert_array_equal(dec["acc_others_noise"], [1.0, 1.0])


def test_essentiality_wrong_map_is_not_essential_and_empty_class_is_nan():
    f, y, w, b, _ = essential_case()
    wrong = np.array([[2, 3], [0, 1]])  # each class gets the other's features
    out = analysis.essentiality_test(features=f, labels=y, weight=w, bias=b, idx=wrong, seed=1)
    np.testing.assert_array_equal(out["acc_selected_noise"], [1.0, 1.0])
    assert (out["acc_others_noise"] < 0.01).all()
    w3, b3 = np.vstack([w, np.zeros(4)]), np.zeros(3)
    out = analysis.essentiality_test(features=f, labels=y, weight=w3, bias=b3, idx=np.array([[0, 1], [2, 3], [0, 2]]))
    assert np.isnan(out["acc_clean"][2]) and out["n"][2] == 0
    with pytest.raises(ValueError, match="2 classes, the head 3"):
        analysis.essentiality_test(features=f, labels=y, weight=w3, bias=b3, idx=wrong)
    bad = f.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        analysis.essentiality_test(features=bad, labels=y, weight=w, bias=b, idx=wrong)


def test_psi_constructed():
    v = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # masses 4, 7, 9, 10 of 10: q = 0.7 → 2 of 4 channels hold it → Ψ = 2/4; all equal: 3 of 4
    np.testing.assert_allclose(analysis.psi(values=v, q=0.7)[[0, 1, 3]], [0.5, 0.5, 0.75])
    assert np.isnan(analysis.psi(values=v, q=0.7)[2])
    np.testing.assert_allclose(analysis.psi(values=v[:2], q=0.4), [0.25, 0.25])  # 4 ≥ 4: one channel
    np.testing.assert_allclose(analysis.psi(values=v[:2], q=1.0), [1.0, 1.0])
    np.testing.assert_allclose(analysis.psi(values=-v[:1], q=0.7), [0.5])  # the L1 mass uses |v|
    with pytest.raises(ValueError, match="outside"):
        analysis.psi(values=v, q=0.0)


def test_psi_by_class_median_and_warnings():
    v = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    y = np.array([0, 0, 0, 1])
    out = analysis.psi_by_class(values=v, labels=y, num_classes=3, q=0.7)
    # class 0: Ψ = 0.5, 0.75, 0.25 → median 0.5; class 1 only a zero-mass instance; class 2 empty
    assert out["psi_median"][0] == pytest.approx(0.5)
    assert np.isnan(out["psi_median"][1]) and np.isnan(out["psi_median"][2])
    assert out["zero_mass"] == 1 and len(out["warnings"]) == 2
    np.testing.assert_array_equal(out["n"], [3, 1, 0])


def test_channel_l1_and_block_hooks():
    x = torch.zeros(2, 3, 2, 2)
    x[0, 1] = -1.0
    x[1, 2, 0, 0] = 5.0
    np.testing.assert_allclose(analysis.channel_l1(x), [[0, 4, 0], [0, 0, 5]])

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.b1 = nn.Conv2d(1, 2, 1, bias=False)
            self.b2 = nn.Conv2d(2, 3, 1, bias=False)
            nn.init.constant_(self.b1.weight, 1.0)
            nn.init.constant_(self.b2.weight, -1.0)
            self.blocks = {"b1": self.b1, "b2": self.b2}

        def forward_features(self, x):
            return self.b2(self.b1(x)).mean((2, 3))

    net = Tiny()
    batches = [torch.ones(2, 1, 3, 3), 2 * torch.ones(1, 1, 3, 3)]
    out = analysis.block_channel_norms(backbone=net, batches=batches)
    np.testing.assert_allclose(out["b1"], [[9, 9], [9, 9], [18, 18]])
    np.testing.assert_allclose(out["b2"], [[18, 18, 18], [18, 18, 18], [36, 36, 36]])
    assert not net.b1._forward_hooks and not net.b2._forward_hooks
    psi = analysis.psi_by_class(values=out["b2"], labels=np.array([0, 0, 1]), num_classes=2, q=0.5)
    np.testing.assert_allclose(psi["psi_median"], [2 / 3, 2 / 3])
    with pytest.raises(ValueError, match="unknown block"):
        analysis.block_channel_norms(backbone=net, batches=batches, blocks=["b3"])


# ----------------------------------------------------------------------------- matched ablations


def _ablation_reference(f, y, w, b, sets, repl):
    """Instance by instance: ablate the instance's class set with ``repl`` rows, predict with the full head."""
    out = np.zeros(len(f))
    for i in range(len(f)):
        x = f[i].copy()
        for j in sets[y[i]]:
            x[j] = repl[i][j]
        out[i] = float(np.argmax(w @ x + b) == y[i])
    return out


def test_mean_and_permutation_ablations_match_a_loop():
    rng = np.random.default_rng(0)
    C, m, N, k = 4, 12, 80, 3
    f = np.abs(rng.normal(size=(N, m))) + 0.1
    y = rng.integers(0, C, N)
    w, b = rng.normal(size=(C, m)), rng.normal(size=C)
    idx = np.stack([rng.choice(m, k, replace=False) for _ in range(C)])
    mu = np.abs(rng.normal(size=m))
    got = analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=b, idx=idx, kind="mean", means=mu, seeds=[0])
    np.testing.assert_array_equal(got["selected"], _ablation_reference(f, y, w, b, idx, np.tile(mu, (N, 1))))
    perm = np.random.default_rng([0, 2]).permutation(N)
    got = analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=b, idx=idx, kind="permute", seeds=[0])
    np.testing.assert_array_equal(got["selected"], _ablation_reference(f, y, w, b, idx, f[perm]))
    # the random sets: k of each class's other features, drawn from default_rng([seed, 1, y])
    rand = []
    for c in range(C):
        others = np.setdiff1d(np.arange(m), idx[c])
        rand.append(np.random.default_rng([0, 1, c]).choice(others, size=k, replace=False))
    np.testing.assert_array_equal(got["random"], _ablation_reference(f, y, w, b, rand, f[perm]))
    assert all(len(set(r) & set(i)) == 0 for r, i in zip(rand, idx))
    # two seeds: the mean of the two single-seed outcomes
    two = analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=b, idx=idx, kind="permute", seeds=[0, 1])
    one = analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=b, idx=idx, kind="permute", seeds=[1])
    np.testing.assert_allclose(two["random"], (got["random"] + one["random"]) / 2)


def test_ablating_the_features_a_class_relies_on_hurts_more_than_random_ones():
    # class c's logit reads features 2c and 2c+1 only: taking those from another (mostly other-class)
    # instance removes its evidence; two of its other features taken the same way leave it intact
    rng = np.random.default_rng(1)
    C, m, N = 4, 16, 400
    y = rng.integers(0, C, N)
    f = rng.random((N, m)) * 0.1
    f[np.arange(N), 2 * y] += 3.0
    f[np.arange(N), 2 * y + 1] += 3.0
    w = np.zeros((C, m))
    for c in range(C):
        w[c, [2 * c, 2 * c + 1]] = 1.0
    idx = np.array([[2 * c, 2 * c + 1] for c in range(C)])
    got = analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=np.zeros(C), idx=idx, kind="permute",
                                     seeds=[0, 1, 2])
    assert got["selected"].mean() < 0.6 and got["random"].mean() == 1.0


def test_ablation_bad_input_is_one_line():
    f, y, w, b = np.ones((3, 4)), np.zeros(3, int), np.ones((2, 4)), np.zeros(2)
    with pytest.raises(ValueError, match="kind must be"):
        analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=b, idx=[[0], [1]], kind="zero")
    with pytest.raises(ValueError, match="needs the training split's feature means"):
        analysis.ablation_outcomes(features=f, labels=y, weight=w, bias=b, idx=[[0], [1]], kind="mean")


def test_weighted_psi_is_psi_of_the_own_class_contributions():
    rng = np.random.default_rng(2)
    f, w = np.abs(rng.normal(size=(50, 8))), rng.normal(size=(3, 8))
    y = rng.integers(0, 3, 50)
    want = analysis.psi(values=np.abs(w[y] * f), q=0.9)
    np.testing.assert_array_equal(analysis.weighted_psi(features=f, labels=y, weight=w, q=0.9), want)
    # one feature dominating the weighted values: Ψ_w = 1/m while plain Ψ is larger
    f1 = np.ones((1, 8))
    w1 = np.full((1, 8), 1e-3)
    w1[0, 3] = 10.0
    assert analysis.weighted_psi(features=f1, labels=[0], weight=w1, q=0.9)[0] == pytest.approx(1 / 8)
    assert analysis.psi(values=f1, q=0.9)[0] > 0.5
