"""Localisation of class maps: does a class's map put its mass on the object?

The test images are pasted into a larger canvas at a known box (``dtd_ray.data.canvas``);
a network run fully convolutionally on the canvas gives last-block maps ``A`` (N, C, h, w).
Per image, for its true class ``y``, a spatial map ``M`` is built from ``A`` and scored
against the box ``B = [x0, x1) × [y0, y1)`` (half-open pixel ranges of the canvas):

* :func:`channel_sum` — ``M_n = Σ_{c ∈ I_n} A[n, c]`` (the class's selected channels, or
  any other channel set: top-|W|, random);
* :func:`weighted_sum` — ``M_n = Σ_j w[n, j] · A[n, j]`` over all channels; with
  ``w[n] = W[y_n]`` (the head's row of the true class) this is the class activation map
  (CAM) of Zhou et al. 2016;
* :func:`upsample` — bilinear to the canvas size (``align_corners=False``), so every map is
  scored on the canvas's pixel grid, where the box is exact;
* :func:`energy_in_box` — ``E = Σ_{p ∈ B} max(M_p, 0) / Σ_p max(M_p, 0)``; a map with no
  positive mass (``Σ_p max(M_p, 0) = 0``) scores ``E = 0`` and is flagged, not dropped;
* :func:`pointing_game` — ``1`` iff ``argmax_p M_p ∈ B`` (the first maximum in row-major
  order); a constant map has nothing to point at and scores ``0``;
* :func:`uniform_energy` — the score of a uniform map, ``|B| / (H · W)``: the baseline of both
  scores (a point drawn uniformly from the canvas falls in ``B`` with that probability);
* :func:`random_channel_sets` — the random baseline's channel sets, seeded per (seed, class).

numpy/torch only (the core layer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    return int(h), int(w)


def _feature_maps(feature_maps: Any) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(feature_maps) if not isinstance(feature_maps, torch.Tensor) else feature_maps)
    if a.ndim != 4:
        raise ValueError(f"need feature maps (N, C, h, w), got shape {tuple(a.shape)}")
    return a.float()


def channel_sum(*, feature_maps: Any, channels: Any) -> np.ndarray:
    """``M_n = Σ_{c ∈ channels[n]} A[n, c]`` (N, h, w) float32, from ``A`` (N, C, h, w) and ``channels`` (N, k).

    A channel listed twice counts twice (a class map never repeats one)."""
    a = _feature_maps(feature_maps)
    idx = torch.as_tensor(np.asarray(channels), dtype=torch.long)
    if idx.ndim != 2 or idx.shape[0] != a.shape[0]:
        raise ValueError(f"need channels (N, k) for {a.shape[0]} maps, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= a.shape[1]):
        raise ValueError(f"channel index out of range [0, {a.shape[1]})")
    picked = torch.gather(a, 1, idx[:, :, None, None].expand(-1, -1, a.shape[2], a.shape[3]))
    return picked.sum(1).numpy()


def weighted_sum(*, feature_maps: Any, weights: Any) -> np.ndarray:
    """``M_n = Σ_j w[n, j] · A[n, j]`` (N, h, w) float32, from ``A`` (N, C, h, w) and ``w`` (N, C).

    With ``w[n] = W[y_n]`` (the linear head's row of instance ``n``'s class) this is the CAM:
    its spatial mean plus ``b_y`` is the class's logit, since the features are ``A``'s spatial mean."""
    a = _feature_maps(feature_maps)
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    if w.shape != a.shape[:2]:
        raise ValueError(f"need weights (N, C) = {tuple(a.shape[:2])}, got {tuple(w.shape)}")
    return torch.einsum("nc,nchw->nhw", w, a).numpy()


def upsample(maps: Any, *, size: int | tuple[int, int]) -> np.ndarray:
    """Maps (N, h, w) bilinearly resized to ``size`` (N, H, W) float32 (torch, ``align_corners=False``)."""
    m = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    if m.ndim != 3:
        raise ValueError(f"need maps (N, h, w), got shape {tuple(m.shape)}")
    return F.interpolate(m[:, None], size=_as_size(size), mode="bilinear", align_corners=False)[:, 0].numpy()


def check_boxes(boxes: Any, *, size: int | tuple[int, int], n: int | None = None) -> np.ndarray:
    """``boxes`` (N, 4) as int64 ``x0, y0, x1, y1`` with ``0 ≤ x0 < x1 ≤ W`` and ``0 ≤ y0 < y1 ≤ H``,
    or a one-line error."""
    H, W = _as_size(size)
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4 or (n is not None and b.shape[0] != n):
        raise ValueError(f"need boxes ({'N' if n is None else n}, 4) as x0, y0, x1, y1; got shape {b.shape}")
    b = b.astype(np.int64)
    x0, y0, x1, y1 = b.T
    if not ((0 <= x0) & (x0 < x1) & (x1 <= W) & (0 <= y0) & (y0 < y1) & (y1 <= H)).all():
        raise ValueError(f"a box is empty or outside the {H}x{W} canvas (need 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H)")
    return b


def box_masks(*, boxes: Any, size: int | tuple[int, int]) -> np.ndarray:
    """Bool (N, H, W): ``mask[n, r, c]`` iff ``y0 ≤ r < y1`` and ``x0 ≤ c < x1`` for box ``n``."""
    H, W = _as_size(size)
    b = check_boxes(boxes, size=(H, W))
    rows, cols = np.arange(H), np.arange(W)
    in_r = (rows[None] >= b[:, 1:2]) & (rows[None] < b[:, 3:4])  # (N, H)
    in_c = (cols[None] >= b[:, 0:1]) & (cols[None] < b[:, 2:3])  # (N, W)
    return in_r[:, :, None] & in_c[:, None, :]


def _maps(maps: Any) -> np.ndarray:
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"need maps (N, H, W), got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("maps contain NaN or inf")
    return m


def energy_in_box(*, maps: Any, boxes: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(E, empty)``: ``E_n = Σ_{p ∈ B_n} max(M_np, 0) / Σ_p max(M_np, 0)`` (N,) float64, and
    ``empty_n`` = the map has no positive mass (N,) bool, where ``E_n = 0``.

    A map with no positive mass put none of it on the object: it scores 0 and stays in
    every mean (dropping it would favour maps that are often empty)."""
    m = _maps(maps)
    pos = np.maximum(m, 0.0)
    total = pos.sum(axis=(1, 2))
    inside = (pos * box_masks(boxes=boxes, size=m.shape[1:])).sum(axis=(1, 2))
    empty = total <= 0.0
    return np.where(empty, 0.0, inside / np.where(empty, 1.0, total)), empty


