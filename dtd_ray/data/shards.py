"""Packed image shards: an image folder as Parquet files of encoded image bytes, without Ray.

An ImageNet-size folder is a million small objects, and an object store lists and reads them
one request each. Packed, the same images are a thousand-odd Parquet files (Ray's own
batch-inference benchmarks store images this way), which Ray Data streams with one request
per file. ``jobs/pack.py`` writes them (:mod:`dtd_ray.ray.pack`); ``parquet:DST`` reads them.

Layout of a packed dataset ``DST``::

    DST/split=<split>/part-00000.parquet   rows [0, r) of the split in sample_id order, r = rows_per_file
    DST/split=<split>/part-00001.parquet   rows [r, 2r), …
    DST/_pack.json                         the plan: source, rows_per_file, rows and listing digest per split
    DST/_classes.json                      the class names and the plan, written last: the pack is finished

Each file has the columns of :data:`SHARD_SCHEMA`: ``sample_id`` and ``label`` exactly as the
folder source gives them (so records extracted from the shards match the folder's), the
``class_name``, the path relative to the split (``<class>/<file>``) and the file's bytes as
they are (never re-encoded: a bad image stays bad and is skipped at extraction as from the
folder).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtd_ray.io import storage

BYTES = "image_bytes"
REL_PATH = "rel_path"
SHARD_SCHEMA = pa.schema([
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
    pa.field("class_name", pa.string(), nullable=False),
    pa.field(REL_PATH, pa.string(), nullable=False),
    pa.field(BYTES, pa.binary(), nullable=False),
])
# What extraction reads of a shard (the names and paths stay on storage).
READ_COLUMNS = ("sample_id", "label", BYTES)
PLAN_NAME = "_pack.json"  # "_": outside Parquet dataset discovery (pandas reads DST whole), as the records' manifests
CLASSES_NAME = "_classes.json"
SPLIT_PREFIX = "split="
PACK_VERSION = 1
# Rows per Parquet row group: a reader of rows [lo, hi) reads the groups that hold them, so
# extraction can cut a split into the same blocks as from the folder (whatever rows_per_file)
# while reading at most two groups' worth of rows it does not use.
ROW_GROUP_ROWS = 64
# Concurrent reads per shard: an object store answers each GET after a round trip, so a shard of
# a thousand small images is read by a few threads at once (a local disk does not mind).
_READ_THREADS = 16


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_bounds(num_rows: int, rows_per_file: int) -> list[tuple[int, int]]:
    """``[(lo, hi), …]``: shard ``i`` holds rows ``[i·r, min((i+1)·r, n))`` of the split (none when n = 0)."""
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    return [(lo, min(lo + rows_per_file, num_rows)) for lo in range(0, num_rows, rows_per_file)]


def listing_digest(*, rel_paths: Sequence[str], labels: np.ndarray) -> str:
    """sha256 of a split's listing (relative paths and labels, in order): a resumed pack must see the same rows."""
    h = hashlib.sha256()
    for rel, label in zip(rel_paths, np.asarray(labels).tolist()):
        h.update(f"{label}\t{rel}\n".encode())
    return h.hexdigest()


def read_bytes(path: str) -> bytes:
    """The bytes of one file (local path or URI). A file that cannot be read raises one line
    (``OSError``): a pack stores every image of the folder or fails, never a gap in the ids."""
    try:
        return storage.read_bytes(path)
    except OSError as e:
        raise type(e)(f"cannot read {path}: {storage.explain(e)}") from None


def write_shard(*, uri: str, sample_id: np.ndarray, label: np.ndarray, class_name: Sequence[str],
                rel_path: Sequence[str], paths: Sequence[str]) -> int:
    """Read the files ``paths`` and write them with their columns as one Parquet file at ``uri``
    (atomically, :func:`dtd_ray.io.storage.write_parquet`); returns the rows written."""
    with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(paths)))) as pool:
        data = list(pool.map(read_bytes, paths))
    table = pa.table({
        "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)),
        "label": pa.array(np.asarray(label, dtype=np.int32)),
        "class_name": pa.array(list(class_name), type=pa.string()),
        REL_PATH: pa.array(list(rel_path), type=pa.string()),
        BYTES: pa.array(data, type=pa.binary()),
    }, schema=SHARD_SCHEMA)
    fs, path = storage.resolve(uri)
    # Encoded images do not compress further, and a dictionary of a thousand unique blobs costs more than it saves.
    storage.write_parquet(fs, path, table, use_dictionary=["class_name"], row_group_size=ROW_GROUP_ROWS)
    return table.num_rows


