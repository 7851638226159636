"""The cluster path for real: the sweep against an S3-compatible object store, on several nodes, with faults.

The store is a real S3 HTTP server (``tests/s3_server.py``: moto's standalone server in a
subprocess on 127.0.0.1, authentication enforced). Every client reaches it through the
environment only (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), set before the Ray nodes start, as on a real cluster; the client is
pyarrow's ``S3FileSystem``, the code path of a user's ``s3://`` URI.

The cluster is ``ray.cluster_utils.Cluster``: a head and two worker nodes, one CPU each.
Its nodes share this machine's disk, so a local output would seem to work on it; on a real
cluster each node writes its own disk. Hence: a local output on it is refused unless
declared shared (``shared_fs``), and the S3 sweep reads its images from the bucket and writes
everything there. (The checkpoint stays a local file: on a real cluster every node has it
under ``--data_root``, as README says.)

* the whole sweep (extraction, decomposition, trials of all three retrain modes, the report)
  with ``imagefolder:s3://…`` and ``--output s3://…`` gives the rows and records of the same
  sweep on local folders, to the last digit; a rerun skips everything; pandas reads
  ``trials/`` and ``records/`` from ``s3://`` with the environment alone;
* the multi-node extraction tests of ``tests/test_reliability.py`` with the output on S3:
  records from >= 2 nodes, an actor killed and a node removed mid-run;
* faults of the store: its endpoint stopped mid-write and restarted (one line, nothing
  committed, the rerun completes exactly once), down while images are read (the batch fails;
  never counted skips), a bucket that does not exist, wrong credentials (one line each,
  before the first write);
* the soak (``jobs/soak.py``, two runs), marked ``slow``: skipped unless asked for.

The images are a small subset of CIFAR-10 with the public ResNet-20 where ``../shared/data``
has them, else a synthetic 10-class image folder with a fitted head (so the file runs in a
fresh clone too); either way the sweep is small.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import CIFAR10_DIR, CIFAR_RESNETS_DIR
from dtd_ray.io import records, schema
from s3_server import S3Server
from test_reliability import (N_IMAGES, TAG, Fault, fe_tasks, mn_config, mn_data, settled_fe_tasks_by_node,
                              three_node_cluster, wait_for_no_fe_processes, write_checkpoint, write_imagefolder)

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "dtd"

# The file takes about 3 minutes on 2 busy cores; every wait below has its own bound too.
pytestmark = pytest.mark.timeout(420)

__all__ = ["mn_data"]  # a fixture, imported for the multi-node tests


# ----------------------------------------------------------------------------- the store and the cluster


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, its bucket, and its environment in this process for the module (restored after):
    the driver, pandas and every Ray node started meanwhile reach the store through it."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        server.create_bucket(BUCKET)
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def s3_cluster(s3):
    """Head + two worker nodes (1 CPU each) started with the store's environment, the driver connected."""
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint  # set by s3 before the nodes start: their workers inherit it
    # after: the session's local Ray again, without the store's environment
    with three_node_cluster(drop_env_after=tuple(s3.env)) as c:
        yield c


# ----------------------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def e2e_data(s3, tmp_path_factory):
    """An image folder on disk and the same folder uploaded to ``s3://dtd/data/<name>``, with its checkpoint."""
    root = tmp_path_factory.mktemp("e2e")
    if CIFAR10_DIR.is_dir() and CIFAR_RESNETS_DIR.is_dir():
        name, weights, norm = "cifar10", str(CIFAR_RESNETS_DIR / "resnet20-12fca82f.th"), "cifar10"
        for split, per_class in (("train", 30), ("test", 20)):  # the first images of each class
            for cls in sorted(p.name for p in (CIFAR10_DIR / split).iterdir() if p.is_dir()):
                dst = root / name / split / cls
                dst.mkdir(parents=True)
                for f in sorted((CIFAR10_DIR / split / cls).glob("*.png"))[:per_class]:
                    shutil.copyfile(f, dst / f.name)
    else:  # a fresh clone without ../shared/data: tinted noise, 10 classes, a head fitted to it
        name, weights, norm = "images", str(root / "ckpt.th"), None
        write_imagefolder(root / name, 300, split="train", seed=5)
        write_imagefolder(root / name, 200, split="test", seed=6)
        write_checkpoint(root / "ckpt.th")
    n = s3.upload_dir(root / name, BUCKET, f"data/{name}")
    assert n == 500
    return SimpleNamespace(name=name, local=root / name, uri=f"s3://{BUCKET}/data/{name}", weights=weights,
                           normalization=norm, root=root)


