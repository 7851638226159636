"""Reliability of extraction: sharding across nodes, faults survived, interrupted drivers resumed.

The multi-node tests run on ``ray.cluster_utils.Cluster``: a head node and two worker
nodes, all processes on this machine. The worker nodes advertise one *fake* GPU each
(``num_gpus=1``), so the cluster looks like the GPU cluster the sweep runs on; torch has
no CUDA here, so the extraction configs pass ``use_gpu=False`` explicitly (the driver's
own decision on this cluster, GPU actors, is checked without running them).

"Records produced on >= 2 nodes" is shown with Ray's state API (the dashboard of this
test cluster listens on 127.0.0.1 only): the FeatureExtractor actor tasks
(``MapWorker(...FeatureExtractor).submit``) that FINISHED ran on at least two distinct
node ids. Every instance's features come out of exactly one such task, so records were
computed on >= 2 nodes.

Faults: an extraction actor's worker process killed with SIGKILL mid-run, and a worker
node removed mid-run (``Cluster.remove_node``). Each run must end with every
``sample_id`` exactly once and the same predictions (hence accuracy) and features as a
clean run. A driver process killed with SIGKILL between two partitions, then rerun, must
skip the finished partition (its files untouched) and redo the other; ``jobs/sweep.py``
killed with SIGKILL after some trials wrote their rows, then rerun, must skip extraction,
decomposition and the finished trials (their files untouched) and run only the others.
"""

from __future__ import annotations

import contextlib
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
import pytest
import torch
from PIL import Image

from tests.conftest import start_local_ray
from dtd_ray.io import records
from dtd_ray.io import schema
from tests.s3_server import free_port

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 3072  # 6 source blocks of 512 rows for 3 actors: a fault lands while tasks are in flight
N_CLASSES = 10
TAG = "mn"
FE_TASK = "FeatureExtractor"  # in the fused actor stage's name: MapWorker(MapBatches(prepare_batch)->MapBatches(FeatureExtractor))

# Per-test bound (pytest-timeout; a plain marker where the plugin is absent). The file takes about
# 3 minutes on 2 busy cores; the fault injector and the subprocesses carry their own deadlines too.
pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------- data


def class_images(n: int, *, classes: int = N_CLASSES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 32-px images, instance ``i`` of class ``i % classes`` tinted with its class's colour."""
    labels = np.arange(n) % classes
    tint = np.random.default_rng(1234).integers(0, 256, (classes, 1, 1, 3))  # the same for every seed
    rng = np.random.default_rng(seed)
    images = np.clip(tint[labels] + rng.integers(-100, 101, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return images, labels


def write_imagefolder(root: Path, n: int, *, split: str = "test", classes: int = N_CLASSES, seed: int = 0) -> None:
    """``n`` PNGs in ``root/<split>/c<k>/`` (uncompressed: fast to write and decode); sorted order = index order."""
    images, labels = class_images(n, classes=classes, seed=seed)
    for i in range(n):
        d = root / split / f"c{labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i:05d}.png", compress_level=0)


def write_checkpoint(path: Path, *, num_classes: int = N_CLASSES, seed: int = 0) -> None:
    """cifar_resnet20 in the public checkpoint format: random convs, a least-squares head.

    The head is fitted on 500 tinted images, so that predictions differ between instances
    and accuracy is neither 0 nor 1: a random head predicts one class for everything,
    which would make "same accuracy as a clean run" an empty check.
    """
    from dtd_ray.models.backbones import get_backbone

    torch.manual_seed(seed)
    model = get_backbone("cifar_resnet20", weights=None, num_classes=num_classes).eval()
    images, labels = class_images(500, classes=num_classes, seed=seed + 1)
    pre = model.preprocessing
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) \
        / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        f = model.forward_features(x).double()
        a = torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, torch.nn.functional.one_hot(torch.from_numpy(labels), num_classes).double()).solution
        model.head.weight.copy_(sol[:-1].T)
        model.head.bias.copy_(sol[-1])
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)


