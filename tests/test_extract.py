"""Extraction: the pure ranking, the model callable, and the Ray pipeline end to end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dtd_ray.io import records
from dtd_ray.io import schema
from dtd_ray import config as config_lib
from dtd_ray.core.counting import rank_topk
from dtd_ray.models.extractor import FeatureExtractor
from dtd_ray.models.runtime import normalize_images
from dtd_ray.ray.extract import ExtractConfig, run_extract


# ----------------------------------------------------------------------------- pure functions


def test_rank_topk_matches_numpy_reference_with_ties():
    f = torch.tensor([[0.5, 2.0, 2.0, 0.0, -3.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    idx, val = rank_topk(f, 3)
    # |f| descending, ties by the lower index
    assert idx.tolist() == [[4, 1, 2], [0, 1, 2]]
    assert val.tolist() == [[-3.0, 2.0, 2.0], [1.0, 1.0, 1.0]]
    g = torch.rand(50, 64)
    idx, _ = rank_topk(g, 10)
    ref = np.argsort(-g.numpy(), axis=1, kind="stable")[:, :10]
    assert (idx.numpy() == ref).all()


def test_normalize_images_equals_to_tensor_and_normalize():
    import torchvision.transforms.functional as TF

    u8 = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    got = normalize_images(torch.from_numpy(u8), mean=mean, std=std)
    ref = torch.stack([TF.normalize(TF.to_tensor(im), mean.tolist(), std.tolist()) for im in u8])
    assert torch.allclose(got, ref, atol=1e-6)


def test_config_validates_options():
    with pytest.raises(ValueError, match="precision"):
        ExtractConfig(precision="fp8")
    with pytest.raises(ValueError, match="on_bad_input"):
        ExtractConfig(on_bad_input="ignore")
    with pytest.raises(ValueError, match="unknown ExtractConfig option.*kmx"):
        config_lib.check_keys(ExtractConfig, {"kmx": 5})
    assert ExtractConfig(splits="train,test").splits == ("train", "test")


# ----------------------------------------------------------------------------- fixtures


def _write_tiny_imagefolder(root: Path, *, per_class: int = 6, classes=("cat", "dog", "frog")) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class 32-px imagefolder and a checkpoint of a randomly initialised cifar_resnet20."""
    from dtd_ray.models.backbones import get_backbone

    root = tmp_path_factory.mktemp("tiny")
    _write_tiny_imagefolder(root / "data")
    torch.manual_seed(0)
    model = get_backbone("cifar_resnet20", weights=None, num_classes=3)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    # Stored in the public format (DataParallel prefix, best_prec1 wrapper) on purpose.
    torch.save({"best_prec1": 0.0, "state_dict": sd}, root / "ckpt.th")
    return root


def _reference_forward(tiny: Path, split: str):
    """Plain PyTorch: PIL → ToTensor → Normalize → features / logits, in sorted file order."""
    import torchvision.transforms.functional as TF

    from dtd_ray.models.backbones import get_backbone

    bb = get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th"), num_classes=3).eval()
    pre = bb.preprocessing
    files = sorted((tiny / "data" / split).glob("*/*.png"))
    x = torch.stack([TF.normalize(TF.to_tensor(Image.open(p).convert("RGB")), pre.mean, pre.std) for p in files])
    with torch.inference_mode():
        f = bb.forward_features(x)
        logits = bb.head(f)
    return f.numpy(), logits.argmax(1).numpy()


# ----------------------------------------------------------------------------- the callable without Ray


