"""The reviewer's tests of the report (dtd_ray.report.protocol) on small hand-made evidence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dtd_ray.core import stats
from dtd_ray.report import protocol
from dtd_ray.report.evidence import Evidence

N = 400


def _row(model, strategy, k2, mode, *, seed=0, lr=None, acc_val=np.nan, outcomes=None, k1=None):
    o = np.asarray(outcomes, dtype=bool)
    return {"model": model, "strategy": strategy, "k1": k2 if k1 is None else k1, "k2": k2, "retrain_mode": mode,
            "map_seed": -1, "seed": seed, "lr": lr, "acc_val": acc_val, "best_epoch": 1, "val_split": "train_val10",
            "acc_retrained": 100 * o.mean(), "acc_decomposed": 100 * o.mean(), "outcomes": stats.pack_outcomes(o)}


def _evidence(trials, full):
    inst = pd.DataFrame({"sample_id": np.arange(N), "correct_full": full, "psi": np.full(N, 0.5)})
    return Evidence(trials=trials, instances={"m": inst}, essentiality=pd.DataFrame(), n_boot=500)


def test_choose_on_val_keeps_the_best_validation_row_and_says_so():
    o = np.ones(N, bool)
    t = pd.DataFrame([_row("m", "frequency", 5, "head", lr=1e-3, acc_val=90.0, outcomes=o),
                      _row("m", "frequency", 5, "head", lr=1e-2, acc_val=91.0, outcomes=o),
                      _row("m", "frequency", 5, "head", lr=3e-2, acc_val=91.0, outcomes=o),  # a tie: the smaller lr
                      _row("m", "weight_l1", 5, "head", lr=1e-3, acc_val=80.0, outcomes=o),
                      _row("m", "weight_l1", 5, "head", lr=1e-2, acc_val=79.0, outcomes=o),
                      _row("m", "frequency", 5, "none", outcomes=o)])
    chosen, choices = protocol.choose_on_val(t)
    assert len(chosen) == 3
    head = chosen[chosen.retrain_mode == "head"].set_index("strategy")["lr"]
    assert head["frequency"] == 1e-2 and head["weight_l1"] == 1e-3
    assert choices.iloc[0]["chosen on"] == "train_val10" and choices.iloc[0]["cells"] == 2
    # without a validation split: the smallest lr, and the table says nothing chose it
    t2 = t.assign(acc_val=np.nan, val_split=None)
    chosen2, choices2 = protocol.choose_on_val(t2)
    assert (chosen2[chosen2.retrain_mode == "head"]["lr"] == 1e-3).all()
    assert "no validation split" in choices2.iloc[0]["chosen on"]


def test_c1_against_the_control_with_seeds():
    rng = np.random.default_rng(0)
    full0 = rng.random(N) < 0.92
    rows = []
    for s in (0, 1, 2):
        ctrl = rng.random(N) < 0.93
        dec = ctrl & (rng.random(N) < 0.99)  # about 1 point below the control, seed by seed
        rows += [_row("m", "full", 64, "finetune", seed=s, outcomes=ctrl, k1=-1),
                 _row("m", "frequency", 5, "finetune", seed=s, outcomes=dec)]
    t = pd.DataFrame(rows)
    ev = _evidence(t, full0)
    c1 = protocol.c1_table(t, ev, k=5)
    assert list(c1["reference"]) == ["full head trained the same way", "original full head"]
    like = c1.iloc[0]
    want = np.mean([(r1 - r2) for r1, r2 in zip(
        [stats.unpack_outcomes(r, n=N).mean() for r in t[t.strategy == "full"]["outcomes"]],
        [stats.unpack_outcomes(r, n=N).mean() for r in t[t.strategy == "frequency"]["outcomes"]])]) * 100
    assert like["_est"].value == pytest.approx(want) and like["seeds"] == 3
    assert like["_est"].lo < like["_est"].value < like["_est"].hi
    for mg in protocol.MARGINS:
        assert like[f"< {mg:g} point"] == stats.verdict(like["_est"], expect="negative", null=mg)
    # against the original head: full0 − decomposed, sign and value
    dec_mean = np.mean([stats.unpack_outcomes(r, n=N).mean() for r in t[t.strategy == "frequency"]["outcomes"]])
    assert c1.iloc[1]["_est"].value == pytest.approx(100 * (full0.mean() - dec_mean))


def test_kgrid_chooses_k1_on_validation_and_compares_on_test():
    rng = np.random.default_rng(1)
    rows_t, rows_v = [], []
    for k1 in (1, 2, 3):
        for k2 in range(1, k1 + 1):
            o = rng.random(N) < (0.5 + 0.1 * k2 + (0.05 if k1 == 3 else 0.0))  # k1 = 3 is better at every k2
            rows_t.append({"model": "m", "strategy": "frequency", "k1": k1, "k2": k2, "acc_decomposed": o.mean(),
                           "n_instances": N, "outcomes": stats.pack_outcomes(o)})
            rows_v.append({"model": "m", "strategy": "frequency", "k1": k1, "k2": k2,
                           "acc_decomposed": 0.5 + 0.1 * k2 + (0.05 if k1 == 3 else 0.0), "n_instances": 50})
    g = protocol.kgrid_tables(pd.DataFrame(rows_t), pd.DataFrame(rows_v), model="m", n_boot=300)
    assert g["test"].shape == (3, 3) and np.isnan(g["test"].loc[1, 2])
    ch = g["choice"].set_index("k2")
    assert list(ch["k1 (val)"]) == [3, 3, 3]
    assert ch.loc[3, "says"] == "k1 = k2 chosen on validation"
    t = pd.DataFrame(rows_t)
    o31 = stats.unpack_outcomes(t[(t.k1 == 3) & (t.k2 == 1)]["outcomes"].iloc[0], n=N)
    o11 = stats.unpack_outcomes(t[(t.k1 == 1) & (t.k2 == 1)]["outcomes"].iloc[0], n=N)
    assert ch.loc[1, "difference [95 % CI]"].startswith(f"{100 * (o31.mean() - o11.mean()):.2f} [")


def test_slope_is_least_squares_and_its_interval_is_paired():
    x = np.array([20.0, 32.0, 44.0, 56.0])
    y = np.array([3.6, 2.5, 2.4, 1.7])
    assert protocol.ols_slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0])
    rng = np.random.default_rng(2)
    base = (rng.random(N) < 0.1).astype(float)
    vecs = [base + (rng.random(N) < p) for p in (0.04, 0.03, 0.02, 0.01)]  # the gap shrinks with depth
    counts = stats.bootstrap_counts(n=N, n_boot=500)
    est = protocol.slope_estimate(list(x), vecs, counts)
    want = np.polyfit(x, [v.mean() for v in vecs], 1)[0] * 10 * 100
    assert est.value == pytest.approx(want) and est.lo <= est.value <= est.hi
    flat = protocol.slope_estimate(list(x), [base] * 4, counts)
    assert (flat.value, flat.lo, flat.hi) == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)


def test_augmented_maps_against_the_sweeps_own(tmp_path):
    import json

    from dtd_ray.core import selection
    from dtd_ray.io import maptables, storage
    from dtd_ray.report.augmented import augmented_table, overlap, parse_published
    from dtd_ray.report.tables import SweepOutput

    assert overlap(np.array([[0, 1], [2, 3]]), np.array([[1, 5], [3, 2]])) == 3
    assert parse_published("a=x.json, b=y.json") == {"a": "x.json", "b": "y.json"}
    with pytest.raises(ValueError, match="model=path.json"):
        parse_published("a.json")
    rng = np.random.default_rng(3)
    plain, aug = rng.random(N) < 0.88, rng.random(N) < 0.89
    folders = {}
    for name, o, idx in (("plain", plain, [[0, 1], [2, 3]]), ("aug", aug, [[0, 4], [2, 3]])):
        t = pd.DataFrame([{**_row("m", "frequency", 2, "none", outcomes=o), "head_macs_full": 16,
                           "head_macs_decomposed": 4}])
        cm = selection.ClassMap(strategy="frequency", k1=2, idx=np.array(idx), score=np.ones((2, 2)),
                                count=np.ones((2, 2), dtype=np.int64))
        fs, path = storage.resolve(str(tmp_path / name))
        storage.write_parquet(fs, f"{path}/maps.parquet", maptables.maps_to_table([cm], model="m"))
        folders[name] = SweepOutput(root=str(tmp_path / name), config={"config": {"select_augment": "cifar"}
                                                                       if name == "aug" else {}},
                                    trials=t, analysis=pd.DataFrame(), maps_files={"m": f"{path}/maps.parquet"})
    pub = tmp_path / "pub.json"
    pub.write_text(json.dumps({"0": [0, 4], "1": [3, 7]}))
    ev = _evidence(folders["plain"].trials, plain)
    t = augmented_table(folders["plain"], folders["aug"], ev, k=2, published={"m": str(pub)}).iloc[0]
    assert t["decomposed: difference [95 % CI]"].startswith(f"{100 * (aug.mean() - plain.mean()):.2f} [")
    assert t["shared features"] == "3 / 4" and t["published: augmented / this sweep"] == "3 / 2 of 4"
    assert t["maps"] == "`train_aug0` against `train`"