@pytest.fixture(scope="module")
def mn_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    write_imagefolder(root / "data", N_IMAGES)
    write_checkpoint(root / "ckpt.th")
    return root


def mn_config(data: Path, out: Path, **kw):
    from dtd_ray.ray.extract import ExtractConfig

    base = dict(model="cifar_resnet20", weights=str(data / "ckpt.th"), dataset=f"imagefolder:{data / 'data'}",
                splits=("test",), output=str(out), tag=TAG, kmax=8, batch_size=64, rows_per_file=64,
                use_gpu=False,  # the nodes' GPUs are fake: torch has no CUDA here
                shared_fs=True)  # the test cluster's nodes share this machine's disk (the S3 variants: tests/test_s3.py)
    base.update(kw)
    return ExtractConfig(**base)


def partition_dir(out: Path, split: str = "test", tag: str = TAG) -> Path:
    return Path(records.partition_uri(str(out / "records"), model=tag, split=split))


# ----------------------------------------------------------------------------- the cluster


@contextlib.contextmanager
def three_node_cluster(*, worker_gpus: int = 0, drop_env_after: tuple[str, ...] = ()):
    """Head (1 CPU) + two worker nodes (1 CPU, ``worker_gpus`` fake GPUs each), the driver connected to
    the head and its state API up; after, the session's local Ray again where one ran before (started
    without the variables ``drop_env_after`` names, which the cluster's nodes were given)."""
    import ray
    from ray.cluster_utils import Cluster

    was_initialized = ray.is_initialized()  # e.g. conftest's session-wide ray_local
    ray.shutdown()
    port = free_port()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port})
    workers = [c.add_node(num_cpus=1, num_gpus=worker_gpus) for _ in range(2)]
    try:
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        c.wait_for_nodes()
        ray.data.DataContext.get_current().enable_progress_bars = False
        _wait_for_state_api(f"http://127.0.0.1:{port}")
        yield SimpleNamespace(cluster=c, workers=workers, state_api=f"http://127.0.0.1:{port}",
                              head_id=c.head_node.node_id)
    finally:
        ray.shutdown()
        c.shutdown()
        if was_initialized:
            saved = {k: os.environ.pop(k) for k in drop_env_after if k in os.environ}
            try:
                start_local_ray()
            finally:
                os.environ.update(saved)


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + two worker nodes (1 CPU, 1 fake GPU each), the driver connected to the head."""
    with three_node_cluster(worker_gpus=1) as c:
        yield c


def _wait_for_state_api(address: str, timeout: float = 60) -> None:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout
    while True:
        try:
            if len(list_nodes(address=address)) >= 3:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def fe_tasks(cl, *, since_ms: int = 0, state: str | None = None):
    """FeatureExtractor actor tasks (one per block of rows; all attempts) created after ``since_ms``."""
    from ray.util.state import list_tasks

    filters = [("state", "=", state)] if state else None
    return [t for t in list_tasks(address=cl.state_api, filters=filters, detail=True, limit=10_000)
            if FE_TASK in t.name and t.name.endswith(".submit") and (t.creation_time_ms or 0) >= since_ms]


def fe_tasks_by_node(cl, *, since_ms: int = 0) -> dict[str, int]:
    """Finished FeatureExtractor tasks per node id."""
    counts: dict[str, int] = {}
    for t in fe_tasks(cl, since_ms=since_ms, state="FINISHED"):
        counts[t.node_id] = counts.get(t.node_id, 0) + 1
    return counts


def settled_fe_tasks_by_node(cl, *, since_ms: int, timeout: float = 15.0) -> dict[str, int]:
    """:func:`fe_tasks_by_node` once the state API has caught up: task events reach it about a second late,
    and the model stage is the pipeline's last, so its last task may end with the run. Read until every
    FeatureExtractor task listed is finished and two reads a second apart agree (at most ``timeout``)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        pending = [t for t in fe_tasks(cl, since_ms=since_ms) if t.state != "FINISHED"]
        now = fe_tasks_by_node(cl, since_ms=since_ms)
        if (not pending and now == last) or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(1.0)


