"""Storage URIs (a local folder, ``s3://…``, ``gs://…``) through ``pyarrow.fs``.

Manifests are the commit markers of every stage: a partition is finished exactly
when its manifest exists, and the manifest is written last, after every data file
is in place, so a reader or a rerun never mistakes a half-written partition for a
finished one.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a URI or a local path (made absolute)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or ``None`` where there is no file."""
    if not exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json(fs: pafs.FileSystem, path: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON; on a local disk via a temporary file and rename, so it is atomic."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:  # object stores write whole objects: a put is already atomic
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> str:
    """Write ``table`` as one Parquet file at ``path``, atomically: readers see the whole file or none.

    The one Parquet writer of the project. On a local disk the file is written under a
    ``_tmp-…`` name in the same folder (pyarrow's dataset discovery ignores names that
    start with ``_``) and renamed into place; an object store puts whole objects, so a
    put is already atomic. Creates the parent folder. Returns ``path``.
    """
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/_tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
        try:
            pq.write_table(table, tmp, filesystem=fs)
            fs.move(tmp, path)
        except BaseException:
            if exists(fs, tmp):
                fs.delete_file(tmp)
            raise
    else:
        pq.write_table(table, path, filesystem=fs)
    return path


def remove_tree(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_dir(path)


def check_writable(uri: str) -> None:
    """Raise ``PermissionError`` with one clear line if ``uri`` cannot be written."""
    fs, path = resolve(uri)
    probe = f"{path}/_write_probe-{os.getpid()}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise PermissionError(f"output {uri!r} is not writable: {e.strerror or e}") from None
