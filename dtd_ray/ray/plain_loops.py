"""The plain loops that ``jobs/bench_extract.py`` compares the extraction pipeline with (README, "Extraction
speed"): the same work as the pipeline's, in one process and, for image folders, a ``DataLoader``'s workers.

Each returns :func:`dtd_ray.ray.benchmark.run_figures` of its run, with its CPU split into this process
(``main``) and its DataLoader workers (``loader``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from dtd_ray.ray.benchmark import is_image, run_figures


class _HWCUint8:
    """PIL image -> uint8 HWC tensor (what the pipeline's prepare stage hands the model)."""

    def __call__(self, img):
        import numpy as np
        import torch

        arr = np.array(img, dtype=np.uint8)
        return torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr)


def plain_folder(*, root: str, model: str, weights: str | None, device: str, batch_size: int, kmax: int,
                 workers: int) -> dict[str, Any]:
    """The strong plain loop over an image folder (README, "Extraction speed"): ImageFolder decoding in a
    DataLoader, the project's input path on the device, forward_features, head, ranked top-k, all to the host."""
    import torch

    from dtd_ray.core.counting import rank_topk
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.models.runtime import Runtime
    from dtd_ray.ray import procstats

    t0, c0 = time.perf_counter(), procstats.cpu_split()
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # one model call at a time: all the cores
    bb = get_backbone(model, weights=weights)
    pre = bb.preprocessing
    it = _folder_loader(root=root, preprocessing=pre, batch_size=batch_size, workers=workers, pin=device == "cuda")
    rt = Runtime(device=torch.device(device), precision="auto", mean=pre.mean, std=pre.std, channels_last=True)
    bb = rt.prepare(bb.eval())  # the DataLoader's workers already decode meanwhile
    n, t_first, first_rows = 0, None, 0
    with torch.inference_mode():
        for x, _ in it:
            with rt.autocast():
                f = bb.forward_features(rt.images(x)).float()
            idx, val = rank_topk(f, min(kmax, bb.feature_dim))
            _ = (bb.head(f).argmax(1).to(torch.int32).cpu(), idx.to(torch.int32).cpu(), val.cpu(), f.cpu())
            n += len(x)
            if t_first is None:
                t_first, first_rows = time.perf_counter() - t0, len(x)
    return run_figures(rows=n, seconds=time.perf_counter() - t0, t_first=t_first, first_rows=first_rows,
                       **_cpu_since(c0))


def _folder_loader(*, root: str, preprocessing: Any, batch_size: int, workers: int, pin: bool):
    """An iterator over ``(uint8 NHWC images, labels)`` batches of an image folder: torchvision's
    ``ImageFolder`` (PIL decoding, the preprocessing's resize and centre crop) in a ``DataLoader``."""
    import torch
    import torchvision
    import torchvision.transforms as T

    pre = preprocessing
    steps = [] if pre.resize is None else [
        T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation), antialias=True),
        T.CenterCrop(pre.size)]
    ds = torchvision.datasets.ImageFolder(root, transform=T.Compose([*steps, _HWCUint8()]), is_valid_file=is_image)
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=pin))


def _cpu_since(c0: tuple[float, float]) -> dict[str, Any]:
    """:func:`run_figures`' ``cpu_s`` and ``cpu_by_kind`` since ``c0`` (:func:`procstats.cpu_split`): this
    process (``main``) and its joined children (``loader``: a DataLoader's workers)."""
    from dtd_ray.ray import procstats

    own, children = (b - a for a, b in zip(c0, procstats.cpu_split()))
    return {"cpu_s": own + children, "cpu_by_kind": {"main": own, "loader": children}}


def _records_loop(batches, *, ext: Any, rows_per_file: int, out_dir: str, t0: float) -> tuple[int, float | None, int]:
    """The plain loops' model and writes: ``ext`` (the FeatureExtractor callable) on every batch and
    ``write_part`` every ``rows_per_file`` rows, in this process; ``(rows, first output s, its rows)``."""
    from dtd_ray.io.records import concat_records, write_part

    os.makedirs(out_dir, exist_ok=True)
    n, t_first, first_rows, pending, held = 0, None, 0, [], 0
    for batch in batches:
        pending.append(ext(batch))
        n, held = n + len(pending[-1]["sample_id"]), held + len(pending[-1]["sample_id"])
        if t_first is None:
            t_first, first_rows = time.perf_counter() - t0, n
        if held >= rows_per_file:
            write_part(concat_records(pending), staging_uri=out_dir)
            pending, held = [], 0
    if pending:
        write_part(concat_records(pending), staging_uri=out_dir)
    return n, t_first, first_rows


def plain_proxy(*, spec: str, split: str, model: str, device: str, batch_size: int, kmax: int,
                rows_per_file: int, out_dir: str) -> dict[str, Any]:
    """The array proxy's plain loop: prepare_batch, the FeatureExtractor callable and write_part (every
    ``rows_per_file`` rows) one after the other in one process: the pipeline's work without Ray Data."""
    from dtd_ray.data.sources import parse_source
    from dtd_ray.data.transforms import prepare_batch
    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.models.extractor import FeatureExtractor
    from dtd_ray.ray import procstats

    t0, c0 = time.perf_counter(), procstats.cpu_split()
    cols = parse_source(spec).read_numpy(split)
    pre = get_backbone(model, weights=None).preprocessing
    ext = FeatureExtractor(model=model, weights=None, kmax=kmax, use_gpu=device == "cuda",
                           cpu_threads=os.cpu_count() or 1)
    total = len(cols["sample_id"])
    batches = (prepare_batch({k: v[lo:lo + batch_size] for k, v in cols.items()}, preprocessing=pre)
               for lo in range(0, total, batch_size))
    n, t_first, first_rows = _records_loop(batches, ext=ext, rows_per_file=rows_per_file, out_dir=out_dir, t0=t0)
    return run_figures(rows=n, seconds=time.perf_counter() - t0, t_first=t_first, first_rows=first_rows,
                       **_cpu_since(c0))


def plain_pngproxy(*, root: str, model: str, device: str, batch_size: int, kmax: int, workers: int,
                   rows_per_file: int, out_dir: str) -> dict[str, Any]:
    """The PNG proxy's plain loop: a ``DataLoader`` whose ``workers`` (all cores) decode the folder's images,
    and in this process the FeatureExtractor callable and write_part every ``rows_per_file`` rows: the
    pipeline's work, decode-bound as a GPU run is, without Ray Data."""
    import torch

    from dtd_ray.models.backbones import get_backbone
    from dtd_ray.models.extractor import FeatureExtractor
    from dtd_ray.ray import procstats

    t0, c0 = time.perf_counter(), procstats.cpu_split()
    pre = get_backbone(model, weights=None).preprocessing
    it = _folder_loader(root=root, preprocessing=pre, batch_size=batch_size, workers=workers, pin=device == "cuda")
    ext = FeatureExtractor(model=model, weights=None, kmax=kmax, use_gpu=device == "cuda",
                           cpu_threads=os.cpu_count() or 1)

    def batches():
        start = 0
        for x, y in it:
            ids = torch.arange(start, start + len(x))
            start += len(x)
            yield {"image": x.numpy(), "sample_id": ids.numpy(), "label": y.numpy()}

    n, t_first, first_rows = _records_loop(batches(), ext=ext, rows_per_file=rows_per_file, out_dir=out_dir, t0=t0)
    return run_figures(rows=n, seconds=time.perf_counter() - t0, t_first=t_first, first_rows=first_rows,
                       **_cpu_since(c0))