def test_feature_extractor_callable_matches_plain_forward(tiny):
    ext = FeatureExtractor(model="cifar_resnet20", weights=str(tiny / "ckpt.th"), kmax=8, use_gpu=False)
    files = sorted((tiny / "data" / "test").glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    out = ext({"image": images, "sample_id": np.arange(len(files)), "label": np.zeros(len(files))})
    f_ref, pred_ref = _reference_forward(tiny, "test")
    assert out["features"].shape == (len(files), 64) and out["features"].dtype == np.float32
    np.testing.assert_allclose(out["features"], f_ref, rtol=1e-5, atol=1e-5)
    assert (out["pred"] == pred_ref).all()
    assert (out["topk_idx"] == np.argsort(-np.abs(f_ref), axis=1, kind="stable")[:, :8]).all()
    assert out["ok"].all() and out["topk_val"].shape == (len(files), 8)


def test_writing_stage_writes_each_call_and_returns_its_summary(tiny, tmp_path):
    """The pipeline's model stage, without Ray: a call's rows prepared where asked (decoded arrays), run in
    model batches and written to one file whose records are the callable's; only the file's summary comes
    back; a row marked bad upstream is counted in the summary, not written; the class keeps the model's name."""
    import pyarrow.parquet as pq

    from dtd_ray.data.transforms import prepare_batch
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.models.extractor import writing_stage

    stage_cls = writing_stage(FeatureExtractor)
    assert stage_cls.__name__ == "FeatureExtractor" and issubclass(stage_cls, FeatureExtractor)
    kw = dict(model="cifar_resnet20", weights=str(tiny / "ckpt.th"), kmax=8, use_gpu=False)
    pre = get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th")).preprocessing
    files = sorted((tiny / "data" / "test").glob("*/*.png"))
    batch = {"image": np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]),
             "sample_id": np.arange(len(files)), "label": np.repeat(np.arange(3), 6)}
    ext = FeatureExtractor(**kw)
    prepared = prepare_batch(batch, preprocessing=pre)
    want = [ext({k: v[lo:lo + 4] for k, v in prepared.items()}) for lo in range(0, 18, 4)]  # the model's batches
    want = {k: np.concatenate([w[k] for w in want]) for k in want[0]}

    staging = tmp_path / "staging"
    summary = stage_cls(**kw, staging_uri=str(staging), model_batch=4, prepare={"preprocessing": pre})(batch)
    assert summary["rows"].tolist() == [18] and summary["min_id"].tolist() == [0]
    assert summary["skipped"].tolist() == ["[]"] and set(summary) == {"file", "rows", "min_id", "skipped"}
    got = records.table_to_records(pq.read_table(staging / summary["file"][0]))
    for name in schema.RECORDS_SCHEMA.names:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["features"], ext(prepared)["features"], rtol=1e-5, atol=1e-5)  # one batch alike

    bad = dict(prepared, ok=np.arange(18) != 5, error=np.where(np.arange(18) == 5, "undecodable: x", "").astype(object))
    summary = stage_cls(**kw, staging_uri=str(staging), model_batch=8)(bad)  # prepared upstream: no prepare
    assert summary["rows"].tolist() == [17] and '"sample_id": 5' in summary["skipped"][0]
    got = records.table_to_records(pq.read_table(staging / summary["file"][0]))
    assert got["sample_id"].tolist() == [i for i in range(18) if i != 5]


