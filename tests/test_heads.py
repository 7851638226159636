"""The decomposed head: the formula by hand; module, grid evaluator and masked full FC agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtd_ray.core import heads
from dtd_ray.core import selection
from dtd_ray.core.selection import ClassMap


def random_head(seed=0, N=200, C=4, m=12):
    rng = np.random.default_rng(seed)
    f = rng.random((N, m)) * 2
    w = rng.standard_normal((C, m))
    b = rng.standard_normal(C)
    y = rng.integers(0, C, N)
    return f, w, b, y


def test_formula_by_hand():
    f = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 1.0, 2.0]])
    w = np.array([[1.0, -1.0, 2.0, 0.5], [0.0, 3.0, -2.0, 1.0]])
    b = np.array([0.25, -0.5])
    idx = np.array([[2, 0], [1, 3]])
    # z_0 = 0.25 + 2·f2 + 1·f0 ; z_1 = -0.5 + 3·f1 + 1·f3
    expected = np.array([[0.25 + 6 + 1, -0.5 + 6 + 4], [0.25 + 2 + 0.5, -0.5 + 0 + 2]])
    np.testing.assert_allclose(heads.decomposed_logits(features=f, weight=w, bias=b, idx=idx).numpy(), expected)
    np.testing.assert_allclose(heads.masked_logits(features=f, weight=w, bias=b, idx=idx).numpy(), expected)
    mod = heads.DecomposedHead(weight=w, bias=b, idx=idx)
    np.testing.assert_allclose(mod(torch.from_numpy(f)).detach().numpy(), expected)
    assert mod.macs == 4 and tuple(mod.weight.shape) == (2, 2)
    np.testing.assert_allclose(mod.weight.detach().numpy(), [[2.0, 1.0], [3.0, 1.0]])


def test_module_gathered_and_masked_fc_agree():
    f, w, b, _ = random_head(1, C=6, m=20)
    idx = selection.select_random(num_classes=6, feature_dim=20, k2=7, seed=0).idx
    a = heads.decomposed_logits(features=f, weight=w, bias=b, idx=idx).numpy()
    m = heads.masked_logits(features=f, weight=w, bias=b, idx=idx).numpy()
    lin = torch.nn.Linear(20, 6, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    mod = heads.DecomposedHead.from_linear(lin, idx)
    z = mod(torch.from_numpy(f)).detach().numpy()
    np.testing.assert_allclose(a, m, atol=1e-6, rtol=0)
    np.testing.assert_allclose(z, m, atol=1e-6, rtol=0)
    dense = mod.to_linear()
    np.testing.assert_allclose(dense(torch.from_numpy(f)).detach().numpy(), m, atol=1e-6, rtol=0)
    # bias kept, nothing rescaled: the dense weight is W on the map and 0 elsewhere
    mask = np.zeros_like(w, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    np.testing.assert_array_equal(dense.weight.detach().numpy(), np.where(mask, w, 0.0))
    np.testing.assert_array_equal(dense.bias.detach().numpy(), b)


def test_module_trains_only_its_gathered_weights():
    f, w, b, y = random_head(2)
    idx = selection.select_weight_l1(weight=w, k2=3).idx
    mod = heads.DecomposedHead(weight=torch.from_numpy(w).float(), bias=torch.from_numpy(b).float(), idx=idx)
    loss = torch.nn.functional.cross_entropy(mod(torch.from_numpy(f).float()), torch.from_numpy(y))
    loss.backward()
    assert mod.weight.grad.shape == (4, 3) and mod.bias.grad.shape == (4,)
    assert [n for n, _ in mod.named_parameters()] == ["weight", "bias"]
    assert "idx" in dict(mod.named_buffers())


def test_grid_evaluator_equals_masked_fc_for_every_config():
    f, w, b, y = random_head(3, N=300, C=5, m=16)
    maps = [
        selection.select_random(num_classes=5, feature_dim=16, k2=16, seed=1),
        selection.select_weight_l1(weight=w, k2=9),
        ClassMap(strategy="frequency", k1=4, idx=selection.select_random(num_classes=5, feature_dim=16, k2=4, seed=2).idx,
                 score=np.zeros((5, 4))),
    ]
    rows = heads.evaluate_grid(features=f, labels=y, weight=w, bias=b, maps=maps, chunk_elems=997)
    assert len(rows) == 16 + 9 + 4
    i = 0
    for cm in maps:
        for k2 in range(1, cm.k2 + 1):
            r = rows[i]
            i += 1
            z = heads.masked_logits(features=f, weight=w, bias=b, idx=cm.idx[:, :k2])
            assert (r["strategy"], r["k1"], r["k2"]) == (cm.strategy, cm.k1, k2)
            assert r["correct"] == int((z.argmax(1).numpy() == y).sum())
            assert r["channels_used"] == len(np.unique(cm.idx[:, :k2]))
            assert r["head_macs_decomposed"] == 5 * k2 and r["head_macs_full"] == 5 * 16
            assert r["n_instances"] == 300
    acc_full = float(((f @ w.T + b).argmax(1) == y).mean())
    assert all(r["acc_full"] == acc_full for r in rows)
    # float32 and threads give the same counts here
    rows32 = heads.evaluate_grid(features=f, labels=y, weight=w, bias=b, maps=maps, dtype=np.float32, threads=1)
    assert [r["correct"] for r in rows32] == [r["correct"] for r in rows]


def test_grid_evaluator_tie_rule_is_argmax_first_maximum():
    # all-zero features: every logit is its bias; classes 1 and 2 tie → argmax picks 1
    f = np.zeros((6, 4))
    w = np.ones((3, 4))
    b = np.array([0.0, 1.0, 1.0])
    y = np.array([0, 1, 2, 1, 2, 0])
    cm = selection.select_random(num_classes=3, feature_dim=4, k2=2, seed=0)
    rows = heads.evaluate_grid(features=f, labels=y, weight=w, bias=b, maps=[cm])
    z = heads.masked_logits(features=f, weight=w, bias=b, idx=cm.idx)
    assert rows[-1]["correct"] == int((z.argmax(1).numpy() == y).sum()) == 2


def test_channels_used_by_k2():
    idx = np.array([[0, 1, 2], [1, 3, 0]])
    np.testing.assert_array_equal(heads.channels_used_by_k2(idx, feature_dim=5), [2, 3, 4])


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        (np.array([[0, 1]]), "1 classes, the head 2"),
        (np.array([[0, 1], [2, 12]]), "outside"),
        (np.array([[0, 0], [2, 3]]), "repeats"),
        (np.zeros((2, 0), dtype=int), "empty"),
        (np.tile(np.arange(13), (2, 1)), "larger than the feature dimension"),
    ],
)
def test_bad_maps_are_refused(idx, match):
    f, w, b, _ = random_head(4, C=2, m=12)
    with pytest.raises(ValueError, match=match):
        heads.decomposed_logits(features=f, weight=w, bias=b, idx=idx)
    with pytest.raises(ValueError, match=match):
        heads.DecomposedHead(weight=w, bias=b, idx=idx)


def test_grid_evaluator_bad_inputs():
    f, w, b, y = random_head(5)
    cm = selection.select_weight_l1(weight=w, k2=2)
    bad = f.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        heads.evaluate_grid(features=bad, labels=y, weight=w, bias=b, maps=[cm])
    with pytest.raises(ValueError, match="expected"):
        heads.evaluate_grid(features=f[:, :5], labels=y, weight=w, bias=b, maps=[cm])
    with pytest.raises(ValueError, match="labels outside"):
        heads.evaluate_grid(features=f, labels=y + 4, weight=w, bias=b, maps=[cm])
    other = selection.select_weight_l1(weight=np.ones((3, 12)), k2=2)
    with pytest.raises(ValueError, match="3 classes, the head 4"):
        heads.evaluate_grid(features=f, labels=y, weight=w, bias=b, maps=[other])
