"""Storage URIs (a local folder or ``s3://…``; other ``pyarrow.fs`` URIs are untested) through ``pyarrow.fs``.

Manifests are the commit markers of every stage: a partition is finished exactly
when its manifest exists, and the manifest is written last, after every data file
is in place, so a reader or a rerun never mistakes a half-written partition for a
finished one.

Object stores (``s3://bucket/prefix``): the filesystem is pyarrow's ``S3FileSystem``
as ``pyarrow.fs.FileSystem.from_uri`` makes it, configured only by the environment, as
on every node of a cluster: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or an
instance role), ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible
server (path-style addressing). No credential is ever written by this project. Buckets
are never created: a missing bucket is an error.

A local path is seen only by the node that writes it: :func:`check_shared` refuses one
as the output of a cluster of more than one node unless it is declared shared (NFS).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


# The environment an object-store filesystem is made from: a filesystem is reused only while these are unchanged.
_FS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
_BUCKET_SCHEMES = ("s3", "gs", "gcs")  # URIs whose filesystem path is bucket/key
_filesystems: dict[tuple, pafs.FileSystem] = {}


def is_local(uri: str) -> bool:
    """Whether ``uri`` is a path on this machine's disk (a plain path or ``file://``)."""
    return "://" not in uri or uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a URI or a local path (made absolute).

    An object store's filesystem is made once per (bucket, query, environment) and
    process, then reused: making one costs a request (pyarrow resolves the bucket's
    region), and the workers resolve a URI per image and per written file.
    """
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        rest, _, query = rest.partition("?")
        bucket, _, key = rest.partition("/")
        if scheme.lower() not in _BUCKET_SCHEMES:
            return pafs.FileSystem.from_uri(uri)
        cache_key = (scheme.lower(), bucket, query, tuple(os.environ.get(v) for v in _FS_ENV))
        fs = _filesystems.get(cache_key)
        if fs is None:
            fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
            _filesystems[cache_key] = fs
        return fs, f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended by ``/`` (a URI's query, if any, kept at the end)."""
    base, sep, query = uri.partition("?") if not is_local(uri) else (uri, "", "")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)]) + sep + query


def same_location(a: str, b: str) -> bool:
    """Whether two URIs or local paths name the same folder."""
    if is_local(a) and is_local(b):
        return resolve(a)[1] == resolve(b)[1]
    return a.rstrip("/") == b.rstrip("/")


def list_files(uri: str, *, suffix: str = "", recursive: bool = False) -> list[str]:
    """The files under the folder ``uri`` (as URIs or paths like it) ending in ``suffix``, sorted.

    Names starting with ``_`` or ``.`` (temporary and staged files) are skipped; a missing
    folder has none.
    """
    fs, path = resolve(uri)
    if not exists(fs, path):
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=recursive)):
        rel = info.path[len(path) + 1:]
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix):
            continue
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        out.append(join(uri, rel))
    return sorted(out)


def copy_tree(src: str, dst: str) -> None:
    """Copy the folder ``src`` to ``dst`` (any two URIs or paths), replacing what ``dst`` held."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    remove_tree(dfs, dpath)
    dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two URIs or paths (the parent of ``dst`` is created)."""
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    dfs.create_dir(dpath.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def check_shared(uri: str, *, nodes: int, shared_fs: bool, max_nodes: int = 0, option: str = "--shared_fs") -> None:
    """Refuse a local output for a cluster of more than one node, unless ``shared_fs`` declares it shared.

    The rule of every stage that writes from the cluster's workers (extraction's records,
    Tune's trials): each node writes a local path to its own disk, so the driver would
    commit files it cannot see and a rerun would redo work done elsewhere. ``nodes``: the
    cluster's nodes now; ``max_nodes``: the most its autoscaler may add up to (0: none).
    """
    if shared_fs or not is_local(uri) or max(nodes, max_nodes) <= 1:
        return
    has = f"has {nodes} nodes" if nodes > 1 else "may autoscale to more than one node"
    raise ValueError(
        f"output {uri!r} is a local path, but the Ray cluster {has} and each would write its own disk: "
        f"pass an object store (--output s3://BUCKET/PREFIX, credentials from the environment), "
        f"or {option} true if every node mounts {uri!r} (NFS)"
    )


def store_failed(uri: str, error: OSError) -> bool:
    """Whether reading ``uri`` failed because its object store did (unreachable, refused, throttled),
    rather than because of the object: a missing object is the object's fault (``FileNotFoundError``).

    A store's failure says nothing about the data and passes: the reader must fail (commit nothing,
    a rerun redoes it), never count the object as bad input and go on without it.
    """
    return not is_local(uri) and not isinstance(error, FileNotFoundError)


# An object store's failure, as pyarrow words it: "… AWS Error ACCESS_DENIED during HeadObject operation: …".
_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation(?:: (.*))?")
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "INVALID_CLIENT_TOKEN_ID",
           "UNRECOGNIZED_CLIENT", "EXPIRED_TOKEN", "MISSING_AUTHENTICATION_TOKEN")