def shard_rows(fs: pafs.FileSystem, path: str) -> int | None:
    """Rows of the finished shard at ``path`` from its footer (nothing else read), or ``None`` where there is none."""
    if not storage.exists(fs, path):
        return None
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


# ----------------------------------------------------------------------------- reading a pack
def read_pack(uri: str) -> dict[str, Any]:
    """The finished pack at ``uri``: its ``_classes.json`` (classes, splits with their rows, source).

    Raises one line where ``uri`` is no pack, or a pack that is not finished yet.
    """
    fs, root = storage.resolve(uri)
    try:
        meta = storage.read_json(fs, f"{root}/{CLASSES_NAME}")
        plan = None if meta is not None else storage.read_json(fs, f"{root}/{PLAN_NAME}")
    except OSError as e:
        raise FileNotFoundError(f"parquet dataset {storage.explain(e, uri)}") from None
    if meta is None:
        if plan is not None:
            raise ValueError(f"parquet dataset {uri} is an unfinished pack (no {CLASSES_NAME} yet): "
                             f"rerun jobs/pack.py with --output {uri} to finish it")
        raise FileNotFoundError(f"parquet dataset {uri}: no {CLASSES_NAME} (write one with jobs/pack.py)")
    if not isinstance(meta.get("classes"), list) or not isinstance(meta.get("splits"), dict):
        raise ValueError(f"{storage.join(uri, CLASSES_NAME)}: expected 'classes' (a list) and 'splits' (an object)")
    return meta


def read_rows(uri: str, split: str, *, lo: int, hi: int, rows_per_file: int) -> pa.Table:
    """Rows ``[lo, hi)`` of a finished split (the :data:`READ_COLUMNS`), from the row groups that hold them.

    Shard ``i`` holds rows ``[i·r, (i+1)·r)`` (r = ``rows_per_file``); within it, row group ``g``
    the ``g``-th run of the file's row-group sizes, read from its footer.
    """
    fs, root = storage.resolve(uri)
    parts = []
    for i in range(lo // rows_per_file, (hi - 1) // rows_per_file + 1 if hi > lo else 0):
        start = i * rows_per_file
        path = f"{root}/{SPLIT_PREFIX}{split}/{shard_name(i)}"
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            ends = np.cumsum(sizes) + start
            groups = [g for g in range(len(sizes)) if ends[g] > lo and ends[g] - sizes[g] < hi]
            if not groups:  # a shard shorter than the plan says
                raise ValueError(f"parquet dataset {uri}: {path} holds {sum(sizes)} rows, none of [{lo}, {hi})")
            first = int(ends[groups[0]] - sizes[groups[0]])
            t = pf.read_row_groups(groups, columns=list(READ_COLUMNS))
        parts.append(t.slice(max(lo - first, 0), min(hi, int(ends[groups[-1]])) - max(lo, first)))
    if not parts:
        return SHARD_SCHEMA.empty_table().select(list(READ_COLUMNS))
    return pa.concat_tables(parts)


def read_split(uri: str, split: str, *, rows: int, rows_per_file: int) -> dict[str, np.ndarray]:
    """A whole split's ``sample_id``, ``label`` and ``image_bytes`` (object array of bytes) as numpy columns.

    For the stages that read a split into memory (fine-tuning, the atlas); extraction streams
    the shards through Ray Data instead.
    """
    table = read_rows(uri, split, lo=0, hi=rows, rows_per_file=rows_per_file)
    if table.num_rows != rows:
        raise ValueError(f"parquet dataset {uri} split {split!r}: {table.num_rows} rows in its shards, "
                         f"{CLASSES_NAME} says {rows}")
    data = np.empty(table.num_rows, dtype=object)
    data[:] = table.column(BYTES).to_pylist()
    return {"sample_id": table.column("sample_id").to_numpy(), "label": table.column("label").to_numpy(),
            BYTES: data}


def describe_pack(meta: dict[str, Any]) -> str:
    splits = ", ".join(f"{s} {n:,}" for s, n in meta["splits"].items())
    return f"{len(meta['classes'])} classes; rows per split: {splits}"
