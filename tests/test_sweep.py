"""The sweep: config format and validation, trial identity, resources, and the driver end to end.

The end-to-end tests run on a tiny 3-class image folder with a randomly initialised
cifar_resnet20 (as tests/test_extract.py) on the session's local Ray: extraction,
decomposition, mode ``none`` rows, Tune trials of ``head`` and ``finetune``, the
summary, and a rerun that resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from dtd_ray.io import schema
from dtd_ray import cli
from dtd_ray.ray import cluster, sweep
from dtd_ray.ray.commands import SWEEP
from dtd_ray.config import config_hash

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a tiny project


def make_tiny_project(root: Path, *, per_class: int = 6) -> Path:
    """A 3-class 32-px image folder (train/test) and a random-init cifar_resnet20 checkpoint under ``root``."""
    from dtd_ray.models.backbones import get_backbone

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog", "frog"):
            d = root / "data" / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    torch.manual_seed(0)
    model = get_backbone("cifar_resnet20", weights=None, num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, root / "ckpt.th")
    return root


def write_tiny_config(root: Path, *, retrain: dict, name: str = "tiny.yaml", **extra) -> Path:
    """A sweep YAML over the tiny project (data_root = ``root``, as a preset would use it)."""
    cfg = {
        "data_root": str(root),
        "datasets": ["imagefolder:${data_root}/data"],
        "models": [{"name": "cifar_resnet20", "weights": "${data_root}/ckpt.th", "tag": "tiny"}],
        "k": "1..3",
        "strategies": ["frequency", "weight_l1"],
        "kmax": 8,
        "extract_batch_size": 8,
        "retrain": retrain,
        **extra,
    }
    path = root / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_project(tmp_path_factory.mktemp("sweep_tiny"))


# ----------------------------------------------------------------------------- config


def test_presets_ship_and_resolve():
    assert {"quickstart", "cifar10_resnets", "imagenet_resnets"} <= set(sweep.list_presets())
    cfg = sweep.load_config("cifar10_resnets")
    plan = sweep.plan_sweep(cfg, check_inputs=False)
    assert [u.key for u in plan.units] == ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"]
    assert plan.grid == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20]
    u = plan.units[0]
    assert u.model.weights == "../shared/data/cifar_resnets/resnet20-12fca82f.th"  # ${data_root} replaced
    assert u.dataset == "imagefolder:../shared/data/cifar10" and u.dataset_short == "cifar10"
    assert u.weights_abs == os.path.abspath("../shared/data/cifar_resnets/resnet20-12fca82f.th")
    counts = {m: len(plan.trials_of(m)) for m in plan.modes}
    # head at 6 of the 11 k values; 4 strategies + random with 10 map seeds, 4 lrs, and the full-head control
    # per lr; finetune: frequency at k = 5 and the control, 3 seeds each, ResNet-20 and -56
    assert counts == {"none": 4 * 11 * (4 + 10), "head": 4 * 4 * (6 * (4 + 10) + 1), "finetune": 2 * 2 * 3}
    assert cfg.val_fraction == 0.1
    assert {t.seed for t in plan.trials_of("finetune")} == {0, 1, 2}
    assert {t.lr for t in plan.trials_of("head")} == {3e-3, 1e-2, 3e-2, 1e-1}
    assert sorted({t.map_seed for t in plan.trials if t.strategy == "random"}) == list(range(10))
    assert {t.map_seed for t in plan.trials if t.strategy != "random"} == {-1}
    assert {t.k for t in plan.trials_of("finetune") if t.strategy != "full"} == {5}
    assert {t.k for t in plan.trials_of("finetune") if t.strategy == "full"} == {64}  # m: every feature
    assert plan.output == os.path.abspath("runs/cifar10_resnets")
    # frequency has k1 = k, the k1-independent strategies k1 = -1
    assert {(t.strategy, t.k1) for t in plan.trials_of("head") if t.k == 5} == {
        ("frequency", 5), ("weight_l1", -1), ("contribution", -1), ("random", -1), ("glm", -1)}
    # a different data_root moves every path
    moved = sweep.plan_sweep(sweep.load_config("cifar10_resnets", {"data_root": "/data"}), check_inputs=False)
    assert moved.units[0].dataset == "imagefolder:/data/cifar10"
    for name in ("quickstart", "imagenet_resnets"):
        p = sweep.plan_sweep(sweep.load_config(name), check_inputs=False)
        assert p.trials and p.units


def test_zoo_preset_resolves_shares_of_m_per_model():
    """cifar10_zoo: nine models of four families; k as counts and as shares of each model's width m."""
    plan = sweep.plan_sweep(sweep.load_config("cifar10_zoo"), check_inputs=False)  # m from the architectures
    assert len(plan.units) == 9 and set(plan.modes) == {"none", "head"}  # no fine-tuning on CPU
    counts = list(range(1, 11)) + [20]
    assert plan.grids["cifar_resnet20"] == plan.grids["cifar_resnet56_proj"] == counts  # m = 64: 1, 1, 3, 6
    assert plan.grids["cifar_densenet40_k12"] == counts + [22, 45]  # m = 448
    assert plan.grids["cifar_shufflenet_g3_x0_5"] == counts + [24, 48]  # m = 480
    assert plan.grids["cifar_shufflenetv2_x0_5"] == counts + [51, 102]  # m = 1024
    assert plan.grid == sorted(set(counts + [22, 24, 45, 48, 51, 102]))
    head_k = {u: sorted({t.k for t in plan.trials_of("head", u)}) for u in plan.grids}
    assert head_k["cifar_resnet20"] == [2, 3, 5, 10] and head_k["cifar_shufflenetv2_x0_5"] == [2, 5, 10, 51]
    none_k = {t.k for t in plan.trials_of("none", "cifar_densenet40_k12")}
    assert none_k == set(plan.grids["cifar_densenet40_k12"])
    assert sweep.plan.decompose_config(plan, plan.units[-1]).k1 == plan.grids[plan.units[-1].key]
    with pytest.raises(ValueError, match=r"k=102 > kmax=64 \(cifar_shufflenetv2_x0_5\)"):
        sweep.plan_sweep(sweep.load_config("cifar10_zoo", {"kmax": 64}), check_inputs=False)


