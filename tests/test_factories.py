"""A user's own network, defined in a file outside the package: ``--model file.py:callable`` or
``module:callable`` in get_backbone, jobs/extract.py and a sweep's model entry; its bad cases are
one line each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dtd_ray.io import records, schema
from dtd_ray.models.backbones import get_backbone
from tests.test_reliability import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]

NETS = '''
import torch
from torch import nn


class Small(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def build(num_classes=10):
    return Small(num_classes)


build.preprocessing = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "size": 32}


def no_module(num_classes=10):
    return "a string"


class ConvHead(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


not_callable = 3
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """my_nets.py (the user's file), a 3-class 32-px image folder and weights saved from the factory's module."""
    root = tmp_path_factory.mktemp("factory")
    (root / "my_nets.py").write_text(NETS)
    for seed, split in enumerate(("train", "test")):
        write_imagefolder(root / "data", 15, split=split, classes=3, seed=seed)
    torch.manual_seed(0)
    bb = get_backbone(f"{root}/my_nets.py:build", weights=None, num_classes=3)
    torch.save(bb.state_dict(), root / "w.th")
    return root


def test_factory_is_built_split_and_loaded_strictly(project):
    spec = f"{project}/my_nets.py:build"
    bb = get_backbone(spec, weights=str(project / "w.th"))
    assert bb.num_classes == 3 and bb.feature_dim == 8  # num_classes read from the weights
    assert bb.preprocessing.size == 32 and bb.preprocessing.mean == (0.5, 0.5, 0.5)  # the factory's attribute
    ref = get_backbone(spec, weights=None, num_classes=3)
    ref.load_state_dict(torch.load(project / "w.th", weights_only=True))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(bb(x), ref(x))
    over = get_backbone(spec, weights=None, num_classes=5, input_size=28, resize=32, normalization="cifar10")
    assert over.num_classes == 5 and (over.preprocessing.size, over.preprocessing.resize) == (28, 32)
    assert over.preprocessing.mean == (0.491, 0.482, 0.447)
    torch.save({"fc.weight": torch.zeros(3, 9)}, project / "bad.th")
    with pytest.raises(ValueError) as ei:
        get_backbone(spec, weights=str(project / "bad.th"))
    assert "\n" not in str(ei.value) and "does not fit" in str(ei.value)


@pytest.mark.parametrize("attr, says", [
    ("no_module", "returned a str, not a torch.nn.Module"),
    ("ConvHead", "does not end in one linear layer: its final module is Conv2d (conv) and it has no nn.Linear"),
    ("not_callable", "has a int named not_callable, not a callable"),
    ("missing", "has nothing named missing, not a callable"),
])
def test_bad_factories_are_one_line(project, attr, says):
    with pytest.raises(ValueError) as ei:
        get_backbone(f"{project}/my_nets.py:{attr}", weights=None)
    assert "\n" not in str(ei.value) and says in str(ei.value)


def test_a_module_that_is_not_importable_is_one_line():
    with pytest.raises(ValueError, match=r"module no_such_pkg.nets is not importable \(ModuleNotFoundError"):
        get_backbone("no_such_pkg.nets:build", weights=None)


def test_extract_job_with_a_factory_and_its_bad_cases(project, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "jobs" / "extract.py"), "--model", "my_nets.py:build", "--weights", "w.th",
            "--dataset", f"imagefolder:{project / 'data'}", "--output", str(out), "--splits", "test", "--kmax", "4"]
    r = subprocess.run(args, cwd=project, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = records.load_records(str(out / "records"), model="my_nets_build", split="test")  # the default tag
    assert len(rec[schema.LABEL]) == 15 and rec[schema.FEATURES].shape == (15, 8)
    assert records.read_head(str(out / "records"), model="my_nets_build", split="test")["weight"].shape == (3, 8)
    for model, says in (("my_nets.py:ConvHead", "does not end in one linear layer"),
                        ("no_such_pkg.nets:build", "is not importable")):
        bad = [a if a != "my_nets.py:build" else model for a in args]
        r = subprocess.run(bad, cwd=project, capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("error: ") and says in lines[-1], r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_sweep_with_a_factory_model_entry(project, tmp_path):
    """jobs/sweep.py with a model entry naming the factory's file: extraction, decomposition, the
    mode-none rows and a fine-tuning trial (which rebuilds the network from the factory)."""
    cfg = {"data_root": str(project), "datasets": ["imagefolder:${data_root}/data"],
           "models": [{"name": "my_nets.py:build", "weights": "${data_root}/w.th", "tag": "mine"}],
           "k": "1..2", "strategies": ["frequency", "weight_l1"], "kmax": 4, "extract_batch_size": 8,
           "retrain": {"none": {}, "finetune": {"k": [2], "strategies": ["frequency"], "batch_size": 8}},
           "random_seeds": 1, "noise_seeds": 1}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(path), "--output", str(out),
                        "--report", "false", "--atlas", "false"], cwd=project, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    trials = pd.read_parquet(out / "trials")
    # k 1..2 × 2 strategies in mode none, and one fine-tune: the trial, in Tune's own trial folder, finds
    # the factory's file (relative to the job's folder) too
    assert set(trials["model"]) == {"mine"} and trials.groupby("retrain_mode").size().to_dict() == {"finetune": 1, "none": 4}
    assert trials["acc_full"].between(0, 100).all() and trials["acc_retrained"].notna().sum() == 1


def test_timm_factory_random_init_and_locally_saved_weights(tmp_path):
    """``timm:<name>``: built with pretrained=False (no network), split at its final linear, its
    preprocessing from timm's pretrained_cfg, and a state dict saved here loads back strictly."""
    pytest.importorskip("timm", reason="timm is an optional extra (pip install 'dtd-ray[timm]'); the test extras bring it")
    torch.manual_seed(0)
    bb = get_backbone("timm:resnet18", weights=None, num_classes=7)
    assert bb.num_classes == 7 and bb.feature_dim == 512
    p = bb.preprocessing
    assert (p.size, p.resize, p.interpolation) == (224, 235, "bicubic") and p.mean == (0.485, 0.456, 0.406)
    torch.save(bb.state_dict(), tmp_path / "r18.pt")
    back = get_backbone("timm:resnet18", weights=str(tmp_path / "r18.pt"))
    x = torch.rand(1, 3, 64, 64)
    assert back.num_classes == 7
    torch.testing.assert_close(back(x), bb(x))
    with pytest.raises(ValueError, match="^model timm:no_such_net: timm has no model 'no_such_net'$"):
        get_backbone("timm:no_such_net", weights=None)
