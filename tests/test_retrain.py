"""Retraining of decomposed heads: the pure head fit, and both Tune trainables on tiny data.

Synthetic problem: class ``c`` lives on its own features ``3c..3c+2`` (the map), but the
original head's weights there have the wrong sign, so the decomposed head starts far
below chance and only training can fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dtd_ray.core import heads
from dtd_ray.io import records, schema, storage
from dtd_ray.ray import trainables
from dtd_ray.train.finetune import evaluate_backbone, finetune_epoch, subset_rows
from dtd_ray.train.head import fit_decomposed_head

C, M, K2 = 4, 16, 3
IDX = np.arange(C * K2).reshape(C, K2)  # class c -> features 3c, 3c+1, 3c+2


def _toy(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n).astype(np.int32)
    f = rng.random((n, M)).astype(np.float32)
    for c in range(C):
        f[y == c, 3 * c : 3 * c + 3] += 1.0
    return f, y


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((C, M)) * 0.3
    w[np.arange(C)[:, None], IDX] = -1.0  # wrong sign on each class's own features
    b = np.zeros(C)
    ftr, ytr = _toy(800, seed=2)
    fte, yte = _toy(400, seed=3)
    return {"weight": w, "bias": b, "train_features": ftr, "train_labels": ytr,
            "eval_features": fte, "eval_labels": yte}


def _fit(toy, **kw):
    args = {"train_features": toy["train_features"], "train_labels": toy["train_labels"], "weight": toy["weight"],
            "bias": toy["bias"], "idx": IDX, "epochs": 8, "lr": 5e-2, "batch_size": 64,
            "eval_features": toy["eval_features"], "eval_labels": toy["eval_labels"]}
    args.update(kw)
    return fit_decomposed_head(**args)


# --------------------------------------------------------------------------- pure head fit


def test_fit_improves_accuracy_and_keeps_the_map(toy):
    res = _fit(toy)
    init = heads.decomposed_logits(features=toy["eval_features"], weight=toy["weight"], bias=toy["bias"], idx=IDX)
    acc_init = 100 * float((init.argmax(1).numpy() == toy["eval_labels"]).mean())
    assert res["acc_decomposed_init"] == pytest.approx(acc_init)
    assert acc_init < 25  # worse than chance: the own weights point the wrong way
    hist = res["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    assert hist[-1]["acc_eval"] > 95 and hist[-1]["loss"] < hist[0]["loss"]
    assert {"loss", "acc_train", "seconds", "acc_eval", "loss_eval"} <= set(hist[0])
    head = res["head"]
    # the map is fixed: only the gathered weights and the bias are parameters
    assert torch.equal(head.idx, torch.as_tensor(IDX))
    assert [n for n, p in head.named_parameters()] == ["weight", "bias"]
    assert head.weight.shape == (C, K2) and (head.weight > 0).all()  # learnt the right sign
    # the equivalent dense head is zero off the map and computes the same logits
    dense = head.to_linear().weight.detach().numpy()
    off = np.ones((C, M), bool)
    off[np.arange(C)[:, None], IDX] = False
    assert (dense[off] == 0).all() and (dense[~off] != 0).all()
    f = torch.from_numpy(toy["eval_features"])
    with torch.no_grad():
        z = head(f)
        ref = heads.masked_logits(features=f, weight=dense, bias=head.bias, idx=IDX, dtype=torch.float32)
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
        # features off the map never enter a logit
        g = f.clone()
        g[:, C * K2 :] = 1e3
        torch.testing.assert_close(head(g), z)


def test_fit_resume_replays_the_uninterrupted_run(toy):
    full = _fit(toy, epochs=6)
    saved = {}

    def keep(epoch, metrics, state):
        saved[epoch] = state

    _fit(toy, epochs=3, on_epoch=keep)
    assert sorted(saved) == [1, 2, 3] and saved[3]["epoch"] == 3
    # through torch.save / weights_only, as the trainables store it
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dtd_retrain_state_{os.getpid()}.pt"
    torch.save(saved[3], path)
    state = torch.load(path, weights_only=True)
    path.unlink()
    seen = []
    resumed = _fit(toy, epochs=6, state=state, on_epoch=lambda e, m, s: seen.append(e))
    assert seen == [4, 5, 6] and resumed["resumed_from_epoch"] == 3
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, 7))
    torch.testing.assert_close(resumed["head"].weight, full["head"].weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed["head"].bias, full["head"].bias, rtol=0, atol=0)
    assert resumed["history"][-1]["acc_eval"] == full["history"][-1]["acc_eval"]
    with pytest.raises(ValueError, match="another class map"):
        _fit(toy, idx=IDX[:, ::-1].copy(), epochs=6, state=state)


def test_fit_rejects_bad_inputs(toy):
    with pytest.raises(ValueError, match="labels outside"):
        _fit(toy, train_labels=np.full(800, C, np.int32))
    with pytest.raises(ValueError, match="features have shape"):
        _fit(toy, train_features=toy["train_features"][:, :5])
    with pytest.raises(ValueError, match="outside"):
        _fit(toy, idx=IDX + M)


# --------------------------------------------------------------------------- Tune: head-only


def _write_records(root: Path, split: str, f: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> None:
    n, m = f.shape
    order = np.argsort(-np.abs(f), axis=1, kind="stable")[:, :8]
    arrays = {
        schema.SAMPLE_ID: np.arange(n), schema.LABEL: y, schema.PRED: (f @ w.T + b).argmax(1),
        schema.TOPK_IDX: order, schema.TOPK_VAL: np.take_along_axis(f, order, 1), schema.FEATURES: f,
    }
    fs, path = storage.resolve(records.partition_uri(str(root), model="toy", split=split))
    fs.create_dir(path, recursive=True)
    pq.write_table(records.records_to_table(arrays), f"{path}/part-00000.parquet")
    storage.write_json(fs, f"{path}/{schema.MANIFEST_NAME}",
                       {"rows": n, "kmax": 8, "feature_dim": m, "num_classes": C, "config": {"model": "toy"}})


def _flaky(trainable, *, fail_after_epoch: int, flag: str):
    """``trainable`` that raises once, right after the report (and checkpoint) of ``fail_after_epoch``."""

    def run(config, **kw):
        from ray import tune

        real = tune.report

        def report(metrics, *, checkpoint=None):
            real(metrics, checkpoint=checkpoint)
            if metrics["epoch"] == fail_after_epoch and not os.path.exists(flag):
                open(flag, "w").close()
                raise RuntimeError(f"injected failure after epoch {fail_after_epoch}")

        tune.report = report
        try:
            trainable(config, **kw)
        finally:
            tune.report = real

    return run


def _reported(rows: list):
    """A Tune callback that appends every result the driver receives to ``rows``, as the sweep's row writer does.

    The tests read results here, not from ``Result.metrics_dataframe``: that reads the trial's
    ``progress.csv``, which Ray's CSV logger replaces on a restart with the copy last synced to
    ``storage_path`` (synced at most every 10 s), so the rows of the epochs just before a failure can
    vanish from it while the trial itself resumed correctly."""
    from ray import tune

    class Reported(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            rows.append(dict(result))

    return Reported()


def _tuner(trainable, *, param_space, tmp_path, name, max_failures=0, callbacks=()):
    from ray import tune

    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=param_space,
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name=name, verbose=0, callbacks=list(callbacks),
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )


def test_head_trainable_reports_checkpoints_and_resumes(ray_local, toy, tmp_path):
    from ray import tune

    root = tmp_path / "records"
    _write_records(root, "train", toy["train_features"], toy["train_labels"], toy["weight"], toy["bias"])
    _write_records(root, "test", toy["eval_features"], toy["eval_labels"], toy["weight"], toy["bias"])
    np.savez(tmp_path / "head.npz", weight=toy["weight"], bias=toy["bias"])
    space = {"records": str(root), "model": "toy", "head": str(tmp_path / "head.npz"), "idx": IDX.tolist(),
             "epochs": 4, "lr": 5e-2, "batch_size": 64, "strategy": "a label the trainable ignores"}
    # records + head file read inside the trial; it fails once after epoch 2 and Tune restarts it
    flaky = _flaky(trainables.head_trainable, fail_after_epoch=2, flag=str(tmp_path / "failed_once"))
    rows = []
    grid = _tuner(flaky, param_space=space, tmp_path=tmp_path, name="head", max_failures=1,
                  callbacks=[_reported(rows)]).fit()
    assert not grid.errors and (tmp_path / "failed_once").exists()
    res = grid[0]
    df = pd.DataFrame(rows)
    assert df["epoch"].tolist() == [1, 2, 3, 4]  # epochs 1-2 not redone after the restart
    assert df["resumed_from_epoch"].tolist() == [0, 0, 2, 2]
    assert {"acc_eval", "loss", "seconds", "acc_decomposed_init", "acc_full", "k2"} <= set(df.columns)
    assert res.metrics["acc_decomposed_init"] < 25 and res.metrics["acc_eval"] > 95
    with res.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / trainables.STATE_FILE, weights_only=True)
    assert state["epoch"] == 4 and set(state) >= {"head", "optimizer", "history"}
    # the restarted trial ends exactly where an uninterrupted fit ends
    ref = _fit(toy, epochs=4)
    torch.testing.assert_close(state["head"]["weight"], ref["head"].weight.detach(), rtol=0, atol=0)
    assert res.metrics["acc_eval"] == ref["history"][-1]["acc_eval"]

    # data through tune.with_parameters (no records, no head file needed)
    data = {k: toy[k] for k in ("train_features", "train_labels", "eval_features", "eval_labels", "weight", "bias")}
    space2 = {"idx": IDX.tolist(), "epochs": 2, "lr": 5e-2, "batch_size": 64}
    grid2 = _tuner(tune.with_parameters(trainables.head_trainable, data=data), param_space=space2,
                   tmp_path=tmp_path, name="head_data").fit()
    assert not grid2.errors and len(grid2) == 1
    r = grid2[0]
    assert r.metrics["epoch"] == 2 and r.metrics["acc_eval"] == _fit(toy, epochs=2)["history"][-1]["acc_eval"]


# --------------------------------------------------------------------------- Tune: full fine-tuning


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class 32-px imagefolder and a randomly initialised cifar_resnet20 in the public checkpoint format."""
    from dtd_ray.models.backbones import get_backbone

    root = tmp_path_factory.mktemp("tiny_retrain")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog", "frog"):
            d = root / "data" / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    torch.manual_seed(0)
    model = get_backbone("cifar_resnet20", weights=None, num_classes=3)
    torch.save({"best_prec1": 0.0, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               root / "ckpt.th")
    return root


def test_evaluate_backbone_with_a_full_map_equals_the_full_head(tiny):
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.data.sources import parse_source

    bb = get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th"))
    rows = parse_source(f"imagefolder:{tiny / 'data'}").read_numpy("test")
    everything = heads.DecomposedHead.from_linear(bb.head, np.tile(np.arange(64), (3, 1)))
    ev = evaluate_backbone(backbone=bb, head=everything, rows=rows, batch_size=7, extra_heads={"full": bb.head})
    full = evaluate_backbone(backbone=bb, head=None, rows=rows, batch_size=24)
    assert ev["n"] == 24 and ev["acc"] == ev["acc_full"] == full["acc"]
    assert ev["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_finetune_epoch_trains_the_backbone_and_keeps_the_map(tiny):
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.data.sources import parse_source

    torch.manual_seed(0)
    bb = get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th"))
    idx = np.array([[0, 1], [2, 3], [4, 5]])
    head = heads.DecomposedHead.from_linear(bb.head, idx)
    before = {k: v.clone() for k, v in bb.features.state_dict().items()}
    opt = torch.optim.Adam(list(bb.features.parameters()) + list(head.parameters()), lr=1e-3)
    rows = parse_source(f"imagefolder:{tiny / 'data'}").read_numpy("train")
    out = finetune_epoch(backbone=bb, head=head, optimizer=opt, rows=rows, epoch=1, batch_size=10)
    assert out["n"] == 24 and np.isfinite(out["loss"]) and out["seconds"] > 0
    after = bb.features.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # BN in training mode
    assert torch.equal(head.idx, torch.as_tensor(idx)) and not bb.training


class CountingScaler(torch.amp.GradScaler):
    """A GradScaler that counts its optimizer steps."""

    steps = 0

    def step(self, optimizer, *args, **kwargs):
        self.steps += 1
        return super().step(optimizer, *args, **kwargs)


def test_finetune_epoch_in_fp16_steps_through_the_grad_scaler(tiny):
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.data.sources import parse_source

    torch.manual_seed(0)
    bb = get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th"))
    head = heads.DecomposedHead.from_linear(bb.head, np.array([[0, 1], [2, 3], [4, 5]]))
    before = bb.features.conv1.weight.detach().clone()
    opt = torch.optim.Adam(list(bb.features.parameters()) + list(head.parameters()), lr=1e-3)
    # a few rows: fp16 convolutions are slow on the CPU
    rows = subset_rows(rows=parse_source(f"imagefolder:{tiny / 'data'}").read_numpy("train"), max_rows=8, seed=0)
    scaler = CountingScaler("cpu")  # what Runtime(precision="fp16").grad_scaler() makes on the CPU
    out = finetune_epoch(backbone=bb, head=head, optimizer=opt, rows=rows, epoch=1, batch_size=4,
                         precision="fp16", scaler=scaler)
    assert scaler.is_enabled() and scaler.steps == 2  # 8 rows in batches of 4
    assert out["n"] == 8 and np.isfinite(out["loss"])
    assert torch.isfinite(bb.features.conv1.weight).all() and not torch.equal(before, bb.features.conv1.weight)
    assert bb.features.conv1.weight.dtype == torch.float32  # autocast, not a half-precision model


def test_trainables_refuse_use_gpu_without_cuda(toy, tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # the one device rule (dtd_ray.models.runtime.resolve_device): no silent CPU fallback
    with pytest.raises(RuntimeError, match="no CUDA device"):
        trainables.head_trainable({"idx": IDX.tolist(), "use_gpu": True}, data=dict(toy))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        trainables.finetune_trainable({"idx": [[0], [1], [2]], "dataset": f"imagefolder:{tiny / 'data'}",
                                       "use_gpu": True})


def test_trainable_defaults_are_the_mode_tables():
    from dtd_ray.train import defaults

    assert {k: trainables.HEAD_DEFAULTS[k] for k in defaults.HEAD} == dict(defaults.HEAD)
    assert {k: trainables.FINETUNE_DEFAULTS[k] for k in defaults.FINETUNE} == dict(defaults.FINETUNE)


def test_finetune_trainable_one_epoch_end_to_end_and_resume(ray_local, tiny, tmp_path):
    from dtd_ray.models.backbones import get_backbone

    idx = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    space = {"model": "cifar_resnet20", "weights": str(tiny / "ckpt.th"), "dataset": f"imagefolder:{tiny / 'data'}",
             "idx": idx, "epochs": 2, "lr": 1e-3, "batch_size": 8, "max_train_rows": 16, "max_eval_rows": 12,
             "cpu_threads": 1}
    flaky = _flaky(trainables.finetune_trainable, fail_after_epoch=1, flag=str(tmp_path / "failed_once"))
    rows = []
    grid = _tuner(flaky, param_space=space, tmp_path=tmp_path, name="finetune", max_failures=1,
                  callbacks=[_reported(rows)]).fit()
    assert not grid.errors and (tmp_path / "failed_once").exists()
    res = grid[0]
    df = pd.DataFrame(rows)
    assert df["epoch"].tolist() == [1, 2] and df["resumed_from_epoch"].tolist() == [0, 1]
    assert (df["n_train"] == 16).all() and (df["n_eval"] == 12).all() and (df["device"] == "cpu").all()
    assert {"acc_eval", "loss", "seconds", "acc_decomposed_init", "acc_full"} <= set(df.columns)
    with res.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / trainables.STATE_FILE, weights_only=True)
        assert state["epoch"] == 2 and {"backbone", "head", "optimizer"} <= set(state)
        # the fine-tuned network loads as a backbone whose dense head computes the decomposed logits
        bb = get_backbone("cifar_resnet20", weights=str(Path(d) / trainables.MODEL_FILE))
    w = bb.head.weight.detach()
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, torch.tensor(idx), True)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w.gather(1, torch.tensor(idx)), state["head"]["weight"])
    initial = get_backbone("cifar_resnet20", weights=str(tiny / "ckpt.th"))
    assert not torch.equal(bb.features.conv1.weight, initial.features.conv1.weight)