@pytest.fixture(scope="module")
def clean(cluster, mn_data, tmp_path_factory):
    """A clean multi-node run: its records, manifest, and the nodes its FeatureExtractor tasks ran on."""
    out = tmp_path_factory.mktemp("clean")
    t0_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    summary = run(mn_config(mn_data, out))
    seconds = time.perf_counter() - t0
    rec = records.load_records(str(out / "records"), model=TAG, split="test")
    return SimpleNamespace(out=out, summary=summary, rec=rec, seconds=seconds,
                           nodes=settled_fe_tasks_by_node(cluster, since_ms=t0_ms))


def run(cfg):
    from dtd_ray.ray.extract import run_extract

    return run_extract(cfg)


def check_same_as_clean(out: Path, clean) -> dict:
    """Every sample_id exactly once, predictions and features equal to the clean run's; returns the manifest."""
    part = partition_dir(out)
    man = records.read_manifest(str(out / "records"), model=TAG, split="test")
    assert man is not None and man["rows"] == N_IMAGES and man["skipped"] == 0
    rec = records.load_records(str(out / "records"), model=TAG, split="test")
    ids = rec["sample_id"]
    assert len(ids) == N_IMAGES and (np.sort(ids) == np.arange(N_IMAGES)).all(), "a sample lost or duplicated"
    assert (rec["pred"] == clean.rec["pred"]).all()
    assert (rec["label"] == rec["pred"]).mean() == (clean.rec["label"] == clean.rec["pred"]).mean()
    np.testing.assert_allclose(rec["features"], clean.rec["features"], rtol=1e-4, atol=1e-5)
    # Only the committed files remain: part-00000 … in order, no staging folder, no stray file.
    names = sorted(p.name for p in part.iterdir())
    parts = [f"part-{i:05d}.parquet" for i in range(man["files"])]
    assert names == sorted([records.HEAD_NAME, schema.MANIFEST_NAME] + parts)  # the head is committed with them
    return man


def fe_processes(cl, *, head: bool = False) -> list[SimpleNamespace]:
    """The FeatureExtractor actor processes of the worker nodes (and of the head node with ``head``), from
    /proc (all nodes are on this machine).

    Ray titles an actor's process ``ray::<actor class>`` and, while it runs a task,
    ``ray::<actor class>.submit``; its parent is its node's raylet. Read directly here, not
    through the state API or the GCS actor table: those were seen to list no live
    FeatureExtractor actor during a whole 18-second run, so a fault keyed on them could miss."""
    nodes = [*cl.workers, cl.cluster.head_node] if head else cl.workers
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
    return [SimpleNamespace(pid=pid, node=raylets[ppid], node_id=raylets[ppid].node_id, busy=title.endswith(".submit"))
            for pid, ppid, title in raylet_children(raylets) if FE_TASK in title]


