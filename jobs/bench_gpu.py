"""GPU checks of the model-side code paths, in plain PyTorch (no Ray needed on the GPU box).

    python jobs/bench_gpu.py --data DIR --out gpu.json

DIR holds ``cifar10_test.npz`` (``images`` uint8 N×32×32×3, ``labels``) and
``resnet20-12fca82f.th``; ``python jobs/bench_gpu.py prepare --shared ../shared/data --data DIR``
writes them from the shared CIFAR-10 PNGs. Measures, on the one visible GPU:

1. the extraction callable in bf16 + channels_last against fp32: feature relative error,
   top-5 set agreement, accuracy of both;
2. images/s of the callable (numpy in, numpy out) and of the bare forward, for
   cifar_resnet20 at batch 2048 and resnet50 at 224 px, batch 256;
3. the decomposed head on the GPU: module = masked full FC;
4. one fine-tuning epoch (50k images) of resnet20 through a decomposed head (Adam, lr 1e-4): the
   project's own ``finetune_epoch`` against a plain loop with the data resident on the GPU (crop + flip
   there), in fp16 (with a loss scaler: "auto") and bf16, at batch 128 and 512.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from dtd_ray import cli
from dtd_ray.config import config_class
from dtd_ray.models.extractor import FeatureExtractor


@config_class
class PrepareConfig:
    shared: Annotated[str, Field(description="the shared data folder (cifar10/test PNGs, cifar_resnets/)")] = "../shared/data"
    data: Annotated[str, Field(description="where cifar10_test.npz and the checkpoint go (git-ignored)")] = ".devdata"


@config_class
class GpuConfig:
    data: Annotated[str, Field(description="the folder `prepare` wrote")] = ".devdata"
    out: Annotated[str, Field(description="the JSON of the figures")] = "gpu.json"


def prepare(cfg: PrepareConfig) -> None:
    """Write cifar10_test.npz and copy the resnet20 checkpoint into ``cfg.data`` (git-ignored)."""
    shared, data = cfg.shared, cfg.data
    import shutil

    from PIL import Image

    root = os.path.join(shared, "cifar10", "test")
    classes = sorted(os.listdir(root))
    imgs, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c))):
            imgs.append(np.asarray(Image.open(os.path.join(root, c, f)).convert("RGB")))
            labels.append(i)
    os.makedirs(data, exist_ok=True)
    np.savez(os.path.join(data, "cifar10_test.npz"), images=np.stack(imgs), labels=np.array(labels))
    shutil.copy(os.path.join(shared, "cifar_resnets", "resnet20-12fca82f.th"), data)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(fn, n_items: int, *, warmup: int = 3, iters: int = 10) -> float:
    """Median items/s of ``fn`` over ``iters`` timed calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return n_items / statistics.median(times)


def check_precision(data: str) -> dict:
    z = np.load(os.path.join(data, "cifar10_test.npz"))
    images, labels = z["images"], z["labels"]
    ckpt = os.path.join(data, "resnet20-12fca82f.th")
    kw = dict(model="cifar_resnet20", weights=ckpt, normalization="cifar10", kmax=64, use_gpu=True)
    batch = {"image": images, "sample_id": np.arange(len(images)), "label": labels}
    # The reference is strict fp32 (the extractor switches cuDNN's default TF32 off for "fp32").
    a = FeatureExtractor(precision="fp32", channels_last=False, **kw)(batch)
    out = {"n": int(len(images)), "acc_fp32": float((a["pred"] == labels).mean() * 100)}
    for prec in ("bf16", "fp16", "tf32"):
        b = FeatureExtractor(precision=prec, channels_last=True, **kw)(batch)
        fa, fb = a["features"], b["features"]
        rel = np.linalg.norm(fb - fa, axis=1) / np.maximum(np.linalg.norm(fa, axis=1), 1e-12)
        top5 = np.mean([set(x[:5]) == set(y[:5]) for x, y in zip(a["topk_idx"], b["topk_idx"])])
        out[f"{prec}+cl"] = {
            "feature_rel_err_median": float(np.median(rel)),
            "feature_rel_err_p99": float(np.quantile(rel, 0.99)),
            "feature_rel_err_max": float(rel.max()),
            "top5_sets_equal_frac": float(top5),
            "acc": float((b["pred"] == labels).mean() * 100),
        }
    return out


