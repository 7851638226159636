"""jobs/bench_extract.py and what it measures with (dtd_ray.ray.benchmark, dtd_ray.ray.procstats, the
pipeline's per-stage stats): its inputs, its argument checks, its figures and its bookkeeping.

Correctness only, never time: the replica folder (hard links, with the fallbacks), the synthetic JPEGs,
the even pick over classes, the per-stage table built from the pipeline's per-block stats, the
marginal-rate arithmetic and its medians, the JSON record's fields, the one-line errors (exit 2), the
rows a plain loop counts, the CPU of a process tree, and one real pipeline run through the model-stage
hook.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dtd_ray import config as config_lib
from dtd_ray.ray import benchmark as bm
from dtd_ray.ray import plain_loops
from dtd_ray.ray import procstats
from dtd_ray.ray.pipeline_stats import BlockTiming, OperatorStats, partition_stats
from jobs import bench_extract as be

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, value: int, size: int = 32, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[::2, ::3] = 255 - value
    Image.fromarray(arr).convert(mode).save(path)


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


def test_list_images_skips_hidden_and_non_images(folder):
    items = bm.list_images(root=str(folder))
    assert len(items) == 12
    assert items == sorted(items)
    assert {c for c, _ in items} == {"cat", "dog", "ship"}
    assert not any(p.endswith((".txt", ".hidden.png")) for _, p in items)


def test_list_images_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        bm.list_images(root=str(tmp_path / "nope"))
    assert "\n" not in str(e.value) and "not found" in str(e.value)


def test_pick_evenly_balances_classes(folder):
    items = bm.list_images(root=str(folder))
    six = bm.pick_evenly(items, n=6)
    assert len(six) == 6 and six == sorted(six)
    counts = {c: sum(1 for cc, _ in six if cc == c) for c in ("cat", "dog", "ship")}
    assert counts == {"cat": 2, "dog": 2, "ship": 2}
    assert [p for _, p in six if "cat" in p] == [p for _, p in items if "/cat/" in p][:2]  # the first of each class
    assert bm.pick_evenly(items, n=0) == items and bm.pick_evenly(items, n=99) == items


def test_replica_folder_hard_links_every_image(folder, tmp_path):
    items = bm.list_images(root=str(folder))
    out = bm.make_replica_folder(items, dest=str(tmp_path / "rep"), split="test", replicas=3)
    assert out == {"root": str(tmp_path / "rep"), "split": "test", "files": 12, "images": 36, "link": "hardlink"}
    made = bm.list_images(root=str(tmp_path / "rep" / "test"))
    assert len(made) == 36
    src = folder / "dog" / "0002.png"
    for k in range(3):
        dst = tmp_path / "rep" / "test" / "dog" / f"0002_r{k}.png"
        assert os.path.samefile(src, dst) and not dst.is_symlink()
    assert os.stat(src).st_nlink == 4  # the source and its three links: no bytes copied


def test_replica_folder_falls_back_to_symlinks_then_copies(folder, tmp_path, monkeypatch):
    items = bm.list_images(root=str(folder))[:2]

    def no_link(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(bm.os, "link", no_link)
    out = bm.make_replica_folder(items, dest=str(tmp_path / "sym"), split="test", replicas=2)
    assert out["link"] == "symlink" and out["images"] == 4
    dst = tmp_path / "sym" / "test" / "cat" / "0000_r1.png"
    assert dst.is_symlink() and os.path.isabs(os.readlink(dst)) and dst.read_bytes() == Path(items[0][1]).read_bytes()

    monkeypatch.setattr(bm.os, "symlink", no_link)
    out = bm.make_replica_folder(items, dest=str(tmp_path / "cp"), split="test", replicas=2)
    assert out["link"] == "copy" and out["images"] == 4
    dst = tmp_path / "cp" / "test" / "cat" / "0001_r0.png"
    assert not dst.is_symlink() and dst.read_bytes() == Path(items[1][1]).read_bytes()


def test_replica_folder_refuses_zero_replicas(folder, tmp_path):
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        bm.make_replica_folder(bm.list_images(root=str(folder)), dest=str(tmp_path / "r"), split="test", replicas=0)


def test_synthetic_jpegs_are_imagenet_sized_and_decodable(folder, tmp_path):
    items = bm.list_images(root=str(folder))[:2]
    out = bm.make_jpeg_folder(items, dest=str(tmp_path / "jpg"), split="test", count=3, quality=90)
    made = bm.list_images(root=str(tmp_path / "jpg" / "test"))
    assert out["images"] == len(made) == 3 and out["mean_bytes"] > 0
    sizes = set()
    for _, p in made:
        with Image.open(p) as img:
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.add(img.size)
    assert sizes == set(bm.JPEG_SIZES[:3])
    again = bm.make_jpeg_folder(items, dest=str(tmp_path / "jpg2"), split="test", count=3, quality=90)
    assert again["mean_bytes"] == out["mean_bytes"]  # seeded: the same files


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST (apt dataset-fashion-mnist) not installed")
def test_proxy_replica_repeats_every_image(tmp_path):
    """--proxy_replicas: an IDX copy that the project's own source reads, each split N times, in order."""
    from dtd_ray.data.sources import parse_source

    spec = bm.make_proxy_replica("fashion-mnist", dest=str(tmp_path / "fm"), splits=("test",), replicas=3)
    orig = parse_source("fashion-mnist").read_numpy("test")
    got = parse_source(spec).read_numpy("test")
    n = len(orig["label"])
    assert len(got["label"]) == 3 * n and (got["sample_id"] == np.arange(3 * n)).all()
    for r in range(3):
        assert (got["image"][r * n:(r + 1) * n] == orig["image"]).all()
        assert (got["label"][r * n:(r + 1) * n] == orig["label"]).all()
    assert parse_source(spec).num_rows("train") == 1  # the split not asked for: one blank image