def raylet_children(raylets) -> list[tuple[int, int, str]]:
    """``(pid, parent pid, title)`` of the Ray worker processes (title ``ray::…``) whose parent is one of
    the ``raylets`` (pids), read from /proc: every node of a ``cluster_utils.Cluster`` is on this machine."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").strip()
            with open(f"/proc/{d}/status") as f:
                ppid = int(next(line.split()[1] for line in f if line.startswith("PPid:")))
        except (OSError, StopIteration, ValueError):
            continue  # the process ended meanwhile
        if ppid in raylets and title.startswith("ray::"):
            out.append((int(d), ppid, title))
    return out


def wait_for_no_fe_processes(cl, timeout: float = 20) -> None:
    """The previous run's model actors are gone from every node (extract_split releases them), so that
    this run's actors get the nodes' CPUs."""
    deadline = time.monotonic() + timeout
    while fe_processes(cl, head=True):
        assert time.monotonic() < deadline, f"model actors of an earlier run still alive: {fe_processes(cl, head=True)}"
        time.sleep(0.2)


class Fault(threading.Thread):
    """Injects a fault mid-run: as soon as a FeatureExtractor actor of a worker node (or, with ``head``,
    of any node) is running a task (its process title ends in ``.submit``; no manifest yet), calls
    ``action(process)`` with that actor process (pid, node, node_id).

    ``head`` for a fault that needs no worker node (an actor killed): the actor pool's actors take
    half a CPU each on these 1-CPU nodes, so two of them can share the head node and run all of a
    small run's calls there: the likely cause of two full test runs in which no worker-node actor was
    ever seen busy.

    Not keyed on staged files: the write tasks can be held back until the model actors are done,
    so the first staged file may appear only when the extraction work is over."""

    def __init__(self, cl, part: Path, action, *, timeout: float = 150, head: bool = False):
        super().__init__(daemon=True)
        self.cl, self.part, self.action, self.timeout, self.head = cl, part, action, timeout, head
        self.since_ms = int(time.time() * 1000)
        self.finished_before_fault = None
        self.error: BaseException | None = None
        self._ended = threading.Event()

    def end(self, timeout: float = 10) -> None:
        """The run has returned: stop looking (an error says what was seen) and wait for the thread."""
        self._ended.set()
        self.join(timeout)
        assert not self.is_alive(), "the fault thread did not stop"

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            seen = {"polls": 0, "actor_processes": 0}
            while True:
                if time.monotonic() > deadline or self._ended.is_set() or (self.part / schema.MANIFEST_NAME).exists():
                    raise AssertionError(f"no fault injected: the run ended (or timed out) first; seen {seen}")
                seen["polls"] += 1
                procs = fe_processes(self.cl, head=self.head)
                seen["actor_processes"] = max(seen["actor_processes"], len(procs))
                busy = [p for p in procs if p.busy]
                if busy:
                    break
                time.sleep(0.005)
            self.finished_before_fault = (self.part / schema.MANIFEST_NAME).exists()
            self.action(busy[0])
        except BaseException as e:  # re-raised in the test
            self.error = e


# ----------------------------------------------------------------------------- multi-node tests


def test_extraction_shards_across_nodes(cluster, clean):
    from dtd_ray.ray.extract import plan_resources

    # The driver's decision on this cluster: GPU actors, one per (fake) GPU, unless told otherwise.
    auto = plan_resources(mn_config(Path("/x"), Path("/x"), use_gpu=None))
    assert auto.use_gpu and auto.num_actors == 2
    # What ran: CPU actors, one per node with CPUs (3).
    assert clean.summary["rows"] == N_IMAGES and clean.summary["partitions"] == {"test": "written"}
    ids = clean.rec["sample_id"]
    assert (ids == np.arange(N_IMAGES)).all()
    acc = (clean.rec["label"] == clean.rec["pred"]).mean()
    assert len(np.unique(clean.rec["pred"])) > 1 and 0.1 < acc < 1  # equal accuracy below is a real check
    alive = {n["NodeID"] for n in __import__("ray").nodes() if n["Alive"]}
    assert set(clean.nodes) <= alive
    assert len(clean.nodes) >= 2, f"FeatureExtractor tasks ran on {len(clean.nodes)} node(s): {clean.nodes}"
    assert sum(clean.nodes.values()) >= N_IMAGES // 512  # at least one task per source block


def test_actor_killed_mid_run_loses_and_duplicates_nothing(cluster, clean, mn_data, tmp_path):
    out = tmp_path / "out"
    victim: dict = {}

    def kill_actor(proc):
        victim.update(pid=proc.pid, node_id=proc.node_id)
        os.kill(proc.pid, signal.SIGKILL)  # the actor's worker process dies with its task in flight

    wait_for_no_fe_processes(cluster)
    fault = Fault(cluster, partition_dir(out), kill_actor, head=True)
    fault.start()
    summary = run(mn_config(mn_data, out))
    fault.end()
    assert fault.error is None, fault.error
    assert fault.finished_before_fault is False  # killed mid-run
    assert summary["rows"] == N_IMAGES and summary["skipped"] == 0
    check_same_as_clean(out, clean)
    # Ray restarted the actor and retried its lost task(s) (Ray Data's actor pools use
    # max_restarts=-1, max_task_retries=-1); the retries' rows were counted once.
    with pytest.raises(ProcessLookupError):
        os.kill(victim["pid"], 0)  # the victim is dead: its rows came from the restarted actor or the others
    deadline = time.monotonic() + 15  # task events reach the state API about a second late
    while not [t for t in fe_tasks(cluster, since_ms=fault.since_ms) if t.attempt_number >= 1 and t.state == "FINISHED"]:
        assert time.monotonic() < deadline, "no FeatureExtractor task was retried"
        time.sleep(0.5)


def test_worker_node_removed_mid_run_loses_and_duplicates_nothing(cluster, clean, mn_data, tmp_path):
    import ray

    out = tmp_path / "out"
    removed: dict = {}

    def remove_node(proc):
        node = proc.node  # the node of an actor that is running a task
        removed.update(node_id=node.node_id)
        cluster.cluster.remove_node(node)  # raylet, object store and every worker process of the node
        cluster.workers.remove(node)

    wait_for_no_fe_processes(cluster)
    fault = Fault(cluster, partition_dir(out), remove_node)
    fault.start()
    try:
        summary = run(mn_config(mn_data, out))
        fault.end(30)
        assert fault.error is None, fault.error
        assert fault.finished_before_fault is False  # removed mid-run
        assert removed["node_id"] not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert summary["rows"] == N_IMAGES and summary["skipped"] == 0
        check_same_as_clean(out, clean)
    finally:
        fault.join(30)
        if len(cluster.workers) < 2:  # leave the cluster whole for any later test
            cluster.workers.append(cluster.cluster.add_node(num_cpus=1, num_gpus=1))


# ----------------------------------------------------------------------------- an interrupted driver


def _own_ray_processes(temp_dir: str) -> list[int]:
    """Pids of processes whose command line names ``temp_dir`` (the Ray a subprocess started there)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if temp_dir.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def _kill_own_ray(temp_dir: str) -> None:
    for pid in _own_ray_processes(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass




def test_driver_killed_between_partitions_rerun_redoes_only_the_unfinished(tmp_path):
    """``jobs/extract.py`` killed with SIGKILL after the test partition is committed and while the
    train partition is under way; the rerun skips test (its files untouched) and redoes train.
    (The sweep's trials: test_driver_killed_mid_sweep_rerun_recomputes_only_unfinished_trials.)"""
    data = tmp_path / "data"
    write_imagefolder(data, 40, split="test", classes=4, seed=1)
    write_imagefolder(data, 1200, split="train", classes=4, seed=2)  # 75 batches: time to kill it mid-way
    write_checkpoint(tmp_path / "ckpt.th", num_classes=4)
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/extract.py", "--model", "cifar_resnet20", "--weights", str(tmp_path / "ckpt.th"),
           "--dataset", f"imagefolder:{data}", "--splits", "test,train", "--output", str(out), "--tag", "drv",
           "--kmax", "8", "--batch_size", "16", "--rows_per_file", "16"]
    # RAY_ADDRESS=local: the job starts its own Ray even if another instance runs on this machine,
    # under its own temp dir (short: Ray's socket paths must stay < 108 bytes), so that exactly
    # its processes can be found and ended afterwards.
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="dtdr", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp}
    test_part, train_part = partition_dir(out, "test", "drv"), partition_dir(out, "train", "drv")

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(lambda: proc.stdout.readline().decode(), "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        # Kill once test is committed and train is under way: at its first progress line, or 1.5 s
        # after its execution started (on 2 cores the first staged rows may come only near the end).
        started = None
        while True:
            assert proc.poll() is None, "the job ended before it could be killed:\n" + "".join(lines)
            assert time.monotonic() < deadline, "timed out waiting for the first partition"
            if started is None and any("drv/train: 1200 inputs" in ln for ln in lines):
                started = time.monotonic()
            if started is not None and (time.monotonic() - started > 1.5
                                        or any("drv/train: " in ln and "/1200 (" in ln for ln in lines)):
                break
            time.sleep(0.01)
        assert (test_part / schema.MANIFEST_NAME).exists()
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session (its local Ray)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        _kill_own_ray(ray_tmp)
    assert not (train_part / schema.MANIFEST_NAME).exists()
    assert records.read_manifest(str(out / "records"), model="drv", split="train") is None
    with pytest.raises(FileNotFoundError, match="no finished records"):
        records.load_records(str(out / "records"), model="drv", split="train")  # nothing half-done is readable
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in test_part.iterdir()}

    try:
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    finally:
        _kill_own_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "drv/test: finished earlier (40 rows), skipped" in rerun.stdout
    assert any(ln.startswith("[extract] drv/train: 1,200/1,200 img (100%)") and ln.endswith("wrote 1200 rows (0 skipped)")
               for ln in rerun.stdout.splitlines()), rerun.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in test_part.iterdir()} == before
    for split, n in (("test", 40), ("train", 1200)):
        rec = records.load_records(str(out / "records"), model="drv", split=split)
        assert (np.sort(rec["sample_id"]) == np.arange(n)).all(), f"{split}: a sample lost or duplicated"
    names = sorted(p.name for p in train_part.iterdir())
    man = records.read_manifest(str(out / "records"), model="drv", split="train")
    parts = [f"part-{i:05d}.parquet" for i in range(man["files"])]
    assert names == sorted([records.HEAD_NAME, schema.MANIFEST_NAME] + parts)  # the head is committed with them


