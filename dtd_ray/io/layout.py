"""The one Parquet layout of a decompose output: every table Hive-partitioned by its selection.

    <output>/<table>/select_split=<s>/correct_only=<b>/<model>.parquet            freq/, maps/
    <output>/<table>/select_split=<s>/correct_only=<b>/split=<e>/<model>.parquet  eval/, instances/,
                                                                                  analysis/, essentiality/

``select_split`` is the records split the maps come from (``train``, ``train_aug0``),
``correct_only`` whether only correctly classified instances counted, ``split`` the split
evaluated. As in Hive, a partition's values live in its folder names only, so
``pandas.read_parquet(<output>/eval)`` gives them back as columns; :func:`read_table` does the
same with their types (``correct_only`` a bool) and in the schema's column order.

Outputs of the earlier flat layout (``eval/<model>__<split>__<select>[__correct].parquet``) are
refused with one line by :func:`read_table`; :func:`migrate` rewrites them in place
(``dtd-ray migrate --sweep DIR``).
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtd_ray.io import schema, storage

SELECTION_KEYS = ("select_split", "correct_only")  # the folders of every table
EVAL_KEYS = SELECTION_KEYS + ("split",)  # and of the tables of one evaluation
EVAL_TABLES = ("eval", "instances", "analysis", "essentiality")
# Where read_table puts the partition columns back: after ``model``, in this order (the order of
# EVAL_SCHEMA and of the flat files before).
_COLUMN_ORDER = ("split", "select_split", "correct_only")


def partition(*, select_split: str, correct_only: bool, split: str | None = None) -> str:
    """``select_split=<s>/correct_only=<b>[/split=<e>]``: the folders of one selection (and evaluation)."""
    out = f"select_split={select_split}/correct_only={str(bool(correct_only)).lower()}"
    return out if split is None else f"{out}/split={split}"


def table_path(table: str, *, model: str, select_split: str, correct_only: bool, split: str | None = None) -> str:
    """``<table>/<partition>/<model>.parquet``, relative to a decompose output."""
    return f"{table}/{partition(select_split=select_split, correct_only=correct_only, split=split)}/{model}.parquet"


def sweep_selection(sweep_config: dict[str, Any]) -> dict[str, Any]:
    """``{select_split, correct_only}`` of the maps a sweep made (its ``sweep_config.json``): the
    folders every reader of its tables picks, where an output holds several selections."""
    c = sweep_config.get("config") or {}
    key = schema.split_key(str(c.get("train_split", "train")), augment=c.get("select_augment"),
                           seed=int(c.get("seed", 0)), val_fraction=c.get("val_fraction"))
    return {"select_split": key, "correct_only": bool(c.get("correct_only", False))}


def of_selection(df: pd.DataFrame, sel: dict[str, Any] | None) -> pd.DataFrame:
    """The rows of a decompose table (read by :func:`read_table`) of one selection (:func:`sweep_selection`):
    an output may hold several (maps from train and from an augmented pass). ``sel`` None, or a table
    without the partition columns: as it is; no row of that selection: empty (never another selection's)."""
    if sel is None or df.empty or "select_split" not in df:
        return df
    keep = (df["select_split"] == sel["select_split"]) & (df["correct_only"].astype(bool) == sel["correct_only"])
    return df[keep].reset_index(drop=True)


def sweep_maps_file(root: str, *, model: str, sweep_config: dict[str, Any]) -> str | None:
    """The maps file of ``model`` in the sweep folder ``root``, of the sweep's own selection; ``None``
    where there is none."""
    uri = storage.join(root, "decompose", table_path("maps", model=model, **sweep_selection(sweep_config)))
    fs, path = storage.resolve(uri)
    return uri if storage.exists(fs, path) else None


def write_table(table: pa.Table, root: str, rel: str) -> str:
    """Write ``table`` at ``<root>/<rel>`` (a :func:`table_path`) without the columns its folders hold;
    returns the path written."""
    keys = [k for k in _keys_of(rel) if k in table.column_names]
    fs, path = storage.resolve(root)
    return storage.write_parquet(fs, f"{path}/{rel}", table.drop_columns(keys))


def _keys_of(rel: str) -> dict[str, Any]:
    """The partition values named by the folders of ``rel`` (``key=value`` segments of known keys), typed."""
    out: dict[str, Any] = {}
    for seg in rel.split("/")[:-1]:
        key, sep, value = seg.partition("=")
        if sep and key in EVAL_KEYS:
            out[key] = value == "true" if key == "correct_only" else value
    return out


def _path(uri: str) -> str:
    """``uri`` without its query (``s3://b/x?endpoint_override=…``): the part that names the object."""
    return uri.partition("?")[0] if not storage.is_local(uri) else uri


def _refuse_flat(folder: str) -> None:
    """A one-line ``ValueError`` where the table folder ``folder`` holds files directly in it: the flat
    layout of earlier versions."""
    flat = storage.list_files(folder, suffix=".parquet")
    if flat:
        raise ValueError(f"{_path(folder)} holds tables in the flat layout of earlier versions "
                         f"({os.path.basename(_path(flat[0]))}); rewrite them with "
                         f"`dtd-ray migrate --sweep <the sweep folder>`")


def refuse_flat(root: str) -> None:
    """:func:`_refuse_flat` for every table of the decompose output ``root``: checked before anything
    is written beside such tables (:func:`migrate` rewrites them)."""
    for table in EVAL_TABLES:
        _refuse_flat(storage.join(root, table))


def read_table(uri: str) -> pd.DataFrame:
    """A decompose table (its folder, or one of its files) as one DataFrame with its partition columns;
    empty where there is none. A folder in the flat layout of earlier versions is refused in one line."""
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        files, base = [uri], ""
    else:
        _refuse_flat(uri)
        files = storage.list_files(uri, suffix=".parquet", recursive=True)
        base = _path(uri).rstrip("/")
    frames = []
    for f in files:
        df = pd.read_parquet(storage.resolve(f)[1], filesystem=fs)
        keys = _keys_of(_path(f)[len(base) + 1:] if base else _path(f))
        at = 1 if "model" in df.columns else 0
        for key in (k for k in _COLUMN_ORDER if k in keys and k not in df.columns):
            df.insert(at, key, keys[key])
            at += 1
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _flat_name(name: str) -> dict[str, Any] | None:
    """``<model>__<split>__<select>[__correct].parquet`` (the model may hold ``__``) as its parts."""
    stem = name[: -len(".parquet")]
    correct = stem.endswith("__correct")
    parts = stem.removesuffix("__correct").rsplit("__", 2)
    if len(parts) != 3 or not all(parts):
        return None
    return {"model": parts[0], "split": parts[1], "select": parts[2], "correct": correct}


def migrate(root: str) -> list[tuple[str, str]]:
    """Rewrite the flat-layout tables and manifests of the decompose output ``root`` in this layout
    (the values of the folders from each file's own columns, else from its name); returns (old, new)
    pairs. Idempotent: a migrated output has nothing left to move."""
    fs, path = storage.resolve(root)
    moved = []
    for table in EVAL_TABLES:
        for f in storage.list_files(storage.join(root, table), suffix=".parquet"):
            m = _flat_name(os.path.basename(_path(f)))
            if m is None:
                continue
            t = pq.read_table(storage.resolve(f)[1], filesystem=fs)
            values = {"split": m["split"], "select_split": m["select"], "correct_only": bool(m["correct"])}
            for key in values:
                if key in t.column_names and len(t):
                    values[key] = t.column(key)[0].as_py()
            rel = table_path(table, model=m["model"], **values)
            if storage.exists(fs, f"{path}/{rel}"):  # a newer run wrote it: the old one must not replace it
                raise ValueError(f"{_path(storage.join(root, rel))} exists beside the old {os.path.basename(_path(f))}: "
                                 f"remove one of them first")
            new = write_table(t, root, rel)
            fs.delete_file(storage.resolve(f)[1])
            moved.append((f, new))
            man = f"{path}/_manifests/{os.path.basename(_path(f))[: -len('.parquet')]}.json"
            if table == "eval" and storage.exists(fs, man):
                target = f"{path}/_manifests/{partition(**values)}/{m['model']}.json"
                storage.write_json(fs, target, storage.read_json(fs, man))
                fs.delete_file(man)
                moved.append((man, target))
    return moved
