"""cluster.yaml against Ray's own cluster-config schema, and the `ray job submit` path end to end.

The job-submit test starts its own head with ``ray start --head --block`` (token
authentication on, a fresh random token, every port chosen free, its own temp dir),
submits ``jobs/sweep.py`` with ``--working-dir .``, checks the job SUCCEEDED, reads its
``trials/`` with pandas, and stops the head by signalling the ``ray start`` process it
started (never ``ray stop``, which would stop every Ray on this machine, including the
session's ``ray_local`` instance and other test runs).
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
# The `ray` CLI of the interpreter running the tests (a venv's, in CI), else the one on PATH.
_BESIDE = Path(sys.executable).parent / "ray"
RAY = str(_BESIDE) if _BESIDE.is_file() else shutil.which("ray")


# ----------------------------------------------------------------------------- cluster.yaml


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(config: dict) -> dict:
    """What `ray up` validates: the config with the launcher's defaults filled in."""
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    out = prepare_config(copy.deepcopy(config))
    validate_config(out)
    return out


def test_cluster_yaml_passes_rays_schema(cluster):
    pytest.importorskip("jsonschema")
    prepared = _prepared(cluster)
    assert prepared["provider"]["type"] == "aws"
    # the schema is strict: a misspelt key fails, so the check above means something
    import jsonschema

    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["worker_gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _prepared(bad)


def test_cpu_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu = [t for t in workers if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for t in gpu:
        assert t["min_workers"] == 0 and t["max_workers"] >= 1  # autoscaled from zero
    assert cluster["max_workers"] >= max(t["max_workers"] for t in gpu)


def test_setup_installs_the_project(cluster):
    mounts = cluster["file_mounts"]
    project = [remote for remote, local in mounts.items() if local == "."]
    assert project, "the project folder is not mounted"
    setup = " && ".join(cluster["setup_commands"])
    assert f"pip install -q -e {project[0]}" in setup
    # Ray pinned (every node and the submitting client must run one version) at one with token auth
    pin = re.search(r'"ray\[default,data,tune\]==(\d+)\.(\d+)\.\d+"', setup)
    assert pin and (int(pin.group(1)), int(pin.group(2))) >= (2, 52), setup


def test_token_auth_and_localhost_dashboard(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_cmds = [c for c in starts if re.search(r"\bray (start|stop)\b", c)]
    assert ray_cmds
    for c in ray_cmds:
        assert re.search(r"(^|[;\s])RAY_AUTH_MODE=token ray (start|stop)\b", c), c
    head_start = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1
    host = re.search(r"--dashboard-host[= ](\S+)", head_start[0])
    assert host and host.group(1) in ("127.0.0.1", "localhost")
    assert "0.0.0.0" not in json.dumps(cluster)
    # the token every node reads (~/.ray/auth_token) is mounted from the launching machine
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


# ----------------------------------------------------------------------------- ray job submit


try:  # loaded here, not in the forked child (a loader lock held by another thread would hang it)
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux
    _LIBC = None


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the test process dies (prctl PR_SET_PDEATHSIG), so a
    killed pytest never leaves its Ray head running."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on this machine, started and stopped by this fixture only.

    Token auth on (RAY_AUTH_MODE=token, a fresh RAY_AUTH_TOKEN passed to the head and to
    every CLI call), all ports free, its own temp dir (short: Unix sockets live there).
    """
    if RAY is None:
        pytest.skip("the `ray` command is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="dtdh-", dir="/tmp"))
    ports = _free_ports(9)
    names = ("port", "object-manager-port", "node-manager-port", "ray-client-server-port", "dashboard-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_TMPDIR=str(tmp),  # where the CLI looks for "the current cluster": never /tmp/ray
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
    )
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={tmp / 'ray'}", "--object-store-memory=300000000",
           *[f"--{n}={p}" for n, p in zip(names, ports)]]
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)  # noqa: PLW1509 - one prctl call, no locks
    address = f"http://127.0.0.1:{ports[4]}"
    try:
        deadline = time.monotonic() + 90
        while True:
            r = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not come up:\n{(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "env": env, "tmp": tmp}
    finally:
        # Stop exactly the head this fixture started: SIGTERM to `ray start --block` tears down
        # the processes it spawned; whatever is left of its process group is killed.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its own session (never other Rays)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_job_submit_runs_the_sweep(ray_head, tmp_path):
    from test_sweep import make_tiny_project, write_tiny_config

    project = make_tiny_project(tmp_path / "tiny")
    config = write_tiny_config(project, retrain={
        "none": {},
        "head": {"k": [2], "strategies": ["frequency"], "epochs": 1, "batch_size": 8},
    })
    out = tmp_path / "out"
    job_id = f"dtd-test-{uuid.uuid4().hex[:8]}"
    # dot-folders (.git, .venv, caches) and runs/ stay home; Ray also honours .gitignore
    excludes = json.dumps({"excludes": ["/.[!.]*", "runs/", "**/__pycache__/"]})
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["address"], "--submission-id", job_id,
         "--working-dir", ".", "--runtime-env-json", excludes, "--",
         sys.executable, "jobs/sweep.py", "--config", str(config), "--output", str(out)],
        cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=300,
    )
    logs = submit.stdout + submit.stderr
    status = subprocess.run([RAY, "job", "status", "--address", ray_head["address"], job_id],
                            env=ray_head["env"], capture_output=True, text=True, timeout=60)
    assert re.search(rf"{job_id}' succeeded|SUCCEEDED", status.stdout + status.stderr), logs[-4000:]
    assert "[sweep] done:" in logs and "[sweep] summary" in logs
    df = pd.read_parquet(out / "trials")
    assert len(df) == 6 + 1 and df.trial_id.is_unique  # none: k 1..3 × 2 strategies; head: 1 trial
    assert set(df.retrain_mode) == {"none", "head"}
    assert df.loc[df.retrain_mode == "head", "acc_retrained"].notna().all()
    assert (out / "sweep_config.json").is_file()
