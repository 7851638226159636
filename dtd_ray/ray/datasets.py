"""A dataset source's rows as a Ray Dataset (the first stage of the extraction pipeline)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from dtd_ray.data import shards
from dtd_ray.data.sources import Source

log = logging.getLogger(__name__)

# Image folders and packs: blocks of about 32 MiB of decoded pixels, 512 to 2,048 paths, and at least two
# blocks per CPU of the cluster where the split has the rows. Each block is a decode task, and a task costs
# the driver and the raylet about as much as some hundred decodes of 32-px images: CIFAR's (3 KB decoded)
# come 2,048 a block. ImageNet's 224-px images (150 KB decoded) come 512 a block, which keeps a task's
# output well under Ray's 128 MiB target block size, and a small split still gives every core a task.
_FOLDER_BLOCK_ROWS = (512, 2048)
_FOLDER_BLOCK_BYTES = 32 << 20
# Array sources: blocks of about 8 MiB of pixels (Fashion-MNIST: 10,700 rows, CIFAR: 2,730), in whole calls
# of the model stage (the pipeline's rows per file). Their prepare step is a copy, so the per-task cost of
# Ray Data is what a block size trades against: in jobs/bench_extract.py's array proxy, blocks of three
# 4,096-row calls ran half again as fast as blocks of one.
_ARRAY_BLOCK_BYTES = 8 << 20


def to_ray_dataset(source: Source, split: str, *, override_num_blocks: int | None = None,
                   read_cpus: float = 1.0, rows: np.ndarray | None = None, rows_multiple: int = 1,
                   decoded_bytes: int | None = None, cpus: float = 0.0) -> ray.data.Dataset:
    """The rows of ``split`` (only those at the sorted positions ``rows``, where given) as a Ray
    Dataset with the same columns as ``read_numpy``.

    The driver cuts the columns into ``override_num_blocks`` contiguous blocks of about equal
    size, or by default into blocks of :func:`folder_block_rows` rows for image folders (from the
    bytes of one decoded image, ``decoded_bytes``, and the cluster's ``cpus``) and of about 8 MiB
    of pixels for array sources, either in whole calls of ``rows_multiple`` rows
    (:func:`whole_calls`); it puts each block in the object store once (``ray.data.from_arrow``), so
    a task receives only its own block, never the whole array. Images become a
    fixed-shape tensor column. The result is already materialised: iterating it
    again (another epoch, another model) re-reads nothing from storage.

    A packed dataset (``parquet:``) is streamed instead: one read task per block, cut where the
    folder's would be, reads its rows from the row groups that hold them, so the driver never
    holds the images' bytes (columns ``sample_id``, ``label``, ``image_bytes``). Its read tasks
    ask for ``read_cpus``: the pipeline's builder gives them what its decode tasks get, since a
    whole CPU may never be free beside the model actors.
    """
    if source.kind == "parquet":
        return _read_shards(source, split, override_num_blocks=override_num_blocks, read_cpus=read_cpus, rows=rows,
                            decoded_bytes=decoded_bytes, cpus=cpus, rows_multiple=rows_multiple)
    columns = source.read_numpy(split)
    if rows is not None:
        columns = {name: col[rows] for name, col in columns.items()}
    n = len(columns["sample_id"])
    if override_num_blocks is not None and override_num_blocks < 1:
        raise ValueError(f"override_num_blocks must be >= 1, got {override_num_blocks}")
    rows_per_block = (folder_block_rows(n, decoded_bytes=decoded_bytes, cpus=cpus) if "path" in columns
                      else _array_block_rows(columns["image"]))
    bounds = _split_bounds(n, override_num_blocks=override_num_blocks, rows_per_block=rows_per_block,
                           rows_multiple=rows_multiple)
    blocks = [
        _to_block({name: col[lo:hi] for name, col in columns.items()})
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    log.debug("%s split %s: %d rows in %d blocks", source.kind, split, n, len(blocks))
    return ray.data.from_arrow(blocks)


def folder_block_rows(n: int, *, decoded_bytes: int | None, cpus: float) -> int:
    """Rows per block of a split of ``n`` files whose images decode to ``decoded_bytes`` each: about
    ``_FOLDER_BLOCK_BYTES`` of pixels, within ``_FOLDER_BLOCK_ROWS``, and no more than two blocks per CPU
    (of ``cpus``) allow (512 where ``decoded_bytes`` is not known)."""
    lo, hi = _FOLDER_BLOCK_ROWS
    if not decoded_bytes:
        return lo
    per_cpu = math.ceil(n / (2 * cpus)) if cpus > 0 else hi
    return max(lo, min(hi, _FOLDER_BLOCK_BYTES // decoded_bytes, per_cpu))


def _split_bounds(n: int, *, override_num_blocks: int | None, rows_per_block: int, rows_multiple: int) -> np.ndarray:
    """The bounds of a split's ``n`` rows in blocks: ``override_num_blocks`` of about equal size where given,
    else blocks of ``rows_per_block`` rounded to whole calls of ``rows_multiple`` rows (:func:`whole_calls`)."""
    if override_num_blocks:
        return _block_bounds(n, override_num_blocks)
    return _row_bounds(n, whole_calls(rows_per_block, rows_multiple))


def _row_bounds(n: int, rows_per_block: int) -> np.ndarray:
    """Blocks of ``rows_per_block`` rows from the first row on, the last one shorter: their bounds (one block
    for ``n`` 0). Fixed-size blocks keep whole calls whole (:func:`whole_calls`), where blocks of equal size
    would not."""
    return np.append(np.arange(0, n, rows_per_block, dtype=np.int64), np.int64(n)) if n else np.array([0, 0])


def _block_bounds(n: int, num_blocks: int) -> np.ndarray:
    """``num_blocks`` (at most ``n``, at least one) contiguous blocks of about equal size: their ``n + 1`` bounds."""
    num_blocks = max(1, min(num_blocks, n))
    return np.linspace(0, n, num_blocks + 1).round().astype(np.int64)


def _array_block_rows(images: np.ndarray) -> int:
    """Rows per block of about ``_ARRAY_BLOCK_BYTES`` of pixels (an object column of images: by the first image)."""
    n = len(images)
    if not n:
        return 1
    row_bytes = images[0].nbytes if images.dtype == object else images.nbytes / n
    return max(1, int(_ARRAY_BLOCK_BYTES // max(row_bytes, 1)))


def whole_calls(rows: int, call: int) -> int:
    """``rows`` per block rounded so that blocks make whole calls of ``call`` rows: the nearest multiple of
    ``call`` from ``call`` rows up, else the largest divisor of ``call`` not above ``rows``. Ray Data hands
    a model actor's task whole blocks, at least ``call`` rows, and the task cuts them into calls: with
    blocks of any other size every task would end in a short call."""
    if rows >= call:
        return max(1, round(rows / call)) * call
    return max(d for d in range(1, rows + 1) if call % d == 0)


def _to_block(columns: dict[str, np.ndarray]) -> pa.Table:
    """One Ray Data block (an Arrow table) from numpy columns."""
    if "image" in columns:
        # BlockAccessor.batch_to_block is the conversion map_batches applies to a dict of
        # arrays, so the tensor extension column is exactly what a Ray Data stage makes.
        return BlockAccessor.batch_to_block(columns)
    # paths: typed explicitly so that an empty split still has a string column
    return pa.table(
        {
            "sample_id": pa.array(columns["sample_id"], type=pa.int64()),
            "label": pa.array(columns["label"], type=pa.int32()),
            "path": pa.array(list(columns["path"]), type=pa.string()),
        }
    )


def _read_shards(source: Source, split: str, *, override_num_blocks: int | None, read_cpus: float,
                 rows: np.ndarray | None, decoded_bytes: int | None, cpus: float,
                 rows_multiple: int) -> ray.data.Dataset:
    pos = np.arange(source.num_rows(split)) if rows is None else np.asarray(rows, dtype=np.int64)
    n = len(pos)
    if not n:
        return ray.data.from_arrow(shards.SHARD_SCHEMA.empty_table().select(list(shards.READ_COLUMNS)))
    r = int(source.pack_info()["rows_per_file"])
    bounds = _split_bounds(n, override_num_blocks=override_num_blocks, rows_multiple=rows_multiple,
                           rows_per_block=folder_block_rows(n, decoded_bytes=decoded_bytes, cpus=cpus))
    # Not ray.data.read_parquet: its file-listing task asks for a whole CPU, which a 1-CPU node
    # running a model actor never has free (the extraction waited forever on the three-node test
    # cluster), and its blocks follow the files. These blocks are the folder's (same bounds), so
    # the model stage sees the same batches and the records match the folder's bit for bit.
    # Block j holds the rows at positions pos[a:b]: read [pos[a], pos[b-1] + 1), keep those ("take").
    ranges = ray.data.from_arrow([
        pa.table({"lo": [int(pos[a])], "hi": [int(pos[b - 1]) + 1],
                  "take": pa.array([None if rows is None else (pos[a:b] - pos[a]).tolist()], type=pa.list_(pa.int64()))})
        for a, b in zip(bounds[:-1], bounds[1:])])
    return ranges.map_batches(_read_rows, fn_kwargs={"uri": source.path, "split": split, "rows_per_file": r},
                              batch_size=None, batch_format="pyarrow", num_cpus=read_cpus)


def _read_rows(batch: pa.Table, *, uri: str, split: str, rows_per_file: int) -> pa.Table:
    """The rows of the ``[lo, hi)`` ranges of a block, those at ``take`` where given (in a Ray task: the
    filesystem is resolved there)."""
    parts = []
    for lo, hi, take in zip(batch.column("lo").to_pylist(), batch.column("hi").to_pylist(),
                            batch.column("take").to_pylist()):
        t = shards.read_rows(uri, split, lo=lo, hi=hi, rows_per_file=rows_per_file)
        parts.append(t if take is None else t.take(take))
    return pa.concat_tables(parts)