def test_a_model_entry_may_narrow_the_strategies():
    cfg = sweep.load_config("cifar10_resnets", {"models": "cifar_resnet20,cifar_resnet56", "k": 5})
    cfg.models[1] = {**cfg.models[1], "strategies": "frequency,glm,contribution"}
    plan = sweep.plan_sweep(cfg, check_inputs=False)
    by_unit = {u: {t.strategy for t in plan.trials_of("none", u)} for u in ("cifar_resnet20", "cifar_resnet56")}
    assert by_unit["cifar_resnet20"] == set(cfg.strategies)
    assert by_unit["cifar_resnet56"] == {"frequency", "glm", "contribution"}
    assert sweep.plan.decompose_config(plan, plan.units[1]).strategies == ("frequency", "contribution", "glm")
    with pytest.raises(ValueError, match=r"model cifar_resnet56: unknown strategy 'gml'"):
        cfg.models[1]["strategies"] = ["gml"]
        sweep.plan_sweep(cfg, check_inputs=False)


def test_overrides_select_models_k_modes_and_merge_retrain():
    cfg = sweep.load_config("cifar10_resnets", {
        "models": "cifar_resnet20", "k": 5, "strategies": "frequency,weight_l1", "modes": "none,finetune",
        "retrain": {"finetune": {"epochs": 2}}, "output": "runs/x"})
    plan = sweep.plan_sweep(cfg, check_inputs=False)
    assert [u.key for u in plan.units] == ["cifar_resnet20"] and plan.grid == [5]
    assert list(plan.modes) == ["none", "finetune"]
    ft = plan.modes["finetune"]
    assert ft.epochs == 2 and ft.lr == 1e-4 and ft.augment == "cifar"  # merged into the preset's options
    assert ft.strategies == ("frequency",)  # the preset fine-tunes the frequency map only
    assert len(plan.trials) == 2 + 2 * 3  # none: 2 strategies; finetune: frequency and its control, 3 seeds
    with pytest.raises(ValueError, match="no such model entry.*cifar_resnet20, cifar_resnet32"):
        sweep.load_config("cifar10_resnets", {"models": "resnet18"})


