"""The report: activation maps against references, the computed findings, and report.md + plots
from a sweep folder (the sweep's own end-to-end test in test_sweep.py also checks its report)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dtd_ray import report
from dtd_ray.models.backbones import get_backbone


def test_class_activation_maps_sum_the_chosen_channels():
    rng = np.random.default_rng(0)
    a = rng.random((3, 6, 4, 4)).astype(np.float32)
    ch = np.array([[0, 2], [5, 1], [3, 3]])
    # At the maps' own size there is no interpolation: the sum itself.
    ref = np.stack([a[n, ch[n]].sum(0) for n in range(3)])
    np.testing.assert_allclose(report.class_activation_maps(feature_maps=a, channels=ch, size=4), ref, rtol=1e-6)
    # Upsampled: linear in the channels, and a constant map stays constant.
    up = report.class_activation_maps(feature_maps=a, channels=ch, size=32)
    parts = sum(report.class_activation_maps(feature_maps=a, channels=ch[:, [j]], size=32) for j in range(2))
    assert up.shape == (3, 32, 32)
    np.testing.assert_allclose(up, parts, rtol=1e-5)
    const = np.full((1, 2, 4, 4), 1.5, np.float32)
    np.testing.assert_allclose(report.class_activation_maps(feature_maps=const, channels=[[0, 1]], size=32), 3.0)
    # The corners follow bilinear upsampling (torch's, align_corners=False).
    ref_up = F.interpolate(torch.from_numpy(ref[:, None]), size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(up, ref_up[:, 0].numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        report.class_activation_maps(feature_maps=a, channels=[[6, 0]] * 3, size=8)
    with pytest.raises(ValueError, match="feature maps"):
        report.class_activation_maps(feature_maps=a[0], channels=ch, size=8)


@pytest.mark.parametrize("channels", [3, 1])
def test_last_block_channels_are_the_features(channels):
    """The maps' channel c pools to feature c: a class map's indices name last-block channels."""
    torch.manual_seed(0)
    bb = get_backbone("cifar_resnet8", weights=None, in_channels=channels).eval()
    x = torch.randn(2, channels, 32, 32)
    a = report.last_block_maps(bb, x)
    assert a.shape == (2, bb.feature_dim, 8, 8)
    with torch.inference_mode():
        f = bb.forward_features(x)
    torch.testing.assert_close(a.mean((2, 3)), f, rtol=1e-5, atol=1e-6)


def test_depth_and_trend():
    assert report.depth_of("cifar_resnet56") == 56 and report.depth_of("resnet50") == 50
    assert report.depth_of("vgg16") is None
    assert report.trend([3.0, 2.0, 1.0]) == "decreasing"
    assert report.trend([1.0, 2.0]) == "increasing"
    assert report.trend([1.0, 3.0, 2.0]) == "not monotone"
    assert report.trend([1.0]) == "one point"


def _trials(gaps_by_depth: dict[int, float], *, full: float = 90.0) -> pd.DataFrame:
    rows = []
    for depth, gap in gaps_by_depth.items():
        for s, acc in (("frequency", full - gap), ("random", 20.0)):
            rows.append({"model": f"r{depth}", "backbone": f"cifar_resnet{depth}", "dataset": "cifar10",
                         "strategy": s, "k1": 5 if s == "frequency" else -1, "k2": 5, "retrain_mode": "none",
                         "acc_full": full, "acc_decomposed": acc, "acc_retrained": np.nan,
                         "head_macs_full": 640, "head_macs_decomposed": 50, "channels_used": 30})
    return pd.DataFrame(rows)


def test_findings_without_outcomes_give_point_estimates_and_no_verdict():
    analysis = pd.DataFrame(columns=["model", "class", "psi_median"])
    t = _trials({20: 3.0, 32: 2.0, 56: 1.0})
    facts = report.findings(t, report.model_table(t, analysis), k=5)
    assert any("by depth 20: 3.00, 32: 2.00, 56: 1.00" in f for f in facts)
    assert any("20 → 32: 1.00 (not resolved (no per-instance outcomes" in f for f in facts)
    claims = report.claims_table(t, report.model_table(t, analysis), k=5, evidence=None)
    assert {c.verdict for c in claims} == {"not resolved (no per-instance outcomes in this sweep)"}


def _evidence_sweep(n: int, flips: dict[int, int], *, seed: int = 0) -> tuple[pd.DataFrame, "report.Evidence"]:
    """Trials with per-instance outcomes: a full head right on 90 % of n images; per depth the
    frequency head loses ``flips[depth]`` of those; random maps (two seeds) are right on ~20 %."""
    from dtd_ray.core import stats

    rng = np.random.default_rng(seed)
    full = np.zeros(n, dtype=bool)
    full[: int(0.9 * n)] = True
    rng.shuffle(full)
    rows, inst = [], {}
    for depth, lost in flips.items():
        model = f"r{depth}"
        dec = full.copy()
        dec[rng.choice(np.flatnonzero(full), size=lost, replace=False)] = False
        outs = [("frequency", -1, dec)] + [("random", s, rng.random(n) < 0.2) for s in (0, 1)]
        for s, ms, o in outs:
            rows.append({"model": model, "backbone": f"cifar_resnet{depth}", "dataset": "cifar10", "strategy": s,
                         "k1": 5 if s == "frequency" else -1, "k2": 5, "map_seed": ms, "retrain_mode": "none",
                         "acc_full": 100 * full.mean(), "acc_decomposed": 100 * o.mean(), "acc_retrained": np.nan,
                         "head_macs_full": 640, "head_macs_decomposed": 50, "channels_used": 30,
                         "outcomes": stats.pack_outcomes(o)})
        inst[model] = pd.DataFrame({"model": model, "sample_id": np.arange(n), "label": 0, "correct_full": full,
                                    "psi": 0.6 - depth / 1000 + rng.normal(0, 0.01, n)})
    t = pd.DataFrame(rows)
    return t, report.Evidence(trials=t, instances=inst, essentiality=pd.DataFrame(), n_boot=500)


def test_claims_follow_the_intervals():
    analysis = pd.DataFrame(columns=["model", "class", "psi_median"])
    # 2000 images: the gap falls from 15 points (300 lost) to 1 point (20 lost): supported
    t, ev = _evidence_sweep(2000, {20: 300, 56: 20})
    models = report.model_table(t, analysis, psi={m: float(ev.psi(m).mean()) for m in ev.instances})
    claims = {(c.claim, c.scope, c.measure.split(",")[0]): c for c in report.claims_table(t, models, k=5, evidence=ev)}
    gap = claims[("C3 deeper: a smaller gap", "cifar10: depth 20 → 56", "gap(shallow) − gap(deep)")]
    assert gap.verdict == "supported" and gap.est.value == pytest.approx(14.0) and gap.est.lo > 10
    psi = [c for c in claims.values() if c.claim.startswith("C3 deeper: lower")][0]
    assert psi.verdict == "supported" and psi.est.value == pytest.approx(0.036, abs=0.002)
    rnd = claims[("C2 the frequency rule finds them", "r56", "frequency − random maps (mean over seeds)")]
    assert rnd.verdict == "supported" and rnd.est.value == pytest.approx(89.0 - 20.0, abs=2.0)
    # C1 against the 1-point margin: r56 loses exactly 1 point: the interval straddles it
    c1 = claims[("C1 a few filters per class suffice", "r56", "full − decomposed (frequency")]
    assert c1.verdict == "not resolved" and c1.est.lo < 1.0 < c1.est.hi
    # equal gaps: not resolved, and the paired interval is centred on 0
    t, ev = _evidence_sweep(2000, {20: 40, 56: 40}, seed=1)
    models = report.model_table(t, analysis)
    gap = [c for c in report.claims_table(t, models, k=5, evidence=ev) if c.claim == "C3 deeper: a smaller gap"][0]
    assert gap.verdict == "not resolved" and gap.est.lo < 0 < gap.est.hi
    facts = report.findings(t, models, k=5, evidence=ev)
    assert any("20 → 56: 0.00 [" in f and "(not resolved)" in f for f in facts)
    assert any(f.startswith("frequency beats the random maps") and "at 2 of 2" in f for f in facts)


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no trial rows"):
        report.make_report(report.ReportConfig(sweep=str(tmp_path)))
    with pytest.raises(ValueError, match="cam_images"):
        report.ReportConfig(cam_images=-1)


def test_localisation_differences_become_c4_claims():
    t, ev = _evidence_sweep(500, {20: 20, 56: 10})
    models = report.model_table(t, pd.DataFrame(columns=["model", "class", "psi_median"]))
    loc = pd.DataFrame([
        {"model": "r20", "method": "random", "score": "energy-in-box", "diff": 0.16, "lo": 0.15, "hi": 0.17,
         "verdict": "supported"},
        {"model": "r20", "method": "cam", "score": "energy-in-box", "diff": -0.07, "lo": -0.08, "hi": -0.06,
         "verdict": "contradicted"},
        {"model": "r20", "method": "contribution", "score": "energy-in-box", "diff": 0.0, "lo": -0.01, "hi": 0.01,
         "verdict": "not resolved"},
    ])
    c4 = [c for c in report.claims_table(t, models, k=5, evidence=ev, localisation=loc)
          if c.claim == "C4 the selected filters sit on the object"]
    # the claims table states random, top-|W| and CAM (the report's section has every alternative)
    assert [(c.measure, c.verdict, c.interval()) for c in c4] == [
        ("energy-in-box: selected − random channels", "supported", "0.160 [0.150, 0.170]"),
        ("energy-in-box: selected − CAM", "contradicted", "-0.070 [-0.080, -0.060]")]