def test_driver_killed_mid_sweep_rerun_recomputes_only_unfinished_trials(tmp_path):
    """``jobs/sweep.py`` killed with SIGKILL after some trials wrote their rows (not all); the rerun
    skips extraction, decomposition and the finished trials (their files untouched) and runs the rest."""
    import tempfile

    import pandas as pd
    import yaml

    data = tmp_path / "data"
    for split, n in (("train", 60), ("test", 30)):
        write_imagefolder(data, n, split=split, classes=3, seed=3 if split == "train" else 4)
    write_checkpoint(tmp_path / "ckpt.th", num_classes=3)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "datasets": [f"imagefolder:{data}"],
        "models": [{"name": "cifar_resnet20", "weights": str(tmp_path / "ckpt.th"), "tag": "swp"}],
        "k": "1..3", "strategies": ["frequency", "weight_l1"], "kmax": 8, "extract_batch_size": 30,
        "retrain": {"none": {}, "head": {"epochs": 5, "batch_size": 16}},
    }))
    out = tmp_path / "out"
    trials = out / "trials"
    cmd = [sys.executable, "jobs/sweep.py", "--config", str(cfg), "--output", str(out), "--report", "false"]
    n_none, n_total = 6, 12  # (frequency, weight_l1) x k 1..3, for none and for head
    ray_tmp = tempfile.mkdtemp(prefix="dtdr", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp}

    def rows() -> dict[str, tuple[int, bytes]]:
        if not trials.is_dir():
            return {}
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in trials.glob("*.parquet")
                if not p.name.startswith(("_", "."))}

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(rows()) < n_none + 1:  # every `none` row and at least one head trial's row
            assert proc.poll() is None, f"the sweep ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the first head trial"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Tune trials and its local Ray
        proc.wait(30)
        before = rows()
        assert n_none < len(before) < n_total, f"killed too late: {len(before)} rows"
        rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        _kill_own_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    text = rerun.stdout
    assert f"{len(before)} of {n_total} trial(s) finished earlier" in text
    assert "swp/train: finished earlier (60 rows), skipped" in text and "swp/test: finished earlier (30 rows), skipped" in text
    assert "finished earlier with the same config and records, skipped" in text  # decomposition
    after = rows()
    assert {k: after[k] for k in before} == before  # finished trials' rows untouched (bytes and mtime)
    df = pd.read_parquet(trials)
    assert len(df) == n_total and df.trial_id.is_unique  # every trial exactly once
    assert df.groupby("retrain_mode").size().to_dict() == {"none": n_none, "head": n_total - n_none}