def test_unknown_keys_are_errors_naming_them(tmp_path):
    def cfg_with(**kw):
        base = {"models": [{"name": "cifar_resnet20"}], "retrain": {"none": {}}}
        base.update(kw)
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(base))
        return str(p)

    with pytest.raises(ValueError, match=r"unknown SweepConfig option\(s\) k_grid; valid: .*datasets"):
        sweep.load_config(cfg_with(k_grid=5))
    with pytest.raises(ValueError, match=r"models\[0\] \(cifar_resnet20\): unknown option\(s\) weigths; valid: name, weights"):
        sweep.load_config(cfg_with(models=[{"name": "cifar_resnet20", "weigths": "x"}]))
    with pytest.raises(ValueError, match="unknown retrain mode 'full'; valid: none, head, finetune"):
        sweep.load_config(cfg_with(retrain={"full": {}}))
    with pytest.raises(ValueError, match=r"retrain.head: unknown option\(s\) augment; valid: k, strategies"):
        sweep.load_config(cfg_with(retrain={"head": {"augment": "cifar"}}))
    with pytest.raises(ValueError, match=r"unknown placeholder \$\{root\}"):
        sweep.plan_sweep(sweep.load_config(cfg_with(models=[{"name": "cifar_resnet20", "weights": "${root}/w.th"}])),
                         check_inputs=False)
    with pytest.raises(ValueError, match="unknown strategy 'freq'"):
        sweep.plan_sweep(sweep.load_config(cfg_with(strategies=["freq"])), check_inputs=False)
    with pytest.raises(ValueError, match="unknown preset 'nope'; presets: .*quickstart"):
        sweep.load_config("nope")
    with pytest.raises(ValueError, match="unknown SweepConfig option"):
        cli.run_cli(dataclasses.replace(SWEEP, run=lambda cfg: None), ["--config", cfg_with(), "--epochs", "3"])