def sweep_yaml(data, path: Path) -> Path:
    """A small sweep: k 1..3, four strategies (random: 2 map seeds), all three retrain modes."""
    model = {"name": "cifar_resnet20", "weights": data.weights, "tag": "r20"}
    if data.normalization:
        model["normalization"] = data.normalization
    path.write_text(yaml.safe_dump({
        "datasets": [f"imagefolder:{data.local}"],
        "models": [model],
        "k": "1..3",
        "strategies": ["frequency", "weight_l1", "contribution", "random"],
        "random_seeds": 2,
        "noise_seeds": 2,
        "kmax": 8,
        "extract_batch_size": 50,
        "use_gpu": False,
        "retrain": {
            "none": {},
            "head": {"k": [2], "strategies": ["frequency", "weight_l1"], "epochs": 2, "batch_size": 64},
            "finetune": {"k": [2], "strategies": ["frequency"], "epochs": 1, "batch_size": 32, "max_train_rows": 64},
        },
    }, sort_keys=False))
    return path


N_TRIALS = 3 * 5 + 2 + 1  # none: k 1..3 × (3 strategies + 2 random seeds); head: 2; finetune: 1


def load(spec: Path, **overrides):
    from dtd_ray.ray import sweep

    return sweep.load_config(str(spec), overrides)


@pytest.fixture(scope="module")
def swept(s3_cluster, s3, e2e_data, tmp_path_factory):
    """The same sweep twice on the cluster: on local folders (declared shared) and on the store."""
    from dtd_ray.ray import sweep

    tmp = tmp_path_factory.mktemp("swept")
    spec = sweep_yaml(e2e_data, tmp / "s3sweep.yaml")
    local_out = tmp / "local"
    t0 = time.perf_counter()
    local = sweep.run_sweep(load(spec, output=str(local_out), shared_fs=True))
    t_local = time.perf_counter() - t0
    uri = f"s3://{BUCKET}/run"
    cfg = load(spec, output=uri, datasets=[f"imagefolder:{e2e_data.uri}"])
    since_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    remote = sweep.run_sweep(cfg)
    t_s3 = time.perf_counter() - t0
    print(f"[test_s3] {e2e_data.name}: local sweep {t_local:.1f} s, s3 sweep {t_s3:.1f} s")
    return SimpleNamespace(local=local, local_out=local_out, remote=remote, uri=uri, cfg=cfg, since_ms=since_ms,
                           data=e2e_data)


# Columns that differ between two runs of the same trial by construction: timing, where it ran or was
# written, and the trial id (a hash of what it computes, the dataset's location included).
NOT_COMPARED = ("trial_id", "seconds", "finished_at", "checkpoint", "dataset_uri", "config")


def comparable(df: pd.DataFrame, *locations: str) -> pd.DataFrame:
    """``df`` without the columns above or any other column naming one of ``locations``, sorted, lists as tuples.

    Generic on purpose: a column the trials table gains later is compared too."""
    d = df.drop(columns=[c for c in NOT_COMPARED if c in df.columns])
    for c in list(d.columns):
        if d[c].map(lambda v: isinstance(v, str) and any(x in v for x in locations)).any():  # any dtype (pandas 3: "str")
            d = d.drop(columns=c)
    for c in d.columns:
        if d[c].dtype == object:
            d[c] = d[c].map(lambda v: tuple(np.asarray(v).tolist()) if isinstance(v, (list, np.ndarray)) else v)
    keys = [c for c in ("model", "retrain_mode", "strategy", "k1", "k2", "map_seed") if c in d.columns]
    return d.sort_values(keys).reset_index(drop=True)


# ----------------------------------------------------------------------------- a local output on several nodes


