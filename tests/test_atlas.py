"""The feature atlas (dtd_ray.report.atlas, jobs/atlas.py) on a small sweep it makes itself.

The numbers on the page are checked against the sweep's Parquet (maps, records, trials), the top-n
ranking against a per-feature reference, and the page itself in a real browser: headless Chromium
(Debian's ``chromium``, which ``./dev setup`` installs) loads index.html from the file system, every
image loads, every class section and the class index are there, no script error; a screenshot is kept.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dtd_ray.io import records, schema
from dtd_ray.io.maptables import map_from_table
from dtd_ray.ray import sweep
from dtd_ray.report.atlas import AtlasConfig, build_atlas, class_means, confusion, overlap_counts, top_rows
from test_sweep import make_tiny_project, write_tiny_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_top_rows_matches_a_per_feature_reference():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 7))
    v[[3, 9], 2] = 9.0  # a tie at the top: the lower row first
    got = top_rows(v, 4)
    for j in range(v.shape[1]):
        ref = sorted(range(50), key=lambda r: (-v[r, j], r))[:4]
        assert list(got[:, j]) == ref
    assert top_rows(v, 80).shape == (50, 7)  # n > N: every row, ranked
    assert list(top_rows(v, 80)[:, 0]) == sorted(range(50), key=lambda r: (-v[r, 0], r))


def test_class_tables():
    f = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    np.testing.assert_allclose(class_means(f, np.array([0, 0, 1]), 3), [[2, 1], [5, 4], [0, 0]])
    np.testing.assert_array_equal(confusion(np.array([0, 0, 1]), np.array([0, 1, 1]), 2), [[1, 1], [0, 1]])
    np.testing.assert_array_equal(overlap_counts(np.array([[0, 1], [1, 2], [3, 4]])), [[2, 1, 0], [1, 2, 0], [0, 0, 2]])


@pytest.fixture(scope="module")
def site(ray_local, tmp_path_factory):
    root = make_tiny_project(tmp_path_factory.mktemp("atlas_tiny"), per_class=8)
    out = tmp_path_factory.mktemp("atlas_sweep")
    cfg = sweep.load_config(str(write_tiny_config(root, retrain={"none": {}}, strategies=["frequency", "contribution"])),
                            {"output": str(out), "report": False, "atlas": False})
    sweep.run_sweep(cfg)
    assert not (out / "atlas").exists()  # --atlas false
    site = out / "site"
    res = build_atlas(AtlasConfig(sweep=str(out), output=str(site), k=2, top=4))
    return out, site, res


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs, self.ids, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag in ("script", "link") and re.match(r"^(https?:)?//", a.get("src", "") or a.get("href", "")):
            raise AssertionError(f"loads from the network: {a}")


def test_atlas_content_matches_the_parquet(site):
    out, site_dir, res = site
    assert res["models"] == 1 and res["left_out"] == []
    page = _Page()
    page.feed((site_dir / "index.html").read_text())
    # one section per class, and the class index links to each
    assert [i for i in page.ids if i.startswith("tiny-c")] == ["tiny-c0", "tiny-c1", "tiny-c2"]
    assert {"#tiny-c0", "#tiny-c1", "#tiny-c2"} <= set(page.links)
    for img in page.imgs:
        assert (site_dir / img["src"]).is_file(), img["src"]
    # the features shown per class are the frequency map at k = 2, in its order
    maps = pd.read_parquet(next((out / "decompose" / "maps").rglob("tiny.parquet")))
    idx = map_from_table(maps, strategy="frequency", k1=2, k2=2).idx
    html = (site_dir / "index.html").read_text()
    for c in range(3):
        section = html.split(f'id="tiny-c{c}"', 1)[1].split("</section>", 1)[0]
        assert [int(x) for x in re.findall(r'class="feat" data-feature="(\d+)"', section)] == list(idx[c])
    # the top image of a feature over any class is the train record with its largest value
    rec = records.load_records(str(out / "records"), model="tiny", split="train", columns=[schema.FEATURES])
    f, ids = rec[schema.FEATURES], rec[schema.SAMPLE_ID]
    anys = [i for i in page.imgs if i["src"].split("/")[-1].startswith("any_")]
    assert anys
    for img in anys:
        feat = int(re.search(r"_f(\d+)\.webp$", img["src"]).group(1))
        shown = [int(s) for s in img["data-sample-ids"].split(",")]
        assert shown[0] == int(ids[np.argmax(f[:, feat])])
        assert len(shown) == 4 and shown == [int(ids[r]) for r in top_rows(f[:, [feat]], 4)[:, 0]]
    cfg = json.loads((site_dir / "atlas_config.json").read_text())
    assert cfg["k"] == 2 and cfg["sweep_config"]["name"]


def test_a_missing_image_folder_is_left_out_with_its_reason(site, tmp_path):
    out, _, _ = site
    moved = tmp_path / "sweep"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("site"))
    cfg = json.loads((moved / "sweep_config.json").read_text())
    for u in cfg["resolved"]["units"]:
        u["dataset"] = u["dataset_abs"] = "imagefolder:/nonexistent/images"
    (moved / "sweep_config.json").write_text(json.dumps(cfg))
    res = build_atlas(AtlasConfig(sweep=str(moved), output=str(tmp_path / "s2"), k=2, top=4))
    assert res["models"] == 1 and any("images not readable" in x for x in res["left_out"])
    assert "left out: tiny: images not readable" in (tmp_path / "s2" / "index.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (./dev setup installs Debian's chromium)")
def test_atlas_in_a_real_browser(site, tmp_path):
    _, site_dir, _ = site
    url = (site_dir / "index.html").resolve().as_uri()
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    n_img = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert n_img > 0 and 'data-broken-images="0"' in body, body  # every image loaded
    for c in range(3):
        assert f'id="tiny-c{c}"' in dom.stdout
    errors = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "error" in ln.lower())]
    assert not errors, errors
    shot = ROOT / "runs" / "test_atlas_screenshot.png"
    shot.parent.mkdir(exist_ok=True)
    r = subprocess.run(base + ["--window-size=1280,1600", f"--screenshot={shot}", url], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]


def test_many_classes_get_one_page_each(site, tmp_path):
    out, _, _ = site
    res = build_atlas(AtlasConfig(sweep=str(out), output=str(tmp_path / "paged"), k=2, top=2, per_class_pages_over=2))
    index = (tmp_path / "paged" / "index.html").read_text()
    for c in range(3):
        assert f'href="tiny/class_{c}.html"' in index
        page = _Page()
        page.feed((tmp_path / "paged" / "tiny" / f"class_{c}.html").read_text())
        assert page.imgs and all((tmp_path / "paged" / "tiny" / i["src"]).is_file() for i in page.imgs)
    assert res["models"] == 1


def test_the_report_reads_the_extraction_table_from_the_manifests(site, tmp_path):
    from dtd_ray.report.tables import EXTRACTION_FILE, extraction_table

    out, _, _ = site
    t = extraction_table(str(out))
    assert list(t["split"]) == ["test", "train"] and set(t["model"]) == {"tiny"}
    assert list(t["rows"]) == [24, 24] and (t["seconds"] > 0).all() and (t["m"] == 64).all()
    # a report folder without records keeps the table as extraction.json
    (tmp_path / EXTRACTION_FILE).write_text(json.dumps({"rows": t.to_dict(orient="records")}))
    pd.testing.assert_frame_equal(extraction_table(str(tmp_path)), t)
