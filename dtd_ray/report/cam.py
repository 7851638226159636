"""Class-specific activation maps: where in the image a class's selected channels fire.

For a few test images per class, the class's selected channels of the backbone's last
block (before pooling) are summed and upsampled over the image, beside the same with
the random strategy's channels: once on one colour scale per image (with its colour bar),
once each on its own scale (``cam_<model>.png``). :mod:`dtd_ray.stages.localise` measures
what these pictures suggest.
The channel indices of a class map are exactly the last block's channels, since the
penultimate features are their global average (see :func:`last_block_maps`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from dtd_ray.core import localisation, selection
from dtd_ray.data.transforms import prepare_batch
from dtd_ray.io.maptables import map_from_table
from dtd_ray.models.runtime import Runtime
from dtd_ray.stages.units import last_block_maps, load_unit_backbone, unit_source

def class_activation_maps(*, feature_maps: Any, channels: Any, size: int) -> np.ndarray:
    """``M_n = up(Σ_{c ∈ channels[n]} A[n, c])``: the chosen channels summed, upsampled to ``size``².

    ``feature_maps`` A is (N, C, h, w); ``channels`` is (N, k) channel indices per
    instance (its class's map). ``up`` is bilinear interpolation (align_corners False)
    to ``size × size``. Returns (N, size, size) float32, not normalised.
    """
    a = torch.as_tensor(np.asarray(feature_maps), dtype=torch.float32)
    idx = torch.as_tensor(np.asarray(channels), dtype=torch.long)
    if a.ndim != 4 or idx.ndim != 2 or idx.shape[0] != a.shape[0]:
        raise ValueError(f"need feature maps (N, C, h, w) and channels (N, k), got {tuple(a.shape)} and {tuple(idx.shape)}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= a.shape[1]):
        raise ValueError(f"channel index out of range [0, {a.shape[1]})")
    # The same two steps the localisation scores use (dtd_ray.core.localisation), so the pictures show what is measured.
    return localisation.upsample(localisation.channel_sum(feature_maps=a, channels=idx), size=size)


def cam_figure(
    *,
    unit: dict[str, Any],
    maps_file: str,
    k: int,
    strategy: str,
    n_images: int,
    max_classes: int,
    split: str,
    path: str,
    correct_only: bool = True,
) -> dict[str, Any]:
    """Draw the activation-map figure of one model; returns what it showed (or why not)."""
    # The sweep's absolute paths where they exist here, else the configured ones from here.
    backbone = load_unit_backbone(unit)
    maps = pd.read_parquet(maps_file)
    k1 = k if strategy == "frequency" else selection.K1_NOT_APPLICABLE
    sel = map_from_table(maps, strategy=strategy, k1=k1, k2=k).idx
    rnd = map_from_table(maps, strategy="random", k1=selection.K1_NOT_APPLICABLE, k2=k).idx \
        if (maps["strategy"] == "random").any() else \
        selection.select_random(num_classes=sel.shape[0], feature_dim=backbone.feature_dim, k2=k, seed=0).idx
    src = unit_source(unit)
    cols = src.read_numpy(split)
    labels = np.asarray(cols["label"])
    C = min(backbone.num_classes, max_classes)
    pre = backbone.preprocessing
    # The CPU in strict fp32: a few images per class need no GPU, and the maps stay reproducible anywhere.
    rt = Runtime(device=torch.device("cpu"), precision="fp32", mean=pre.mean, std=pre.std)
    picked: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # class, image, cam sel, cam rnd
    with torch.inference_mode():
        for c in range(C):
            rows = np.flatnonzero(labels == c)[: 8 * max(1, n_images)]
            if not len(rows):
                continue
            batch = {name: np.asarray(v)[rows] for name, v in cols.items()}
            prep = prepare_batch(batch, preprocessing=pre)
            ok = prep["ok"]
            imgs = prep["image"][ok]
            x = rt.images(imgs)
            a = last_block_maps(backbone, x)
            if a.shape[1] != backbone.feature_dim:
                raise ValueError(f"{unit['key']}: the last block has {a.shape[1]} channels but the head "
                                 f"reads {backbone.feature_dim} features; channel maps do not match the map")
            pred = backbone.head(a.mean((2, 3))).argmax(1).numpy()
            good = np.flatnonzero((pred == c) | (not correct_only))[:n_images]
            if not len(good):
                continue
            cs = class_activation_maps(feature_maps=a[good], channels=np.repeat(sel[c][None], len(good), 0),
                                       size=imgs.shape[1])
            cr = class_activation_maps(feature_maps=a[good], channels=np.repeat(rnd[c][None], len(good), 0),
                                       size=imgs.shape[1])
            for j, g in enumerate(good):
                picked.append((c, imgs[g], cs[j], cr[j]))
    if not picked:
        return {"model": unit["key"], "shown": 0,
                "reason": "no correctly classified test image" if correct_only else "no test image"}
    classes = list(src.classes)[:C]
    rows_c = sorted({p[0] for p in picked})
    ncol = 5 * n_images  # per image: image | selected, random (shared scale) | selected, random (own scale)
    w, h = 1.2 * ncol + 0.45 * n_images, 1.3 * len(rows_c) + 1.0
    # A fixed grid, not the report's constrained layout: its solver over this figure's hundred-odd
    # axes and colour bars took most of the report's time, and every panel here has the same size.
    fig = Figure(figsize=(w, h), dpi=110)
    fig.subplots_adjust(left=0.8 / w, right=1 - 0.1 / w, top=1 - 0.7 / h, bottom=0.85 / h, wspace=0.5, hspace=0.3)
    axes = fig.subplots(len(rows_c), ncol, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    # Shared scale: one colour scale per image for both maps (the larger of the two maxima), so
    # the random channels' map is drawn weaker where its activations are weaker; its colour bar
    # gives the scale. Own scale: each map from 0 to its own maximum, so where a weak map puts
    # its mass stays visible (a shared scale alone would hide it).
    ratio = []
    for r, c in enumerate(rows_c):
        items = [p for p in picked if p[0] == c]
        for j, (_, img, ms, mr_) in enumerate(items):
            vmax = max(float(ms.max()), float(mr_.max()), 1e-8)
            ratio.append(float(ms.sum()) / max(float(mr_.sum()), 1e-8))
            grey = img[..., 0] if img.shape[-1] == 1 else None
            panels = [(None, "image", None), (ms, f"{strategy} k={k}\n(shared scale)", vmax),
                      (mr_, f"random k={k}\n(shared scale)", vmax),
                      (ms, f"{strategy}\n(own scale)", max(float(ms.max()), 1e-8)),
                      (mr_, "random\n(own scale)", max(float(mr_.max()), 1e-8))]
            shared = None
            for col, (m, title, top) in enumerate(panels):
                ax = axes[r, 5 * j + col]
                if grey is not None:
                    ax.imshow(grey, cmap="gray")
                else:
                    ax.imshow(img)
                if m is not None:
                    im = ax.imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=top)
                    if col == 1:
                        shared = im
                if r == 0:
                    ax.set_title(title, fontsize=6)
            # in the gap right of the pair it scales (an inset: the panels keep their size)
            cb = fig.colorbar(shared, cax=axes[r, 5 * j + 2].inset_axes([1.04, 0.0, 0.06, 1.0]))
            cb.ax.tick_params(labelsize=5)
            axes[r, 5 * j].text(-0.1, 0.5, classes[c] if j == 0 else "", transform=axes[r, 5 * j].transAxes,
                                ha="right", va="center", fontsize=7)
    own = ScalarMappable(norm=Normalize(0, 1), cmap="jet")
    cb = fig.colorbar(own, cax=fig.add_axes((0.3, 0.45 / h, 0.4, 0.1 / h)), orientation="horizontal")
    cb.set_label("own scale: the map over its own maximum", fontsize=6)
    cb.ax.tick_params(labelsize=5)
    fig.suptitle(f"{unit['key']}: last-block channels of the class's map (k = {k}) vs random channels", fontsize=9)
    fig.savefig(path)
    return {"model": unit["key"], "shown": len(picked), "classes": len(rows_c),
            "mass_ratio_median": float(np.median(ratio))}