def test_prepare_copies_a_balanced_subset_and_the_checkpoints(folder, tmp_path):
    data = folder.parent.parent
    (data / "cifar_resnets").mkdir()
    (data / "cifar_resnets" / be.CKPT["cifar_resnet20"]).write_bytes(b"ckpt")
    be.prepare(be.PrepareConfig(data=str(data), dest=str(tmp_path / "dev"), per_class=2, models="cifar_resnet20"))
    made = bm.list_images(root=str(tmp_path / "dev" / "cifar10" / "test"))
    assert len(made) == 6 and {c for c, _ in made} == {"cat", "dog", "ship"}
    assert [os.path.basename(p) for c, p in made if c == "dog"] == ["0000.png", "0001.png"]  # the first of each
    assert (tmp_path / "dev" / "cifar_resnets" / be.CKPT["cifar_resnet20"]).read_bytes() == b"ckpt"
    assert not any(os.path.samefile(p, folder / c / os.path.basename(p)) for c, p in made)  # copies: they travel


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
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(ValueError) as e:
        be.BenchConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_words_are_parsed_from_commas_or_tuples():
    cfg = be.BenchConfig(modes="png, jpeg", models=("cifar_resnet20", "cifar_resnet56"), proxy_splits="test,train")
    assert cfg.modes == ("png", "jpeg") and cfg.models == ("cifar_resnet20", "cifar_resnet56")
    assert cfg.proxy_splits == ("test", "train")


