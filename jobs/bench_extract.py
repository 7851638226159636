"""Benchmark: the Ray extraction pipeline against a plain PyTorch loop.

    python jobs/bench_extract.py --data ../shared/data --models cifar_resnet20,cifar_resnet56 --repeats 3

Both read the CIFAR-10 test PNGs, run the same backbone on the same device with the
same batch size and compute features, logits and the ranked top-k; the pipeline also
writes Parquet. Prints images/s of each (median over repeats) and the ratio
pipeline / plain; the target on a 2-core CPU machine is >= 0.9.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CKPT = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet32": "resnet32-d509ac18.th",
    "cifar_resnet44": "resnet44-014dd654.th",
    "cifar_resnet56": "resnet56-4bfd9763.th",
}


def plain_loop(*, model: str, weights: str, folder: str, batch_size: int, kmax: int, workers: int) -> float:
    """images/s of torchvision ImageFolder + DataLoader + forward + top-k (no Ray, no writes)."""
    import torch
    import torchvision
    import torchvision.transforms as T

    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.core.counting import rank_topk

    torch.set_num_threads(os.cpu_count() or 1)
    bb = get_backbone(model, weights=weights).eval()
    pre = bb.preprocessing
    ds = torchvision.datasets.ImageFolder(folder, transform=T.Compose([T.ToTensor(), T.Normalize(pre.mean, pre.std)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for x, _ in loader:
            f = bb.forward_features(x)
            bb.head(f).argmax(1)
            rank_topk(f, kmax)
            n += len(x)
    return n / (time.perf_counter() - t0)


def ray_pipeline(*, model: str, weights: str, data: str, batch_size: int, kmax: int) -> tuple[float, float]:
    """(images/s of the pipeline's execution, images/s including planning and commit)."""
    from dtd_ray.ray.extract import ExtractConfig, run_extract

    with tempfile.TemporaryDirectory() as out:
        cfg = ExtractConfig(model=model, weights=weights, dataset=f"imagefolder:{data}", splits=("test",),
                            output=out, kmax=kmax, batch_size=batch_size)
        t0 = time.perf_counter()
        summary = run_extract(cfg)
        total = time.perf_counter() - t0
    return summary["images_per_s"], summary["rows"] / total


def main(data: str = "../shared/data", models: str = "cifar_resnet20,cifar_resnet56", repeats: int = 3,
         batch_size: int = 256, kmax: int = 64, workers: int = 1):
    """Run the benchmark; `data` is the folder holding cifar10/ and cifar_resnets/."""
    import ray

    folder = os.path.join(data, "cifar10")
    if not os.path.isdir(folder):
        sys.exit(f"error: {folder} not found (pass --data to the folder with cifar10/ and cifar_resnets/)")
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for model in [m for m in str(models).split(",") if m]:
        weights = os.path.join(data, "cifar_resnets", _CKPT[model])
        plain, pipe, pipe_total = [], [], []
        for r in range(repeats):  # interleaved, so drift on a noisy machine hits both alike
            plain.append(plain_loop(model=model, weights=weights, folder=os.path.join(folder, "test"),
                                    batch_size=batch_size, kmax=kmax, workers=workers))
            p, t = ray_pipeline(model=model, weights=weights, data=folder, batch_size=batch_size, kmax=kmax)
            pipe.append(p)
            pipe_total.append(t)
            print(f"[bench] {model} repeat {r}: plain {plain[-1]:,.0f} img/s, ray {p:,.0f} img/s "
                  f"({t:,.0f} incl. planning)", flush=True)
        rows.append((model, statistics.median(plain), statistics.median(pipe), statistics.median(pipe_total)))
    ray.shutdown()
    print(f"\n{'model':<16}{'plain img/s':>13}{'ray img/s':>12}{'ratio':>8}{'ray e2e img/s':>15}{'e2e ratio':>11}")
    for model, pl, rp, rt in rows:
        print(f"{model:<16}{pl:>13,.0f}{rp:>12,.0f}{rp / pl:>8.2f}{rt:>15,.0f}{rt / pl:>11.2f}")
    print(f"(medians of {repeats}; CIFAR-10 test, 10,000 images, batch {batch_size}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    fire.Fire(main)
