"""The CPU prepare stage: source rows → model-ready uint8 pixels (decode, channels, resize/crop, augment).

``prepare_batch`` is the function Ray Data maps over a source's rows (and the plain loops
call directly). It emits unnormalised uint8 pixels; the model normalises on its device
(:mod:`dtd_ray.models.runtime`), which keeps the traffic between the stages 4x smaller
than float32.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from dtd_ray.io import storage

log = logging.getLogger(__name__)

_PIL_RESAMPLE = {"nearest": 0, "nearest-exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
AUGMENTS = ("cifar",)
ON_BAD_INPUT = ("skip", "fail")
PREPARED_COLUMNS = ("sample_id", "label", "image", "ok", "error")
# A source row's pixels, one of: decoded arrays, a file to open, or a file's bytes (packed shards).
INPUT_COLUMNS = ("image", "path", "image_bytes")


class _BadInput(Exception):
    """One instance cannot be prepared; the message is the one-line reason."""


def _check_preprocessing(preprocessing: Any) -> tuple[int, int | None, int, int]:
    """``(size, resize, channels, PIL resample filter)`` from a duck-typed
    ``data.preprocessing.Preprocessing``, validated; ``interpolation`` is optional (bilinear)."""
    try:
        size, resize, channels = preprocessing.size, preprocessing.resize, preprocessing.channels
    except AttributeError as e:
        raise TypeError(f"preprocessing needs size, resize and channels attributes: {e}") from None
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"preprocessing.size must be a positive int, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"preprocessing.channels must be 1 or 3, got {channels!r}")
    if resize is not None and (not isinstance(resize, (int, np.integer)) or resize < size):
        raise ValueError(f"preprocessing.resize must be None or an int >= size ({size}), got {resize!r}")
    interpolation = str(getattr(preprocessing, "interpolation", "bilinear")).lower()
    if interpolation not in _PIL_RESAMPLE:
        raise ValueError(f"unknown preprocessing.interpolation {interpolation!r}; valid: {', '.join(_PIL_RESAMPLE)}")
    return int(size), (None if resize is None else int(resize)), int(channels), _PIL_RESAMPLE[interpolation]


def _rgb_to_luma(images: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma exactly as PIL's ``convert("L")`` computes it (16-bit fixed point, rounded)."""
    rgb = images[..., :3].astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _array_to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(…, H, W, C) uint8 with C in 1, 3, 4 to C = ``channels`` (alpha dropped, as PIL's RGBA->RGB does)."""
    c = images.shape[-1]
    if c not in (1, 3, 4):
        raise _BadInput(f"unsupported channel count {c}")
    if c == channels:
        return images
    if channels == 3:
        return images[..., :3] if c == 4 else np.repeat(images, 3, axis=-1)
    return _rgb_to_luma(images)


def _decode(path: str) -> Image.Image:
    """Open and fully decode one file (local path or URI); raises _BadInput on failure (an object
    store's own failure, :func:`dtd_ray.io.storage.store_failed`, as the ``OSError`` it is)."""
    return _decode_bytes(_read(path))


def _read(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except OSError as e:
        if storage.store_failed(path, e):  # the store's outage, not a bad image: fail the batch, commit nothing
            raise
        raise _BadInput(f"unreadable: {e.strerror or e}") from None


def _decode_bytes(data: bytes | None) -> Image.Image:
    """Fully decode one encoded image (a file's bytes as they are); raises _BadInput on failure."""
    if not data:
        raise _BadInput("undecodable: empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so a truncated file fails here instead of yielding half an image
    except UnidentifiedImageError:
        raise _BadInput("undecodable: not a recognised image format") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, …
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _BadInput(f"undecodable: {reason}") from None
    return img


def _pil_to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L (1 channel) or RGB (3).

    RGB uses PIL's ``convert("RGB")``: alpha is dropped, not composited (transparent
    pixels keep their stored colour), as torchvision's default loader does. 16-bit
    grey (``I;16*``) is scaled to 8 bits (PIL's own conversion would clip it at 255).
    """
    if img.mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    target = "RGB" if channels == 3 else "L"
    if img.mode == target:
        return img
    try:
        return img.convert(target)
    except ValueError:  # modes without a direct conversion (e.g. CMYK -> L) go through RGB
        return img.convert("RGB").convert(target)


def _pil_fit(img: Image.Image, size: int, resize: int | None, resample: int) -> np.ndarray:
    """Resize the shorter side to ``resize`` then center-crop ``size`` (torchvision's Resize +
    CenterCrop on PIL), or check the image is already ``size``x``size``; (size, size, C) uint8."""
    w, h = img.size
    if resize is None:
        if (w, h) != (size, size):
            raise _BadInput(f"wrong size {h}x{w}, expected {size}x{size}")
    else:
        # torchvision's rounding: the long side is truncated, the crop offset rounded
        if w <= h:
            new_w, new_h = resize, int(resize * h / w)
        else:
            new_w, new_h = int(resize * w / h), resize
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _array_to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def prepare_batch(
    batch: dict[str, np.ndarray],
    *,
    preprocessing: Any,
    augment: str | None = None,
    seed: int = 0,
    on_bad_input: str = "skip",
) -> dict[str, np.ndarray]:
    """Decode / convert / resize a batch of source rows into model-ready uint8 pixels.

    ``batch`` has ``sample_id``, ``label`` and one of ``path`` (files, decoded with PIL),
    ``image_bytes`` (the files' bytes, decoded the same way) or ``image`` ((N, H, W, C)
    uint8, or an object array of such images). Returns
    ``sample_id`` int64, ``label`` int32, ``image`` (N, size, size, channels) uint8 —
    not normalised, the model does that on its device —, ``ok`` bool and ``error``
    (object array of str, empty when ok). A row that cannot be prepared (unreadable,
    undecodable or truncated file, wrong size with ``resize=None``) gets ``ok=False``,
    a one-line ``error`` and zero pixels, or raises ``ValueError`` when
    ``on_bad_input="fail"``. ``augment="cifar"`` applies ``cifar_augment`` afterwards.
    """
    size, resize, channels, resample = _check_preprocessing(preprocessing)
    if augment is not None and augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; valid: None, {', '.join(AUGMENTS)}")
    if on_bad_input not in ON_BAD_INPUT:
        raise ValueError(f"unknown on_bad_input {on_bad_input!r}; valid: {', '.join(ON_BAD_INPUT)}")
    if not any(c in batch for c in INPUT_COLUMNS):
        raise ValueError(f"batch needs one of the columns {', '.join(INPUT_COLUMNS)}; got {', '.join(batch)}")

    sample_id = np.asarray(batch["sample_id"], dtype=np.int64)
    label = np.asarray(batch["label"], dtype=np.int32)
    n = len(sample_id)
    out = np.zeros((n, size, size, channels), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    error = np.full(n, "", dtype=object)
    paths = batch.get("path")

    def bad(i: int, reason: str) -> None:
        if on_bad_input == "fail":
            where = f"sample {sample_id[i]}" + (f" ({paths[i]})" if paths is not None else "")
            raise ValueError(f"bad input {where}: {reason}")
        ok[i], error[i] = False, reason  # its pixels stay zero

    encoded = batch.get("image_bytes")
    if paths is not None or encoded is not None:
        # a module-wide PIL switch: force it off so truncated files fail instead of half-decoding
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            for i in range(n):
                try:
                    img = _decode(str(paths[i])) if paths is not None else _decode_bytes(encoded[i])
                    out[i] = _pil_fit(_pil_to_channels(img, channels), size, resize, resample)
                except _BadInput as e:
                    bad(i, str(e))
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    else:
        images = batch["image"]
        if isinstance(images, np.ndarray) and images.dtype != object:
            pixels, reason = _prepare_array(images, size=size, resize=resize, channels=channels, resample=resample)
            if reason is None:
                out[:] = pixels
            else:
                for i in range(n):
                    bad(i, reason)
        else:  # variable-shape tensor columns arrive as an object array of arrays
            for i, image in enumerate(images):
                pixels, reason = _prepare_array(
                    np.asarray(image)[None], size=size, resize=resize, channels=channels, resample=resample
                )
                if reason is None:
                    out[i] = pixels[0]
                else:
                    bad(i, reason)

    if (~ok).any():
        first = int(np.flatnonzero(~ok)[0])
        log.warning("skipped %d of %d inputs in a batch; first: sample %d: %s",
                    int((~ok).sum()), n, sample_id[first], error[first])
    if augment == "cifar":
        out = cifar_augment(out, sample_ids=sample_id, seed=seed)
    return {"sample_id": sample_id, "label": label, "image": out, "ok": ok, "error": error}


def _prepare_array(
    images: np.ndarray, *, size: int, resize: int | None, channels: int, resample: int
) -> tuple[np.ndarray | None, str | None]:
    """``(pixels, None)`` from (N, H, W[, C]) uint8 images, or ``(None, reason)`` when they
    cannot be used. The rows of one dense array share shape and channels, so they succeed
    or fail together. Vectorised unless a resize is needed."""
    if images.ndim == 3:
        images = images[..., None]  # (N, H, W) grey
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image column must be (N, H, W, C) uint8, got {images.dtype} {images.shape}")
    try:
        images = _array_to_channels(images, channels)
    except _BadInput as e:
        return None, str(e)
    h, w = images.shape[1:3]
    if resize is None:
        if (h, w) != (size, size):
            return None, f"wrong size {h}x{w}, expected {size}x{size}"
        return images, None
    if not len(images):
        return np.zeros((0, size, size, channels), dtype=np.uint8), None
    # resampling is per image, through PIL: the same code path (and result) as decoded files
    return np.stack([_pil_fit(_array_to_pil(image), size, resize, resample) for image in images]), None


def cifar_augment(images: np.ndarray, *, sample_ids: np.ndarray, seed: int, padding: int = 4) -> np.ndarray:
    """The standard CIFAR training augmentation: zero-pad ``padding`` px, random crop back
    to H x W, random horizontal flip (p = 0.5).

    Each instance draws from ``np.random.default_rng([seed, sample_id])`` (crop top,
    crop left, then flip), so the result depends only on (seed, sample_id, image) and
    not on how rows are batched or sharded. Returns a new (N, H, W, C) array.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    n, h, w, c = images.shape
    if sample_ids.shape != (n,):
        raise ValueError(f"need one sample_id per image: {sample_ids.shape} for {n} images")
    if seed < 0 or (n and sample_ids.min() < 0):
        raise ValueError("seed and sample_ids must be non-negative (they seed numpy's SeedSequence)")
    tops = np.empty(n, dtype=np.int64)
    lefts = np.empty(n, dtype=np.int64)
    flips = np.empty(n, dtype=bool)
    for i, sid in enumerate(sample_ids.tolist()):
        rng = np.random.default_rng([seed, sid])
        tops[i] = rng.integers(0, 2 * padding + 1)
        lefts[i] = rng.integers(0, 2 * padding + 1)
        flips[i] = rng.random() < 0.5
    padded = np.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=images.dtype)
    padded[:, padding : padding + h, padding : padding + w] = images
    rows = tops[:, None] + np.arange(h)  # (n, h)
    cols = lefts[:, None] + np.arange(w)  # (n, w)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)  # a flipped crop reads its columns backwards
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
