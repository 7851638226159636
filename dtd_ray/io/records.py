"""Read and write extraction records (``records/model=…/split=…/``) as numpy arrays.

The record columns are defined in :mod:`dtd_ray.io.schema`. A partition is finished
when its ``_manifest.json`` exists; readers refuse unfinished partitions rather
than return a partial table. Beside its Parquet files a partition holds ``_head.npz``
(:data:`HEAD_NAME`): the final linear layer ``(W, b)`` the records were extracted with,
written before the manifest, so that later stages never rebuild the network to get it.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dtd_ray.io import schema
from dtd_ray.io import storage


def _list_to_2d(col: pa.ChunkedArray | pa.Array, width: int | None = None) -> np.ndarray:
    """A list<…> column whose lists all have one length as an (N, width) array, without a Python loop."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if n == 0:
        return np.zeros((0, width or 0), dtype=col.type.value_type.to_pandas_dtype())
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    w = int(lengths[0])
    if not (lengths == w).all():
        raise ValueError(f"list column has rows of different lengths ({lengths.min()}..{lengths.max()})")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, w)


def records_to_table(arrays: dict[str, np.ndarray]) -> pa.Table:
    """Build a table with :data:`schema.RECORDS_SCHEMA` from numpy arrays (2-D for the vector columns)."""
    cols = []
    for field in schema.RECORDS_SCHEMA:
        a = arrays[field.name]
        if pa.types.is_list(field.type):
            a = np.ascontiguousarray(a, dtype=field.type.value_type.to_pandas_dtype())
            n, w = a.shape
            offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32) if n else np.zeros(1, np.int32))
            cols.append(pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1))).cast(field.type))
        else:
            cols.append(pa.array(np.asarray(a, dtype=field.type.to_pandas_dtype()), type=field.type))
    return pa.Table.from_arrays(cols, schema=schema.RECORDS_SCHEMA)


