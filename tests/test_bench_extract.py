"""jobs/bench_extract.py: its pure helpers, its argument checks and the plain loop's bookkeeping.

Correctness only, never time: the replica folder (hard links, with the fallbacks), the synthetic
JPEGs, the even pick over classes, the per-stage table built from Ray Data's per-block stats, the
marginal-rate arithmetic and its medians, the JSON record's fields, the one-line errors (exit 2)
and the rows a plain loop counts.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "bench_extract.py"


@pytest.fixture(scope="module")
def be():
    spec = importlib.util.spec_from_file_location("bench_extract", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_extract"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_extract", None)


def _png(path: Path, value: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[::2, ::3] = 255 - value
    Image.fromarray(arr).save(path)


@pytest.fixture()
def folder(tmp_path):
    """split test: 3 classes x 4 PNGs, plus a hidden file and a non-image that must be skipped."""
    root = tmp_path / "cifar10" / "test"
    for c, cls in enumerate(("cat", "dog", "ship")):
        for i in range(4):
            _png(root / cls / f"{i:04d}.png", 20 * c + i)
    (root / "cat" / ".hidden.png").write_bytes(b"x")
    (root / "cat" / "notes.txt").write_text("x")
    return root


# ----------------------------------------------------------------------------- data folders


def test_list_images_skips_hidden_and_non_images(be, folder):
    items = be.list_images(str(folder))
    assert len(items) == 12
    assert items == sorted(items)
    assert {c for c, _ in items} == {"cat", "dog", "ship"}
    assert not any(p.endswith((".txt", ".hidden.png")) for _, p in items)


def test_list_images_missing_folder_is_one_line(be, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        be.list_images(str(tmp_path / "nope"))
    assert "\n" not in str(e.value) and "not found" in str(e.value)


def test_pick_evenly_balances_classes(be, folder):
    items = be.list_images(str(folder))
    six = be.pick_evenly(items, 6)
    assert len(six) == 6 and six == sorted(six)
    counts = {c: sum(1 for cc, _ in six if cc == c) for c in ("cat", "dog", "ship")}
    assert counts == {"cat": 2, "dog": 2, "ship": 2}
    assert [p for _, p in six if "cat" in p] == [p for _, p in items if "/cat/" in p][:2]  # the first of each class
    assert be.pick_evenly(items, 0) == items and be.pick_evenly(items, 99) == items


def test_replica_folder_hard_links_every_image(be, folder, tmp_path):
    items = be.list_images(str(folder))
    out = be.make_replica_folder(items, str(tmp_path / "rep"), split="test", replicas=3)
    assert out == {"root": str(tmp_path / "rep"), "split": "test", "files": 12, "images": 36, "link": "hardlink"}
    made = be.list_images(str(tmp_path / "rep" / "test"))
    assert len(made) == 36
    src = folder / "dog" / "0002.png"
    for k in range(3):
        dst = tmp_path / "rep" / "test" / "dog" / f"0002_r{k}.png"
        assert os.path.samefile(src, dst) and not dst.is_symlink()
    assert os.stat(src).st_nlink == 4  # the source and its three links: no bytes copied


def test_replica_folder_falls_back_to_symlinks_then_copies(be, folder, tmp_path, monkeypatch):
    items = be.list_images(str(folder))[:2]

    def no_link(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(be.os, "link", no_link)
    out = be.make_replica_folder(items, str(tmp_path / "sym"), split="test", replicas=2)
    assert out["link"] == "symlink" and out["images"] == 4
    dst = tmp_path / "sym" / "test" / "cat" / "0000_r1.png"
    assert dst.is_symlink() and os.path.isabs(os.readlink(dst)) and dst.read_bytes() == Path(items[0][1]).read_bytes()

    monkeypatch.setattr(be.os, "symlink", no_link)
    out = be.make_replica_folder(items, str(tmp_path / "cp"), split="test", replicas=2)
    assert out["link"] == "copy" and out["images"] == 4
    dst = tmp_path / "cp" / "test" / "cat" / "0001_r0.png"
    assert not dst.is_symlink() and dst.read_bytes() == Path(items[1][1]).read_bytes()


def test_replica_folder_refuses_zero_replicas(be, folder, tmp_path):
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        be.make_replica_folder(be.list_images(str(folder)), str(tmp_path / "r"), split="test", replicas=0)


def test_synthetic_jpegs_are_imagenet_sized_and_decodable(be, folder, tmp_path):
    items = be.list_images(str(folder))[:2]
    out = be.make_jpeg_folder(items, str(tmp_path / "jpg"), split="test", count=3, quality=90)
    made = be.list_images(str(tmp_path / "jpg" / "test"))
    assert out["images"] == len(made) == 3 and out["mean_bytes"] > 0
    sizes = set()
    for _, p in made:
        with Image.open(p) as img:
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.add(img.size)
    assert sizes == set(be.JPEG_SIZES[:3])
    again = be.make_jpeg_folder(items, str(tmp_path / "jpg2"), split="test", count=3, quality=90)
    assert again["mean_bytes"] == out["mean_bytes"]  # seeded: the same files


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "device must be one of auto, cpu, cuda"),
    ({"modes": "png,video"}, "modes: unknown video"),
    ({"modes": ""}, "modes: unknown (none given)"),
    ({"models": "resnet18"}, "models: unknown resnet18"),
    ({"repeats": 0}, "repeats must be >= 1"),
    ({"replicas": 0}, "replicas must be >= 1"),
    ({"jpeg_replicas": 0}, "jpeg_replicas must be >= 1"),
    ({"images": -1}, "images must be >= 0"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"jpeg_quality": 100}, "jpeg_quality must be in 1..95"),
    ({"proxy_splits": "train"}, "proxy_splits: need two splits"),
    ({"repeats": "three"}, "option repeats='three': expected int"),
])
def test_bad_arguments_are_one_line(be, kwargs, message):
    with pytest.raises(ValueError) as e:
        be.BenchConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_words_are_parsed_from_commas_or_tuples(be):
    cfg = be.BenchConfig(modes="png, jpeg", models=("cifar_resnet20", "cifar_resnet56"), proxy_splits="test,train")
    assert cfg.modes == ("png", "jpeg") and cfg.models == ("cifar_resnet20", "cifar_resnet56")
    assert cfg.proxy_splits == ("test", "train")


def test_device_rule(be):
    assert be.resolve_device("auto", cuda_available=False) == "cpu"
    assert be.resolve_device("auto", cuda_available=True) == "cuda"
    assert be.resolve_device("cpu", cuda_available=True) == "cpu"
    assert be.resolve_device("cuda", cuda_available=True) == "cuda"
    with pytest.raises(be.DeviceError) as e:
        be.resolve_device("cuda", cuda_available=False)
    assert "\n" not in str(e.value) and "no CUDA device" in str(e.value)
    assert be.default_workers(16) == 15 and be.default_workers(1) == 1
    assert be.default_batch_size("jpeg", "cuda") == 256 and be.default_batch_size("png", "cuda") == 1024
    assert be.default_batch_size("png", "cpu") == 256 and be.default_batch_size("jpeg", "cpu") == 256
    assert be.default_batch_size("proxy", "cpu") == 1024 == be.default_batch_size("proxy", "cuda")
    assert be.device_slug("cuda", "NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert be.device_slug("cpu", "whatever") == "cpu"
    assert be.default_output("cpu").endswith(os.path.join("results", "gpu", "bench_extract_cpu.json"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line_exit_2():
    p = _cli("--device", "cuda", "--output", "")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda but torch sees no CUDA device"), p.stderr
    assert "[bench]" not in p.stdout  # refused before anything ran


@pytest.mark.parametrize("args, message", [
    (("--replicas", "0"), "error: replicas must be >= 1"),
    (("--modes", "video"), "error: modes: unknown video"),
    (("--nosuch", "1"), "error: unknown BenchConfig option(s) nosuch"),
    (("--data", "/nonexistent_dtd", "--modes", "png"), "error: /nonexistent_dtd/cifar10/test not found"),
    (("prepare", "--per_class", "0"), "error: per_class must be >= 1"),
])
def test_cli_errors_are_one_line_exit_2(args, message):
    p = _cli(*args, *(() if args[0] == "prepare" else ("--output", "")))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), p.stderr


# ----------------------------------------------------------------------------- figures


def _block(rows, start, end, task, wall=None, cpu=0.1):
    return SimpleNamespace(num_rows=rows, exec_stats=SimpleNamespace(
        start_time_s=start, end_time_s=end, wall_time_s=end - start if wall is None else wall, cpu_time_s=cpu,
        task_idx=task))


def test_stage_table_from_block_stats(be):
    t0 = 100.0
    ops = [
        ("FromArrow", [_block(500, 100.5, 100.6, 0), _block(500, 100.5, 100.6, 0)]),
        ("MapBatches(prepare_batch)", [_block(500, 101.0, 102.0, 0), _block(500, 101.5, 103.0, 1)]),
        ("MapBatches(FeatureExtractor)", [_block(500, 104.0, 105.0, 0), _block(500, 105.0, 106.0, 1)]),
        ("MapBatches(write_part)", [_block(1, 106.0, 106.5, 0)]),
    ]
    table = be.stage_table(ops, t0)
    assert [s["stage"] for s in table] == ["FromArrow", "prepare_batch", "FeatureExtractor", "write_part"]
    prep, model, write = table[1:]
    assert prep["rows"] == 1000 and prep["tasks"] == 2 and prep["blocks"] == 2
    assert prep["first_start_s"] == 1.0 and prep["first_out_s"] == 2.0 and prep["span_s"] == 2.0
    assert prep["rows_per_s"] == 500.0 and prep["busy_s"] == 2.5 and prep["cpu_s"] == 0.2
    assert model["first_out_s"] == 5.0 and model["first_out_rows"] == 500 and model["last_out_s"] == 6.0
    # write_part outputs one summary row per file: its rate is over the rows it consumed
    assert write["rows"] == 1000 and write["rows_out"] == 1 and write["rows_per_s"] == 2000.0
    assert be.rows_done_by(ops[1][1], t0 + model["first_out_s"]) == 1000
    assert be.rows_done_by(ops[1][1], 102.5) == 500
    assert be.stage_table([("Empty", [])], t0)[0]["rows_per_s"] is None
    assert be.decode_share(table) == round(0.2 / 0.7, 3)  # prepare's 0.2 of the stages' 0.7 CPU seconds
    assert be.decode_share(table[2:]) is None


def test_marginal_rate_and_medians(be):
    small = be.run_figures(rows=1000, seconds=6.0, t_first=4.0, first_rows=100, cpu_s=3.0)
    full = be.run_figures(rows=3000, seconds=10.0, t_first=4.0, first_rows=100, cpu_s=7.0)
    assert full["e2e_img_s"] == 300.0 and full["startup_s"] == 4.0
    assert full["after_first_img_s"] == round(2900 / 6.0, 1)
    side = be.side_figures(small, full)
    assert side["steady_img_s"] == 500.0  # 2000 more rows in 4 more seconds: the start-up cancels
    assert side["fixed_s"] == 4.0  # 10 s - 3000 / 500
    assert side["cpu_ms_per_img"] == 2.0  # 4 CPU seconds more for 2000 rows more
    # no positive time difference (noise): no rate rather than a negative one
    assert be.side_figures(full, small)["steady_img_s"] is None

    def rep(plain, ray, ahead=0.1):
        p = be.side_figures(be.run_figures(rows=1000, seconds=1000 / plain + 1, t_first=1.0, first_rows=10, cpu_s=2),
                            be.run_figures(rows=2000, seconds=2000 / plain + 1, t_first=1.0, first_rows=10, cpu_s=4))
        r = be.side_figures(be.run_figures(rows=1000, seconds=1000 / ray + 5, t_first=5.0, first_rows=10, cpu_s=3),
                            be.run_figures(rows=2000, seconds=2000 / ray + 5, t_first=5.0, first_rows=10, cpu_s=4))
        r["small"]["ahead_frac"] = ahead
        return {"plain": p, "ray": r, "ratio": be._ratio(r["steady_img_s"], p["steady_img_s"]),
                "stages": [{"stage": "FeatureExtractor", "rows_per_s": ray}]}

    med = be.summarise([rep(100, 90), rep(100, 80, ahead=0.5), rep(50, 60)])
    assert med["ratios"] == [0.9, 0.8, 1.2] and med["ratio"] == 0.9  # the median of the paired ratios
    assert med["plain_steady_img_s"] == 100.0 and med["ray_steady_img_s"] == 80.0
    assert med["ray_startup_s"] == 5.0 and med["plain_fixed_s"] == 1.0
    assert med["ahead_small_max"] == 0.5
    assert med["plain_cpu_ms_per_img"] == 2.0 and med["ray_cpu_ms_per_img"] == 1.0 and med["cpu_ratio"] == 2.0
    assert med["stage_rows_per_s"] == {"FeatureExtractor": 80.0}


def test_tree_cpu_counts_a_child_that_ended(be):
    snap = be.process_tree_cpu(os.getpid())
    assert snap is not None and os.getpid() in snap
    assert be.process_tree_cpu(2**31 - 1) is None
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.3)"
    with be.TreeCPU(interval=0.1) as tree:
        subprocess.run([sys.executable, "-c", burn], check=True)
    # the child's 0.6 CPU seconds (sampled while it lived), not the sampler's own time
    assert 0.5 <= tree.seconds < 2.0, tree.seconds


def test_json_record_fields(be):
    med = {k: 1.0 for k in ("plain_steady_img_s", "ray_steady_img_s", "ratio", "ratio_e2e", "cpu_ratio",
                            "plain_startup_s", "ray_startup_s")}
    case = {"mode": "png", "model": "cifar_resnet20", "images": 10000, "batch_size": 256, "median": med,
            "repeats": []}
    machine = {"device": "CPU: x", "device_type": "cpu", "gpu": None, "cpu_model": "x", "cpu_count": 2,
               "load_start": [1.0, 1.0, 1.0], "load_end": [2.0, 2.0, 2.0]}
    rec = be.record(cfg=be.config_lib.to_dict(be.BenchConfig()), argv=["--repeats", "3"], machine=machine,
                    versions={"torch": "2.x", "ray": "2.y"}, cases=[case], started_at="2026-01-01T00:00:00Z",
                    seconds=12.34)
    for key in ("device", "device_type", "cpu_count", "machine", "versions", "cases", "summary", "config", "argv",
                "started_at", "seconds"):
        assert key in rec, key
    assert rec["device"] == "CPU: x" and rec["cpu_count"] == 2 and rec["versions"]["ray"] == "2.y"
    assert rec["machine"]["load_start"] == [1.0, 1.0, 1.0]
    assert rec["summary"] == [{"mode": "png", "model": "cifar_resnet20", "images": 10000, "batch_size": 256, **med}]
    assert rec["config"]["modes"] == ["png", "proxy"]
    json.loads(json.dumps(rec))  # plain JSON


def test_committed_cpu_json_has_the_fields_if_present(be):
    path = Path(be.default_output("cpu"))
    if not path.exists():
        pytest.skip("no committed CPU run")
    rec = json.loads(path.read_text())
    assert rec["device_type"] == "cpu" and rec["cpu_count"] >= 1 and {"torch", "ray"} <= set(rec["versions"])
    for case in rec["cases"]:
        assert len(case["repeats"]) >= 3 and all("load" in r for r in case["repeats"])
        assert {"ratio", "ratio_e2e", "ray_startup_s", "plain_startup_s"} <= set(case["median"])


# ----------------------------------------------------------------------------- the plain loop, the proxy model


def test_plain_folder_counts_every_row(be, folder):
    r = be.plain_folder(root=str(folder), model="cifar_resnet8", weights=None, device="cpu", batch_size=5, kmax=8,
                        workers=0)
    assert r["rows"] == 12 and r["seconds"] > 0 and 0 <= r["startup_s"] <= r["seconds"]
    assert r["e2e_img_s"] == pytest.approx(12 / r["seconds"], rel=0.05) and r["cpu_s"] > 0  # seconds are rounded


def test_tiny_model_is_registered_idempotently_and_cheap(be):
    from dtd_ray.models import backbones
    from dtd_ray.models.extractor import FeatureExtractor

    try:
        be.register_tiny()
        be.register_tiny()  # a worker may run the hook more than once
        bb = backbones.get_backbone(be.TINY, weights=None)
        assert bb.feature_dim == 64 and bb.num_classes == 10
        assert bb.preprocessing.channels == 1 and bb.preprocessing.size == 28
        assert sum(p.numel() for p in bb.parameters()) < 1000
        ext = FeatureExtractor(model=be.TINY, weights=None, kmax=64, use_gpu=False)
        out = ext({"image": np.zeros((3, 28, 28, 1), np.uint8), "sample_id": np.arange(3), "label": np.zeros(3)})
        assert out["features"].shape == (3, 64) and out["topk_idx"].shape == (3, 64)
    finally:
        backbones._REGISTRY.pop(be.TINY, None)


def test_prepare_copies_a_balanced_subset_and_the_checkpoints(be, folder, tmp_path):
    data = folder.parent.parent
    (data / "cifar_resnets").mkdir()
    (data / "cifar_resnets" / be.CKPT["cifar_resnet20"]).write_bytes(b"ckpt")
    be.prepare(be.PrepareConfig(data=str(data), dest=str(tmp_path / "dev"), per_class=2, models="cifar_resnet20"))
    made = be.list_images(str(tmp_path / "dev" / "cifar10" / "test"))
    assert len(made) == 6 and {c for c, _ in made} == {"cat", "dog", "ship"}
    assert (tmp_path / "dev" / "cifar_resnets" / be.CKPT["cifar_resnet20"]).read_bytes() == b"ckpt"
    assert not any(os.path.samefile(p, folder / c / os.path.basename(p)) for c, p in made)  # copies: they travel


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST (apt dataset-fashion-mnist) not installed")
def test_proxy_replica_repeats_every_image(be, tmp_path):
    """--proxy_replicas: an IDX copy that the project's own source reads, each split N times, in order."""
    from dtd_ray.data.sources import parse_source

    spec = be.make_proxy_replica("fashion-mnist", str(tmp_path / "fm"), splits=("test",), replicas=3)
    orig = parse_source("fashion-mnist").read_numpy("test")
    got = parse_source(spec).read_numpy("test")
    n = len(orig["label"])
    assert len(got["label"]) == 3 * n and (got["sample_id"] == np.arange(3 * n)).all()
    for r in range(3):
        assert (got["image"][r * n:(r + 1) * n] == orig["image"]).all()
        assert (got["label"][r * n:(r + 1) * n] == orig["label"]).all()
    assert parse_source(spec).num_rows("train") == 1  # the split not asked for: one blank image
