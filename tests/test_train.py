"""jobs/train.py's loop: trains, records, and its checkpoint loads through the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtd_ray import cli
from dtd_ray.models.backbones import get_backbone
from dtd_ray.ray.train_on_ray import train_on_ray
from dtd_ray.train.backbone import TrainConfig, one_cycle_lr, run_train, train_backbone

ROOT = Path(__file__).resolve().parents[1]


def test_one_cycle_lr_warms_up_then_decays_to_zero():
    lrs = [one_cycle_lr(s, total=100, peak=0.1) for s in range(100)]
    assert lrs[0] < lrs[14] == pytest.approx(0.1) and max(lrs) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[15:], lrs[16:])) and lrs[-1] < 1e-3


def _grey(root: Path, *, train: int, test: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c, level in (("dark", 40), ("light", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(level, 30, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    """Two 28-px grey classes that differ in brightness: learnable in a couple of epochs."""
    return _grey(tmp_path_factory.mktemp("grey"), train=64, test=32)


@pytest.fixture(scope="module")
def tiny_grey_folder(tmp_path_factory):
    """The same with 8 train and 4 test images per class, for the slow CPU fp16 path."""
    return _grey(tmp_path_factory.mktemp("tiny_grey"), train=8, test=4)


def test_train_writes_a_loadable_checkpoint_and_record(grey_folder, tmp_path):
    cfg = TrainConfig(model="cifar_resnet8", dataset=f"imagefolder:{grey_folder}", in_channels=1, epochs=3,
                      batch_size=16, lr=0.05, ray=False, output=str(tmp_path), name="grey8")
    record = run_train(cfg)
    assert record["eval_acc"] >= 90.0  # brightness separates the classes
    saved = json.loads((tmp_path / "grey8.json").read_text())
    assert saved["sha256"] == record["sha256"] and len(saved["history"]) == 3
    assert saved["config"]["in_channels"] == 1 and saved["n_train"] == 128
    b = get_backbone("cifar_resnet8", weights=str(tmp_path / "grey8.th"))
    assert b.num_classes == 2 and b.preprocessing.channels == 1 and b.preprocessing.size == 28


def test_train_refuses_data_the_model_cannot_take(grey_folder, tmp_path):
    cfg = TrainConfig(model="cifar_resnet8", dataset=f"imagefolder:{grey_folder}", epochs=1, ray=False,
                      output=str(tmp_path))
    with pytest.raises(ValueError, match="none of 128 images usable.*wrong size 28x28"):
        run_train(cfg)


def test_train_in_fp16_steps_through_the_grad_scaler(tiny_grey_folder):
    # explicit fp16 on the CPU: autocast to half and a live GradScaler ("auto" is fp32 there)
    cfg = TrainConfig(model="cifar_resnet8", dataset=f"imagefolder:{tiny_grey_folder}", in_channels=1, epochs=1,
                      batch_size=8, lr=0.05, augment=None, precision="fp16", ray=False)
    result = train_backbone(cfg)
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["loss"])
    floats = [v for v in result["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)


def test_cli_ray_false_is_false():
    cfg = cli.run_cli(cli.Command("", TrainConfig, lambda c: c), ["--ray", "false"])
    assert cfg.ray is False
    cfg = cli.run_cli(cli.Command("", TrainConfig, lambda c: c), ["--ray", "False", "--epochs", "2"])
    assert cfg.ray is False and cfg.epochs == 2


def test_train_job_with_ray_false_runs_in_process(tiny_grey_folder, tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--model", "cifar_resnet8", "--dataset",
         f"imagefolder:{tiny_grey_folder}", "--in_channels", "1", "--epochs", "1", "--batch_size", "8",
         "--ray", "false", "--output", str(tmp_path), "--name", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[train] done: job" in res.stdout and "Started a local Ray instance" not in res.stdout + res.stderr
    record = json.loads((tmp_path / "job.json").read_text())
    assert record["config"]["ray"] is False and (tmp_path / "job.th").exists()


def test_train_as_a_ray_task(ray_local, grey_folder, tmp_path):
    cfg = TrainConfig(model="cifar_resnet8", dataset=f"imagefolder:{grey_folder}", in_channels=1, epochs=1,
                      batch_size=32, output=str(tmp_path), name="task")
    record = train_on_ray(cfg)
    assert record["device"] == "cpu" and (tmp_path / "task.th").exists()