def test_local_output_on_a_multinode_cluster_is_refused_up_front(s3_cluster, e2e_data, tmp_path):
    from dtd_ray.ray import sweep
    from dtd_ray.ray.extract import ExtractConfig, run_extract

    out = tmp_path / "out"
    cfg = load(sweep_yaml(e2e_data, tmp_path / "s.yaml"), output=str(out))
    with pytest.raises(ValueError) as e:
        sweep.run_sweep(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"output '{out}' is a local path, but the Ray cluster has 3 nodes and each would write its own "
                   "disk: pass an object store (--output s3://BUCKET/PREFIX, credentials from the environment), "
                   f"or --shared_fs true if every node mounts '{out}' (NFS)")
    assert not [p for p in out.rglob("*") if p.is_file()], "something was written before the refusal"
    # extraction alone refuses the same way; shared_fs=True (the test clusters of test_reliability.py) runs
    ecfg = ExtractConfig(model="cifar_resnet20", weights=e2e_data.weights, dataset=f"imagefolder:{e2e_data.local}",
                         splits=("test",), output=str(tmp_path / "ext"), use_gpu=False)
    with pytest.raises(ValueError, match=r"is a local path, but the Ray cluster has 3 nodes"):
        run_extract(ecfg)
    assert not (tmp_path / "ext" / "records").exists()


# ----------------------------------------------------------------------------- the sweep on the store


