"""Fault soak: a small sweep on a 3-node Ray cluster against an S3 server, run again and again with random faults.

    python -m jobs.soak --runs 5 --seed 0          # from the project folder
    python -m jobs.soak --runs 2 --seed 1 --keep   # keep the work folder (logs of every run)

(``-m`` from the project folder: the soak uses the tests' S3 server and test data, ``tests.*``.)

Everything runs on this machine: the S3 server of the tests (``tests/s3_server.py``: moto's
standalone server in a subprocess on 127.0.0.1, behind an endpoint that can be stopped), a
``ray.cluster_utils.Cluster`` (a head and two worker nodes, one CPU each) started with the
store's environment, and ``jobs/sweep.py`` as the driver, a subprocess connected to that
cluster (``RAY_ADDRESS``), reading its images from ``s3://soak/data/`` and writing
``s3://soak/<run>/``. First one clean run; then ``--runs`` runs, each with one fault drawn
at random (``--seed``) and injected at a random point of the run: when the driver has printed a
uniform random share (5–90 %) of the lines the clean run printed, so the point falls in any stage
(extraction, decomposition, the trials) whatever the machine's speed; every kind comes once in
each 4 runs, in a random order:

* ``actor_kill``: SIGKILL of a Ray worker process doing the job's work (a model actor, a Ray
  Data task, a Tune trial actor), picked at random;
* ``node_removal``: a worker node removed (raylet, object store and workers; a fresh node
  joins after the run);
* ``driver_kill``: SIGKILL of the driver and its process group;
* ``store_down``: the store's endpoint stopped for 2–8 s, then restarted with every object.

A run that ends with an error is rerun once, without a fault. Then its ``trials/`` and
``records/`` must equal the clean run's: every trial row, with the same trial ids, every
column but timing and location (``seconds``, ``finished_at``, ``checkpoint``, and any column
naming the run's output), and every record bit for bit. Prints one line per run and, last,
a JSON summary; exits 2 with one ``error:`` line if any run differs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

from pydantic import Field

from dtd_ray import cli
from dtd_ray.config import config_class

ROOT = Path(__file__).resolve().parents[1]

FAULTS = ("actor_kill", "node_removal", "driver_kill", "store_down")
BUCKET = "soak"
NOT_COMPARED = ("seconds", "finished_at", "checkpoint")


def sweep_config(data_uri: str, weights: str, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "name": "soak",
        "datasets": [f"imagefolder:{data_uri}"],
        "models": [{"name": "cifar_resnet20", "weights": weights, "tag": "r20"}],
        "k": "1..3",
        "strategies": ["frequency", "weight_l1", "random"],
        "random_seeds": 2,
        "noise_seeds": 1,
        "kmax": 8,
        "extract_batch_size": 50,
        "use_gpu": False,
        "report": False,
        "retrain": {
            "none": {},
            "head": {"k": [2, 3], "strategies": ["frequency", "weight_l1"], "epochs": 3, "batch_size": 64},
            "finetune": {"k": [2], "strategies": ["frequency"], "epochs": 1, "batch_size": 32, "max_train_rows": 64},
        },
    }, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- comparing runs


def comparable_trials(df, output: str):
    """The trial rows without timing and location columns, sorted by trial id, lists as tuples."""
    import numpy as np

    d = df.drop(columns=[c for c in NOT_COMPARED if c in df.columns])
    for c in list(d.columns):
        if d[c].map(lambda v: isinstance(v, str) and output in v).any():  # any dtype: pandas 3 has "str"
            d = d.drop(columns=c)  # e.g. config: names the run's records folder
    for c in d.columns:
        if d[c].dtype == object:
            d[c] = d[c].map(lambda v: tuple(np.asarray(v).tolist()) if isinstance(v, (list, np.ndarray)) else v)
    return d.sort_values("trial_id").reset_index(drop=True)


def read_run(output: str) -> dict:
    """A run's trial rows and its records (every partition), as compared."""
    from dtd_ray.io import records
    from dtd_ray.ray.sweep.store import read_trials

    recs = {}
    for split in ("train", "test"):
        try:
            recs[split] = records.load_records(f"{output}/records", model="r20", split=split)
        except FileNotFoundError:
            recs[split] = None
    return {"trials": comparable_trials(read_trials(output), output), "records": recs}


