"""Image sources and the CPU prepare stage that turns their rows into model-ready pixels.

A *source* is named by a one-line spec (``parse_source``):

- ``imagefolder:PATH`` — ``PATH/<split>/<class>/<image>`` (the ImageNet/torchvision layout);
- ``cifar10:PATH`` / ``cifar100:PATH`` — the python-pickle batches torchvision downloads;
- ``fashion-mnist`` or ``fashion-mnist:PATH`` — the original IDX ``.gz`` files.

Every source gives, per split, the columns ``sample_id`` (int64, stable across runs),
``label`` (int32) and either ``image`` (N, H, W, C uint8; array sources) or ``path``
(str; image folders, decoded later in CPU tasks so the driver never holds pixels).
``Source.read_numpy`` returns them without Ray; ``Source.to_dataset`` as a Ray Dataset.

``prepare_batch`` is the function Ray Data maps over those rows: decode, convert to the
model's channels, resize / center-crop, optionally augment. It emits unnormalised
uint8 pixels; the model actor normalises on its device, which keeps the object-store
traffic between the stages 4x smaller than float32.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from dtd_ray.io import storage

if TYPE_CHECKING:  # Ray is imported lazily: the core (read_numpy, prepare_batch) runs without it
    import pyarrow as pa
    import ray.data
    from PIL import Image

log = logging.getLogger(__name__)

KINDS = ("imagefolder", "cifar10", "cifar100", "fashion-mnist")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# split -> (images file, labels file); the test split is the "t10k" pair
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: 0x0000 | type 0x08 (unsigned byte) | number of dimensions
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims (N, rows, cols)
_IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim (N,)

_CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "meta": "batches.meta",
        "names_key": b"label_names",
        "label_key": b"labels",
        "splits": {
            "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
            "test": ("test_batch",),
        },
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "meta": "meta",
        "names_key": b"fine_label_names",
        "label_key": b"fine_labels",
        "splits": {"train": ("train",), "test": ("test",)},
    },
}

# Rows per block when to_dataset gets no override_num_blocks. Image folders get fewer
# rows per block because each row costs a file decode and (for ImageNet) becomes
# 224*224*3 B = 150 KB of prepared pixels: 512 rows keep a prepare task's output near
# Ray's 128 MiB target block size. Array rows are cheap and small (CIFAR: 3 KB).
_DEFAULT_BLOCK_ROWS = {"imagefolder": 512, "array": 2048}

# Preprocessing.interpolation (torchvision's InterpolationMode values) -> PIL resampling
# filter, as torchvision maps them for PIL images. PIL's filters are antialiased when shrinking.
_PIL_RESAMPLE = {"nearest": 0, "nearest-exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}

AUGMENTS = ("cifar",)
ON_BAD_INPUT = ("skip", "fail")

PREPARED_COLUMNS = ("sample_id", "label", "image", "ok", "error")


# ------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """One dataset on some storage: its kind, location and class names.

    Build it with ``parse_source``. Listings and decoded arrays are cached on the
    instance (an image folder is listed once, a pickle/IDX file decoded once); the
    cache is not pickled, so shipping a ``Source`` to a Ray task stays cheap.
    """

    kind: str
    path: str  # a URI, or an absolute local path
    classes: tuple[str, ...]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def splits(self) -> tuple[str, ...]:
        """The split names: the sorted sub-folders of ``path`` for image folders, else train, test."""
        if self.kind == "imagefolder":
            if "splits" not in self._cache:
                fs, root = storage.resolve(self.path)
                self._cache["splits"] = tuple(_subdirs(fs, root))
            return self._cache["splits"]
        if self.kind == "fashion-mnist":
            return tuple(_FASHION_MNIST_FILES)
        return tuple(_CIFAR_LAYOUT[self.kind]["splits"])

    def num_rows(self, split: str) -> int:
        """Number of instances in ``split``."""
        return len(self._columns(split)["sample_id"])

    def read_numpy(self, split: str) -> dict[str, np.ndarray]:
        """The rows of ``split`` as numpy columns, without Ray.

        ``sample_id`` int64 and ``label`` int32, plus ``image`` (N, H, W, C) uint8 for
        array sources or ``path`` (N,) object array of str for image folders. The arrays
        are shared with the instance's cache and read-only; copy before modifying.
        """
        return dict(self._columns(split))

    def to_dataset(self, split: str, *, override_num_blocks: int | None = None) -> "ray.data.Dataset":
        """The rows of ``split`` as a Ray Dataset with the same columns as ``read_numpy``.

        The driver cuts the columns into ``override_num_blocks`` contiguous blocks of
        about equal size (default: 512 rows per block for image folders, 2048 for array
        sources) and puts each block in the object store once (``ray.data.from_arrow``), so
        a task receives only its own block, never the whole array. Images become a
        fixed-shape tensor column. The result is already materialised: iterating it
        again (another epoch, another model) re-reads nothing from storage.
        """
        import ray

        columns = self._columns(split)
        n = len(columns["sample_id"])
        if override_num_blocks is not None and override_num_blocks < 1:
            raise ValueError(f"override_num_blocks must be >= 1, got {override_num_blocks}")
        rows_per_block = _DEFAULT_BLOCK_ROWS["imagefolder" if self.kind == "imagefolder" else "array"]
        num_blocks = override_num_blocks or max(1, math.ceil(n / rows_per_block))
        num_blocks = max(1, min(num_blocks, n))
        bounds = np.linspace(0, n, num_blocks + 1).round().astype(np.int64)
        blocks = [
            _to_block({name: col[lo:hi] for name, col in columns.items()})
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        log.debug("%s split %s: %d rows in %d blocks", self.kind, split, n, len(blocks))
        return ray.data.from_arrow(blocks)

    # -- internals ----------------------------------------------------------------
    def _check_split(self, split: str) -> None:
        splits = self.splits()
        if split not in splits:
            raise ValueError(
                f"unknown split {split!r} for {self.kind}:{self.path}; valid: {', '.join(splits) or '(none)'}"
            )

    def _columns(self, split: str) -> dict[str, np.ndarray]:
        self._check_split(split)
        key = ("columns", split)
        if key not in self._cache:
            if self.kind == "imagefolder":
                cols = _read_imagefolder_split(self.path, split, self.classes)
            elif self.kind == "fashion-mnist":
                cols = _read_fashion_mnist_split(self.path, split)
            else:
                cols = _read_cifar_split(self.kind, self.path, split)
            for arr in cols.values():
                arr.flags.writeable = False  # shared cache: a caller's in-place edit must not corrupt it
            self._cache[key] = cols
        return self._cache[key]


def _to_block(columns: dict[str, np.ndarray]) -> "pa.Table":
    """One Ray Data block (an Arrow table) from numpy columns."""
    import pyarrow as pa

    if "image" in columns:
        # BlockAccessor.batch_to_block is the conversion map_batches applies to a dict of
        # arrays, so the tensor extension column is exactly what a Ray Data stage makes.
        from ray.data.block import BlockAccessor

        return BlockAccessor.batch_to_block(columns)
    # paths: typed explicitly so that an empty split still has a string column
    return pa.table(
        {
            "sample_id": pa.array(columns["sample_id"], type=pa.int64()),
            "label": pa.array(columns["label"], type=pa.int32()),
            "path": pa.array(list(columns["path"]), type=pa.string()),
        }
    )


def parse_source(spec: str) -> Source:
    """A ``Source`` from a spec ``KIND:PATH`` (``fashion-mnist`` alone uses the OS package).

    Checks that the data is there and reads the class names; the rows themselves are
    listed/decoded lazily, per split, on first use.
    """
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)} (as KIND:PATH)")
    path = path.strip()
    if kind == "fashion-mnist":
        return _parse_fashion_mnist(path or FASHION_MNIST_DEFAULT_PATH)
    if not path:
        raise ValueError(f"dataset spec {spec!r} needs a path: {kind}:PATH")
    uri = _normalise_uri(path)
    fs, root = storage.resolve(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{kind} dataset folder not found: {uri}")
    if kind == "imagefolder":
        return _parse_imagefolder(uri, fs, root)
    return _parse_cifar(kind, uri, fs, root)


def _normalise_uri(path: str) -> str:
    """Local paths absolute (so rows name the same file from any worker's cwd); URIs as given."""
    if "://" in path:
        return path.rstrip("/")
    return storage.resolve(path)[1]


def _join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _subdirs(fs: pafs.FileSystem, root: str) -> list[str]:
    """Sorted names of the visible sub-folders of ``root`` (hidden ones, e.g. ``.ipynb_checkpoints``, skipped)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
    )


# ------------------------------------------------------------------------- image folders
def _parse_imagefolder(uri: str, fs: pafs.FileSystem, root: str) -> Source:
    splits = _subdirs(fs, root)
    if not splits:
        raise ValueError(f"imagefolder {uri} has no split folders; expected {uri}/<split>/<class>/<image>")
    classes: list[str] | None = None
    for split in splits:
        found = _subdirs(fs, f"{root}/{split}")
        if not found:
            raise ValueError(f"imagefolder split {uri}/{split} has no class folders; expected <split>/<class>/<image>")
        if classes is None:
            classes = found
        elif found != classes:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise ValueError(
                f"imagefolder {uri}: class folders of split {split!r} differ from split {splits[0]!r}"
                f" (missing: {', '.join(missing) or '-'}; extra: {', '.join(extra) or '-'})"
            )
    source = Source(kind="imagefolder", path=uri, classes=tuple(classes))
    source._cache["splits"] = tuple(splits)
    return source


def _read_imagefolder_split(uri: str, split: str, classes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """List ``uri/split/<class>/**/<image>``; sample_id = position in sorted (class, relative path)."""
    fs, root = storage.resolve(uri)
    split_root = f"{root}/{split}"
    class_index = {c: i for i, c in enumerate(classes)}
    entries: list[tuple[str, str]] = []
    for info in fs.get_file_info(pafs.FileSelector(split_root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(split_root) + 1 :]
        parts = rel.split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue  # a file beside the class folders, or hidden (e.g. macOS "._x.jpg" resource forks)
        ext = parts[-1][parts[-1].rfind(".") :].lower() if "." in parts[-1] else ""
        if ext not in IMAGE_EXTENSIONS or parts[0] not in class_index:
            continue
        entries.append((parts[0], "/".join(parts[1:])))
    entries.sort()
    counts = dict.fromkeys(classes, 0)
    for cls, _ in entries:
        counts[cls] += 1
    for cls, count in counts.items():
        if count == 0:
            log.warning("imagefolder %s/%s: class folder %r has no images; it contributes no rows", uri, split, cls)
    # rows name files as the worker opens them: a plain local path, or the URI for remote storage
    base = _join_uri(uri, split) if "://" in uri else split_root
    paths = np.empty(len(entries), dtype=object)
    paths[:] = [f"{base}/{cls}/{rel}" for cls, rel in entries]
    return {
        "sample_id": np.arange(len(entries), dtype=np.int64),
        "label": np.fromiter((class_index[c] for c, _ in entries), dtype=np.int32, count=len(entries)),
        "path": paths,
    }


# ------------------------------------------------------------------------- CIFAR pickles
def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batch files that resolves only the globals those files use.

    The format is defined as Python pickles, and a pickle can call any importable
    function; these files only need numpy's array/dtype reconstruction (under the
    numpy 1 ``numpy.core`` or numpy 2 ``numpy._core`` name) and ``_codecs.encode``
    (how Python 3 writes ``bytes`` in protocol <= 2). Anything else is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _numpy_reconstruct()
            if name == "scalar":
                return _numpy_scalar()
        elif module == "numpy" and name == "ndarray":
            return np.ndarray
        elif module == "numpy" and name == "dtype":
            return np.dtype
        elif module == "_codecs" and name == "encode":
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR batch file may only hold numpy arrays, lists, dicts and bytes"
        )


class BadPickleError(pickle.UnpicklingError, ValueError):
    """A CIFAR batch file that is refused (it carries code) or unreadable (empty, truncated).

    A ``ValueError`` too, so that the entry points report it in one line like other bad input.
    """


def _load_cifar_pickle(fs: pafs.FileSystem, path: str, uri: str) -> dict:
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"CIFAR batch file not found: {uri}")
    with fs.open_input_file(path) as f:
        data = f.read()
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise BadPickleError(f"{uri}: {e}") from None
    except Exception as e:  # zero-byte or truncated file: EOFError, ValueError, struct.error, …
        why = "empty file" if not data else f"truncated or not a pickle ({type(e).__name__}: {e})"
        raise BadPickleError(f"{uri}: {why}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{uri}: expected a dict, got {type(obj).__name__}")
    return obj


def _cifar_dir(kind: str, uri: str, fs: pafs.FileSystem, root: str) -> tuple[str, str]:
    """``(uri, fs path)`` of the folder holding the batch files: PATH/<folder> or PATH itself."""
    layout = _CIFAR_LAYOUT[kind]
    for sub in (layout["folder"], None):
        candidate = f"{root}/{sub}" if sub else root
        if fs.get_file_info(f"{candidate}/{layout['meta']}").type == pafs.FileType.File:
            return (_join_uri(uri, sub) if sub else uri), candidate
    raise FileNotFoundError(
        f"{kind} data not found: neither {uri}/{layout['folder']}/{layout['meta']} nor {uri}/{layout['meta']} exists"
    )


def _parse_cifar(kind: str, uri: str, fs: pafs.FileSystem, root: str) -> Source:
    layout = _CIFAR_LAYOUT[kind]
    dir_uri, dir_path = _cifar_dir(kind, uri, fs, root)
    meta = _load_cifar_pickle(fs, f"{dir_path}/{layout['meta']}", f"{dir_uri}/{layout['meta']}")
    if layout["names_key"] not in meta:
        raise ValueError(f"{dir_uri}/{layout['meta']}: no {layout['names_key']!r} entry")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout["names_key"]])
    return Source(kind=kind, path=dir_uri, classes=classes)


def _read_cifar_split(kind: str, uri: str, split: str) -> dict[str, np.ndarray]:
    """Concatenate the split's batch files; sample_id = row index in that concatenation."""
    layout = _CIFAR_LAYOUT[kind]
    fs, root = storage.resolve(uri)
    images, labels = [], []
    for name in layout["splits"][split]:
        file_uri = _join_uri(uri, name)
        batch = _load_cifar_pickle(fs, f"{root}/{name}", file_uri)
        for key in (b"data", layout["label_key"]):
            if key not in batch:
                raise ValueError(f"{file_uri}: no {key!r} entry (keys: {sorted(batch)})")
        data = np.asarray(batch[b"data"])
        lab = np.asarray(batch[layout["label_key"]], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise ValueError(
                f"{file_uri}: expected data uint8 (N, 3072) and N labels, got data {data.dtype} {data.shape}"
                f" and {len(lab)} labels"
            )
        if len(lab) and (lab.min() < 0 or lab.max() >= 100):
            raise ValueError(f"{file_uri}: labels outside 0..99")
        # rows are channel-planar (1024 R, 1024 G, 1024 B, each row-major 32x32)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab.astype(np.int32))
    image = np.ascontiguousarray(np.concatenate(images))
    label = np.concatenate(labels)
    return {"sample_id": np.arange(len(label), dtype=np.int64), "label": label, "image": image}


# ------------------------------------------------------------------------- Fashion-MNIST
def _fashion_mnist_file(fs: pafs.FileSystem, root: str, name: str) -> str | None:
    """The fs path of ``name`` (or its uncompressed twin), or None."""
    for candidate in (name, name[: -len(".gz")]):
        if fs.get_file_info(f"{root}/{candidate}").type == pafs.FileType.File:
            return f"{root}/{candidate}"
    return None


def _parse_fashion_mnist(path: str) -> Source:
    uri = _normalise_uri(path)
    fs, root = storage.resolve(uri)
    hint = "install it with `apt-get install -y dataset-fashion-mnist` or pass fashion-mnist:PATH"
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"fashion-mnist folder not found: {uri}; {hint}")
    for files in _FASHION_MNIST_FILES.values():
        for name in files:
            if _fashion_mnist_file(fs, root, name) is None:
                raise FileNotFoundError(f"fashion-mnist file not found: {_join_uri(uri, name)}; {hint}")
    return Source(kind="fashion-mnist", path=uri, classes=FASHION_MNIST_CLASSES)


def parse_idx(data: bytes, *, expected_magic: int, name: str = "IDX data") -> np.ndarray:
    """Decode an (uncompressed) IDX file of unsigned bytes, checking magic and size.

    The header is 0x00 0x00, a type code (0x08 = uint8), the number of dimensions,
    then one big-endian uint32 per dimension; the data follows, row-major.
    """
    if len(data) < 4:
        raise ValueError(f"{name}: not an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{name}: bad IDX magic number {magic}, expected {expected_magic}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: IDX header truncated ({len(data)} bytes, {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = math.prod(dims)
    if len(data) - header != count:
        raise ValueError(f"{name}: {len(data) - header} data bytes, but the header says {dims} = {count}")
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _read_fashion_mnist_split(uri: str, split: str) -> dict[str, np.ndarray]:
    fs, root = storage.resolve(uri)
    arrays = []
    for name, magic in zip(_FASHION_MNIST_FILES[split], (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC)):
        path = _fashion_mnist_file(fs, root, name)
        if path is None:
            raise FileNotFoundError(f"fashion-mnist file not found: {_join_uri(uri, name)}")
        with fs.open_input_file(path) as f:
            raw = f.read()
        if path.endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise ValueError(f"{_join_uri(uri, name)}: not a valid gzip file ({e})") from None
        arrays.append(parse_idx(raw, expected_magic=magic, name=_join_uri(uri, name)))
    images, labels = arrays
    if len(images) != len(labels):
        raise ValueError(f"fashion-mnist {split}: {len(images)} images but {len(labels)} labels in {uri}")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"fashion-mnist {split}: label {labels.max()} outside 0..9 in {uri}")
    return {
        "sample_id": np.arange(len(labels), dtype=np.int64),
        "label": labels.astype(np.int32),
        "image": images[..., None],  # (N, 28, 28, 1): channels-last like every other source
    }


# ------------------------------------------------------------------------- prepare stage
class _BadInput(Exception):
    """One instance cannot be prepared; the message is the one-line reason."""


def _check_preprocessing(preprocessing: Any) -> tuple[int, int | None, int, int]:
    """``(size, resize, channels, PIL resample filter)`` from a duck-typed
    ``backbones.Preprocessing``, validated; ``interpolation`` is optional (bilinear)."""
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


def _decode(path: str) -> "Image.Image":
    """Open and fully decode one file (local path or URI); raises _BadInput on failure."""
    from PIL import Image, UnidentifiedImageError

    try:
        if "://" in path:
            fs, p = storage.resolve(path)
            with fs.open_input_file(p) as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise _BadInput(f"unreadable: {e.strerror or e}") from None
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


def _pil_to_channels(img: "Image.Image", channels: int) -> "Image.Image":
    """Convert any PIL mode to L (1 channel) or RGB (3).

    RGB uses PIL's ``convert("RGB")``: alpha is dropped, not composited (transparent
    pixels keep their stored colour), as torchvision's default loader does. 16-bit
    grey (``I;16*``) is scaled to 8 bits (PIL's own conversion would clip it at 255).
    """
    from PIL import Image

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


def _pil_fit(img: "Image.Image", size: int, resize: int | None, resample: int) -> np.ndarray:
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


def _array_to_pil(image: np.ndarray) -> "Image.Image":
    from PIL import Image

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

    ``batch`` has ``sample_id``, ``label`` and either ``path`` (files, decoded with PIL)
    or ``image`` ((N, H, W, C) uint8, or an object array of such images). Returns
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
    if "path" not in batch and "image" not in batch:
        raise ValueError(f"batch needs a 'path' or 'image' column; got {', '.join(batch)}")

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

    if paths is not None:
        from PIL import ImageFile

        # a module-wide PIL switch: force it off so truncated files fail instead of half-decoding
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            for i, path in enumerate(paths):
                try:
                    out[i] = _pil_fit(_pil_to_channels(_decode(str(path)), channels), size, resize, resample)
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