def pointing_game(*, maps: Any, boxes: Any) -> np.ndarray:
    """``hit_n = 1`` iff the map's maximum lies in box ``n`` (N,) bool.

    The maximum is ``numpy.argmax`` over the row-major flattened map (the first one on
    ties); a constant map (max = min) points nowhere and scores 0."""
    m = _maps(maps)
    N, H, W = m.shape
    b = check_boxes(boxes, size=(H, W), n=N)
    flat = m.reshape(N, -1)
    p = flat.argmax(axis=1)
    r, c = p // W, p % W
    hit = (b[:, 0] <= c) & (c < b[:, 2]) & (b[:, 1] <= r) & (r < b[:, 3])
    return hit & (flat.max(axis=1) > flat.min(axis=1))


def uniform_energy(*, boxes: Any, size: int | tuple[int, int]) -> np.ndarray:
    """``|B_n| / (H · W)`` (N,) float64: energy-in-box of a constant positive map, and the chance
    that a point drawn uniformly from the canvas lands in the box (the pointing game's baseline)."""
    H, W = _as_size(size)
    b = check_boxes(boxes, size=(H, W))
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64) / (H * W)


def random_channel_sets(*, num_classes: int, feature_dim: int, k: int, seed: int) -> np.ndarray:
    """(C, k) int64: class ``y``'s row is ``numpy.random.default_rng([seed, y]).choice(m, k, replace=False)``.

    Seeded per (seed, class), so a class's set does not depend on how many classes there
    are, and seeds 0..R−1 give R independent draws of the random baseline."""
    if not 1 <= k <= feature_dim or num_classes < 1:
        raise ValueError(f"need 1 <= k <= feature_dim and num_classes >= 1, got k={k}, feature_dim={feature_dim}, "
                         f"num_classes={num_classes}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.stack([np.random.default_rng([seed, y]).choice(feature_dim, size=k, replace=False)
                     for y in range(num_classes)]).astype(np.int64)


__all__ = [
    "box_masks",
    "channel_sum",
    "check_boxes",
    "energy_in_box",
    "pointing_game",
    "random_channel_sets",
    "uniform_energy",
    "upsample",
    "weighted_sum",
]