def test_device_rule():
    assert be.resolve_device(device="auto", cuda_available=False) == "cpu"
    assert be.resolve_device(device="auto", cuda_available=True) == "cuda"
    assert be.resolve_device(device="cpu", cuda_available=True) == "cpu"
    assert be.resolve_device(device="cuda", cuda_available=True) == "cuda"
    with pytest.raises(be.DeviceError) as e:
        be.resolve_device(device="cuda", cuda_available=False)
    assert "\n" not in str(e.value) and "no CUDA device" in str(e.value)
    assert be.default_workers(cpu_count=16) == 15 and be.default_workers(cpu_count=1) == 1
    assert be.default_batch_size(mode="jpeg", device="cuda") == 256
    assert be.default_batch_size(mode="png", device="cuda") == 1024
    assert be.default_batch_size(mode="png", device="cpu") == 256 == be.default_batch_size(mode="jpeg", device="cpu")
    assert be.default_batch_size(mode="proxy", device="cpu") == 1024 == be.default_batch_size(mode="proxy", device="cuda")
    assert be.device_slug(device="cuda", name="NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert be.device_slug(device="cpu", name="whatever") == "cpu"
    assert be.default_output(device_slug="cpu").endswith(os.path.join("results", "gpu", "bench_extract_cpu.json"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/bench_extract.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


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
    # the config layer may put the option's name before a check's own words: the words, on one "error:" line
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.removeprefix("error: ") in lines[0], p.stderr


# ----------------------------------------------------------------------------- figures


def _block(rows, start, end, task, wall=None, cpu=0.1):
    return BlockTiming(rows=rows, task=task, start_s=start, end_s=end, wall_s=end - start if wall is None else wall,
                       cpu_s=cpu)


def _ops():
    return [
        OperatorStats("FromArrow", "read", (_block(500, 100.5, 100.6, None), _block(500, 100.5, 100.6, None))),
        OperatorStats("MapBatches(prepare_batch)", "prepare", (_block(500, 101.0, 102.0, 0), _block(500, 101.5, 103.0, 1))),
        # the proxy's model stage is a FeatureExtractor subclass: labelled as the model stage all the same; it
        # writes the records and outputs one summary row per file
        OperatorStats("MapBatches(TinyExtractor)", "model", (_block(1, 104.0, 105.0, 0), _block(1, 105.0, 106.0, 1))),
    ]


def test_stage_table_from_block_stats():
    t0, ops = 100.0, _ops()
    table = bm.stage_table(ops, t0=t0)
    assert [s["stage"] for s in table] == ["FromArrow", "prepare_batch", "FeatureExtractor"]
    read, prep, model = table
    assert read["tasks"] == 1 and read["rows"] == 1000  # a read's blocks come from one task without an index
    assert prep["rows"] == 1000 and prep["tasks"] == 2 and prep["blocks"] == 2
    assert prep["first_start_s"] == 1.0 and prep["first_out_s"] == 2.0 and prep["span_s"] == 2.0
    assert prep["rows_per_s"] == 500.0 and prep["busy_s"] == 2.5 and prep["cpu_s"] == 0.2
    assert model["first_out_s"] == 5.0 and model["first_out_rows"] == 1 and model["last_out_s"] == 6.0
    # the model stage outputs one summary row per file: its rate is over the rows it consumed
    assert model["rows"] == 1000 and model["rows_out"] == 2 and model["rows_per_s"] == 500.0
    assert ops[1].rows_done_by(ops[2].first_out_s) == 1000
    assert ops[1].rows_done_by(102.5) == 500
    assert bm.stage_table([OperatorStats("Empty", "read", ())], t0=t0)[0]["rows_per_s"] is None
    assert bm.decode_share(table) == round(0.2 / 0.6, 3)  # prepare's 0.2 of the stages' 0.6 CPU seconds
    assert bm.decode_share(table[2:]) is None


def test_partition_stats_names_each_operators_stage():
    """The pipeline's stats: plain values per block, each operator given its stage in build_pipeline
    (fused operators all of theirs), whatever the model stage's class is called."""
    meta = lambda rows, task: SimpleNamespace(num_rows=rows, exec_stats=SimpleNamespace(  # noqa: E731
        task_idx=task, start_time_s=1.0, end_time_s=2.0, wall_time_s=1.0, cpu_time_s=0.5))
    parent = SimpleNamespace(parents=[], metadata={"FromArrow->MapBatches(prepare_batch)": [meta(3, None)]})
    raw = SimpleNamespace(parents=[parent], metadata={
        "MapBatches(TinyExtractor)": [meta(2, 0), meta(1, 1)], "Limit": [SimpleNamespace(num_rows=3, exec_stats=None)]})
    ds = SimpleNamespace(_raw_stats=lambda: raw, stats=lambda: "text")
    st = partition_stats(ds, model="m", split="test", model_stage=be.TinyExtractor, started_s=0.0, ended_s=3.0)
    assert [(op.name, op.stage) for op in st.operators] == [
        ("FromArrow->MapBatches(prepare_batch)", "read+prepare"), ("MapBatches(TinyExtractor)", "model"),
        ("Limit", "read")]
    model = st.operators[1]
    assert model.rows_out == 3 and model.first_out_s == 2.0 and model.blocks[1].task == 1
    assert st.operators[2].blocks == (BlockTiming(rows=3, task=None, start_s=None, end_s=None, wall_s=0.0, cpu_s=0.0),)
    assert st.text == "text" and (st.started_s, st.ended_s) == (0.0, 3.0)


def test_marginal_rate_and_medians():
    small = bm.run_figures(rows=1000, seconds=6.0, t_first=4.0, first_rows=100, cpu_s=3.0,
                           cpu_by_kind={"driver": 1.0, "worker": 2.0})
    full = bm.run_figures(rows=3000, seconds=10.0, t_first=4.0, first_rows=100, cpu_s=7.0,
                          cpu_by_kind={"driver": 1.5, "worker": 5.5})
    assert full["e2e_img_s"] == 300.0 and full["startup_s"] == 4.0
    assert full["after_first_img_s"] == round(2900 / 6.0, 1)
    side = bm.side_figures(small=small, full=full)
    assert side["steady_img_s"] == 500.0  # 2000 more rows in 4 more seconds: the start-up cancels
    assert side["fixed_s"] == 4.0  # 10 s - 3000 / 500
    assert side["cpu_ms_per_img"] == 2.0  # 4 CPU seconds more for 2000 rows more
    assert side["cpu_us_by_kind"] == {"driver": 250.0, "worker": 1750.0}  # per kind: 0.5 and 3.5 s more
    line = bm.kinds_line({"plain": {"cpu_us_by_kind": {"main": 10.0, "loader": 0.0}}, "ray": side})
    assert line == "plain main 10.0; ray driver 250.0, worker 1750.0"  # kinds that took nothing left out
    # no positive time difference (noise): no rate rather than a negative one
    assert bm.side_figures(small=full, full=small)["steady_img_s"] is None

    def rep(plain, ray, ahead=0.1):
        p = bm.side_figures(small=bm.run_figures(rows=1000, seconds=1000 / plain + 1, t_first=1.0, first_rows=10, cpu_s=2),
                            full=bm.run_figures(rows=2000, seconds=2000 / plain + 1, t_first=1.0, first_rows=10, cpu_s=4))
        r = bm.side_figures(small=bm.run_figures(rows=1000, seconds=1000 / ray + 5, t_first=5.0, first_rows=10, cpu_s=3,
                                                 cpu_by_kind={"worker": 3.0}),
                            full=bm.run_figures(rows=2000, seconds=2000 / ray + 5, t_first=5.0, first_rows=10, cpu_s=4,
                                                cpu_by_kind={"worker": 4.0 + ray / 1000}))
        r["small"]["ahead_frac"] = ahead
        return {"plain": p, "ray": r, "ratio": bm.ratio(r["steady_img_s"], p["steady_img_s"]),
                "stages": [{"stage": "FeatureExtractor", "rows_per_s": ray}]}

    med = bm.summarise([rep(100, 90), rep(100, 80, ahead=0.5), rep(50, 60)])
    assert med["ratios"] == [0.9, 0.8, 1.2] and med["ratio"] == 0.9  # the median of the paired ratios
    assert med["plain_steady_img_s"] == 100.0 and med["ray_steady_img_s"] == 80.0
    assert med["ray_startup_s"] == 5.0 and med["plain_fixed_s"] == 1.0
    assert med["ahead_small_max"] == 0.5
    assert med["plain_cpu_ms_per_img"] == 2.0 and med["ray_cpu_ms_per_img"] == 1.0 and med["cpu_ratio"] == 2.0
    assert med["stage_rows_per_s"] == {"FeatureExtractor": 80.0}
    # per kind of process: the median over repeats (1 s + 90, 80 or 60 ms more for 1000 rows more)
    assert med["ray_cpu_us_by_kind"] == {"worker": 1080.0} and med["plain_cpu_us_by_kind"] == {}


def test_tree_cpu_counts_a_child_that_ended():
    snap = procstats.process_tree_cpu(root=os.getpid())
    assert snap is not None and snap[os.getpid()][0] == "driver"
    assert procstats.process_tree_cpu(root=2**31 - 1) is None
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.3)"
    with procstats.TreeCPU(interval=0.1) as tree:
        subprocess.run([sys.executable, "-c", burn], check=True)
    # the child's 0.6 CPU seconds (sampled while it lived), not the sampler's own time
    assert 0.5 <= tree.seconds < 2.0, tree.seconds
    assert set(tree.by_kind) == set(procstats.KINDS) and tree.by_kind["other"] >= 0.5  # a plain child process
    assert tree.seconds == pytest.approx(sum(tree.by_kind.values()), abs=0.01)


def test_json_record_fields():
    med = {k: 1.0 for k in ("plain_steady_img_s", "ray_steady_img_s", "ratio", "ratio_e2e", "cpu_ratio",
                            "plain_startup_s", "ray_startup_s")}
    case = {"mode": "png", "model": "cifar_resnet20", "images": 10000, "batch_size": 256, "median": med,
            "repeats": []}
    machine = {"device": "CPU: x", "device_type": "cpu", "gpu": None, "cpu_model": "x", "cpu_count": 2,
               "load_start": [1.0, 1.0, 1.0], "load_end": [2.0, 2.0, 2.0]}
    rec = bm.record(cfg=config_lib.to_dict(be.BenchConfig()), argv=["--repeats", "3"], machine=machine,
                    versions={"torch": "2.x", "ray": "2.y"}, cases=[case], started_at="2026-01-01T00:00:00Z",
                    seconds=12.34)
    for key in ("device", "device_type", "cpu_count", "machine", "versions", "cases", "summary", "config", "argv",
                "started_at", "seconds"):
        assert key in rec, key
    assert rec["device"] == "CPU: x" and rec["cpu_count"] == 2 and rec["versions"]["ray"] == "2.y"
    assert rec["machine"]["load_start"] == [1.0, 1.0, 1.0]
    assert rec["summary"] == [{"mode": "png", "model": "cifar_resnet20", "images": 10000, "batch_size": 256, **med}]
    assert rec["config"]["modes"] == ["png", "proxy", "pngproxy"]
    json.loads(json.dumps(rec))  # plain JSON


def test_committed_cpu_json_has_the_fields_if_present():
    path = Path(be.default_output(device_slug="cpu"))
    if not path.exists():
        pytest.skip("no committed CPU run")
    rec = json.loads(path.read_text())
    assert rec["device_type"] == "cpu" and rec["cpu_count"] >= 1 and {"torch", "ray"} <= set(rec["versions"])
    for case in rec["cases"]:
        assert len(case["repeats"]) >= 3 and all("load" in r for r in case["repeats"])
        assert {"ratio", "ratio_e2e", "ray_startup_s", "plain_startup_s"} <= set(case["median"])


# ----------------------------------------------------------------------------- the two sides


def test_plain_folder_counts_every_row(folder):
    r = plain_loops.plain_folder(root=str(folder), model="cifar_resnet8", weights=None, device="cpu", batch_size=5, kmax=8,
                        workers=0)
    assert r["rows"] == 12 and r["seconds"] > 0 and 0 <= r["startup_s"] <= r["seconds"]
    assert r["e2e_img_s"] == pytest.approx(12 / r["seconds"], rel=0.05) and r["cpu_s"] > 0  # seconds are rounded
    assert r["cpu_by_kind"]["main"] > 0 and r["cpu_by_kind"]["loader"] == 0  # no workers: all in this process


def test_plain_pngproxy_decodes_in_workers_and_writes_every_record(folder, tmp_path):
    """The PNG proxy's plain loop: every image decoded by the DataLoader's worker processes (their CPU is
    counted once they are joined), the model's records written in files of at most rows_per_file rows."""
    from dtd_ray.io import records

    be.register_tiny()
    out = tmp_path / "plain"
    r = plain_loops.plain_pngproxy(root=str(folder), model=be.TINY_RGB, device="cpu", batch_size=5, kmax=8, workers=2,
                          rows_per_file=6, out_dir=str(out))
    assert r["rows"] == 12 and 0 < r["startup_s"] <= r["seconds"]
    assert r["cpu_by_kind"]["loader"] > 0 and r["cpu_s"] == pytest.approx(sum(r["cpu_by_kind"].values()), abs=2e-3)
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) == 2  # 5 + 5 rows held, written at 10; the last 2 at the end
    got = records.table_to_records(pa.concat_tables([pq.read_table(f) for f in files]))
    assert sorted(got["sample_id"].tolist()) == list(range(12)) and got["features"].shape == (12, 64)


def test_tiny_model_registers_itself_in_a_fresh_process():
    """What a model actor does: a fresh process builds TinyExtractor (registering bench_tiny, once however
    often it is asked) and runs it. A subprocess, so that this test session's registry stays as it was."""
    code = (
        "import json, numpy as np\n"
        "from jobs import bench_extract as be\n"
        "from dtd_ray.models.backbones import get_backbone\n"
        "ext = be.TinyExtractor(model=be.TINY, weights=None, kmax=64, use_gpu=False)\n"
        "be.register_tiny()\n"
        "bb = get_backbone(be.TINY, weights=None)\n"
        "out = ext({'image': np.zeros((3, 28, 28, 1), np.uint8), 'sample_id': np.arange(3), 'label': np.zeros(3)})\n"
        "print(json.dumps([bb.feature_dim, bb.num_classes, bb.preprocessing.channels, bb.preprocessing.size,\n"
        "                  sum(p.numel() for p in bb.parameters()), out['features'].shape, out['topk_idx'].shape]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    dim, classes, channels, size, params, features, topk = json.loads(p.stdout.strip().splitlines()[-1])
    assert (dim, classes, channels, size) == (64, 10, 1, 28) and params < 1000
    assert features == [3, 64] and topk == [3, 64]


def test_ray_run_figures_of_a_real_pipeline(ray_local, tmp_path):
    """One pipeline run through ray_run: every row counted, the stages in order with the model's first
    output (its first file written) and the rows decoded by then, and the CPU of the session's processes by
    kind."""
    from dtd_ray.ray.extract import ExtractConfig

    for c, cls in enumerate(("cat", "dog", "ship")):
        for i in range(4):
            _png(tmp_path / "data" / "test" / cls / f"{i}.png", 20 * c + i)
    cfg = ExtractConfig(model="cifar_resnet8", weights=None, dataset=f"imagefolder:{tmp_path / 'data'}",
                        splits=("test",), output=str(tmp_path / "out"), kmax=8, batch_size=4, rows_per_file=5)
    r = bm.ray_run(cfg, verbose=False)
    assert r["rows"] == 12 and r["seconds"] > 0 and 0 < r["startup_s"] < r["seconds"]
    stages = {s["stage"]: s for s in r["stages"]}
    assert list(stages)[1:] == ["prepare_batch", "FeatureExtractor"]  # the model stage writes the records
    assert stages["FeatureExtractor"]["rows"] == 12
    assert stages["FeatureExtractor"]["rows_out"] == 3  # one summary row per file of at most 5 rows
    assert r["startup_s"] == stages["FeatureExtractor"]["first_out_s"] and 0 < r["ahead_rows"] <= 12
    assert r["cpu_by_kind"]["driver"] > 0 and r["cpu_by_kind"]["worker"] > 0
    assert "FeatureExtractor" in r["stats_text"] and r["write_tail_s"] is not None