def concat_records(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches of records (the same columns each) as one, rows in order; a single batch as it is."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_part(batch: dict[str, np.ndarray], *, staging_uri: str) -> dict[str, np.ndarray]:
    """Write the ok rows of one batch to a new Parquet file under ``staging_uri``; return its summary.

    The write of the extraction pipeline, done at the end of each call of its model stage
    (:func:`dtd_ray.models.extractor.writing_stage`). The summary (one row) names the file and
    carries the skipped rows' ids and reasons, so the driver can account for every input row
    without reading the data back.
    """
    ok = np.asarray(batch["ok"], dtype=bool)
    rows = {name: np.asarray(batch[name])[ok] for name in schema.RECORDS_SCHEMA.names}
    name = ""
    if ok.any():
        fs, path = storage.resolve(staging_uri)
        name = f"part-{uuid.uuid4().hex}.parquet"
        storage.write_parquet(fs, f"{path}/{name}", records_to_table(rows),
                              use_dictionary=list(schema.RECORDS_DICTIONARY_COLUMNS))
    skipped = [
        {"sample_id": int(s), "reason": str(e)}
        for s, e in zip(np.asarray(batch[schema.SAMPLE_ID])[~ok], np.asarray(batch["error"])[~ok])
    ]
    ids = rows[schema.SAMPLE_ID]
    return {
        "file": np.array([name], dtype=object),
        "rows": np.array([int(ok.sum())], dtype=np.int64),
        "min_id": np.array([int(ids.min()) if len(ids) else -1], dtype=np.int64),
        "skipped": np.array([json.dumps(skipped)], dtype=object),
    }


def table_to_records(table: pa.Table) -> dict[str, np.ndarray]:
    """The inverse of :func:`records_to_table`: 1-D arrays and (N, width) arrays for vector columns."""
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            out[name] = _list_to_2d(col)
        else:
            out[name] = col.to_numpy()
    return out


def partition_uri(root: str, *, model: str, split: str) -> str:
    return schema.partition_path(root, model=model, split=split)


def read_manifest(root: str, *, model: str, split: str) -> dict[str, Any] | None:
    fs, path = storage.resolve(partition_uri(root, model=model, split=split))
    return storage.read_json(fs, f"{path}/{schema.MANIFEST_NAME}")


# The underscore keeps it out of Parquet dataset discovery (pyarrow skips "_" and "." names), as the manifest.
HEAD_NAME = "_head.npz"


def write_head(fs: Any, path: str, *, weight: np.ndarray, bias: np.ndarray, identity: dict[str, Any]) -> str:
    """Write the final linear layer into the partition folder ``path`` (atomically); returns the file's path.

    An ``.npz`` with ``weight`` (C, m) and ``bias`` (C,) as given (the module's float32
    tensors, so a reader gets the very values the records' ``pred`` came from) and
    ``identity``: the JSON of what the head is (backbone, weights, sha256). The same file
    is a valid ``--head`` for decomposition.
    """
    buf = io.BytesIO()
    np.savez(buf, weight=np.asarray(weight), bias=np.asarray(bias),
             identity=np.array(json.dumps(identity, sort_keys=True, default=str)))
    storage.write_bytes(fs, f"{path}/{HEAD_NAME}", buf.getvalue())
    return f"{path}/{HEAD_NAME}"


def read_head(root: str, *, model: str, split: str) -> dict[str, Any] | None:
    """``{"weight", "bias", "identity", "uri"}`` of a partition's stored head; ``None`` where it has none."""
    uri = f"{partition_uri(root, model=model, split=split)}/{HEAD_NAME}"
    fs, path = storage.resolve(uri)
    if not storage.exists(fs, path):
        return None
    with fs.open_input_file(path) as f:
        z = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return {"weight": z["weight"], "bias": z["bias"], "identity": json.loads(str(z["identity"])), "uri": uri}


def load_records(
    root: str, *, model: str, split: str, columns: list[str] | None = None
) -> dict[str, np.ndarray]:
    """All records of one finished partition as numpy arrays, sorted by ``sample_id``.

    Vector columns come back as (N, width) arrays. Raises ``FileNotFoundError`` when the
    partition has no manifest (missing or unfinished).
    """
    uri = partition_uri(root, model=model, split=split)
    if read_manifest(root, model=model, split=split) is None:
        raise FileNotFoundError(
            f"no finished records at {uri} (no {schema.MANIFEST_NAME}); run jobs/extract.py first"
        )
    fs, path = storage.resolve(uri)
    cols = list(columns) if columns else list(schema.RECORDS_SCHEMA.names)
    if schema.SAMPLE_ID not in cols:
        cols.append(schema.SAMPLE_ID)
    ds = pads.dataset(path, filesystem=fs, format="parquet", schema=schema.RECORDS_SCHEMA)
    table = ds.to_table(columns=cols)
    table = table.sort_by(schema.SAMPLE_ID)
    return table_to_records(table)


def partition_info(root: str, *, model: str, split: str) -> tuple[str, Any, str, dict[str, Any]]:
    manifest = read_manifest(root, model=model, split=split)
    uri = partition_uri(root, model=model, split=split)
    if manifest is None:
        raise FileNotFoundError(f"no finished records at {uri} (no {schema.MANIFEST_NAME}); run jobs/extract.py first")
    for key in ("kmax", "feature_dim", "num_classes"):
        if key not in manifest:
            raise ValueError(f"records manifest at {uri} lacks {key!r}")
    fs, path = storage.resolve(uri)
    return uri, fs, path, manifest


def iter_record_batches(fs: Any, path: str, *, columns: list[str], batch_rows: int) -> Iterable[pa.RecordBatch]:
    """The partition's rows, file by file and batch by batch, reading only ``columns``.

    One ``ParquetFile.iter_batches`` at a time rather than a dataset scan: the scanner's
    read-ahead over several files and row groups held ~1 GB for an ImageNet-size
    partition, this holds about one row group.
    """
    files = sorted(pads.dataset(path, filesystem=fs, format="parquet").files)
    for file in files:
        with fs.open_input_file(file) as fh:
            pf = pq.ParquetFile(fh)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
