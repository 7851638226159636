"""The cross-family view of the report (dtd_ray.report.families) on a synthetic sweep whose answers are known.

Seven models of four families and widths m = 64 … 1,024 on the same 4,000 test images: each decomposed
head's error above the full head's falls with k/m (by construction), so at a fixed count the wide
models trail, at a fixed share of m they do not, and Ψ is set to rise with the gap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dtd_ray.core import stats
from dtd_ray.core.kgrid import k_of_share
from dtd_ray.report.evidence import Evidence
from dtd_ray.report.families import applies, family_view, spearman
from dtd_ray.report.tables import depth_of, family_of, markdown_table, model_table, series_of

N = 4000
MODELS = {"cifar_resnet20": 64, "cifar_resnet56": 64, "cifar_resnet20_proj": 64, "cifar_resnet56_proj": 64,
          "cifar_densenet40_k12": 448, "cifar_shufflenet_g3_x0_5": 480, "cifar_shufflenetv2_x0_5": 1024}
DEPTH_BONUS = {"cifar_resnet56": 0.6, "cifar_resnet56_proj": 0.6}  # deeper: a smaller gap in both series


def _sweep():
    rng = np.random.default_rng(0)
    rows, instances = [], {}
    ids = np.arange(N)
    for model, m in MODELS.items():
        full = rng.random(N) < 0.93
        # the decomposed head loses a share of the full head's hits that falls with k/m
        loss = lambda k: 0.35 * np.exp(-30.0 * k / m) * (1.0 - DEPTH_BONUS.get(model, 0.0)) + 0.01
        u = rng.random(N)
        ks = sorted(set(list(range(1, 11)) + [20] + [k_of_share(p, m=m) for p in (1, 2, 5, 10)]))
        gap5 = loss(5)
        instances[model] = pd.DataFrame({"sample_id": ids, "correct_full": full.astype(np.int8),
                                         "psi": np.clip(0.5 + gap5 + rng.normal(0, 0.01, N), 0, 1)})
        for strategy, shift in (("frequency", 0.0), ("weight_l1", 0.05)):
            for k in ks:
                for mode, gain in (("none", 0.0), ("head", 0.5)):
                    out = full & (u >= (loss(k) + shift) * (1 - gain))
                    rows.append({"model": model, "backbone": model, "dataset": "cifar10", "strategy": strategy,
                                 "k1": k, "k2": k, "retrain_mode": mode, "acc_full": 100 * full.mean(),
                                 "acc_decomposed": 100 * out.mean(), "acc_retrained": 100 * out.mean(),
                                 "head_macs_full": 10 * m, "head_macs_decomposed": 10 * k,
                                 "outcomes": stats.pack_outcomes(out)})
    trials = pd.DataFrame(rows)
    ev = Evidence(trials=trials, instances=instances, essentiality=pd.DataFrame(), n_boot=300)
    psi = {m: float(instances[m]["psi"].mean()) for m in MODELS}
    return trials, model_table(trials, pd.DataFrame(), psi=psi), ev


@pytest.fixture(scope="module")
def view():
    trials, models, ev = _sweep()
    return models, family_view(trials, models, k=5, evidence=ev)


def test_names_give_depth_family_and_series():
    assert [depth_of(n) for n in ("cifar_resnet20_proj", "cifar_densenet40_k12", "cifar_shufflenetv2_x0_5")] == [20, 40, None]
    assert [family_of(n) for n in ("cifar_resnet56", "cifar_shufflenet_g3_x0_5", "cifar_shufflenetv2_x0_5",
                                   "resnext50_32x4d")] == ["ResNet", "ShuffleNet v1", "ShuffleNetV2", "ResNeXt"]
    assert series_of("cifar_resnet20_proj") == series_of("cifar_resnet56_proj") == "cifar_resnet_proj"
    assert series_of("cifar_resnet20") == "cifar_resnet" != series_of("cifar_resnet20_proj")


def test_spearman_against_a_reference():
    a = np.array([0.1, 0.4, 0.2, 0.9])
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    # ranks [0, 2, 1, 3] and [1, 3, 0, 2]: 1 − 6 Σd² / (n(n² − 1)) = 1 − 6·(1 + 1 + 1 + 1) / 60
    assert spearman(a, np.array([2.0, 5.0, 1.0, 3.0])) == pytest.approx(1 - 6 * 4 / 60)
    rows = np.stack([a, -a])
    np.testing.assert_allclose(spearman(rows, np.stack([a, a])), [1.0, -1.0])


def test_the_view_answers_the_constructed_questions(view):
    models, v = view
    assert applies(models) and list(models["feature_dim"]) == sorted(models["feature_dim"])  # widths first
    width = " ".join(v.findings["Width or family?"])
    # at the fixed count k = 5 every wider model has the larger gap, resolved
    line = next(f for f in v.findings["Width or family?"] if f.startswith("gap k = 5:"))
    assert line.count("(larger)") == 3, line
    assert "about the same width, other family" in width  # DenseNet-40 (448) against ShuffleNet v1 (480)
    share = v.tables["A count or a share?"]
    assert list(share["share p"]) == ["1 %", "2 %", "5 %", "10 %"]
    assert (share["verdict"] == "the share collapses more").sum() >= 3, share.to_string()
    psi = " ".join(v.findings["Ψ against the gap"])
    assert "Ψ orders the models as the gap does" in psi
    strat = v.tables["Strategies by family"]
    assert set(strat["best"]) == {"frequency"} and len(strat) == 2 * len(MODELS)
    depth = v.findings["Depth, replicated"]
    assert sum("the gap shrinks with depth" in f for f in depth) == 2
    assert any("the depth effect on the gap replicates" in f for f in depth)
    md = "\n".join(v.markdown(markdown_table))
    assert md.startswith("## Across families and widths") and "### A count or a share?" in md


def test_one_family_one_width_gets_no_view():
    trials, models, ev = _sweep()
    keep = ["cifar_resnet20", "cifar_resnet56"]
    t = trials[trials["model"].isin(keep)]
    mt = models[models["model"].isin(keep)]
    assert not applies(mt)
    assert not family_view(t, mt, k=5, evidence=ev).findings