def same(a: dict, b: dict) -> tuple[bool, bool, str]:
    """``(trials equal, records equal, why not)``."""
    import numpy as np
    import pandas as pd

    why = []
    ta, tb = a["trials"], b["trials"]
    t_ok = list(ta.columns) == list(tb.columns) and len(ta) == len(tb)
    if not t_ok:
        why.append(f"trials: {len(ta)} rows × {list(ta.columns)} vs {len(tb)} rows × {list(tb.columns)}")
    else:
        for c in ta.columns:  # every differing column, not just the first
            try:
                pd.testing.assert_series_equal(ta[c], tb[c], check_exact=True)
            except AssertionError:
                t_ok = False
                rows = [str(ta["trial_id"][i]) for i in range(len(ta)) if repr(ta[c][i]) != repr(tb[c][i])]
                why.append(f"trials.{c} differs in {len(rows)} row(s) (e.g. {', '.join(rows[:3])})")
    r_ok = True
    for split, ra in a["records"].items():
        rb = b["records"][split]
        if ra is None or rb is None:
            r_ok = False
            why.append(f"records {split}: missing")
            continue
        for col in ra:
            if not np.array_equal(ra[col], rb[col]):
                r_ok = False
                why.append(f"records {split}.{col} differ")
    return t_ok, r_ok, "; ".join(why)


# ----------------------------------------------------------------------------- faults


# The job's own work, by process title: Ray Data's map actors and tasks (the model actors among them) and
# Tune's trial actors. Not Ray's agents nor its bookkeeping actors (ActorLocationTracker, _StatsActor, …).
_THE_JOBS_WORK = ("MapWorker", "MapBatches", "ImplicitFunc", "_run_trial")


def busy_workers(cl) -> list[tuple[int, str]]:
    """``(pid, title)`` of the cluster's Ray worker processes doing the job's work (a task or an actor)."""
    from tests.test_reliability import raylet_children

    raylets = {n.all_processes["raylet"][0].process.pid for n in [cl.head_node, *cl.worker_nodes]}
    return [(pid, title) for pid, _, title in raylet_children(raylets) if any(s in title for s in _THE_JOBS_WORK)]


class Injector(threading.Thread):
    """Waits until the driver's log has ``at_line`` lines, then injects ``kind``; records what it did."""

    def __init__(self, kind: str, at_line: int, *, log: Path, cl, s3, driver: subprocess.Popen,
                 rng: random.Random, deadline: float) -> None:
        super().__init__(daemon=True)
        self.kind, self.at_line, self.log, self.cl, self.s3, self.driver, self.rng = \
            kind, at_line, log, cl, s3, driver, rng
        self.deadline = deadline
        self.detail = "not injected: the run ended first"
        self.injected = False
        self.at_s = None

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.log.exists() or len(self.log.read_bytes().splitlines()) < self.at_line:
            if self.driver.poll() is not None or time.monotonic() > self.deadline:
                return
            time.sleep(0.05)
        self.at_s = time.monotonic() - t0
        if self.kind == "driver_kill":
            if self.driver.poll() is None:
                os.killpg(self.driver.pid, signal.SIGKILL)
                self.injected, self.detail = True, "driver and its process group killed"
        elif self.kind == "store_down":
            down = self.rng.uniform(2, 8)
            self.s3.stop_endpoint()
            self.injected = True
            time.sleep(down)
            self.s3.start_endpoint()
            self.detail = f"endpoint down for {down:.1f} s"
        elif self.kind == "node_removal":
            node = self.rng.choice(sorted(self.cl.worker_nodes, key=lambda n: n.node_id))
            self.cl.remove_node(node)
            self.injected, self.detail = True, f"worker node {node.node_id[:8]} removed"
        elif self.kind == "actor_kill":
            while self.driver.poll() is None and time.monotonic() < self.deadline:
                busy = busy_workers(self.cl)
                if busy:
                    pid, title = self.rng.choice(busy)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.injected, self.detail = True, f"SIGKILL {title}"
                    return
                time.sleep(0.05)


# ----------------------------------------------------------------------------- the soak


@config_class
class SoakConfig:
    runs: Annotated[int, Field(ge=1, description="faulted runs after the clean one")] = 5
    seed: Annotated[int, Field(description="seed of the faults' kinds, points and victims")] = 0
    keep: Annotated[bool, Field(description="keep the work folder (the runs' logs)")] = False


