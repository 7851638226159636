"""jobs/bench_shards.py: its inputs, its argument checks and one real run of both sources (correctness, never time)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dtd_ray.data.sources import FASHION_MNIST_DEFAULT_PATH, parse_source
from jobs import bench_shards as bs

needs_fmnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_PATH),
                                  reason="Fashion-MNIST not installed (./dev setup installs dataset-fashion-mnist)")


@pytest.mark.parametrize("kwargs, message", [
    ({"stores": ("local", "gcs")}, "stores: gcs not among local, s3"),
    ({"small": 100, "full": 100}, "full > small"),
    ({"repeats": 0}, "must be >= 1"),
])
def test_bad_arguments_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        bs.ShardBenchConfig(**kwargs)
    assert "\n" not in str(e.value)


@needs_fmnist
def test_folder_holds_the_first_train_images_as_pngs(tmp_path):
    bs.write_folder(str(tmp_path), small=7, full=5)
    cols = parse_source("fashion-mnist").read_numpy("train")
    for split, lo, hi in (("small", 0, 7), ("full", 7, 12)):
        files = sorted((tmp_path / split).glob("*/*.png"))
        assert len(files) == hi - lo
        for f in files:
            i = int(f.stem)
            assert lo <= i < hi and int(f.parent.name) == int(cols["label"][i])
            assert np.array_equal(np.asarray(Image.open(f)), cols["image"][i][..., 0])  # PNG: lossless


@needs_fmnist
@pytest.mark.timeout(600)
def test_a_run_measures_both_sources_on_the_same_rows(ray_local, tmp_path):
    out = tmp_path / "bench.json"
    bs.main(bs.ShardBenchConfig(small=60, full=180, repeats=1, stores=("local",), json=str(out), tmp=str(tmp_path)))
    rec = json.loads(out.read_text())
    (store,) = rec["stores"]
    (rep,) = store["repeats"]
    for kind in ("folder", "shards"):
        assert rep[kind]["small"]["rows"] == 60 and rep[kind]["full"]["rows"] == 180
    assert store["sources"]["shards"].startswith("parquet:") and store["sources"]["folder"].startswith("imagefolder:")
    assert rec["config"]["rows_per_file"] == 1000 and rec["cpu_count"] == os.cpu_count()
    assert not list(tmp_path.glob("bench_shards_*"))  # the scratch folder is removed