def explain(error: BaseException | str, uri: str | None = None) -> str:
    """A one-line account of a storage failure: what went wrong with the object store and what to check.

    Errors that are not an object store's are returned as their first line.
    """
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    text = text.strip().splitlines()[0] if text.strip() else text
    where = f"{uri!r}: " if uri else ""
    bucket = re.search(r"[Bb]ucket '([^']+)'", text)
    m = _AWS_ERROR.search(text)
    code = m.group(1) if m else ""
    if "not found. To create buckets" in text or code in ("NO_SUCH_BUCKET", "NoSuchBucket"):
        name = bucket.group(1) if bucket else "?"
        return f"{where}bucket {name!r} does not exist (create it first; dtd-ray never creates buckets)"
    if code in _DENIED or (m and "403" in (m.group(3) or "")):
        return (f"{where}the object store refused the credentials ({code} during {m.group(2)}): check "
                f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and the bucket's policy)")
    if code == "NETWORK_CONNECTION" or "curlCode" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"
        detail = (m.group(3) or "").strip() if m else text
        return f"{where}cannot reach the object store at {endpoint} ({detail or 'no connection'}): is it up?"
    return f"{where}{text}" if uri else text


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
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_bytes(path: str) -> bytes:
    """The whole file at ``path``, a local path or a URI (its filesystem from :func:`resolve`); raises its ``OSError``."""
    if "://" in path:
        fs, p = resolve(path)
        with fs.open_input_file(p) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` as the whole file ``path``, atomically: on a local disk via a temporary file and rename."""
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


def write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table, *,
                  use_dictionary: bool | Sequence[str] = True, row_group_size: int | None = None) -> str:
    """Write ``table`` as one Parquet file at ``path``, atomically: readers see the whole file or none.

    The one Parquet writer of the project. On a local disk the file is written under a
    ``_tmp-…`` name in the same folder (pyarrow's dataset discovery ignores names that
    start with ``_``) and renamed into place; an object store puts whole objects, so a
    put is already atomic. Creates the parent folder. ``use_dictionary``: pyarrow's (every
    column, or the column paths named); ``row_group_size``: pyarrow's (``None``: its default). Returns ``path``.
    """
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/_tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
        try:
            pq.write_table(table, tmp, filesystem=fs, use_dictionary=use_dictionary, row_group_size=row_group_size)
            fs.move(tmp, path)
        except BaseException:
            if exists(fs, tmp):
                fs.delete_file(tmp)
            raise
    else:
        pq.write_table(table, path, filesystem=fs, use_dictionary=use_dictionary, row_group_size=row_group_size)
    return path


def remove_tree(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_dir(path)


def check_writable(uri: str) -> None:
    """Raise ``PermissionError`` with one clear line if ``uri`` cannot be written.

    Writes and deletes a probe file, so that an object store's missing bucket, refused
    credentials or unreachable endpoint are found here, before the first real write.
    """
    fs, path = resolve(uri)
    probe = f"{path}/_write_probe-{os.getpid()}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        if not is_local(uri):
            raise PermissionError(f"output {explain(e, uri)}") from None
        raise PermissionError(f"output {uri!r} is not writable: {e.strerror or e}") from None
