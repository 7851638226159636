"""Image sources: where a dataset's rows come from, without Ray.

A *source* is named by a one-line spec (``parse_source``):

- ``imagefolder:PATH`` — ``PATH/<split>/<class>/<image>`` (the ImageNet/torchvision layout);
- ``cifar10:PATH`` / ``cifar100:PATH`` — the python-pickle batches torchvision downloads;
- ``fashion-mnist`` or ``fashion-mnist:PATH`` — the original IDX ``.gz`` files;
- ``parquet:PATH`` — an image folder packed into Parquet shards by ``jobs/pack.py``
  (:mod:`dtd_ray.data.shards`): the same rows, ids and labels as the folder.

Every source gives, per split, the columns ``sample_id`` (int64, stable across runs),
``label`` (int32) and one of ``image`` (N, H, W, C uint8; array sources), ``path``
(str; image folders, decoded later in CPU tasks so the driver never holds pixels) or
``image_bytes`` (the encoded files; packed shards, decoded like the folder's files).
``Source.read_numpy`` returns them; :func:`dtd_ray.ray.datasets.to_ray_dataset` makes a
Ray Dataset of them, and :mod:`dtd_ray.data.transforms` prepares their pixels.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from dtd_ray.data import shards
from dtd_ray.io import storage


log = logging.getLogger(__name__)

KINDS = ("imagefolder", "parquet", "cifar10", "cifar100", "fashion-mnist")

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

    @property
    def decoded(self) -> bool:
        """Whether its rows hold decoded pixels (an ``image`` array) rather than files or their bytes."""
        return self.kind not in ("imagefolder", "parquet")

    def splits(self) -> tuple[str, ...]:
        """The split names: the sorted sub-folders of ``path`` for image folders, else train, test."""
        if self.kind == "imagefolder":
            if "splits" not in self._cache:
                fs, root = storage.resolve(self.path)
                self._cache["splits"] = tuple(_subdirs(fs, root))
            return self._cache["splits"]
        if self.kind == "parquet":
            return tuple(self.pack_info()["splits"])
        if self.kind == "fashion-mnist":
            return tuple(_FASHION_MNIST_FILES)
        return tuple(_CIFAR_LAYOUT[self.kind]["splits"])

    def num_rows(self, split: str) -> int:
        """Number of instances in ``split`` (a pack's from its ``_classes.json``: no shard is read)."""
        if self.kind == "parquet":
            self._check_split(split)
            return int(self.pack_info()["splits"][split])
        return len(self._columns(split)["sample_id"])

    def pack_info(self) -> dict[str, Any]:
        """A packed dataset's ``_classes.json`` (classes, ``rows_per_file``, rows per split; ``parquet:`` only)."""
        if self.kind != "parquet":
            raise ValueError(f"{self.kind}:{self.path} is not a packed (parquet:) dataset")
        if "pack" not in self._cache:
            self._cache["pack"] = shards.read_pack(self.path)
        return self._cache["pack"]

    def read_numpy(self, split: str) -> dict[str, np.ndarray]:
        """The rows of ``split`` as numpy columns, without Ray.

        ``sample_id`` int64 and ``label`` int32, plus ``image`` (N, H, W, C) uint8 for
        array sources, ``path`` (N,) object array of str for image folders, or ``image_bytes``
        (N,) object array of bytes for packed shards (the whole split in memory). The arrays
        are shared with the instance's cache and read-only; copy before modifying.
        """
        return dict(self._columns(split))

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
            elif self.kind == "parquet":
                meta = self.pack_info()
                cols = shards.read_split(self.path, split, rows=int(meta["splits"][split]),
                                         rows_per_file=int(meta["rows_per_file"]))
            elif self.kind == "fashion-mnist":
                cols = _read_fashion_mnist_split(self.path, split)
            else:
                cols = _read_cifar_split(self.kind, self.path, split)
            for arr in cols.values():
                arr.flags.writeable = False  # shared cache: a caller's in-place edit must not corrupt it
            self._cache[key] = cols
        return self._cache[key]


def subset_positions(*, num_rows: int, max_rows: int | None, seed: int) -> np.ndarray | None:
    """The row positions of a seeded random subset of at most ``max_rows`` of ``num_rows`` rows,
    in row order (``None``: every row). Random, not the first rows: image folders list rows class
    by class, so the first rows would be one class.

    ``positions = sort(choice(num_rows, max_rows, replace=False))`` drawn with
    ``numpy.random.default_rng([seed, 1])``: the same rows for the same seed, in every process.
    """
    if max_rows is None or max_rows >= num_rows:
        return None
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    return np.sort(np.random.default_rng([int(seed), 1]).choice(num_rows, size=int(max_rows), replace=False))


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
    try:
        found = fs.get_file_info(root).type
    except OSError as e:  # an object store that refuses the credentials or cannot be reached: one line
        raise FileNotFoundError(f"{kind} dataset {storage.explain(e, uri)}") from None
    if found != pafs.FileType.Directory:
        raise FileNotFoundError(f"{kind} dataset folder not found: {uri}")
    if kind == "imagefolder":
        return _parse_imagefolder(uri, fs, root)
    if kind == "parquet":
        meta = shards.read_pack(uri)
        source = Source(kind="parquet", path=uri, classes=tuple(str(c) for c in meta["classes"]))
        source._cache["pack"] = meta
        return source
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
