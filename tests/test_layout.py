"""The one Parquet layout of a decompose output (dtd_ray.io.layout): written partitioned, read
back whole and typed, the flat layout of earlier versions refused in one line and migrated."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtd_ray.io import layout, schema


def _eval_frame(model: str, *, correct_only: bool = False) -> pd.DataFrame:
    n = 3
    return pd.DataFrame({
        "model": model, "split": "test", "select_split": "train", "correct_only": correct_only,
        "strategy": ["frequency", "weight_l1", "random"], "k1": np.array([2, -1, -1], np.int32),
        "map_seed": np.array([-1, -1, 0], np.int32), "k2": np.array([2, 2, 2], np.int32),
        "n_instances": np.full(n, 10, np.int64), "acc_full": 0.9, "acc_decomposed": [0.8, 0.7, 0.3],
        "head_macs_full": np.full(n, 640, np.int64), "head_macs_decomposed": np.full(n, 20, np.int64),
        "channels_used": np.array([11, 12, 19], np.int32), "outcomes": [b"\x01", b"\x02", b"\x03"],
    })


def _table(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df, schema=schema.EVAL_SCHEMA, preserve_index=False)


def test_written_partitioned_and_read_back_whole(tmp_path):
    for model, co in (("b", False), ("a", False), ("a", True)):
        rel = layout.table_path("eval", model=model, select_split="train", correct_only=co, split="test")
        layout.write_table(_table(_eval_frame(model, correct_only=co)), str(tmp_path), rel)
    f = tmp_path / "eval/select_split=train/correct_only=true/split=test/a.parquet"
    assert f.is_file()
    assert "correct_only" not in pq.read_schema(f).names and "split" not in pq.read_schema(f).names
    back = layout.read_table(str(tmp_path / "eval"))
    assert list(back.columns) == schema.EVAL_SCHEMA.names and back["correct_only"].dtype == bool
    want = pd.concat([_eval_frame("a"), _eval_frame("b"), _eval_frame("a", correct_only=True)], ignore_index=True)
    key = ["correct_only", "model", "strategy"]
    pd.testing.assert_frame_equal(back.sort_values(key).reset_index(drop=True),
                                  want.sort_values(key).reset_index(drop=True), check_dtype=False)
    # one file alone reads with its partition columns too (the sweep's resume reads one)
    one = layout.read_table(str(f))
    assert one["correct_only"].all() and (one["split"] == "test").all()
    # pandas alone reads the folder as a Hive dataset
    assert len(pd.read_parquet(tmp_path / "eval")) == 9


def test_flat_layout_is_refused_in_one_line_and_migrated(tmp_path):
    root = tmp_path / "decompose"
    (root / "eval").mkdir(parents=True)
    (root / "_manifests").mkdir()
    df = _eval_frame("cifar__x")  # a model key may hold "__" (a sweep unit's <model>__<dataset>)
    pq.write_table(_table(df), root / "eval" / "cifar__x__test__train__correct.parquet")
    (root / "_manifests" / "cifar__x__test__train__correct.json").write_text(json.dumps({"ok": 1}))
    with pytest.raises(ValueError) as ei:
        layout.read_table(str(root / "eval"))
    msg = str(ei.value)
    assert "\n" not in msg and "flat layout" in msg and "dtd-ray migrate" in msg
    moved = layout.migrate(str(root))
    assert len(moved) == 2 and not list((root / "eval").glob("*.parquet"))
    # the folder values come from the file's own columns (correct_only False here, whatever the name said)
    new = root / "eval/select_split=train/correct_only=false/split=test/cifar__x.parquet"
    assert new.is_file()
    assert json.loads((root / "_manifests/select_split=train/correct_only=false/split=test/cifar__x.json")
                      .read_text()) == {"ok": 1}
    pd.testing.assert_frame_equal(layout.read_table(str(root / "eval")), df, check_dtype=False)
    assert layout.migrate(str(root)) == []  # idempotent


def test_migrate_command_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "jobs/migrate.py", "--sweep", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=layout.__file__.rsplit("/dtd_ray/", 1)[0], timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: no such folder: {tmp_path / 'nope'}"


def test_an_earlier_versions_output_is_refused_before_anything_is_written_beside_it(tmp_path):
    """A decompose or a sweep on an output of the flat layout stops at once, in one line; migrate never
    replaces a table a newer run wrote."""
    root = tmp_path / "decompose"
    (root / "instances").mkdir(parents=True)
    pq.write_table(pa.table({"model": ["m"], "split": ["test"], "sample_id": [0]}), root / "instances" / "m__test__train.parquet")
    with pytest.raises(ValueError, match=r"flat layout of earlier versions \(m__test__train.parquet\).*dtd-ray migrate"):
        layout.refuse_flat(str(root))
    newer = root / "instances/select_split=train/correct_only=false/split=test/m.parquet"
    newer.parent.mkdir(parents=True)
    pq.write_table(pa.table({"model": ["m"], "sample_id": [1]}), newer)
    with pytest.raises(ValueError, match="exists beside the old m__test__train.parquet"):
        layout.migrate(str(root))
    assert pq.read_table(newer).column("sample_id").to_pylist() == [1]  # untouched
