"""Localisation: the scores against hand-computed examples and loop references, the canvas set,
the summary's intervals, and the localise job end to end (a tiny random ResNet on a synthetic
sweep folder; the real ResNet-20 on the committed sweep where ../shared/data is present)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CIFAR10_DIR, ROOT, needs_shared_data
from dtd_ray.core import localisation as loc
from dtd_ray.core import selection
from dtd_ray.data import canvas as cv

# ----------------------------------------------------------------------------- loop references


def ref_energy(m: np.ndarray, box) -> tuple[float, bool]:
    x0, y0, x1, y1 = box
    tot = ins = 0.0
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            v = max(float(m[r, c]), 0.0)
            tot += v
            if y0 <= r < y1 and x0 <= c < x1:
                ins += v
    return (0.0, True) if tot == 0 else (ins / tot, False)


def ref_pointing(m: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = box
    best, where = -np.inf, None
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            if m[r, c] > best:  # strict: the first maximum in row-major order
                best, where = m[r, c], (r, c)
    if m.max() == m.min():
        return False
    return y0 <= where[0] < y1 and x0 <= where[1] < x1


# ----------------------------------------------------------------------------- scores


def test_energy_and_pointing_hand_computed():
    m = np.array([[1, 0, 0, 0],
                  [0, 2, 0, 0],
                  [0, 0, -5, 0],
                  [0, 0, 0, 3]], dtype=np.float64)[None]
    box = [[1, 1, 3, 3]]  # columns 1-2, rows 1-2: holds the 2 and the -5 (clipped to 0)
    e, empty = loc.energy_in_box(maps=m, boxes=box)
    assert e[0] == pytest.approx(2 / 6) and not empty[0]
    assert not loc.pointing_game(maps=m, boxes=box)[0]  # the maximum 3 is at row 3, column 3
    assert loc.pointing_game(maps=m, boxes=[[2, 2, 4, 4]])[0]
    # x is the column, y the row: a box over column 3, rows 0-3 holds the 3 only
    assert loc.energy_in_box(maps=m, boxes=[[3, 0, 4, 4]])[0][0] == pytest.approx(3 / 6)
    assert loc.energy_in_box(maps=m, boxes=[[0, 3, 4, 4]])[0][0] == pytest.approx(3 / 6)


def test_indicator_map_scores_one_and_the_uniform_map_the_box_share():
    rng = np.random.default_rng(0)
    H = W = 24
    x0, y0 = rng.integers(0, 12, 8), rng.integers(0, 12, 8)
    boxes = np.stack([x0, y0, x0 + 12, y0 + 10], 1)
    ind = loc.box_masks(boxes=boxes, size=H).astype(np.float32)
    assert ind.sum((1, 2)).tolist() == [120] * 8
    e, empty = loc.energy_in_box(maps=ind, boxes=boxes)
    np.testing.assert_array_equal(e, 1.0)
    assert not empty.any() and loc.pointing_game(maps=ind, boxes=boxes).all()
    # outside only: energy 0, pointing 0
    e0, _ = loc.energy_in_box(maps=1 - ind, boxes=boxes)
    np.testing.assert_array_equal(e0, 0.0)
    assert not loc.pointing_game(maps=1 - ind, boxes=boxes).any()
    # a constant positive map scores the box's share of the canvas
    const = np.full((8, H, W), 0.7)
    np.testing.assert_allclose(loc.energy_in_box(maps=const, boxes=boxes)[0], 120 / (H * W))
    np.testing.assert_allclose(loc.uniform_energy(boxes=boxes, size=H), 120 / (H * W))
    assert not loc.pointing_game(maps=const, boxes=boxes).any()  # constant: nothing to point at


def test_map_without_positive_mass_scores_zero_and_is_flagged():
    m = np.stack([np.zeros((5, 5)), -np.ones((5, 5)), np.eye(5)])
    e, empty = loc.energy_in_box(maps=m, boxes=[[0, 0, 2, 2]] * 3)
    assert e.tolist() == [0.0, 0.0, pytest.approx(2 / 5)]
    assert empty.tolist() == [True, True, False]
    assert np.isfinite(e).all()
    with pytest.raises(ValueError, match="NaN"):
        loc.energy_in_box(maps=np.full((1, 3, 3), np.nan), boxes=[[0, 0, 1, 1]])


def test_scores_match_the_loop_reference():
    rng = np.random.default_rng(1)
    N, H, W = 30, 11, 13
    m = rng.normal(size=(N, H, W))
    m[3] = -np.abs(m[3])  # no positive mass
    m[4] = 2.0  # constant
    m[5, 2, 3] = m[5, 7, 9] = 50.0  # a tie: the first in row-major order counts
    x0, y0 = rng.integers(0, W - 1, N), rng.integers(0, H - 1, N)
    x1, y1 = x0 + rng.integers(1, W - x0 + 1), y0 + rng.integers(1, H - y0 + 1)
    boxes = np.stack([x0, y0, x1, y1], 1)
    boxes[5] = [3, 2, 4, 3]
    e, empty = loc.energy_in_box(maps=m, boxes=boxes)
    p = loc.pointing_game(maps=m, boxes=boxes)
    for i in range(N):
        re, rempty = ref_energy(m[i], boxes[i])
        assert e[i] == pytest.approx(re, abs=1e-12) and empty[i] == rempty
        assert p[i] == ref_pointing(m[i], boxes[i])
    assert p[5] and empty[3] and not p[4]


def test_bad_boxes_are_one_line_errors():
    m = np.zeros((2, 8, 8))
    for bad in ([[0, 0, 9, 4]] * 2, [[3, 0, 3, 4]] * 2, [[-1, 0, 2, 2]] * 2):
        with pytest.raises(ValueError, match="outside the 8x8 canvas"):
            loc.energy_in_box(maps=m, boxes=bad)
    with pytest.raises(ValueError, match=r"need boxes \(2, 4\)"):
        loc.pointing_game(maps=m, boxes=[[0, 0, 2, 2]])


def test_channel_sum_weighted_sum_and_upsample_against_references():
    rng = np.random.default_rng(2)
    a = rng.random((4, 7, 5, 5)).astype(np.float32)
    ch = rng.integers(0, 7, (4, 3))
    np.testing.assert_allclose(loc.channel_sum(feature_maps=a, channels=ch),
                               np.stack([sum(a[n, c] for c in ch[n]) for n in range(4)]), rtol=1e-6)
    w = rng.normal(size=(4, 7)).astype(np.float32)
    np.testing.assert_allclose(loc.weighted_sum(feature_maps=a, weights=w),
                               np.stack([sum(w[n, j] * a[n, j] for j in range(7)) for n in range(4)]), rtol=1e-5,
                               atol=1e-6)
    up = loc.upsample(a[:, 0], size=20)
    ref = F.interpolate(torch.from_numpy(a[:, :1]), size=(20, 20), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(up, ref, rtol=1e-6)
    np.testing.assert_allclose(loc.upsample(np.full((1, 4, 4), 2.5), size=(9, 7)), 2.5)
    with pytest.raises(ValueError, match="out of range"):
        loc.channel_sum(feature_maps=a, channels=[[7, 0, 0]] * 4)
    with pytest.raises(ValueError, match="weights"):
        loc.weighted_sum(feature_maps=a, weights=w[:, :3])


def test_cam_is_the_logit_before_pooling():
    """The CAM's spatial mean plus the bias is the class's logit (the features are A's spatial mean)."""
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.stages.units import last_block_maps

    torch.manual_seed(0)
    bb = get_backbone("cifar_resnet8", weights=None).eval()
    x = torch.randn(3, 3, 48, 48)  # not 32: the pool is adaptive
    a = last_block_maps(bb, x)
    y = np.array([0, 4, 9])
    W = bb.head.weight.detach().numpy()
    cam = loc.weighted_sum(feature_maps=a, weights=W[y])
    with torch.inference_mode():
        logits = bb.head(bb.forward_features(x)).numpy()
    np.testing.assert_allclose(cam.mean((1, 2)) + bb.head.bias.detach().numpy()[y], logits[np.arange(3), y],
                               rtol=1e-4, atol=1e-5)


def test_random_channel_sets_are_seeded_per_class():
    s = loc.random_channel_sets(num_classes=10, feature_dim=64, k=5, seed=3)
    assert s.shape == (10, 5) and all(len(set(r)) == 5 for r in s) and s.min() >= 0 and s.max() < 64
    np.testing.assert_array_equal(s[7], np.random.default_rng([3, 7]).choice(64, size=5, replace=False))
    np.testing.assert_array_equal(loc.random_channel_sets(num_classes=4, feature_dim=64, k=5, seed=3), s[:4])
    assert not np.array_equal(loc.random_channel_sets(num_classes=10, feature_dim=64, k=5, seed=4), s)
    with pytest.raises(ValueError, match="k <= feature_dim"):
        loc.random_channel_sets(num_classes=2, feature_dim=4, k=5, seed=0)


# ----------------------------------------------------------------------------- the canvas set


def _images(n: int = 12, size: int = 32, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % classes


@pytest.mark.parametrize("background", cv.BACKGROUNDS)
def test_canvas_is_deterministic_and_the_box_holds_the_image(background):
    imgs, labels = _images()
    c1, b1 = cv.paste_on_canvas(images=imgs, labels=labels, canvas=64, background=background, seed=5)
    c2, b2 = cv.paste_on_canvas(images=imgs, labels=labels, canvas=64, background=background, seed=5)
    assert c1.dtype == np.uint8 and c1.shape == (12, 64, 64, 3) and b1.shape == (12, 4)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(b1, b2)
    assert ((b1[:, 2] - b1[:, 0]) == 32).all() and ((b1[:, 3] - b1[:, 1]) == 32).all()
    assert (b1[:, :2] >= 0).all() and (b1[:, 2:] <= 64).all()
    for i, (x0, y0, x1, y1) in enumerate(b1):
        np.testing.assert_array_equal(c1[i, y0:y1, x0:x1], imgs[i])  # rows are y, columns x
    c3, b3 = cv.paste_on_canvas(images=imgs, labels=labels, canvas=64, background=background, seed=6)
    assert not np.array_equal(b1, b3) and not np.array_equal(c1, c3)


def test_canvas_layout_positions_and_donors():
    imgs, labels = _images(n=30)
    boxes, donors = cv.canvas_layout(labels=labels, image_size=(32, 32), canvas=96, seed=1)
    assert (labels[donors] != labels).all()  # the background is always another class's image
    # positions are seeded per id: a subset with the same ids gets the same boxes
    sub = np.arange(5, 17)
    b_sub, _ = cv.canvas_layout(labels=labels[sub], image_size=(32, 32), canvas=96, seed=1, ids=sub)
    np.testing.assert_array_equal(b_sub, boxes[sub])
    # positions spread over the canvas
    assert boxes[:, 0].max() - boxes[:, 0].min() > 20
    with pytest.raises(ValueError, match="one class only"):
        cv.canvas_layout(labels=np.zeros(4), image_size=(32, 32), canvas=64)
    with pytest.raises(ValueError, match="smaller than the images"):
        cv.canvas_layout(labels=labels, image_size=(32, 32), canvas=31)
    with pytest.raises(ValueError, match="unknown background"):
        cv.paste_on_canvas(images=imgs, labels=labels, background="plaid")


def test_backgrounds_come_from_the_donor():
    imgs, labels = _images(n=6)
    boxes, donors = cv.canvas_layout(labels=labels, image_size=(32, 32), canvas=64, seed=0)
    outside = ~loc.box_masks(boxes=boxes, size=64)
    up = cv.resize_bilinear(imgs[donors], 64)
    c, _ = cv.paste_on_canvas(images=imgs, labels=labels, canvas=64, background="blur", seed=0)
    blur = np.clip(np.rint(cv.gaussian_blur(up, 64 * cv.BLUR_SIGMA)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(c[outside], blur[outside])
    # scramble: each background is a permutation of the donor's upsampled 8 px patches
    s, _ = cv.paste_on_canvas(images=imgs, labels=labels, canvas=64, background="scramble", seed=0)
    u8 = np.clip(np.rint(up), 0, 255).astype(np.uint8)

    def patches(a: np.ndarray) -> np.ndarray:  # (64, 64, 3) -> the 64 patches of 8 x 8 px, row-major
        return a.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 8 * 8 * 3)

    for i in range(6):
        # the patches that lie wholly outside the pasted image are the donor's patches, moved
        whole = patches(np.repeat(outside[i][:, :, None], 3, 2)).all(1)
        donor = {p.tobytes() for p in patches(u8[i])}
        got = patches(s[i])[whole]
        assert len(got) >= 64 - 25 and all(g.tobytes() in donor for g in got)
        assert not np.array_equal(s[i][outside[i]], u8[i][outside[i]])  # and shuffled
    # noise: the donor's colour mean per channel (outside the box up to the pasted part)
    n, _ = cv.paste_on_canvas(images=imgs, labels=labels, canvas=64, background="noise", seed=0)
    assert abs(n[0][outside[0]].astype(float).mean() - imgs[donors[0]].astype(float).mean()) < 12


def test_resize_and_blur_against_references():
    rng = np.random.default_rng(3)
    x = rng.random((2, 7, 9, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(20, 20), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(cv.resize_bilinear(x, 20), ref, rtol=1e-5, atol=1e-6)
    # blur against a direct 2-D sum over the mirrored image
    img = rng.random((1, 10, 10, 1)).astype(np.float32)
    sigma = 1.3
    r = int(np.ceil(3 * sigma))
    t = np.arange(-r, r + 1)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    pad = np.pad(img[0, :, :, 0], r, mode="reflect")
    ref2 = np.array([[sum(k[a] * k[b] * pad[i + a, j + b] for a in range(2 * r + 1) for b in range(2 * r + 1))
                      for j in range(10)] for i in range(10)])
    np.testing.assert_allclose(cv.gaussian_blur(img, sigma)[0, :, :, 0], ref2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cv.gaussian_blur(np.full((1, 6, 6, 2), 3.0), 4.0), 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------- summary


def _scores(n: int = 200, seed: int = 0, shift: float = 0.1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.7, n)
    rows = []
    for method, e, p in [("selected", base + shift, rng.random(n) < 0.9),
                         ("random", base, rng.random(n) < 0.6),
                         ("cam", base + rng.normal(0, 0.05, n), rng.random(n) < 0.9),
                         ("uniform", np.full(n, 0.25), np.full(n, 0.25))]:
        rows.append(pd.DataFrame({"model": "m", "image": np.arange(n), "sample_id": np.arange(n) + 100,
                                  "label": np.arange(n) % 3, "pred": np.arange(n) % 3, "method": method,
                                  "energy_in_box": e, "pointing": np.asarray(p, float), "empty_maps": 0,
                                  "n_maps": 10 if method == "random" else 1, "k": 5, "canvas": 64,
                                  "background": "blur", "seed": 0, "x0": 0, "y0": 0, "x1": 32, "y1": 32,
                                  "donor_sample_id": 0}))
    return pd.concat(rows, ignore_index=True)


def test_table_means_and_intervals():
    from dtd_ray.report.localisation_summary import localisation_table

    df = _scores()
    t = localisation_table(df).set_index("method")
    assert list(t.index) == ["selected", "random", "cam", "uniform"] and (t["images"] == 200).all()
    for m in t.index:
        d = df[df.method == m]
        assert t.loc[m, "energy_in_box"] == pytest.approx(d.energy_in_box.mean())
        assert t.loc[m, "pointing"] == pytest.approx(100 * d.pointing.mean())
        assert t.loc[m, "energy_lo"] <= t.loc[m, "energy_in_box"] <= t.loc[m, "energy_hi"]
        assert t.loc[m, "pointing_lo"] <= t.loc[m, "pointing"] <= t.loc[m, "pointing_hi"]
    assert t.loc["uniform", "energy_lo"] == t.loc["uniform", "energy_hi"] == pytest.approx(0.25)
    # the interval of a mean of 200 values in [0.3, 0.8] is a few hundredths wide, not zero
    assert 0.01 < t.loc["selected", "energy_hi"] - t.loc["selected", "energy_lo"] < 0.1


def test_findings_are_paired_and_give_the_verdicts():
    from dtd_ray.report.localisation_summary import localisation_differences, localisation_findings

    df = _scores(shift=0.1)
    d = localisation_differences(df).set_index(["method", "score"])
    # selected = random + 0.1 on every image: paired, the difference has no spread at all
    r = d.loc[("random", "energy-in-box")]
    assert r["diff"] == pytest.approx(0.1) and r["lo"] == pytest.approx(0.1) and r["hi"] == pytest.approx(0.1)
    assert r["verdict"] == "supported"
    assert d.loc[("random", "pointing game"), "verdict"] == "supported"  # 90 % against 60 %
    assert d.loc[("uniform", "energy-in-box"), "verdict"] == "supported"
    lines = localisation_findings(df)
    assert len(lines) == 3
    assert lines[0].startswith("m, blur background: selected (frequency map) localises better than random channels")
    assert "energy-in-box +0.100 [+0.100, +0.100]: supported" in lines[0]
    worse = localisation_differences(_scores(shift=-0.1)).set_index(["method", "score"])
    assert worse.loc[("random", "energy-in-box"), "verdict"] == "contradicted"
    same = localisation_differences(_scores(shift=0.0)).set_index(["method", "score"])
    assert same.loc[("cam", "energy-in-box"), "verdict"] == "not resolved"  # noise of sd 0.05 around no effect


def test_section_is_empty_without_a_localisation_folder(tmp_path):
    from dtd_ray.io import storage
    from dtd_ray.report.localisation_summary import localisation_section

    assert localisation_section(str(tmp_path)) == []
    df = _scores()
    import pyarrow as pa

    fs, path = storage.resolve(str(tmp_path / "localisation"))
    storage.write_parquet(fs, f"{path}/m.parquet", pa.Table.from_pandas(df, preserve_index=False))
    lines = localisation_section(str(tmp_path))
    assert lines[0] == "## Localisation"
    text = "\n".join(lines)
    assert "| m | blur | selected (frequency map) |" in text and "(25.0 %)" in text
    assert "- m, blur background: selected (frequency map) localises better than random channels" in text
    assert "What this can show and what it cannot" in text


def test_energy_split_by_outcome_and_a_second_background():
    from dtd_ray.report.localisation_summary import energy_by_outcome, localisation_differences

    df = _scores(shift=0.1)
    wrong = df["image"] % 4 == 0
    df.loc[wrong, "pred"] = (df.loc[wrong, "label"] + 1) % 3
    df.loc[wrong & (df.method == "selected"), "energy_in_box"] -= 0.2  # lower on the canvases it gets wrong
    by = energy_by_outcome(df).set_index("method")
    sel = by.loc["selected (frequency map)"]
    d = df[df.method == "selected"]
    ok = d["pred"] == d["label"]
    assert sel["correct"] == pytest.approx(d[ok].energy_in_box.mean()) and sel["images wrong"] == int((~ok).sum())
    assert sel["correct − wrong [95 % CI]"].startswith(f"{d[ok].energy_in_box.mean() - d[~ok].energy_in_box.mean():.3f} [")
    # two backgrounds of one model: each paired within itself
    both = pd.concat([df, df.assign(background="noise", energy_in_box=df.energy_in_box * 0.5)], ignore_index=True)
    diffs = localisation_differences(both)
    assert set(diffs["background"]) == {"blur", "noise"}
    r = diffs[(diffs.background == "noise") & (diffs.method == "random") & (diffs.score == "energy-in-box")].iloc[0]
    nz = both[both.background == "noise"]
    want = nz[nz.method == "selected"].energy_in_box.mean() - nz[nz.method == "random"].energy_in_box.mean()
    assert r["diff"] == pytest.approx(want)


# ----------------------------------------------------------------------------- the job, end to end


def make_tiny_sweep(root: Path, *, per_class: int = 5, k: int = 2) -> Path:
    """A sweep folder over a 3-class image folder with a randomly initialised ResNet-8 (weights in ``root``)."""
    from dtd_ray.io import maptables, storage
    from dtd_ray.models.backbones import get_backbone

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            d = root / "data" / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    torch.manual_seed(0)
    bb = get_backbone("cifar_resnet8", weights=None, num_classes=3)
    torch.save({"state_dict": {f"module.{k_}": v for k_, v in bb.state_dict().items()}}, root / "ckpt.th")
    sweep = root / "sweep"
    unit = {"key": "tiny", "backbone": "cifar_resnet8", "weights": str(root / "ckpt.th"),
            "weights_abs": str(root / "ckpt.th"), "normalization": "cifar10",
            "dataset": f"imagefolder:{root / 'data'}", "dataset_abs": f"imagefolder:{root / 'data'}"}
    (sweep).mkdir()
    (sweep / "sweep_config.json").write_text(json.dumps({"config": {"eval_split": "test"}, "resolved": {"units": [unit]}}))
    W = bb.head.weight.detach().numpy()
    freq = selection.ClassMap(strategy="frequency", k1=k, idx=np.array([[0, 1], [2, 3], [4, 5]]),
                              score=np.ones((3, k)), count=np.ones((3, k), dtype=np.int64))
    maps = [freq, selection.select_weight_l1(weight=W, k2=4)]
    fs, path = storage.resolve(str(sweep / "decompose" / "maps" / "select_split=train" / "correct_only=false"))
    storage.write_parquet(fs, f"{path}/tiny.parquet", maptables.maps_to_table(maps, model="tiny"))
    return sweep


def test_localise_job_end_to_end(tmp_path):
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.stages.units import last_block_maps
    from dtd_ray.report.localisation_summary import localisation_section
    from dtd_ray.stages.localise import LOCALISATION_SCHEMA, LocaliseConfig, run_localise

    sweep = make_tiny_sweep(tmp_path)
    out = tmp_path / "out"
    cfg = LocaliseConfig(sweep=str(sweep), k=2, canvas=48, background="scramble", random_seeds=3, batch_size=4,
                         output=str(out))
    res = run_localise(cfg)
    f = out / "localisation" / "tiny__scramble.parquet"
    assert res["files"] == [str(f)]
    df = pd.read_parquet(f)
    import pyarrow.parquet as pq

    assert pq.read_schema(f).equals(LOCALISATION_SCHEMA, check_metadata=False)
    n = 15
    # no contribution map in this sweep: eight methods
    methods = ("selected", "other_class", "background_class", "random", "weight_l1", "cam_selected", "cam", "uniform")
    assert len(df) == n * 8 and df.groupby("method").size().to_dict() == {m: n for m in methods}
    # the controls: another class's selected channels, neither the label nor the background's class
    assert (df.other_label != df.label).all() and (df.other_label != df.donor_label).all()
    assert (df.donor_label != df.label).all()
    assert df["energy_in_box"].between(0, 1).all() and df["pointing"].between(0, 1).all()
    np.testing.assert_allclose(df[df.method == "uniform"]["energy_in_box"], 32 * 32 / 48**2)
    assert (df[df.method == "random"]["n_maps"] == 3).all()
    assert ((df.x1 - df.x0) == 32).all() and (df.canvas == 48).all() and (df.background == "scramble").all()
    conf = json.loads((out / "localisation" / "localise_config.json").read_text())
    assert conf["config"]["canvas"] == 48 and conf["models"]["tiny__scramble"]["images"] == n
    assert "shuffled patches" in conf["background"]

    # One image recomputed independently: the canvas, the forward pass and the selected map's scores.
    from dtd_ray.data.sources import parse_source
    from dtd_ray.data.transforms import prepare_batch

    src = parse_source(f"imagefolder:{tmp_path / 'data'}")
    cols = src.read_numpy("test")
    bb = get_backbone("cifar_resnet8", weights=str(tmp_path / "ckpt.th"), normalization="cifar10").eval()
    prep = prepare_batch(cols, preprocessing=bb.preprocessing)
    canv, boxes = cv.paste_on_canvas(images=prep["image"], labels=prep["label"], canvas=48, background="scramble",
                                     seed=0, ids=prep["sample_id"])
    i = 7
    row = df[(df.method == "selected") & (df.image == i)].iloc[0]
    assert row.sample_id == prep["sample_id"][i] and list(boxes[i]) == [row.x0, row.y0, row.x1, row.y1]
    mean, std = np.array(bb.preprocessing.mean), np.array(bb.preprocessing.std)
    x = torch.from_numpy(((canv[i:i + 1] / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))
    a = last_block_maps(bb, x).numpy()
    y = int(prep["label"][i])
    sel = [[0, 1], [2, 3], [4, 5]][y]
    m = F.interpolate(torch.from_numpy(a[:, sel].sum(1, keepdims=True)), size=(48, 48), mode="bilinear",
                      align_corners=False)[0, 0].numpy()
    re, _ = ref_energy(m, boxes[i])
    assert row.energy_in_box == pytest.approx(re, rel=1e-4) and row.pointing == float(ref_pointing(m, boxes[i]))
    # the other class's selected channels on the same canvas, and the CAM over the selected channels
    other = df[(df.method == "other_class") & (df.image == i)].iloc[0]
    mo = F.interpolate(torch.from_numpy(a[:, [[0, 1], [2, 3], [4, 5]][int(other.other_label)]].sum(1, keepdims=True)),
                       size=(48, 48), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert other.energy_in_box == pytest.approx(ref_energy(mo, boxes[i])[0], rel=1e-4)
    W = bb.head.weight.detach().numpy()
    mc = F.interpolate(torch.from_numpy((a[:, sel] * W[y, sel][None, :, None, None]).sum(1, keepdims=True)),
                       size=(48, 48), mode="bilinear", align_corners=False)[0, 0].numpy()
    cs = df[(df.method == "cam_selected") & (df.image == i)].iloc[0]
    assert cs.energy_in_box == pytest.approx(ref_energy(mc, boxes[i])[0], rel=1e-4, abs=1e-6)
    assert row.pred == int(bb.head(torch.from_numpy(a.mean((2, 3)))).argmax(1)[0])

    # A rerun gives the same rows; the section renders them.
    run_localise(cfg)
    pd.testing.assert_frame_equal(pd.read_parquet(f), df)
    text = "\n".join(localisation_section(str(out)))
    assert "## Localisation" in text and "| tiny | scramble | selected (frequency map) |" in text
    assert "shuffled patches" in text


def test_localise_command_line_refuses_bad_input(tmp_path):
    sweep = make_tiny_sweep(tmp_path)
    job = str(ROOT / "jobs" / "localise.py")
    for args, msg in ([f"--sweep={sweep}", "--models=nope"], "unknown model(s) nope; the sweep has tiny"), \
                     ([f"--sweep={sweep}", "--background=plaid"], "background must be one of blur, scramble, noise"), \
                     ([f"--sweep={tmp_path}"], "sweep_config.json not found"), \
                     ([f"--sweep={sweep}", "--k=abc"], "option k='abc': expected int"):
        res = subprocess.run([sys.executable, job, *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stderr.strip().startswith("error: ") and msg in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.real_data
@needs_shared_data()
def test_localise_real_resnet20(tmp_path):
    """The committed sweep's ResNet-20 on 200 pasted CIFAR-10 test images."""
    from dtd_ray.report.localisation_summary import localisation_section, localisation_table
    from dtd_ray.stages.localise import LocaliseConfig, run_localise

    assert CIFAR10_DIR.is_dir()
    res = run_localise(LocaliseConfig(sweep=str(ROOT / "results" / "cifar10_resnets"), models=("cifar_resnet20",),
                                      n_images=200, output=str(tmp_path)))
    df = pd.read_parquet(tmp_path / "localisation" / "cifar_resnet20__blur.parquet")
    assert len(df) == 200 * 9 and df["image"].nunique() == 200
    assert df["label"].nunique() == 10  # a seeded random subset, not the first class's folder
    np.testing.assert_allclose(df[df.method == "uniform"]["energy_in_box"], 0.25)
    # The network still recognises pasted images far above chance (10 %): the canvases are normalised right.
    assert res["models"]["cifar_resnet20__blur"]["canvas_accuracy_pct"] > 30
    t = localisation_table(df)
    assert set(t["method"]) == {"selected", "other_class", "background_class", "random", "weight_l1", "contribution",
                                "cam_selected", "cam", "uniform"}
    assert "## Localisation" in "\n".join(localisation_section(str(tmp_path)))


def test_cam_figure_draws_both_scales_and_keeps_its_summary(tmp_path):
    """The activation-map figure (shared and own scale, with colour bars) still returns what the report reads."""
    from dtd_ray.report.cam import cam_figure

    sweep = make_tiny_sweep(tmp_path)
    unit = json.loads((sweep / "sweep_config.json").read_text())["resolved"]["units"][0]
    maps_file = next((sweep / "decompose" / "maps").rglob("tiny.parquet"))
    info = cam_figure(unit=unit, maps_file=str(maps_file), k=2, strategy="frequency", n_images=2, max_classes=3,
                      split="test", path=str(tmp_path / "cam.png"), correct_only=False)
    assert set(info) == {"model", "shown", "classes", "mass_ratio_median"} and info["shown"] == 6
    img = np.asarray(Image.open(tmp_path / "cam.png"))
    assert img.shape[1] > img.shape[0]  # 2 images × 5 panels per row, 3 rows