def check_throughput(data: str) -> dict:
    out = {}
    ckpt = os.path.join(data, "resnet20-12fca82f.th")
    z = np.load(os.path.join(data, "cifar10_test.npz"))
    cases = [
        ("cifar_resnet20", ckpt, 2048, np.resize(z["images"], (2048, 32, 32, 3))),
        ("resnet50", None, 256, np.random.default_rng(0).integers(0, 256, (256, 224, 224, 3), dtype=np.uint8)),
    ]
    for name, weights, bs, imgs in cases:
        for prec, cl in (("fp32", False), ("tf32", True), ("bf16", False), ("bf16", True), ("fp16", True)):
            ext = FeatureExtractor(model=name, weights=weights, kmax=64, use_gpu=True, precision=prec,
                                   channels_last=cl)
            batch = {"image": imgs, "sample_id": np.arange(bs), "label": np.zeros(bs)}
            key = f"{name}/{prec}{'+cl' if cl else ''}"
            with torch.inference_mode():
                # numpy uint8 → device → normalise → features (what the callable does before the head)
                out[f"{key}/features_from_numpy_img_s"] = _rate(lambda: ext.features(imgs), bs)
                xd = torch.randn(bs, 3, imgs.shape[1], imgs.shape[2], device="cuda")
                if cl:
                    xd = xd.contiguous(memory_format=torch.channels_last)

                def fwd():
                    with torch.autocast("cuda", dtype=ext.runtime.dtype or torch.bfloat16,
                                        enabled=ext.runtime.dtype is not None):
                        ext.backbone.forward_features(xd)

                out[f"{key}/bare_forward_img_s"] = _rate(fwd, bs)
            out[f"{key}/callable_img_s"] = _rate(lambda: ext(batch), bs)
            ext = None  # free the model before the next case
            torch.cuda.empty_cache()
    return out


def check_head() -> dict:
    from dtd_ray.core.heads import DecomposedHead, masked_logits

    g = torch.Generator().manual_seed(0)
    C, m, k2, n = 1000, 2048, 50, 4096
    W, b = torch.randn(C, m, generator=g), torch.randn(C, generator=g)
    idx = torch.stack([torch.randperm(m, generator=g)[:k2] for _ in range(C)])
    f = torch.rand(n, m, generator=g)
    head = DecomposedHead(weight=W, bias=b, idx=idx).cuda()
    with torch.inference_mode():
        z = head(f.cuda()).double().cpu()
    ref = masked_logits(features=f, weight=W, bias=b, idx=idx)
    return {"head_max_abs_diff_vs_masked_fc": float((z - ref).abs().max()), "C": C, "m": m, "k2": k2}


def _finetune_setup(data: str, *, device: str = "cuda", seed: int = 0):
    """resnet20 (the shared checkpoint) on ``device`` with a decomposed head (k=5, a seeded random map) and
    Adam at the paper's lr 1e-4 over the feature module and the head."""
    from dtd_ray.core.heads import DecomposedHead
    from dtd_ray.models.backbones import get_backbone

    torch.manual_seed(seed)
    bb = get_backbone("cifar_resnet20", weights=os.path.join(data, "resnet20-12fca82f.th"),
                      normalization="cifar10").to(device)
    idx = torch.stack([torch.randperm(64)[:5] for _ in range(10)]).to(device)
    head = DecomposedHead.from_linear(bb.head, idx).to(device)
    opt = torch.optim.Adam(list(bb.features.parameters()) + list(head.parameters()), lr=1e-4)
    return bb, head, opt


def plain_finetune_epoch(images: torch.Tensor, labels: torch.Tensor, *, models, batch_size: int, steps: int,
                         dtype: torch.dtype) -> float:
    """The plain loop an expert writes, as the baseline: every image resident on the GPU, normalisation,
    4-px pad + random crop + flip there, ``dtype`` autocast (a loss scaler under fp16), channels_last;
    ``steps`` steps of ``batch_size`` random images; ``models``: :func:`_finetune_setup`'s. Returns the
    loss of the last step."""
    import torch.nn.functional as F

    from dtd_ray.models.runtime import normalize_images

    bb, head, opt = models
    bb = bb.to(memory_format=torch.channels_last).train()
    dev = images.device
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    mean = torch.tensor(bb.preprocessing.mean, device=dev)
    std = torch.tensor(bb.preprocessing.std, device=dev)
    n = len(images)
    loss = torch.zeros((), device=dev)
    for _ in range(steps):
        sel = torch.randint(0, n, (batch_size,), device=dev)
        x = F.pad(normalize_images(images[sel], mean=mean, std=std), (4, 4, 4, 4))
        i, j = np.random.randint(0, 9, 2)
        x = x[:, :, i:i + 32, j:j + 32]
        if np.random.rand() < 0.5:
            x = x.flip(3)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=dtype):
            loss = F.cross_entropy(head(bb.forward_features(x).float()), labels[sel])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return float(loss.detach())


