"""jobs/bench_gpu.py's fine-tuning timing, run on the CPU at toy size: it times the project's own
``finetune_epoch`` (not a copy of the loop) against the plain GPU-resident loop, for both precisions,
and every figure it reports is consistent. The GPU box runs the same code at full size."""

from __future__ import annotations

import numpy as np
import torch

from jobs import bench_gpu


def test_time_finetune_times_the_projects_epoch_against_the_plain_loop(tmp_path, monkeypatch):
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.train import finetune

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar10_test.npz", images=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, 16))
    torch.manual_seed(0)
    model = get_backbone("cifar_resnet20", weights=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "resnet20-12fca82f.th")
    calls = []
    real = finetune.finetune_epoch

    def spy(**kw):
        calls.append((kw["precision"], len(kw["rows"]["label"]), kw["batch_size"]))
        return real(**kw)

    monkeypatch.setattr(finetune, "finetune_epoch", spy)
    out = bench_gpu.time_finetune(str(tmp_path), batch_size=8, epoch_images=24, device="cpu")
    # per precision: a warm-up epoch on 4 batches (all 24 rows here), then the timed epoch over all 24 images
    assert calls == [("fp16", 24, 8), ("fp16", 24, 8), ("bf16", 24, 8), ("bf16", 24, 8)]
    assert out["batch_size"] == 8 and out["epoch_images"] == 24
    for prec in ("fp16", "bf16"):
        r = out[prec]
        assert r["project_img_s"] > 0 and r["plain_img_s"] > 0
        # the same number of images on both sides here, so the ratio of rates is the ratio of epoch times
        assert abs(r["ratio"] - r["plain_epoch_s"] / r["project_epoch_s"]) <= 0.02 * r["ratio"]
        assert np.isfinite(r["project_loss"]) and np.isfinite(r["plain_last_loss"])
        assert 0.0 <= r["project_acc_train"] <= 100.0
