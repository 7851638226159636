"""The ``glm`` strategy: glm-saga's elastic-net path and the entry-order map derived from it."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

from dtd_ray.core import glm, heads, selection

pytest.importorskip("glm_saga.elasticnet", reason="glm-saga (and the tqdm it imports) is not installed")

C, M, INFORMATIVE = 4, 20, 3
FAST = dict(path_length=20, epsilon=1e-2, nepochs=10, batch_size=250, lr=0.1, tol=1e-4)


def synthetic(n=1000, seed=0):
    """Class ``y`` raises exactly its own 3 features (disjoint blocks); the other 8 are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    x = rng.normal(size=(n, M)).astype(np.float32)
    support = np.arange(C * INFORMATIVE).reshape(C, INFORMATIVE)  # class y: features 3y, 3y+1, 3y+2
    strength = np.array([2.5, 2.0, 1.5], dtype=np.float32)  # a known order within the block
    for c in range(C):
        x[np.ix_(y == c, support[c])] += strength
    x *= rng.uniform(0.5, 20.0, size=M).astype(np.float32)  # scales must not matter (standardised)
    return x, y, support


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def full_path(data):
    x, y, _ = data
    return glm.glm_path(features=x, labels=y, num_classes=C, seed=0, **FAST)


def test_informative_features_enter_first(data, full_path):
    _, _, support = data
    cm = glm.glm_map(path=full_path, kmax=INFORMATIVE)
    for c in range(C):
        assert set(cm.idx[c].tolist()) == set(support[c].tolist()), (c, cm.idx[c])
    # the strongest feature of every block enters first (at the latest by the time the third one does)
    assert all(cm.idx[c, 0] == support[c, 0] for c in range(C)), cm.idx


def test_map_is_a_strict_nested_order(full_path):
    K = 12
    cm = glm.glm_map(path=full_path, kmax=K)
    assert cm.strategy == "glm" and cm.k1 == selection.K1_NOT_APPLICABLE and cm.nested
    assert cm.idx.shape == (C, K) and cm.score.shape == (C, K) and cm.idx.dtype == np.int64
    heads.check_map(cm.idx, num_classes=C, feature_dim=M)  # in range, no repeats
    assert (np.diff(cm.score, axis=1) <= 0).all(), "entry λ must not increase along a class's ranking"
    for k in range(1, K + 1):
        np.testing.assert_array_equal(glm.glm_map(path=full_path, kmax=k).idx, cm.top(k).idx)
    # the full ranking is a permutation of every feature
    idx, _, _ = glm.entry_order(full_path)
    assert (np.sort(idx, axis=1) == np.arange(M)).all()


def test_entry_order_rule():
    """Entry step first, then |W| at entry, then lower index; never-entered last by |W_final|."""
    w = np.zeros((3, 1, 6), dtype=np.float32)
    w[0, 0, 4] = 0.1                        # 4 enters at step 0
    w[1, 0, [4, 2, 5]] = [0.2, -0.5, 0.3]  # 2 (|−0.5|) before 5 (0.3) at step 1
    w[2, 0, [1, 0]] = [0.3, 0.3]           # 0 and 1 tie at step 2: lower index first; 4 left again
    path = {"weights": w, "lambdas": np.array([3.0, 2.0, 1.0]), "complete": True, "threshold": 0.0}
    idx, step, score = glm.entry_order(path)
    assert idx[0].tolist() == [4, 2, 5, 0, 1, 3]
    assert step[0].tolist() == [0, 1, 1, 2, 2, 3]
    assert score[0].tolist() == [3.0, 2.0, 2.0, 1.0, 1.0, 0.0]
    cm = glm.glm_map(path=path, kmax=6)  # complete: the never-entered feature 3 is ranked last
    assert cm.idx[0].tolist() == [4, 2, 5, 0, 1, 3]
    with pytest.raises(ValueError, match="stopped before"):
        glm.glm_map(path={**path, "complete": False}, kmax=6)


def test_deterministic(data):
    x, y, _ = data
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    a = glm.glm_path(features=x, labels=y, num_classes=C, seed=3, stop_at_k=3, **FAST)
    assert torch.equal(torch.random.get_rng_state(), rng), "the caller's global RNG must not move"
    assert torch.get_num_threads() == threads, "the thread count is restored"
    b = glm.glm_path(features=x, labels=y, num_classes=C, seed=3, stop_at_k=3, **FAST)
    np.testing.assert_array_equal(a["weights"], b["weights"])
    np.testing.assert_array_equal(a["lambdas"], b["lambdas"])
    np.testing.assert_array_equal(glm.glm_map(path=a, kmax=3).idx, glm.glm_map(path=b, kmax=3).idx)


