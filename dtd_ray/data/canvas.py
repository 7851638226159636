"""A localisation test set: each image pasted at a known box on a larger canvas.

:func:`paste_on_canvas` puts image ``i`` (h × w) at a seeded random position of a
``canvas × canvas`` canvas, unchanged (pixel for pixel), and fills the rest with a
background made from a *donor*: another image of the set whose label differs, so the
background carries natural-image statistics but not the pasted image's class:

``blur`` (the default)
    the donor upsampled bilinearly to the canvas, then Gaussian-blurred with
    ``σ = canvas / 12`` px (5.3 px at 64): its colours and coarse layout remain, its object
    and its edges do not;
``scramble``
    the donor upsampled bilinearly to the canvas, cut into an 8 × 8 grid of square patches
    (``canvas // 8`` px; 8 px at 64) and the patches shuffled: local texture of another
    class, no global shape (the harder background: its patches can excite texture channels);
``noise``
    structured noise: white Gaussian noise blurred with ``σ = canvas / 32`` px, scaled per
    channel to the donor's mean and standard deviation.

Seeding: image ``i``'s position and donor come from ``numpy.random.default_rng([seed, id_i])``
(``id_i`` = ``ids[i]``, default ``i``), its background's shuffle or noise from
``default_rng([seed, id_i, 1])``; so an image's canvas does not depend on the batch it is
made in, only on the set it draws donors from. Boxes are half-open ``x0, y0, x1, y1``
(columns ``x0 … x1 − 1``, rows ``y0 … y1 − 1``), as :mod:`dtd_ray.core.localisation` scores them.
Pure numpy, deterministic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BACKGROUNDS = ("blur", "scramble", "noise")
BLUR_SIGMA = 1 / 12  # blur: σ of the Gaussian in canvas widths (5.3 px at 64, 8 px at 96)
SCRAMBLE_GRID = 8  # scramble: patches per side (8 px patches at 64)
NOISE_SIGMA = 1 / 32  # noise: σ of the blur that gives white noise spatial structure, in canvas widths
_CHUNK = 512  # images per vectorised background pass (a 96 px float32 chunk is ~57 MB)

DESCRIPTIONS = {
    "blur": "another class's test image, upsampled to the canvas and Gaussian-blurred (σ = canvas/12 px)",
    "scramble": "another class's test image, upsampled to the canvas and cut into 8 × 8 shuffled patches",
    "noise": "Gaussian noise blurred with σ = canvas/32 px, with another class's image's colour mean and spread",
}


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, C) → (N, size, size, C) float32 by bilinear interpolation, ``align_corners=False``
    (source coordinate ``(i + ½)·h/size − ½``, clamped to the image: torch's convention)."""
    x = np.asarray(images, dtype=np.float32)

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    r0, r1, fr = axis(x.shape[1])
    c0, c1, fc = axis(x.shape[2])
    rows = x[:, r0] * (1 - fr)[None, :, None, None] + x[:, r1] * fr[None, :, None, None]
    return rows[:, :, c0] * (1 - fc)[None, None, :, None] + rows[:, :, c1] * fc[None, None, :, None]


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into ``[0, n)`` without repeating the edge (``numpy.pad`` mode ``reflect``, period ``2(n − 1)``)."""
    if n == 1:
        return np.zeros_like(i)
    j = np.abs(np.mod(i, 2 * (n - 1)))
    return np.where(j > n - 1, 2 * (n - 1) - j, j)


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float32 ``B``: ``B @ v`` convolves ``v`` (n,) with a Gaussian of std ``sigma``, truncated at
    ``r = ⌈3σ⌉`` taps and normalised, edges mirrored: ``(B v)_i = Σ_{t=−r..r} g_t · v_{reflect(i + t)}``."""
    r = int(math.ceil(3 * sigma))
    B = np.zeros((n, n), dtype=np.float64)
    if r < 1:
        return np.eye(n, dtype=np.float32)
    t = np.arange(-r, r + 1)
    g = np.exp(-(t.astype(np.float64) ** 2) / (2 * sigma**2))
    g /= g.sum()
    rows = np.repeat(np.arange(n), len(t))
    cols = _reflect(rows + np.tile(t, n), n)
    np.add.at(B, (rows, cols), np.tile(g, n))
    return B.astype(np.float32)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W, C) float → the same convolved with a separable Gaussian of std ``sigma`` px
    (:func:`blur_matrix` along rows, then columns: two matrix products, fast for canvas sizes)."""
    x = np.asarray(images, dtype=np.float32)
    N, H, W, C = x.shape
    x = np.matmul(blur_matrix(H, sigma), x.reshape(N, H, W * C)).reshape(N, H, W, C)
    xt = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(N, W, H * C)
    return np.matmul(blur_matrix(W, sigma), xt).reshape(N, W, H, C).transpose(0, 2, 1, 3).copy()


def canvas_layout(
    *, labels: Any, image_size: tuple[int, int], canvas: int = 64, seed: int = 0, ids: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes (N, 4) int64 x0, y0, x1, y1; donors (N,) int64)``: where image ``i`` goes and which
    image of the set (index into it) lends its background, a uniform draw among those whose label differs.

    ``rng = default_rng([seed, ids[i]])``: ``x0 = rng.integers(0, canvas − w + 1)``, then
    ``y0`` alike, then the donor."""
    labels = np.asarray(labels).astype(np.int64)
    n = labels.shape[0]
    h, w = int(image_size[0]), int(image_size[1])
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,), got shape {labels.shape}")
    if canvas < max(h, w):
        raise ValueError(f"canvas={canvas} is smaller than the images ({h}x{w})")
    ids = np.arange(n) if ids is None else np.asarray(ids).astype(np.int64)
    if ids.shape != (n,) or (n and ids.min() < 0):
        raise ValueError(f"ids must be (N,) non-negative integers, got shape {ids.shape}")
    if n and len(np.unique(labels)) < 2:
        raise ValueError("a canvas background comes from an image of another class: the set has one class only")
    others = {int(y): np.flatnonzero(labels != y) for y in np.unique(labels)}
    boxes = np.zeros((n, 4), dtype=np.int64)
    donors = np.zeros(n, dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng([int(seed), int(ids[i])])
        x0 = int(rng.integers(0, canvas - w + 1))
        y0 = int(rng.integers(0, canvas - h + 1))
        pool = others[int(labels[i])]
        donors[i] = pool[int(rng.integers(0, len(pool)))]
        boxes[i] = (x0, y0, x0 + w, y0 + h)
    return boxes, donors


def _backgrounds(donor_images: np.ndarray, *, canvas: int, background: str, seed: int, ids: np.ndarray) -> np.ndarray:
    """(n, canvas, canvas, C) float32 backgrounds from the donors' images (see the module docstring)."""
    if background == "blur":
        return gaussian_blur(resize_bilinear(donor_images, canvas), canvas * BLUR_SIGMA)
    n, C = donor_images.shape[0], donor_images.shape[3]
    if background == "scramble":
        up = resize_bilinear(donor_images, canvas)
        p = canvas // SCRAMBLE_GRID
        G = SCRAMBLE_GRID
        out = up.copy()
        for i in range(n):
            perm = np.random.default_rng([int(seed), int(ids[i]), 1]).permutation(G * G)
            tiles = up[i, : G * p, : G * p].reshape(G, p, G, p, C).transpose(0, 2, 1, 3, 4).reshape(G * G, p, p, C)
            out[i, : G * p, : G * p] = tiles[perm].reshape(G, G, p, p, C).transpose(0, 2, 1, 3, 4).reshape(G * p, G * p, C)
        return out
    noise = np.stack([np.random.default_rng([int(seed), int(ids[i]), 1]).standard_normal((canvas, canvas, C))
                      for i in range(n)]).astype(np.float32)
    noise = gaussian_blur(noise, canvas * NOISE_SIGMA)
    noise = (noise - noise.mean((1, 2), keepdims=True)) / np.maximum(noise.std((1, 2), keepdims=True), 1e-6)
    d = donor_images.astype(np.float32)
    return noise * d.std((1, 2), keepdims=True) + d.mean((1, 2), keepdims=True)


def paste_on_canvas(
    *,
    images: Any,
    labels: Any,
    canvas: int = 64,
    background: str = "blur",
    seed: int = 0,
    ids: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(canvases (N, canvas, canvas, C) uint8, boxes (N, 4) int64 x0, y0, x1, y1)``.

    ``images`` (N, h, w, C) uint8 with ``labels`` (N,); each image is copied unchanged into its
    box of :func:`canvas_layout`, the rest is its donor's ``background`` (``blur``, ``scramble``
    or ``noise``; see the module docstring), rounded to uint8."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; valid: {', '.join(BACKGROUNDS)}")
    x = np.asarray(images)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"images must be (N, h, w, C) uint8, got {x.dtype} {x.shape}")
    n, h, w, C = x.shape
    if np.asarray(labels).shape != (n,):
        raise ValueError(f"labels must be ({n},), got shape {np.asarray(labels).shape}")
    if background == "scramble" and canvas % SCRAMBLE_GRID:
        raise ValueError(f"background 'scramble' needs a canvas divisible by {SCRAMBLE_GRID}, got {canvas}")
    boxes, donors = canvas_layout(labels=labels, image_size=(h, w), canvas=canvas, seed=seed, ids=ids)
    ids = np.arange(n) if ids is None else np.asarray(ids).astype(np.int64)
    out = np.empty((n, canvas, canvas, C), dtype=np.uint8)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        bg = _backgrounds(x[donors[s:e]], canvas=canvas, background=background, seed=seed, ids=ids[s:e])
        out[s:e] = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
    for i in range(n):
        x0, y0, x1, y1 = boxes[i]
        out[i, y0:y1, x0:x1] = x[i]
    return out, boxes


__all__ = ["BACKGROUNDS", "DESCRIPTIONS", "blur_matrix", "canvas_layout", "gaussian_blur", "paste_on_canvas", "resize_bilinear"]
