"""Checkpoint files: fetch (local path, URL or object store, sha256-checked), unpickle safely, unwrap to a state dict.

Every load is ``torch.load(..., weights_only=True)``: a checkpoint that carries code is refused.
An object-store source (``s3://…``, and ``gs://…`` where pyarrow has it) is read through the same
pyarrow filesystem as the data (:func:`dtd_ray.io.storage.resolve`, its credentials and endpoint)
and cached once per node in the temporary folder, keyed by the URI, the object's size and its
modification time; nothing is written into the output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
import urllib.parse
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _check_sha(label: str, digest: str, sha256: str | None) -> None:
    if sha256 is None:
        return
    expected = sha256.lower()
    # A prefix (>= 8 hex digits) is what torch.hub / torchvision file names carry.
    if len(expected) < 8 or not re.fullmatch(r"[0-9a-f]+", expected):
        raise ValueError(f"sha256 {sha256!r} is not a hex digest (need at least 8 hex digits)")
    if not digest.startswith(expected):
        raise ValueError(f"{label}: sha256 mismatch: expected {expected}, file has {digest}")


def _fetch_from_store(source: str) -> str:
    """The local copy of an object-store checkpoint, fetched once per node (see the module docstring)."""
    from dtd_ray.io import storage  # the data's filesystems: imported where a store is read

    fs, path = storage.resolve(source)
    info = fs.get_file_info(path)
    if info.type.name != "File":
        raise ValueError(f"checkpoint {source.partition('?')[0]!r} is not an object in the store")
    key = hashlib.sha256(f"{source}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    cache_dir = os.path.join(tempfile.gettempdir(), "dtd-ray-weights")
    local = os.path.join(cache_dir, f"{key}-{os.path.basename(path)}")
    if not os.path.isfile(local):
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}"
        try:  # a rename: a process that reads the cache never sees half a file
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return local


def _fetch(source: str, sha256: str | None) -> tuple[str, str]:
    """``(local path, sha256 hex)`` of a local file, an http(s) URL's or an object's cached download."""
    if "://" in source and not _is_url(source) and not source.startswith("file://"):
        path = _fetch_from_store(source)
        digest = _sha256_file(path)
        _check_sha(source.partition("?")[0], digest, sha256)
        return path, digest
    if _is_url(source):
        filename = os.path.basename(urllib.parse.urlparse(source).path) or "checkpoint"
        cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        path = os.path.join(cache_dir, filename)
        if not os.path.isfile(path):
            os.makedirs(cache_dir, exist_ok=True)
            logger.info("downloading %s to %s", source, path)
            # download_url_to_file writes to a temporary file and renames, so an
            # interrupted download never leaves a truncated file in the cache.
            try:
                torch.hub.download_url_to_file(source, path, hash_prefix=None, progress=False)
            except OSError as e:  # URLError is an OSError; offline clusters are common
                raise RuntimeError(
                    f"could not download {source} ({e}); without network, put the file at {path} "
                    "or pass weights=<local file>"
                ) from e
        digest = _sha256_file(path)
        try:
            _check_sha(source, digest, sha256)
        except ValueError as e:
            raise ValueError(f"{e} (cached at {path}; delete it to download again)") from None
        return path, digest
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {source!r} is not a file")
    digest = _sha256_file(path)
    _check_sha(path, digest, sha256)
    return path, digest


# Old torchvision DenseNet checkpoints name layers "norm.1" where the modules are now
# "norm1" ('.' is no longer allowed in module names); torchvision renames on load.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _unwrap(obj: Any, label: str) -> dict[str, Tensor]:
    """The flat state dict inside the checkpoint formats people actually save."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{label}: no state dict found (expected a dict of tensors, or one under 'state_dict'/'model')")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"{label}: not a state dict: {len(bad)} non-tensor value(s), e.g. {', '.join(map(str, bad[:3]))}"
        )
    sd = dict(obj)
    # DataParallel ("module.") and torch.compile ("_orig_mod.") wrap every key.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return {(_DENSENET_LEGACY.sub(r"\1\2", k)): v for k, v in sd.items()}


def load_checkpoint(source: str, sha256: str | None) -> tuple[dict[str, Tensor], str, str]:
    path, digest = _fetch(source, sha256)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL [\w.]+", str(e))
        detail = m.group(0) if m else (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"checkpoint {source!r} refused: the checkpoint carries code (weights_only=True) and is not "
            f"loaded; re-save its state_dict with plain tensors ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {source!r} could not be read: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return _unwrap(obj, f"checkpoint {source!r}"), path, digest


def load_state_dict_file(source: str, *, sha256: str | None = None) -> dict[str, Tensor]:
    """The state dict in a local file or at an http(s) URL, read with ``weights_only=True``.

    URLs download once into ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME``).
    ``sha256`` (full hex digest, or a prefix of >= 8 hex digits) is checked when given.
    Accepts a bare state dict or one under ``'state_dict'``/``'model'``; a
    ``module.``/``_orig_mod.`` prefix on every key is stripped. Raises ``ValueError``
    for a hash mismatch, an unreadable file, or a pickle that carries code.
    """
    return load_checkpoint(source, sha256)[0]