def test_stop_at_k_gives_the_same_prefix(data, full_path):
    x, y, _ = data
    capped = glm.glm_path(features=x, labels=y, num_classes=C, seed=0, stop_at_k=3, **FAST)
    assert not capped["complete"] and len(capped["lambdas"]) < len(full_path["lambdas"])
    # every class has >= 3 features that entered (|W| > 0 at some step of the path) where it stopped
    assert (np.abs(capped["weights"]) > 0).any(axis=0).sum(-1).min() >= 3
    np.testing.assert_array_equal(capped["weights"], full_path["weights"][: len(capped["lambdas"])])
    np.testing.assert_array_equal(glm.glm_map(path=capped, kmax=3).idx, glm.glm_map(path=full_path, kmax=3).idx)
    with pytest.raises(ValueError, match="stopped before"):
        glm.glm_map(path=capped, kmax=M)
    sel = glm.select_glm(features=x, labels=y, num_classes=C, kmax=3, seed=0, **FAST)
    np.testing.assert_array_equal(sel.idx, glm.glm_map(path=full_path, kmax=3).idx)


def test_agrees_with_glm_saga_in_one_call(data, full_path):
    """The reference: glm-saga's own one-call path (same loader, same grid) gives the same weights,
    and the map's support is what its weights say — every ranked feature is non-zero at its entry λ
    and zero before it."""
    from glm_saga.elasticnet import glm_saga

    x, y, _ = data
    xs, _, _ = glm.standardize(x)
    loader = glm._loader(xs, torch.as_tensor(y).long(), batch_size=FAST["batch_size"], seed=0, shuffle=True)
    linear = torch.nn.Linear(M, C)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = glm_saga(linear, loader, FAST["lr"], FAST["nepochs"], glm.DEFAULT_ALPHA, k=FAST["path_length"],
                           epsilon=FAST["epsilon"], tol=FAST["tol"], group=False, n_ex=len(y), n_classes=C,
                           do_zero=True)
    finally:
        torch.set_num_threads(threads)
    rw = np.stack([p["weight"].numpy() for p in ref["path"]])
    rl = np.array([float(p["lam"]) for p in ref["path"]])
    assert rw.shape == full_path["weights"].shape
    np.testing.assert_allclose(full_path["lambdas"], rl, rtol=1e-5)
    np.testing.assert_allclose(full_path["weights"], rw, atol=1e-4)

    K = 6
    cm = glm.glm_map(path=full_path, kmax=K)
    lam_index = {float(v): s for s, v in enumerate(full_path["lambdas"])}
    for c in range(C):
        for r in range(K):
            j, s = int(cm.idx[c, r]), lam_index[float(cm.score[c, r])]
            assert rw[s, c, j] != 0, (c, j, s)
            assert (rw[:s, c, j] == 0).all(), (c, j, s)
    # glm-saga's non-zeros at every step are features that have entered by then in the map's order
    _, step, _ = glm.entry_order(full_path)
    idx_all = glm.entry_order(full_path)[0]
    entry = np.empty_like(step)
    np.put_along_axis(entry, idx_all, step, axis=1)  # entry[c, j] = entry step of feature j
    for s in range(len(rl)):
        assert (entry[np.abs(rw[s]) > 0] <= s).all(), s


def test_refuses_bad_input(data):
    x, y, _ = data
    with pytest.raises(ValueError, match="labels"):
        glm.glm_path(features=x, labels=y + C, num_classes=C, **FAST)
    with pytest.raises(ValueError, match="stop_at_k"):
        glm.glm_path(features=x, labels=y, num_classes=C, stop_at_k=M + 1, **FAST)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        glm.glm_path(features=bad, labels=y, num_classes=C, **FAST)


def test_constant_feature_never_enters(data):
    x, y, _ = data
    x = x.copy()
    x[:, 7] = 5.0  # zero std: standardised to 0, never enters, no division by zero
    p = glm.glm_path(features=x, labels=y, num_classes=C, seed=0, **FAST)
    assert np.isfinite(p["weights"]).all() and p["std"][7] == 1.0
    idx, step, _ = glm.entry_order(p)
    assert (step[np.arange(C), (idx == 7).argmax(1)] == len(p["lambdas"])).all()