def test_sweep_on_s3_matches_the_same_sweep_on_local_folders(swept, s3, s3_cluster):
    local = pd.read_parquet(swept.local_out / "trials")
    remote = swept.remote["trials"]
    assert len(local) == len(remote) == N_TRIALS and remote["trial_id"].is_unique
    assert swept.remote["ran"] == {"none": 15, "head": 2, "finetune": 1} and swept.remote["skipped"] == 0
    a = comparable(local, str(swept.local_out), str(swept.data.local))
    b = comparable(remote, swept.uri, swept.data.uri)
    for col in ("acc_full", "acc_decomposed", "acc_retrained", "outcomes", "acc_by_epoch", "channels_used"):
        assert col in a.columns and col in b.columns, col  # what "the same rows" means includes these
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # every compared value, to the last digit
    assert remote.loc[remote.retrain_mode != "none", "acc_retrained"].notna().all()
    assert remote["checkpoint"].dropna().str.startswith(f"{BUCKET}/run/tune/").all()  # Tune's storage is the bucket
    # the records: the same rows and features from the bucket as from the local folder
    for split, n in (("train", 300), ("test", 200)):
        lr = records.load_records(str(swept.local_out / "records"), model="r20", split=split)
        rr = records.load_records(f"{swept.uri}/records", model="r20", split=split)
        assert len(rr["sample_id"]) == n and (rr["sample_id"] == np.arange(n)).all()
        for col in lr:
            np.testing.assert_array_equal(rr[col], lr[col], err_msg=f"{split}.{col}")
    # the cluster's workers read the images from the bucket and wrote the records to it (that they do so
    # from >= 2 nodes at once: test_multinode_extraction_writes_records_to_s3_from_several_nodes)
    alive = {n["NodeID"] for n in __import__("ray").nodes() if n["Alive"]}
    nodes = settled_fe_tasks_by_node(s3_cluster, since_ms=swept.since_ms)
    assert nodes and set(nodes) <= alive and sum(nodes.values()) >= 2  # one task per split at least
    # the report, written to the bucket
    keys = s3.keys(BUCKET, "run/")
    assert "run/report.md" in keys and "run/report_config.json" in keys and "run/plots/accuracy_vs_k.png" in keys
    md = s3.client().get_object(Bucket=BUCKET, Key="run/report.md")["Body"].read().decode()
    freq2 = remote[(remote.retrain_mode == "none") & (remote.strategy == "frequency") & (remote.k2 == 2)]
    assert md.startswith("# dtd-ray sweep report") and f"| {freq2.acc_decomposed.iloc[0]:.2f} |" in md
    assert swept.remote["report"] == f"{swept.uri}/report.md"
    png = s3.client().get_object(Bucket=BUCKET, Key="run/plots/accuracy_vs_k.png")["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_pandas_reads_trials_and_records_from_s3_with_the_environment_alone(swept):
    # as README's "Object store (S3)" shows: no storage_options; pyarrow's S3 filesystem reads the environment
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    t = pd.read_parquet(f"{swept.uri}/trials")
    assert len(t) == N_TRIALS and set(t.trial_id) == set(swept.remote["trials"].trial_id)
    rec = pd.read_parquet(f"{swept.uri}/records", columns=["sample_id", "label", "pred", "model", "split"])
    assert rec.groupby("split", observed=True).size().to_dict() == {"test": 200, "train": 300}
    assert set(rec["model"]) == {"r20"}
    # the decomposition's tables too
    ev = pd.read_parquet(f"{swept.uri}/decompose/eval")
    assert {"strategy", "k1", "k2", "acc_decomposed"} <= set(ev.columns) and len(ev) > 0


def test_report_from_s3_into_a_local_folder(swept, tmp_path):
    """``jobs/report.py --sweep s3://… --output DIR``: the report and the tables it read, in a local folder."""
    from dtd_ray.report import ReportConfig, make_report

    rep = tmp_path / "rep"
    res = make_report(ReportConfig(sweep=swept.uri, output=str(rep), k=2, cam_images=0))
    assert res["report"] == str(rep / "report.md") and (rep / "report.md").read_text().startswith("# dtd-ray")
    assert (rep / "plots" / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copied = pd.read_parquet(rep / "trials")
    pd.testing.assert_frame_equal(comparable(copied, swept.uri), comparable(swept.remote["trials"], swept.uri),
                                  check_exact=True)
    assert json.loads((rep / "sweep_config.json").read_text())["resolved"]["output"] == swept.uri
    assert (rep / "decompose" / "eval").is_dir() and not (rep / "records").exists()


def test_rerun_on_s3_skips_everything_finished(swept, s3, capsys):
    from dtd_ray.ray import sweep

    def committed():  # every object a stage commits (the report and sweep_config.json are rewritten)
        return {k: v for k, v in s3.keys(BUCKET, "run/").items()
                if k.startswith(("run/trials/", "run/records/", "run/decompose/")) and not k.endswith("/")}

    before = committed()
    assert sum(k.startswith("run/trials/") for k in before) == N_TRIALS
    capsys.readouterr()
    res = sweep.run_sweep(swept.cfg)
    text = capsys.readouterr().out
    assert res["ran"] == {"none": 0, "head": 0, "finetune": 0} and res["skipped"] == N_TRIALS
    assert f"{N_TRIALS} of {N_TRIALS} trial(s) finished earlier" in text and "[extract]" not in text
    assert committed() == before  # not one object rewritten (ETag and LastModified)
    # one trial's row lost (a driver killed before it was written): only that trial runs again
    lost = res["trials"][res["trials"].retrain_mode == "head"].trial_id.iloc[0]
    s3.client().delete_object(Bucket=BUCKET, Key=f"run/trials/{lost}.parquet")
    res = sweep.run_sweep(swept.cfg)
    text = capsys.readouterr().out
    assert res["ran"] == {"none": 0, "head": 1, "finetune": 0} and res["skipped"] == N_TRIALS - 1
    assert "r20/train: finished earlier (300 rows), skipped" in text
    assert "finished earlier with the same config and records, skipped" in text
    after = res["trials"]
    assert len(after) == N_TRIALS and after.trial_id.is_unique
    pd.testing.assert_frame_equal(comparable(after, swept.uri), comparable(swept.remote["trials"], swept.uri),
                                  check_exact=True)


# ----------------------------------------------------------------------------- the store's faults


def cli(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_missing_bucket_and_wrong_credentials_are_one_line_before_any_write(s3, e2e_data, tmp_path):
    spec = sweep_yaml(e2e_data, tmp_path / "s.yaml")
    data = f"imagefolder:{e2e_data.uri}"
    env = {**os.environ, **s3.env}
    r = cli(["jobs/sweep.py", "--config", str(spec), "--datasets", data, "--output", "s3://no-such-bucket/run"], env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "error: output 's3://no-such-bucket/run': bucket 'no-such-bucket' does not exist "
        "(create it first; dtd-ray never creates buckets)"]
    assert "[extract]" not in r.stdout
    for bad in ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY000000"}):
        r = cli(["jobs/sweep.py", "--config", str(spec), "--datasets", data, "--output", f"s3://{BUCKET}/badcreds"],
                {**env, **bad})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        lines = r.stderr.strip().splitlines()
        print(f"[test_s3] wrong credentials: {lines}")
        assert len(lines) == 1 and lines[0].startswith(f"error: model r20 on {data}: imagefolder dataset "), lines
        assert "the object store refused the credentials (ACCESS_DENIED" in lines[0]
        assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in lines[0]
    # and where only the output is on the store, the output's check says the same
    r = cli(["jobs/sweep.py", "--config", str(spec), "--output", f"s3://{BUCKET}/badcreds"],
            {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: output 's3://{BUCKET}/badcreds': the object store refused the credentials (ACCESS_DENIED during "
        "HeadBucket): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and the bucket's policy)"], r.stderr
    assert not s3.keys(BUCKET, "badcreds"), "something was written with wrong credentials"


def test_images_unreadable_because_the_store_is_down_fail_the_batch_not_counted_as_bad(s3, e2e_data):
    """A store outage while images are read is not bad input: no counted skip (that would commit a
    partition without them, as the soak once found), the batch fails; a missing object is a counted skip."""
    from dtd_ray.data.sources import parse_source
    from dtd_ray.data.transforms import prepare_batch
    from dtd_ray.models.backbones import get_backbone

    src = parse_source(f"imagefolder:{e2e_data.uri}")
    rows = src.read_numpy("test")
    batch = {"sample_id": rows["sample_id"][:2], "label": rows["label"][:2],
             "path": np.array([rows["path"][0], f"{e2e_data.uri}/test/no-such.png"], dtype=object)}
    pre = get_backbone("cifar_resnet20", weights=None).preprocessing
    out = prepare_batch(batch, preprocessing=pre)
    assert out["ok"].tolist() == [True, False] and out["error"][1].startswith("unreadable: ")
    s3.stop_endpoint()
    try:
        with pytest.raises(OSError, match="NETWORK_CONNECTION|Could not connect"):
            prepare_batch(batch, preprocessing=pre)
    finally:
        s3.start_endpoint()


def test_weights_from_the_store_are_read_checked_cached_and_a_missing_object_is_one_line(s3, e2e_data, tmp_path):
    """``--weights s3://…``: read through the data's filesystem (the store's environment), the same
    tensors as the local file, sha256-recognised, cached once in the temporary folder (not in the
    output); a missing object is one line and nothing is written."""
    import tempfile

    import torch

    from dtd_ray.models.backbones import get_backbone

    name = os.path.basename(e2e_data.weights)
    s3.client().upload_file(e2e_data.weights, BUCKET, f"weights/{name}")
    uri = f"s3://{BUCKET}/weights/{name}"
    local = get_backbone("cifar_resnet20", weights=e2e_data.weights)
    remote = get_backbone("cifar_resnet20", weights=uri)
    assert remote.checkpoint_sha256 == local.checkpoint_sha256
    assert (remote.weights is None) == (local.weights is None)  # a known file is recognised by its hash either way
    for a, b in zip(local.state_dict().values(), remote.state_dict().values()):
        assert torch.equal(a, b)
    cached = [f for f in os.listdir(os.path.join(tempfile.gettempdir(), "dtd-ray-weights")) if f.endswith(name)]
    assert cached and not any(".tmp-" in f for f in cached)
    with pytest.raises(ValueError, match=rf"^checkpoint 's3://{BUCKET}/weights/nope.th' is not an object in the store$"):
        get_backbone("cifar_resnet20", weights=f"s3://{BUCKET}/weights/nope.th")
    # through the job: one error line before anything is written
    out = f"s3://{BUCKET}/weights-missing"
    r = cli(["jobs/extract.py", "--model", "cifar_resnet20", "--weights", f"s3://{BUCKET}/weights/nope.th",
             "--dataset", f"imagefolder:{e2e_data.local}", "--splits", "test", "--output", out], {**os.environ, **s3.env})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (f"error: checkpoint 's3://{BUCKET}/weights/nope.th' is not an object "
                                                 "in the store")
    assert not s3.keys(BUCKET, "weights-missing")


def test_packed_shards_to_and_from_the_store_give_the_folders_records(s3_cluster, s3, e2e_data, tmp_path, capsys):
    """``jobs/pack.py`` local → ``s3://`` and ``s3://`` → local give the same shards; extraction
    from ``parquet:s3://…`` gives the records of ``imagefolder:s3://…`` bit for bit; a pack on the
    store resumes after a lost shard; a missing pack is one line."""
    from dtd_ray.data.sources import parse_source
    from dtd_ray.data import shards
    from dtd_ray.ray.extract import ExtractConfig, run_extract
    from dtd_ray.ray.pack import PackConfig, run_pack

    up = f"s3://{BUCKET}/packs/{e2e_data.name}"
    meta = run_pack(PackConfig(dataset=f"imagefolder:{e2e_data.local}", output=up, rows_per_file=64))
    assert meta["splits"] == {"test": 200, "train": 300} and meta["written"] == 4 + 5
    down = tmp_path / "pack"
    run_pack(PackConfig(dataset=f"imagefolder:{e2e_data.uri}", output=str(down), rows_per_file=64, shared_fs=True))
    keys = s3.keys(BUCKET, f"packs/{e2e_data.name}/")
    for split, n_files in (("test", 4), ("train", 5)):
        for i in range(n_files):
            name = f"split={split}/{shards.shard_name(i)}"
            body = s3.client().get_object(Bucket=BUCKET, Key=f"packs/{e2e_data.name}/{name}")["Body"].read()
            local = pd.read_parquet(down / name)
            remote = pd.read_parquet(io.BytesIO(body))
            assert local.equals(remote), name  # the same rows from either side of the store
    assert f"packs/{e2e_data.name}/{shards.CLASSES_NAME}" in keys

    def extract(dataset: str, out: str) -> dict:
        kw = {"normalization": e2e_data.normalization} if e2e_data.normalization else {}
        run_extract(ExtractConfig(model="cifar_resnet20", weights=e2e_data.weights, dataset=dataset, splits=("test",),
                                  output=out, tag="r20", kmax=8, batch_size=50, rows_per_file=64, use_gpu=False, **kw))
        return records.load_records(f"{out}/records", model="r20", split="test")

    a = extract(f"imagefolder:{e2e_data.uri}", f"s3://{BUCKET}/pack-x/folder")
    b = extract(f"parquet:{up}", f"s3://{BUCKET}/pack-x/shards")
    oa, ob = np.argsort(a["sample_id"]), np.argsort(b["sample_id"])
    assert len(oa) == 200
    for name in a:
        assert np.array_equal(np.asarray(a[name])[oa], np.asarray(b[name])[ob]), name
    # resumable on the store: a lost shard and the finishing marker, then only that shard is rewritten
    c = s3.client()
    c.delete_object(Bucket=BUCKET, Key=f"packs/{e2e_data.name}/split=train/{shards.shard_name(3)}")
    c.delete_object(Bucket=BUCKET, Key=f"packs/{e2e_data.name}/{shards.CLASSES_NAME}")
    capsys.readouterr()
    assert run_pack(PackConfig(dataset=f"imagefolder:{e2e_data.local}", output=up, rows_per_file=64))["written"] == 1
    assert "resuming, 436 of 500 images in place" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=rf"^parquet dataset folder not found: s3://{BUCKET}/packs/nope$"):
        parse_source(f"parquet:s3://{BUCKET}/packs/nope")


def test_store_stopped_mid_write_commits_nothing_and_the_rerun_completes_exactly_once(s3_cluster, s3, tmp_path):
    """The store's endpoint goes down while extraction's tasks write the train partition, and comes back."""
    from dtd_ray.ray.extract import ExtractConfig, ExtractionError, run_extract

    data = tmp_path / "data"  # on the (shared) disk: only the writes go to the store
    write_imagefolder(data, 40, split="test", classes=4, seed=1)
    write_imagefolder(data, 800, split="train", classes=4, seed=2)  # 80 staged files: the stop lands mid-write
    write_checkpoint(tmp_path / "ckpt.th", num_classes=4)
    cfg = ExtractConfig(model="cifar_resnet20", weights=str(tmp_path / "ckpt.th"), dataset=f"imagefolder:{data}",
                        splits=("test", "train"), output=f"s3://{BUCKET}/fault", tag="f", kmax=8, batch_size=20,
                        rows_per_file=10, use_gpu=False, num_actors=1)  # one model actor: starts faster
    test_prefix, train_prefix = "fault/records/model=f/split=test/", "fault/records/model=f/split=train/"
    seen: dict = {}

    def stop_at_first_staged_write():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            keys = s3.keys(BUCKET, train_prefix)
            if any(schema.STAGING_PREFIX in k and k.endswith(".parquet") for k in keys):
                seen["test"] = s3.keys(BUCKET, test_prefix)  # committed before train started
                seen["staged"] = len(keys)
                s3.stop_endpoint()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_at_first_staged_write, daemon=True)
    watcher.start()
    try:
        with pytest.raises((ExtractionError, OSError)) as e:
            run_extract(cfg)
        watcher.join(30)
        msg = str(e.value)
        print(f"[test_s3] the store stopped mid-write: {msg}")
        assert "\n" not in msg, msg
        assert msg.startswith("f/train: extraction failed after ") and "nothing committed" in msg, msg
        assert "Could not connect to server" in msg or "NETWORK_CONNECTION" in msg, msg
        # while the store is down for its clients: nothing of train committed, test untouched
        keys = s3.keys(BUCKET, train_prefix)
        assert not [k for k in keys if k.endswith(schema.MANIFEST_NAME)]
        assert s3.keys(BUCKET, test_prefix) == seen["test"]
    finally:
        s3.start_endpoint()
    with pytest.raises(FileNotFoundError, match="no finished records"):
        records.load_records(f"s3://{BUCKET}/fault/records", model="f", split="train")
    summary = run_extract(cfg)
    assert summary["partitions"] == {"test": "skipped", "train": "written"}
    assert s3.keys(BUCKET, test_prefix) == seen["test"]
    rec = records.load_records(f"s3://{BUCKET}/fault/records", model="f", split="train")
    assert (rec["sample_id"] == np.arange(800)).all(), "a sample lost or duplicated"
    man = records.read_manifest(f"s3://{BUCKET}/fault/records", model="f", split="train")
    names = sorted(k[len(train_prefix):] for k in s3.keys(BUCKET, train_prefix) if not k.endswith("/"))
    parts = [f"part-{i:05d}.parquet" for i in range(man["files"])]
    assert names == sorted([records.HEAD_NAME, schema.MANIFEST_NAME] + parts)  # the head is committed with them


# ----------------------------------------------------------------------------- multi-node extraction, output on S3


@pytest.fixture(scope="module")
def s3_clean(s3_cluster, mn_data):
    """A clean multi-node extraction with its output on the store (the baseline of the faults below)."""
    from dtd_ray.ray.extract import run_extract

    wait_for_no_fe_processes(s3_cluster)
    t0_ms = int(time.time() * 1000)
    uri = f"s3://{BUCKET}/mn/clean"
    summary = run_extract(mn_config(mn_data, uri, shared_fs=False))
    rec = records.load_records(f"{uri}/records", model=TAG, split="test")
    return SimpleNamespace(uri=uri, summary=summary, rec=rec, nodes=settled_fe_tasks_by_node(s3_cluster, since_ms=t0_ms))


def check_same_as_clean_s3(s3, uri: str, clean) -> None:
    man = records.read_manifest(f"{uri}/records", model=TAG, split="test")
    assert man is not None and man["rows"] == N_IMAGES and man["skipped"] == 0
    rec = records.load_records(f"{uri}/records", model=TAG, split="test")
    assert (rec["sample_id"] == np.arange(N_IMAGES)).all(), "a sample lost or duplicated"
    assert (rec["pred"] == clean.rec["pred"]).all()
    np.testing.assert_allclose(rec["features"], clean.rec["features"], rtol=1e-4, atol=1e-5)
    prefix = uri.split(f"s3://{BUCKET}/", 1)[1] + f"/records/model={TAG}/split=test/"
    names = sorted(k[len(prefix):] for k in s3.keys(BUCKET, prefix) if not k.endswith("/"))
    parts = [f"part-{i:05d}.parquet" for i in range(man["files"])]
    assert names == sorted([records.HEAD_NAME, schema.MANIFEST_NAME] + parts)  # the head is committed with them


def test_multinode_extraction_writes_records_to_s3_from_several_nodes(s3_clean, s3):
    assert s3_clean.summary["rows"] == N_IMAGES and s3_clean.summary["partitions"] == {"test": "written"}
    acc = (s3_clean.rec["label"] == s3_clean.rec["pred"]).mean()
    assert len(np.unique(s3_clean.rec["pred"])) > 1 and 0.1 < acc < 1
    assert len(s3_clean.nodes) >= 2, f"FeatureExtractor tasks ran on {len(s3_clean.nodes)} node(s)"
    check_same_as_clean_s3(s3, s3_clean.uri, s3_clean)


def test_actor_killed_mid_run_with_output_on_s3(s3_cluster, s3_clean, s3, mn_data, tmp_path):
    from dtd_ray.ray.extract import run_extract

    uri = f"s3://{BUCKET}/mn/actor"
    victim: dict = {}

    def kill_actor(proc):
        victim.update(pid=proc.pid)
        os.kill(proc.pid, signal.SIGKILL)

    wait_for_no_fe_processes(s3_cluster)
    fault = Fault(s3_cluster, tmp_path / "never", kill_actor, head=True)  # the run's end: fault.end() below
    fault.start()
    summary = run_extract(mn_config(mn_data, uri, shared_fs=False))
    fault.end()
    assert fault.error is None and fault.finished_before_fault is False, fault.error
    assert summary["rows"] == N_IMAGES and summary["skipped"] == 0
    check_same_as_clean_s3(s3, uri, s3_clean)
    deadline = time.monotonic() + 15  # a retried task (the victim's), seen through the state API
    while not [t for t in fe_tasks(s3_cluster, since_ms=fault.since_ms) if t.attempt_number >= 1]:
        assert time.monotonic() < deadline, "no FeatureExtractor task was retried"
        time.sleep(0.5)


def test_worker_node_removed_mid_run_with_output_on_s3(s3_cluster, s3_clean, s3, mn_data, tmp_path):
    import ray
    from dtd_ray.ray.extract import run_extract

    uri = f"s3://{BUCKET}/mn/node"
    removed: dict = {}

    def remove_node(proc):
        removed.update(node_id=proc.node.node_id)
        s3_cluster.cluster.remove_node(proc.node)
        s3_cluster.workers.remove(proc.node)

    wait_for_no_fe_processes(s3_cluster)
    fault = Fault(s3_cluster, tmp_path / "never", remove_node)
    fault.start()
    try:
        summary = run_extract(mn_config(mn_data, uri, shared_fs=False))
        fault.end(30)
        assert fault.error is None and fault.finished_before_fault is False, fault.error
        assert removed["node_id"] not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert summary["rows"] == N_IMAGES and summary["skipped"] == 0
        check_same_as_clean_s3(s3, uri, s3_clean)
    finally:
        fault.join(30)
        if len(s3_cluster.workers) < 2:
            s3_cluster.workers.append(s3_cluster.cluster.add_node(num_cpus=1))


# ----------------------------------------------------------------------------- the soak (slow)


@pytest.mark.slow
def test_soak_two_runs_each_with_a_random_fault():
    """A short ``jobs/soak.py``: two faulted runs, each equal to a clean run's trials and records."""
    r = subprocess.run([sys.executable, "-m", "jobs.soak", "--runs", "2", "--seed", "1"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["runs"] == 2 and result["equal"] == 2 and result["injected"] == 2
    assert len(set(result["faults"])) == 2  # two different kinds (each kind once per four runs)
