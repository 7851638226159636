"""jobs/train.py's loop: trains, records, and its checkpoint loads through the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dtd_ray.models.backbones import get_backbone
from dtd_ray.train.backbone import TrainConfig, one_cycle_lr, run_train


def test_one_cycle_lr_warms_up_then_decays_to_zero():
    lrs = [one_cycle_lr(s, total=100, peak=0.1) for s in range(100)]
    assert lrs[0] < lrs[14] == pytest.approx(0.1) and max(lrs) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[15:], lrs[16:])) and lrs[-1] < 1e-3


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    """Two 28-px grey classes that differ in brightness: learnable in a couple of epochs."""
    root = tmp_path_factory.mktemp("grey")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        for c, level in (("dark", 40), ("light", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(level, 30, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


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


def test_train_as_a_ray_task(ray_local, grey_folder, tmp_path):
    cfg = TrainConfig(model="cifar_resnet8", dataset=f"imagefolder:{grey_folder}", in_channels=1, epochs=1,
                      batch_size=32, output=str(tmp_path), name="task")
    record = run_train(cfg)
    assert record["device"] == "cpu" and (tmp_path / "task.th").exists()
