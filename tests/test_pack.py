"""Packed image shards (``jobs/pack.py``, ``parquet:`` sources): the same records as the folder, bit for bit.

A small 3-class folder with the bad images of ``tests/test_extract.py`` (grey, RGBA, wrong
size, empty, truncated) is packed at 7 rows a file; extraction from ``parquet:`` and from the
folder must give the same sample_ids, labels, features, preds and top-k (exact equality), and
the same skipped rows. The pack itself: its columns and bytes, the layout pandas reads,
resuming after a lost shard, a plan that changed, and the one-line errors. The object-store
round trip (folder on S3 → pack on S3 → extraction) is in ``tests/test_s3.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dtd_ray.data import shards
from dtd_ray.data.sources import parse_source
from dtd_ray.io import records
from dtd_ray.ray.extract import ExtractConfig, run_extract
from dtd_ray.ray.pack import PackConfig, plan_pack, run_pack
from test_extract import _write_tiny_imagefolder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``data/{train,test}/{cat,dog,frog}`` (6 PNGs each) plus five bad files in test/cat, and a checkpoint."""
    import torch

    from dtd_ray.models.backbones import get_backbone

    root = tmp_path_factory.mktemp("pack")
    _write_tiny_imagefolder(root / "data")
    cat = root / "data" / "test" / "cat"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(cat / "grey.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(cat / "rgba.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(cat / "big.png")
    (cat / "empty.png").write_bytes(b"")
    good = (cat / "000.png").read_bytes()
    (cat / "trunc.png").write_bytes(good[: len(good) // 2])
    torch.manual_seed(0)
    model = get_backbone("cifar_resnet20", weights=None, num_classes=3)
    torch.save({"state_dict": model.state_dict()}, root / "ckpt.th")
    return root


def _pack(folder: Path, out: Path, **kw) -> dict:
    cfg = PackConfig(dataset=f"imagefolder:{folder / 'data'}", output=str(out), rows_per_file=7, **kw)
    return run_pack(cfg)


def _extract(folder: Path, dataset: str, out: Path) -> None:
    run_extract(ExtractConfig(model="cifar_resnet20", weights=str(folder / "ckpt.th"), dataset=dataset,
                              output=str(out), kmax=10, batch_size=8, rows_per_file=5, tag="tiny"))


def test_pack_holds_every_file_as_it_is_in_the_documented_layout(ray_local, folder, tmp_path):
    out = tmp_path / "packed"
    meta = _pack(folder, out)
    assert meta["splits"] == {"test": 23, "train": 18} and meta["classes"] == ["cat", "dog", "frog"]
    assert meta["written"] == 4 + 3  # ceil(23/7) + ceil(18/7)
    assert json.loads((out / shards.CLASSES_NAME).read_text())["rows_per_file"] == 7
    src = parse_source(f"imagefolder:{folder / 'data'}")
    for split in ("train", "test"):
        files = sorted((out / f"split={split}").iterdir())
        assert [f.name for f in files] == [shards.shard_name(i) for i in range(len(files))]
        table = pq.read_table(files[0])
        assert table.schema.equals(shards.SHARD_SCHEMA) and table.num_rows == 7
        cols = src.read_numpy(split)
        df = pd.concat(pd.read_parquet(f) for f in files)
        assert (df["sample_id"].to_numpy() == cols["sample_id"]).all() and (df["label"].to_numpy() == cols["label"]).all()
        for rel, data, path in zip(df["rel_path"], df["image_bytes"], cols["path"]):
            assert str(path).endswith("/" + rel) and Path(path).read_bytes() == data  # the bytes as they are
        assert (df["class_name"] == [src.classes[i] for i in cols["label"]]).all()
    # pandas reads the whole pack, the split a column from the folder names
    everything = pd.read_parquet(out)
    assert len(everything) == 41 and set(everything["split"].astype(str)) == {"train", "test"}
    # the parquet: source: same splits, rows and labels; num_rows without reading a shard
    packed = parse_source(f"parquet:{out}")
    assert packed.classes == src.classes and set(packed.splits()) == {"train", "test"}
    assert packed.num_rows("test") == 23
    rows = packed.read_numpy("test")
    assert (rows["sample_id"] == src.read_numpy("test")["sample_id"]).all()
    assert rows["image_bytes"][0] == Path(src.read_numpy("test")["path"][0]).read_bytes()


def test_extraction_from_the_shards_gives_the_folders_records_bit_for_bit(ray_local, folder, tmp_path):
    out = tmp_path / "packed"
    _pack(folder, out)
    _extract(folder, f"imagefolder:{folder / 'data'}", tmp_path / "from_folder")
    _extract(folder, f"parquet:{out}", tmp_path / "from_pack")
    for split in ("train", "test"):
        a = records.load_records(str(tmp_path / "from_folder" / "records"), model="tiny", split=split)
        b = records.load_records(str(tmp_path / "from_pack" / "records"), model="tiny", split=split)
        assert set(a) == set(b)
        order_a, order_b = np.argsort(a["sample_id"]), np.argsort(b["sample_id"])
        for name in a:
            x, y = np.asarray(a[name])[order_a], np.asarray(b[name])[order_b]
            assert x.dtype == y.dtype and np.array_equal(x, y), name  # exact: same bytes decoded the same way
        ma = records.read_manifest(str(tmp_path / "from_folder" / "records"), model="tiny", split=split)
        mb = records.read_manifest(str(tmp_path / "from_pack" / "records"), model="tiny", split=split)
        assert ma["rows"] == mb["rows"] and ma["skipped"] == mb["skipped"]
        key = lambda items: sorted((x["sample_id"], x["reason"]) for x in items)  # noqa: E731
        assert key(ma["skipped_items"]) == key(mb["skipped_items"])
    assert records.read_manifest(str(tmp_path / "from_pack" / "records"), model="tiny", split="test")["skipped"] == 3


def test_pack_resumes_keeps_a_finished_pack_and_refuses_another_plan(ray_local, folder, tmp_path, capsys):
    out = tmp_path / "packed"
    _pack(folder, out)
    shard = out / "split=test" / shards.shard_name(2)
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    # a crash: one shard and the finishing _classes.json lost
    shard.unlink()
    (out / shards.CLASSES_NAME).unlink()
    with pytest.raises(ValueError, match=r"unfinished pack .*rerun jobs/pack.py"):
        parse_source(f"parquet:{out}")
    capsys.readouterr()
    assert _pack(folder, out)["written"] == 1
    assert "resuming, 34 of 41 images in place" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before
    assert _pack(folder, out)["written"] == 0  # finished: nothing redone
    with pytest.raises(ValueError, match=r"another plan \(differs in rows_per_file\).*--overwrite"):
        run_pack(PackConfig(dataset=f"imagefolder:{folder / 'data'}", output=str(out), rows_per_file=5))
    meta = run_pack(PackConfig(dataset=f"imagefolder:{folder / 'data'}", output=str(out), rows_per_file=5,
                               overwrite=True))
    assert meta["written"] == 5 + 4 and len(list((out / "split=test").iterdir())) == 5


def test_bad_packs_and_bad_options_are_one_line(folder, tmp_path):
    data = folder / "data"
    with pytest.raises(ValueError, match=r"^pack reads an image folder \(imagefolder:PATH\), not cifar10"):
        plan_pack(PackConfig(dataset="cifar10:/nope", output=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="is inside the folder it packs"):
        plan_pack(PackConfig(dataset=f"imagefolder:{data}", output=str(data / "packed")))
    with pytest.raises(ValueError, match=r"split 'val' not in .*valid: test, train"):
        plan_pack(PackConfig(dataset=f"imagefolder:{data}", output=str(tmp_path / "x"), splits=("val",)))
    with pytest.raises(ValueError, match="rows_per_file must be >= 1"):
        PackConfig(dataset=f"imagefolder:{data}", output=str(tmp_path / "x"), rows_per_file=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no _classes.json \(write one with jobs/pack.py\)"):
        parse_source(f"parquet:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="parquet dataset folder not found"):
        parse_source(f"parquet:{tmp_path / 'nope'}")
    # an unreadable file fails the shard (a pack never has a gap in its ids)
    with pytest.raises(OSError, match=r"^cannot read .*missing.png"):
        shards.read_bytes(str(tmp_path / "missing.png"))


def test_jobs_pack_cli_errors_are_one_line(folder, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("not a pack")
    for args, message in (
        (["--dataset", f"imagefolder:{folder / 'data'}"], "error: pack needs --dataset imagefolder:SRC and --output DST"),
        (["--dataset", f"imagefolder:{folder / 'nope'}", "--output", str(tmp_path / "o")],
         f"error: imagefolder dataset folder not found: {folder / 'nope'}"),
    ):
        r = subprocess.run([sys.executable, "jobs/pack.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, check=False)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [message], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "jobs/pack.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and "--rows_per_file" in r.stdout


def test_pack_into_a_folder_holding_something_else_is_refused(ray_local, folder, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "x.txt").write_text("not a pack")
    with pytest.raises(ValueError, match=r"is not empty and holds no pack plan"):
        _pack(folder, out)
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"]


def test_a_packed_split_decodes_like_the_folder_outside_ray(folder, tmp_path):
    """The stages that read a split into memory (fine-tuning, the atlas) get the same pixels from bytes."""
    from dtd_ray.data.transforms import prepare_batch
    from dtd_ray.models.backbones import get_backbone

    out = tmp_path / "packed"
    planned = plan_pack(PackConfig(dataset=f"imagefolder:{folder / 'data'}", output=str(out), rows_per_file=7))
    cols = planned["columns"]["test"]
    for i, (lo, hi) in enumerate(shards.shard_bounds(len(cols["sample_id"]), 7)):
        shards.write_shard(uri=str(out / "split=test" / shards.shard_name(i)), sample_id=cols["sample_id"][lo:hi],
                           label=cols["label"][lo:hi], class_name=["x"] * (hi - lo), rel_path=cols["rel_path"][lo:hi],
                           paths=list(cols["path"][lo:hi]))
    meta = {**{k: planned["plan"][k] for k in ("version", "source", "classes", "rows_per_file")}, "splits": {"test": 23}}
    (out / shards.CLASSES_NAME).write_text(json.dumps(meta))
    pre = get_backbone("cifar_resnet20", weights=None).preprocessing
    a = prepare_batch(parse_source(f"imagefolder:{folder / 'data'}").read_numpy("test"), preprocessing=pre)
    b = prepare_batch(parse_source(f"parquet:{out}").read_numpy("test"), preprocessing=pre)
    for name in ("sample_id", "label", "image", "ok", "error"):
        assert np.array_equal(a[name], b[name]), name
    assert (~a["ok"]).sum() == 3


def test_read_rows_gives_any_range_of_a_split_from_its_row_groups(tmp_path, monkeypatch):
    """Rows [lo, hi) across shard and row-group boundaries equal the same slice of the whole split."""
    monkeypatch.setattr(shards, "ROW_GROUP_ROWS", 3)  # shards of 7 rows: groups of 3, 3, 1
    n, r = 23, 7
    files = []
    for i, (lo, hi) in enumerate(shards.shard_bounds(n, r)):
        (tmp_path / "img").mkdir(exist_ok=True)
        paths = []
        for j in range(lo, hi):
            (tmp_path / "img" / f"{j}.bin").write_bytes(bytes([j]) * (j + 1))
            paths.append(str(tmp_path / "img" / f"{j}.bin"))
        uri = str(tmp_path / "pack" / f"{shards.SPLIT_PREFIX}test" / shards.shard_name(i))
        shards.write_shard(uri=uri, sample_id=np.arange(lo, hi), label=np.arange(lo, hi) % 3,
                           class_name=["c"] * (hi - lo), rel_path=[f"c/{j}" for j in range(lo, hi)], paths=paths)
        files.append(uri)
    assert pq.ParquetFile(files[0]).num_row_groups == 3
    whole = pa.concat_tables(pq.read_table(f, columns=list(shards.READ_COLUMNS)) for f in files)
    for lo, hi in [(0, 23), (0, 1), (2, 3), (3, 6), (5, 9), (6, 7), (7, 14), (4, 20), (22, 23), (9, 9)]:
        got = shards.read_rows(str(tmp_path / "pack"), "test", lo=lo, hi=hi, rows_per_file=r)
        assert got.equals(whole.slice(lo, hi - lo)), (lo, hi)


def test_a_subset_of_rows_is_the_same_seeded_rows_from_the_folder_and_the_shards(ray_local, folder, tmp_path):
    """``max_rows``: the seeded subset (sources.subset_positions) of a split, the same records from either source."""
    from dtd_ray.data.sources import subset_positions

    out = tmp_path / "packed"
    _pack(folder, out)
    keep = subset_positions(num_rows=18, max_rows=11, seed=0)
    assert len(keep) == 11 and (np.diff(keep) > 0).all()
    assert (subset_positions(num_rows=18, max_rows=11, seed=0) == keep).all()  # the same rows every time
    assert subset_positions(num_rows=18, max_rows=18, seed=0) is None
    got = {}
    for name, dataset in (("folder", f"imagefolder:{folder / 'data'}"), ("pack", f"parquet:{out}")):
        run_extract(ExtractConfig(model="cifar_resnet20", weights=str(folder / "ckpt.th"), dataset=dataset,
                                  output=str(tmp_path / name), kmax=10, batch_size=8, rows_per_file=5, tag="tiny",
                                  splits=("train",), max_rows={"train": 11}))
        got[name] = records.load_records(str(tmp_path / name / "records"), model="tiny", split="train")
        man = records.read_manifest(str(tmp_path / name / "records"), model="tiny", split="train")
        assert man["rows"] + man["skipped"] == 11 and man["content"]["max_rows"] == 11
    ids = parse_source(f"imagefolder:{folder / 'data'}").read_numpy("train")["sample_id"][keep]
    skipped = {int(x["sample_id"]) for x in records.read_manifest(
        str(tmp_path / "folder" / "records"), model="tiny", split="train")["skipped_items"]}
    assert sorted(int(i) for i in got["folder"]["sample_id"]) == sorted(set(int(i) for i in ids) - skipped)
    for col in got["folder"]:
        assert np.array_equal(np.asarray(got["folder"][col]), np.asarray(got["pack"][col])), col