def soak(args: SoakConfig) -> None:
    """The soak; a run that differs from the clean one (or a clean run that fails) is an error (exit 2)."""
    rng = random.Random(args.seed)

    import ray
    from ray.cluster_utils import Cluster

    from tests.s3_server import S3Server
    from tests.test_reliability import write_checkpoint, write_imagefolder

    work = Path(tempfile.mkdtemp(prefix="dtd-soak-"))
    t_start = time.monotonic()
    s3 = S3Server(work / "s3").start()
    cl = None
    results = []
    try:
        s3.create_bucket(BUCKET)
        os.environ.update(s3.env)  # before the nodes start: their workers reach the store through it
        data = work / "data"
        write_imagefolder(data, 600, split="train", seed=5)
        write_imagefolder(data, 300, split="test", seed=6)
        write_checkpoint(work / "ckpt.th")
        s3.upload_dir(data, BUCKET, "data/images")
        spec = sweep_config(f"s3://{BUCKET}/data/images", str(work / "ckpt.th"), work / "soak.yaml")

        cl = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(2):
            cl.add_node(num_cpus=1)
        cl.wait_for_nodes()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": cl.address}

        def sweep(output: str, log: Path) -> subprocess.Popen:
            f = open(log, "a")
            return subprocess.Popen([sys.executable, "jobs/sweep.py", "--config", str(spec), "--output", output],
                                    cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

        def finish(p: subprocess.Popen, limit: float = 600) -> int:
            try:
                return p.wait(limit)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                return p.wait(30)

        t0 = time.monotonic()
        rc = finish(sweep(f"s3://{BUCKET}/clean", work / "clean.log"))
        clean_s = time.monotonic() - t0
        if rc != 0:
            print((work / "clean.log").read_text()[-3000:], flush=True)
            raise RuntimeError(f"the clean run failed (exit {rc}); its log's end is above")
        clean = read_run(f"s3://{BUCKET}/clean")
        clean_lines = len((work / "clean.log").read_bytes().splitlines())
        print(f"[soak] clean run: {len(clean['trials'])} trials, "
              f"{sum(len(r['sample_id']) for r in clean['records'].values())} records, {clean_s:.0f} s", flush=True)

        kinds: list[str] = []
        while len(kinds) < args.runs:  # every kind once per 4 runs, in a random order
            kinds += rng.sample(FAULTS, len(FAULTS))
        for i in range(1, args.runs + 1):
            kind = kinds[i - 1]
            at_line = max(1, int(rng.uniform(0.05, 0.9) * clean_lines))
            out = f"s3://{BUCKET}/run-{i}"
            log = work / f"run-{i}.log"
            t0 = time.monotonic()
            p = sweep(out, log)
            inj = Injector(kind, at_line, log=log, cl=cl, s3=s3, driver=p, rng=rng, deadline=time.monotonic() + 600)
            inj.start()
            rc1 = finish(p)
            inj.join(60)
            if kind == "node_removal" and len(cl.worker_nodes) < 2:
                cl.add_node(num_cpus=1)  # whole again for the rerun and the next run
                cl.wait_for_nodes()
            rc2 = None
            if rc1 != 0:
                rc2 = finish(sweep(out, work / f"run-{i}.rerun.log"))
            run = read_run(out)
            t_ok, r_ok, why = same(run, clean)
            seconds = time.monotonic() - t0
            outcome = "equal" if (t_ok and r_ok) else "DIFFERENT"
            when = f"line {at_line} of {clean_lines}" + (f", {inj.at_s:.1f} s" if inj.at_s is not None else "")
            line = (f"[soak] run {i}: {kind} at {when} ({inj.detail}); first run exit {rc1}"
                    + (f", rerun exit {rc2}" if rc2 is not None else "")
                    + f"; trials {'equal' if t_ok else 'DIFFER'}, records {'equal' if r_ok else 'DIFFER'}"
                    + f" -> {outcome} ({seconds:.0f} s)" + (f": {why}" if why else ""))
            print(line, flush=True)
            results.append({"run": i, "fault": kind, "at_line": at_line, "of_lines": clean_lines,
                            "at_s": None if inj.at_s is None else round(inj.at_s, 1), "injected": inj.injected,
                            "detail": inj.detail, "exit": rc1, "rerun_exit": rc2, "trials_equal": t_ok,
                            "records_equal": r_ok, "seconds": round(seconds, 1)})
    finally:
        ray.shutdown()
        if cl is not None:
            cl.shutdown()
        s3.close()
        if args.keep:
            print(f"[soak] work folder kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    equal = sum(r["trials_equal"] and r["records_equal"] for r in results)
    summary = {"runs": len(results), "equal": equal, "faults": [r["fault"] for r in results],
               "injected": sum(r["injected"] for r in results), "seed": args.seed,
               "seconds": round(time.monotonic() - t_start, 1), "results": results}
    print(json.dumps(summary), flush=True)
    if not equal == len(results) == args.runs:
        raise RuntimeError(f"{len(results) - equal} of {len(results)} faulted run(s) differ from the clean run")


if __name__ == "__main__":
    cli.main(cli.Command(summary=__doc__.strip().splitlines()[0], config=SoakConfig, run=soak))