def _write_idx(folder: Path, split_prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Uncompressed IDX files (the Fashion-MNIST layout): magic, big-endian dimensions, the bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for arr, kind, magic in ((images, "images-idx3", 0x803), (labels, "labels-idx1", 0x801)):
        head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (folder / f"{split_prefix}-{kind}-ubyte").write_bytes(head + arr.astype(np.uint8).tobytes())


# ----------------------------------------------------------------------------- Ray end to end


def test_decoded_arrays_are_prepared_in_the_model_stage(ray_local, tiny, tmp_path):
    """An array source already at the model's size has no decode tasks: the model stage prepares each call's
    rows. Every row is written once, in files of rows_per_file rows, with the callable's records."""
    from dtd_ray.data.sources import parse_source
    from dtd_ray.data.transforms import prepare_batch
    from dtd_ray.models.backbones import get_backbone

    rng = np.random.default_rng(1)
    fm = tmp_path / "fm"
    _write_idx(fm, "train", rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10)
    _write_idx(fm, "t10k", rng.integers(0, 256, (2, 28, 28)), np.arange(2))
    stats = []
    cfg = _cfg(tiny, tmp_path, dataset=f"fashion-mnist:{fm}", splits=("train",), input_size=28, rows_per_file=16)
    summary = run_extract(cfg, on_stats=stats.append)
    assert summary["rows"] == 40 and summary["skipped"] == 0
    assert [op.stage for op in stats[0].operators] == ["read", "model"]  # no prepare_batch operator
    rec = records.load_records(str(tmp_path / "records"), model="tiny", split="train")
    assert (rec["sample_id"] == np.arange(40)).all()
    assert records.read_manifest(str(tmp_path / "records"), model="tiny", split="train")["files"] == 3  # 16, 16, 8

    pre = get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th"), input_size=28).preprocessing
    ext = FeatureExtractor(model="cifar_resnet20", weights=str(tiny / "ckpt.th"), input_size=28, kmax=10, use_gpu=False)
    cols = parse_source(f"fashion-mnist:{fm}").read_numpy("train")
    want = np.concatenate([ext(prepare_batch({k: v[lo:lo + 8] for k, v in cols.items()}, preprocessing=pre))["features"]
                           for lo in range(0, 40, 8)])  # the model's batches: 8 rows within calls of 16
    np.testing.assert_array_equal(rec["features"], want)


def _cfg(tiny: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(model="cifar_resnet20", weights=str(tiny / "ckpt.th"), dataset=f"imagefolder:{tiny / 'data'}",
                output=str(out), kmax=10, batch_size=8, rows_per_file=7, tag="tiny")
    base.update(kw)
    return ExtractConfig(**base)


def test_extract_end_to_end_matches_plain_pytorch(ray_local, tiny, tmp_path, capsys):
    summary = run_extract(_cfg(tiny, tmp_path))
    assert summary["rows"] == 36 and summary["skipped"] == 0
    assert "[extract] done:" in capsys.readouterr().out
    root = str(tmp_path / "records")
    for split in ("train", "test"):
        rec = records.load_records(root, model="tiny", split=split)
        n = len(rec["sample_id"])
        assert n == 18 and (rec["sample_id"] == np.arange(n)).all()  # every instance exactly once
        assert (rec["label"] == np.repeat(np.arange(3), 6)).all()
        f_ref, pred_ref = _reference_forward(tiny, split)
        np.testing.assert_allclose(rec["features"], f_ref, rtol=1e-5, atol=1e-5)
        assert (rec["pred"] == pred_ref).all()
        assert (rec["topk_idx"] == np.argsort(-np.abs(f_ref), axis=1, kind="stable")[:, :10]).all()
        man = records.read_manifest(root, model="tiny", split=split)
        assert man["rows"] == 18 and man["skipped"] == 0 and man["kmax"] == 10 and man["feature_dim"] == 64
        assert man["files"] == 3  # 18 rows at 7 rows per file
        assert {"config_hash", "versions", "seconds", "config"} <= set(man)
    # pandas reads the Hive-partitioned records without Ray, manifests ignored
    df = pd.read_parquet(root)
    assert len(df) == 36 and set(df["split"].astype(str)) == {"train", "test"}
    assert set(df.columns) >= set(schema.RECORDS_SCHEMA.names) | {"model", "split"}


def test_rerun_skips_finished_and_redoes_unfinished(ray_local, tiny, tmp_path, capsys):
    cfg = _cfg(tiny, tmp_path, splits=("test",))
    run_extract(cfg)
    part = Path(records.partition_uri(str(tmp_path / "records"), model="tiny", split="test"))
    first = {p.name: p.stat().st_mtime_ns for p in part.glob("*.parquet")}
    assert run_extract(cfg)["partitions"] == {"test": "skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in part.glob("*.parquet")} == first
    # Simulate a crash after some files were written: no manifest, a stray file and a staging folder.
    (part / schema.MANIFEST_NAME).unlink()
    (part / "part-99999.parquet").write_bytes(b"junk from a crashed run")
    (part / f"{schema.STAGING_PREFIX}-dead").mkdir()
    assert run_extract(cfg)["partitions"] == {"test": "written"}
    rec = records.load_records(str(tmp_path / "records"), model="tiny", split="test")
    assert sorted(rec["sample_id"].tolist()) == list(range(18))  # nothing duplicated, nothing lost
    assert not (part / "part-99999.parquet").exists()
    assert sorted(p.name for p in part.iterdir() if p.name.startswith("_")) == [records.HEAD_NAME, schema.MANIFEST_NAME]


def test_extraction_stores_the_head_that_load_head_reads_without_a_model(ray_local, tiny, tmp_path, monkeypatch,
                                                                         caplog):
    import hashlib
    import json
    import logging

    from dtd_ray.models import backbones, linear_head

    run_extract(_cfg(tiny, tmp_path, splits=("test",)))
    root = str(tmp_path / "records")
    man = records.read_manifest(root, model="tiny", split="test")
    stored = Path(records.partition_uri(root, model="tiny", split="test")) / records.HEAD_NAME
    sha = hashlib.sha256((tiny / "ckpt.th").read_bytes()).hexdigest()
    assert man["head"] == {"file": records.HEAD_NAME, "model": "cifar_resnet20", "weights": str(tiny / "ckpt.th"),
                           "weights_name": None, "weights_source": str(tiny / "ckpt.th"), "sha256": sha}
    z = np.load(stored)
    assert z["weight"].dtype == np.float32 and z["weight"].shape == (3, 64) and z["bias"].shape == (3,)
    assert json.loads(str(z["identity"]))["sha256"] == sha
    # What load_head returned when it rebuilt the network: the module's float32 tensors as float64.
    ref = backbones.get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th")).head
    want_w, want_b = ref.weight.detach().double().numpy(), ref.bias.detach().double().numpy()

    def no_model(*args, **kwargs):
        raise AssertionError("load_head built a model")

    with monkeypatch.context() as m:
        m.setattr(backbones, "_build", no_model)
        m.setattr(linear_head, "get_backbone", no_model)
        w, b, source = linear_head.load_head(root=root, manifest=man)
    assert w.dtype == np.float64 and np.array_equal(w, want_w) and np.array_equal(b, want_b)  # bit-identical
    assert records.HEAD_NAME in source
    # Records extracted before heads were stored: the backbone is rebuilt, with a warning.
    stored.unlink()
    linear_head._rebuilt_head.cache_clear()
    with caplog.at_level(logging.WARNING, logger="dtd_ray.models.linear_head"):
        w, b, _ = linear_head.load_head(root=root, manifest=man)
    assert np.array_equal(w, want_w) and np.array_equal(b, want_b)
    assert any("no stored head" in r.getMessage() for r in caplog.records)


def test_rerun_with_another_config_is_refused(ray_local, tiny, tmp_path):
    run_extract(_cfg(tiny, tmp_path, splits=("test",)))
    with pytest.raises(ValueError, match="another config.*kmax.*--overwrite"):
        run_extract(_cfg(tiny, tmp_path, splits=("test",), kmax=5))
    assert run_extract(_cfg(tiny, tmp_path, splits=("test",), kmax=5, overwrite=True))["rows"] == 18


def test_bad_images_are_converted_or_counted(ray_local, tiny, tmp_path):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(tiny / "data", data)
    cat = data / "test" / "cat"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(cat / "grey.png")  # grey → RGB
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(cat / "rgba.png")  # RGBA → RGB
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(cat / "big.png")  # wrong size, no resize → skip
    (cat / "empty.png").write_bytes(b"")  # zero bytes → skip
    good = (cat / "000.png").read_bytes()
    (cat / "trunc.png").write_bytes(good[: len(good) // 2])  # truncated → skip
    cfg = _cfg(tiny, tmp_path / "out", dataset=f"imagefolder:{data}", splits=("test",))
    summary = run_extract(cfg)
    assert summary["rows"] == 20 and summary["skipped"] == 3
    man = records.read_manifest(str(tmp_path / "out" / "records"), model="tiny", split="test")
    reasons = sorted(x["reason"].split(":")[0] for x in man["skipped_items"])
    assert len(reasons) == 3 and any("size" in r for r in reasons)
    rec = records.load_records(str(tmp_path / "out" / "records"), model="tiny", split="test")
    assert len(set(rec["sample_id"].tolist())) == 20
    with pytest.raises(Exception, match="undecodable|wrong size"):
        run_extract(_cfg(tiny, tmp_path / "out2", dataset=f"imagefolder:{data}", splits=("test",),
                         on_bad_input="fail"))
    # A failed run leaves nothing marked finished.
    assert records.read_manifest(str(tmp_path / "out2" / "records"), model="tiny", split="test") is None


def test_bad_names_fail_fast_with_one_line(ray_local, tiny, tmp_path):
    with pytest.raises(ValueError, match="cifar_resnet20"):
        run_extract(_cfg(tiny, tmp_path, model="cifar_resnet21"))
    with pytest.raises(ValueError, match="imagefolder"):
        run_extract(_cfg(tiny, tmp_path, dataset="tiffolder:/nope"))
    with pytest.raises(FileNotFoundError):
        run_extract(_cfg(tiny, tmp_path, dataset="imagefolder:/does/not/exist"))
    with pytest.raises(ValueError, match="valid: test, train"):
        run_extract(_cfg(tiny, tmp_path, splits=("val",)))


def test_jobs_extract_cli_help_and_error(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    h = subprocess.run([sys.executable, "jobs/extract.py", "--help"], cwd=root, capture_output=True, text=True,
                       env={**env, "PAGER": "cat"}, timeout=120)
    assert "--kmax" in h.stdout + h.stderr and "--on_bad_input" in h.stdout + h.stderr
    bad = subprocess.run([sys.executable, "jobs/extract.py", "--kmx", "3"], cwd=root, capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown ExtractConfig")


def test_fp16_overflow_falls_back_to_fp32(tiny):
    ext = FeatureExtractor(model="cifar_resnet20", weights=str(tiny / "ckpt.th"), kmax=4, use_gpu=False,
                           precision="fp16")
    with torch.no_grad():
        ext.backbone.features.conv1.weight.mul_(1e4)  # activations far beyond fp16's 65504
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    f = ext.features(images)
    assert torch.isfinite(f).all() and f.abs().max() > 65504