def time_finetune(data: str, *, batch_size: int = 128, epoch_images: int = 50_000,
                  precisions: tuple[str, ...] = ("fp16", "bf16"), device: str = "cuda") -> dict:
    """One fine-tuning epoch (``epoch_images`` images: CIFAR-10 test repeated) of resnet20 through a
    decomposed head, timed for the project's own ``dtd_ray.train.finetune.finetune_epoch`` (what the
    sweep's finetune trials run: prepare + CIFAR augmentation on the CPU in a prefetch thread, the
    Runtime's device, precision and memory format) and for :func:`plain_finetune_epoch`, per precision:
    epoch seconds, images/s and the ratio project / plain. "auto" is fp16 (``models.runtime``); bf16 is
    timed beside it so that the policy rests on a measurement. (``device="cpu"``: the test suite's smoke run.)"""
    from dtd_ray.train.finetune import finetune_epoch

    z = np.load(os.path.join(data, "cifar10_test.npz"))
    reps = -(-epoch_images // len(z["labels"]))
    rows = {"image": np.tile(z["images"], (reps, 1, 1, 1))[:epoch_images],
            "label": np.tile(z["labels"], reps)[:epoch_images].astype(np.int64),
            "sample_id": np.arange(epoch_images, dtype=np.int64)}
    images_gpu = torch.from_numpy(rows["image"]).to(device)
    labels_gpu = torch.from_numpy(rows["label"]).to(device)
    warm = {k: v[:4 * batch_size] for k, v in rows.items()}
    out: dict = {"batch_size": batch_size, "epoch_images": epoch_images}
    for prec in precisions:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[prec]
        bb, head, opt = _finetune_setup(data, device=device)
        finetune_epoch(backbone=bb, head=head, optimizer=opt, rows=warm, epoch=0, batch_size=batch_size,
                       device=device, precision=prec)
        _sync()
        t0 = time.perf_counter()
        r = finetune_epoch(backbone=bb, head=head, optimizer=opt, rows=rows, epoch=1, batch_size=batch_size,
                           device=device, precision=prec)
        _sync()
        proj_s = time.perf_counter() - t0
        steps = epoch_images // batch_size
        models = _finetune_setup(data, device=device)
        plain_finetune_epoch(images_gpu, labels_gpu, models=models, batch_size=batch_size, steps=5, dtype=dtype)
        _sync()
        t0 = time.perf_counter()
        plain_loss = plain_finetune_epoch(images_gpu, labels_gpu, models=models, batch_size=batch_size, steps=steps,
                                          dtype=dtype)
        _sync()
        plain_s = time.perf_counter() - t0
        out[prec] = {
            "project_epoch_s": round(proj_s, 3), "project_img_s": round(r["n"] / proj_s, 1),
            "project_loss": r["loss"], "project_acc_train": r["acc_train"],
            "plain_epoch_s": round(plain_s, 3), "plain_img_s": round(steps * batch_size / plain_s, 1),
            "plain_last_loss": plain_loss, "ratio": round((r["n"] / proj_s) / (steps * batch_size / plain_s), 3),
        }
    return out


def run(cfg: GpuConfig) -> dict:
    data, out = cfg.data, cfg.out
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible")
    torch.backends.cudnn.benchmark = True
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (("precision", lambda: check_precision(data)), ("throughput", lambda: check_throughput(data)),
                     ("head", check_head),
                     ("finetune", lambda: {"b128": time_finetune(data, batch_size=128),
                                           "b512": time_finetune(data, batch_size=512)})):
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # keep the other checks' figures if one fails
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[gpu] {name} ({time.perf_counter() - t0:.1f} s): {json.dumps(res[name], indent=1)}", flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    # On the GPU box, `. .devray/on-device.sh` brings fire and pydantic (README, "GPU measurement").
    summary = __doc__.strip().splitlines()[0]
    cli.main({None: cli.Command(summary=summary, config=GpuConfig, run=run),
              "prepare": cli.Command(summary="Write the GPU check's data folder.", config=PrepareConfig, run=prepare)})