def test_yaml_is_data_only(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("models: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(yaml.YAMLError):
        sweep.load_config(str(p))


def test_help_lists_every_option(capsys):
    cli.run_cli(SWEEP, ["--help"])
    out = capsys.readouterr().out
    for cls in (sweep.SweepConfig,):
        for f in dataclasses.fields(cls):
            assert f"--{f.name} (default" in out
    for cls in (sweep.ModelSpec, sweep.RetrainSpec):
        for f in dataclasses.fields(cls):
            assert f"  {f.name} " in out
    assert "Presets: cifar10_resnets, cifar10_zoo, imagenet_resnets, quickstart" in out


def test_cli_flags_override_the_config(tmp_path):
    got = {}
    path = write_tiny_config(make_tiny_project(tmp_path), retrain={"none": {}, "head": {"epochs": 3}})
    cli.run_cli(dataclasses.replace(SWEEP, run=lambda cfg: got.setdefault("cfg", cfg)),
                ["--config", str(path), "--k", "2", "--retrain", "{head: {lr: 0.01}}", "--output", "/tmp/x",
                 "--use_gpu", "false", "--overwrite"])
    cfg = got["cfg"]
    assert cfg.k == 2 and cfg.output == "/tmp/x" and cfg.name == "tiny"
    assert cfg.retrain["head"] == {"epochs": 3, "lr": 0.01} and cfg.strategies == ("frequency", "weight_l1")
    assert cfg.use_gpu is False and cfg.overwrite is True  # "false" on a command line is not a truthy string
    assert cfg.kmax == 8  # options not on the command line keep the config's value


def test_quickstart_without_fashion_mnist_is_one_line_saying_how_to_install_it():
    """The quickstart's data missing: one line (no traceback) naming the package and the option."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--datasets", "fashion-mnist:/nonexistent/fm",
                        "--dry_run", "True"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert "apt-get install -y dataset-fashion-mnist" in r.stderr and "fashion-mnist:PATH" in r.stderr


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({
        "datasets": ["fashion-mnist"], "retrain": {"none": {}},
        "models": [{"name": "cifar_resnet20", "weights": "results/backbones/nope.th", "tag": "x"}]}))
    with pytest.raises(FileNotFoundError, match=r"checkpoint of model x not found: results/backbones/nope.th .*jobs/train.py"):
        sweep.plan_sweep(sweep.load_config(str(p)))


def test_trial_ids_are_stable_and_ignore_resources():
    base = sweep.load_config("cifar10_resnets", {"models": "cifar_resnet20", "k": 5})
    ids = [t.trial_id for t in sweep.plan_sweep(base, check_inputs=False).trials]
    assert len(ids) == len(set(ids))
    again = sweep.load_config("cifar10_resnets", {"models": "cifar_resnet20", "k": "5", "name": "other",
                                                  "retrain": {"finetune": {"cpus": 3, "max_concurrent": 2}},
                                                  "max_failures": 4})
    assert [t.trial_id for t in sweep.plan_sweep(again, check_inputs=False).trials] == ids
    lr = sweep.load_config("cifar10_resnets", {"models": "cifar_resnet20", "k": 5,
                                               "retrain": {"finetune": {"lr": 1e-3}}})
    changed = {t.trial_id for t in sweep.plan_sweep(lr, check_inputs=False).trials} - set(ids)
    assert len(changed) == 6  # exactly the finetune trials (frequency, k = 5, and the control; 3 seeds each)
    t = sweep.plan_sweep(base, check_inputs=False).trials[0]
    assert t.trial_id == config_hash(t.identity)
    # another sweep seed draws another validation split and other random maps: no trial id is shared,
    # the fine-tuning trials of retrain.finetune.seeds included
    other = {t.trial_id for t in sweep.plan_sweep(sweep.load_config("cifar10_resnets", {
        "models": "cifar_resnet20", "k": 5, "seed": 1}), check_inputs=False).trials}
    assert not other & set(ids)
    ft = [t for t in sweep.plan_sweep(base, check_inputs=False).trials if t.mode == "finetune"]
    assert {t.identity.get("sweep_seed") for t in ft if t.seed != 0} == {0}
    assert all("sweep_seed" not in t.identity for t in ft if t.seed == 0)
    with pytest.raises(ValueError, match="lists a value twice"):
        sweep.load_config("cifar10_resnets", {"retrain": {"head": {"lr": [1e-2, 1e-2]}}})


def test_trial_resources_are_decided_on_the_driver():
    small = cluster.Cluster(cpus=2, gpus=0, nodes=1, cpus_per_node=2)
    head, ft = sweep.RetrainSpec(), sweep.RetrainSpec()
    res, conc, gpu, threads = sweep.trial_resources("head", head, small, use_gpu=False)
    assert res == {"cpu": 0.5, "gpu": 0.0} and conc == 2 and not gpu  # fractional CPUs on 2 cores
    res, conc, gpu, threads = sweep.trial_resources("finetune", ft, small, use_gpu=False)
    assert res["gpu"] == 0 and conc == 1 and threads == 2
    big = cluster.Cluster(cpus=40, gpus=4, nodes=5, cpus_per_node=8)
    res, conc, gpu, _ = sweep.trial_resources("finetune", ft, big, use_gpu=True)
    assert res == {"cpu": 1.0, "gpu": 1.0} and gpu
    assert sweep.trial_resources("head", head, big, use_gpu=True)[0]["gpu"] == 0  # head-only never takes a GPU
    with pytest.raises(RuntimeError, match="wait forever"):
        sweep.trial_resources("finetune", sweep.RetrainSpec(gpus=1), small, use_gpu=False)


def test_trials_rows_round_trip_atomically(tmp_path):
    row = {"trial_id": "abc", "model": "m", "strategy": "frequency", "k1": 5, "k2": 5, "retrain_mode": "head",
           "acc_by_epoch": [80.0, 81.5], "acc_retrained": 81.5}
    path = sweep.write_trial_row(str(tmp_path), row)
    assert path.endswith("trials/abc.parquet") and not list((tmp_path / "trials").glob("_tmp*"))
    (tmp_path / "trials" / "_tmp-zzz-1.parquet").write_bytes(b"partial")  # a crashed writer's leftover
    assert sweep.finished_trial_ids(str(tmp_path)) == {"abc"}
    df = pd.read_parquet(tmp_path / "trials")  # pandas ignores _-prefixed files
    assert len(df) == 1 and df["acc_by_epoch"].iloc[0].tolist() == [80.0, 81.5]
    assert pq.read_schema(path).equals(schema.TRIALS_SCHEMA)


# ----------------------------------------------------------------------------- end to end on local Ray

RETRAIN = {
    "none": {},
    "head": {"k": [2], "epochs": 2, "batch_size": 8},
    "finetune": {"k": [2], "strategies": ["frequency"], "epochs": 1, "batch_size": 8, "max_train_rows": 12},
}


@pytest.fixture(scope="module")
def swept(ray_local, tiny, tmp_path_factory):
    """One sweep of the tiny project with all three retrain modes."""
    out = tmp_path_factory.mktemp("sweep_out")
    cfg = sweep.load_config(str(write_tiny_config(tiny, retrain=RETRAIN)), {"output": str(out)})
    res = sweep.run_sweep(cfg)
    return cfg, out, res


def test_sweep_end_to_end(swept):
    _, out, res = swept
    df = pd.read_parquet(out / "trials")
    # none: k 1..3 × 2 strategies; head: k 2 × 2 strategies; finetune: k 2, frequency
    assert len(df) == 6 + 2 + 1 and df["trial_id"].is_unique
    assert df.groupby("retrain_mode").size().to_dict() == {"none": 6, "head": 2, "finetune": 1}
    assert set(df.columns) == set(schema.TRIALS_SCHEMA.names)
    assert res["ran"] == {"none": 6, "head": 2, "finetune": 1} and res["skipped"] == 0
    ev = pd.read_parquet(out / "decompose" / "eval")
    for _, r in df.iterrows():
        e = ev[(ev.strategy == r.strategy) & (ev.k1 == r.k1) & (ev.k2 == r.k2)].iloc[0]
        assert r.acc_decomposed == pytest.approx(100 * e.acc_decomposed)
        assert r.acc_full == pytest.approx(100 * e.acc_full)
        assert r.k1 == (r.k2 if r.strategy == "frequency" else -1)
        assert r.head_macs_decomposed == 3 * r.k2 and r.head_macs_full == 3 * 64
    trained = df[df.retrain_mode != "none"]
    assert trained["acc_retrained"].between(0, 100).all() and trained["acc_retrained"].notna().all()
    assert (trained["acc_by_epoch"].map(len) == trained["epochs"]).all()
    assert trained["seconds"].gt(0).all() and trained["checkpoint"].notna().all()
    assert df[df.retrain_mode == "none"]["acc_retrained"].isna().all()
    # the decomposed head before training is what the trainables measure too
    np.testing.assert_allclose(trained["acc_decomposed_init"], trained["acc_decomposed"], atol=1e-6)
    # every row carries its per-instance outcomes (sorted by sample_id): their mean is its accuracy
    from dtd_ray.core import stats

    inst = pd.read_parquet(out / "decompose" / "instances").sort_values("sample_id")
    assert inst["sample_id"].is_unique and (df["n_eval"] == len(inst)).all()
    assert 100 * inst["correct_full"].mean() == pytest.approx(df["acc_full"].iloc[0])
    for _, r in df.iterrows():
        o = stats.unpack_outcomes(r.outcomes, n=len(inst))
        acc = r.acc_decomposed if r.retrain_mode == "none" else r.acc_retrained
        assert 100 * o.mean() == pytest.approx(acc), (r.retrain_mode, r.strategy, r.k2)
    saved = json.loads((out / "sweep_config.json").read_text())
    assert saved["config"]["k"] == "1..3" and saved["resolved"]["trials"] == {"none": 6, "head": 2, "finetune": 1}
    summary = res["summary"]
    assert list(summary.columns) == ["model", "strategy", "k", "acc_full", "acc_decomposed",
                                     "acc_retrained[head]", "acc_retrained[finetune]"]
    assert len(summary) == 6
    # The sweep ends with its report: report.md and the plots, next to trials/.
    assert res["report"] == str(out / "report.md")
    md = (out / "report.md").read_text()
    assert "## Headline at k = 2" in md  # 5 is not in the grid 1..3: the middle k
    freq2 = df[(df.retrain_mode == "none") & (df.strategy == "frequency") & (df.k2 == 2)].acc_decomposed.iloc[0]
    assert f"| {freq2:.2f} |" in md
    for name in ("accuracy_vs_k", "retraining", "head_cost"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ... and the feature atlas at the report's k (tests/test_atlas.py checks its content)
    atlas = (out / "atlas" / "index.html").read_text()
    assert 'id="tiny-c0"' in atlas and "k1 = k2 = 2" in atlas and "## Extraction" in md


def test_report_to_another_folder_stands_alone(swept, tmp_path):
    """jobs/report.py --output DIR: the plots, the activation maps and the tables they came from."""
    from dtd_ray.report import ReportConfig, make_report

    _, out, _ = swept
    res = make_report(ReportConfig(sweep=str(out), output=str(tmp_path / "rep"), k=2, cam_correct_only=False))
    rep = tmp_path / "rep"
    # random weights classify little correctly: all images are shown (2 per class, 3 classes)
    assert res["cams"] == [{"model": "tiny", "shown": 6, "classes": 3, "mass_ratio_median": pytest.approx(
        res["cams"][0]["mass_ratio_median"])}]
    assert (rep / "plots" / "cam_tiny.png").stat().st_size > 1000
    assert len(pd.read_parquet(rep / "trials")) == 9 and (rep / "sweep_config.json").exists()
    assert (rep / "decompose" / "eval").is_dir() and (rep / "decompose" / "maps").is_dir()
    assert (rep / "report_config.json").exists()
    again = make_report(ReportConfig(sweep=str(rep), k=2, cam_images=0))  # from the copy alone
    assert again["headline"].equals(res["headline"])


def test_rerun_resumes_and_never_duplicates(swept, capsys):
    cfg, out, _ = swept
    before = pd.read_parquet(out / "trials")
    res = sweep.run_sweep(cfg)  # everything finished: nothing runs, not even extraction
    text = capsys.readouterr().out
    assert res["ran"] == {"none": 0, "head": 0, "finetune": 0} and res["skipped"] == 9
    assert "[extract]" not in text and "9 of 9 trial(s) finished earlier" in text
    # an interrupted driver: one head trial's row is missing -> only that trial runs again
    lost = before[before.retrain_mode == "head"].trial_id.iloc[0]
    os.remove(out / "trials" / f"{lost}.parquet")
    res = sweep.run_sweep(cfg)
    text = capsys.readouterr().out
    assert res["ran"] == {"none": 0, "head": 1, "finetune": 0} and res["skipped"] == 8
    assert "finished earlier with the same config and records, skipped" in text  # decompose resumed
    assert "finished earlier (18 rows), skipped" in text  # extraction resumed
    after = pd.read_parquet(out / "trials")
    assert len(after) == 9 and after.trial_id.is_unique and lost in set(after.trial_id)


# ----------------------------------------------------------------------------- validation split, seeds, controls

HELDOUT_RETRAIN = {
    "none": {},
    "head": {"k": [2], "epochs": 3, "lr": [1e-3, 3e-2], "control": True},
    "finetune": {"k": [2], "strategies": ["frequency"], "epochs": 2, "batch_size": 8, "seeds": [0, 1],
                 "control": True},
}


@pytest.fixture(scope="module")
def heldout(ray_local, tmp_path_factory):
    """The tiny project (10 images a class) swept with a 30 % validation split, two head lrs, two
    fine-tuning seeds and the full-head controls."""
    proj = make_tiny_project(tmp_path_factory.mktemp("heldout_proj"), per_class=10)
    out = tmp_path_factory.mktemp("heldout_out")
    cfg = sweep.load_config(str(write_tiny_config(proj, retrain=HELDOUT_RETRAIN, val_fraction=0.3)),
                            {"output": str(out), "atlas": False})
    return cfg, out, sweep.run_sweep(cfg)


def test_validation_split_seeds_and_controls_end_to_end(heldout):
    from dtd_ray.core import holdout, stats
    from dtd_ray.io import records

    cfg, out, res = heldout
    df = pd.read_parquet(out / "trials")
    # none: k 1..3 × 2 strategies; head: (2 strategies + the control) × 2 lrs; finetune: (1 + control) × 2 seeds
    assert df.groupby("retrain_mode").size().to_dict() == {"none": 6, "head": 6, "finetune": 4}
    assert (df["select_split"] == "train_fit70").all() and (df["val_split"] == "train_val30").all()
    tr = records.load_records(str(out / "records"), model="tiny", split="train", columns=[schema.LABEL])
    val = holdout.val_mask(sample_id=tr["sample_id"], fraction=0.3, seed=0)
    assert 0 < val.sum() < len(val)
    # the maps were counted from the rows left for fitting only
    freq = pd.read_parquet(out / "decompose" / "freq")
    k1 = freq[freq.k1 == 1]
    assert int(k1["count"].sum()) == int((~val).sum())
    # every head is also evaluated on the validation split; mode none rows carry it
    ev_val = pd.read_parquet(out / "decompose" / "eval", filters=[("split", "==", "train_val30")])
    assert len(ev_val) and (ev_val["n_instances"] == int(val.sum())).all()
    none = df[df.retrain_mode == "none"]
    for _, r in none.iterrows():
        e = ev_val[(ev_val.strategy == r.strategy) & (ev_val.k1 == r.k1) & (ev_val.k2 == r.k2)].iloc[0]
        assert r.acc_val == pytest.approx(100 * e.acc_decomposed)
    # trained rows: the epoch kept is the best on validation (earliest of equals), never chosen on test
    trained = df[df.retrain_mode != "none"]
    for _, r in trained.iterrows():
        vals, best = list(r.acc_val_by_epoch), int(r.best_epoch)  # a float column: mode none has none
        assert len(vals) == r.epochs and best == int(np.argmax(vals)) + 1
        assert r.acc_val == pytest.approx(vals[best - 1])
        assert r.acc_retrained == pytest.approx(r.acc_by_epoch[best - 1])
        o = stats.unpack_outcomes(r.outcomes, n=int(r.n_eval))
        assert 100 * o.mean() == pytest.approx(r.acc_retrained)
    head = df[df.retrain_mode == "head"]
    assert sorted(head["lr"].unique()) == [1e-3, 3e-2]
    ft = df[df.retrain_mode == "finetune"]
    assert sorted(ft["seed"]) == [0, 0, 1, 1]
    # the control: the full head (every class keeps all m = 64 features), trained with the same recipe
    ctrl = df[df.strategy == "full"]
    assert len(ctrl) == 2 + 2 and (ctrl["k2"] == 64).all() and (ctrl["k1"] == -1).all()
    assert (ctrl["acc_decomposed"] == ctrl["acc_full"]).all() and (ctrl["channels_used"] == 64).all()
    # a fine-tuning trial trains on the fit rows only (its trainable config records the split)
    for _, r in ft.iterrows():
        conf = json.loads(r.config)["trainable"]
        assert conf["val_fraction"] == 0.3 and conf["val_seed"] == 0 and conf["seed"] == r.seed
    # ids: each (strategy, lr, seed) its own trial
    assert df["trial_id"].is_unique and res["skipped"] == 0
