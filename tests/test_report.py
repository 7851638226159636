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


def test_findings_are_computed_from_the_data():
    analysis = pd.DataFrame(columns=["model", "class", "psi_median"])
    t = _trials({20: 3.0, 32: 2.0, 56: 1.0})
    facts = report.findings(t, report.model_table(t, analysis), k=5)
    assert any("20: 3.00, 32: 2.00, 56: 1.00 — shrinks with depth in every step" in f for f in facts)
    assert any(f.startswith("frequency beats random at 100 %") for f in facts)
    t = _trials({20: 3.0, 32: 1.0, 56: 2.0})
    facts = report.findings(t, report.model_table(t, analysis), k=5)
    assert any("does not shrink monotonically" in f for f in facts)


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no trial rows"):
        report.make_report(report.ReportConfig(sweep=str(tmp_path)))
    with pytest.raises(ValueError, match="cam_images"):
        report.ReportConfig(cam_images=-1)
