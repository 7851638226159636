"""The trials store: one Parquet file per finished trial, ``<output>/trials/<trial_id>.parquet``.

Each row is written atomically (:func:`dtd_ray.io.storage.write_parquet`) the moment its
trial finishes, so a row file exists exactly when its trial finished: a rerun skips those
(:func:`finished_trial_ids`) and never writes a row twice. Schema: ``schema.TRIALS_SCHEMA``.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from dtd_ray.io import schema, storage


def trials_root(output: str) -> str:
    return f"{output.rstrip('/')}/trials"


def timestamp() -> str:
    """The current UTC time as rows and markers record it (``finished_at``, ``started_at``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def finished_trial_ids(output: str) -> set[str]:
    """Trial ids with a row file under ``<output>/trials`` (temporary ``_…`` files ignored)."""
    fs, path = storage.resolve(trials_root(output))
    if not storage.exists(fs, path):
        return set()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return {
        i.base_name[: -len(".parquet")]
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))
    }


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """``rows`` as a table of ``schema.TRIALS_SCHEMA`` (missing columns null)."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema.TRIALS_SCHEMA}
    return pa.Table.from_pydict(cols, schema=schema.TRIALS_SCHEMA)


def write_trial_row(output: str, row: dict[str, Any]) -> str:
    """Write one trial's row as ``trials/<trial_id>.parquet`` atomically; returns the path."""
    fs, path = storage.resolve(trials_root(output))
    return storage.write_parquet(fs, f"{path}/{row['trial_id']}.parquet", rows_to_table([row]))


def read_trials(output: str, trial_ids: list[str] | None = None) -> pd.DataFrame:
    """The rows under ``<output>/trials`` (optionally only ``trial_ids``) as a DataFrame."""
    fs, path = storage.resolve(trials_root(output))
    if not storage.exists(fs, path):
        return rows_to_table([]).to_pandas()
    ds = pads.dataset(path, filesystem=fs, format="parquet", schema=schema.TRIALS_SCHEMA)
    if trial_ids is not None:
        table = ds.to_table(filter=pc.field("trial_id").isin(list(trial_ids)))
    else:
        table = ds.to_table()
    return table.to_pandas()
