"""CPU seconds of this process and of every process it started, by kind (driver, Ray workers, raylet…).

    with procstats.TreeCPU() as tree:
        run_extract(cfg)
    tree.seconds, tree.by_kind   # {"driver": …, "worker": …, "raylet": …, "gcs": …, "daemon": …}

A local Ray session's processes are all descendants of the driver (the GCS and the raylet its
children, the workers and the model actors the raylet's), so the tree below this process holds
everything a pipeline costs, also outside its tasks.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

# Ray bundles psutil in ray/thirdparty_files and puts it first on sys.path when imported; a machine
# given only Ray's wheel (the GPU box's .devray/) has no other copy, so Ray is imported first.
import ray
import psutil

_RAY_DIR = os.path.dirname(ray.__file__) + os.sep

KINDS = ("driver", "worker", "raylet", "gcs", "daemon", "other")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished, waited-for children (a
    DataLoader's workers once they are joined)."""
    return sum(cpu_split())


def cpu_split() -> tuple[float, float]:
    """``(own, children)``: user + system CPU seconds of this process, and of its finished, waited-for
    children."""
    t = psutil.Process().cpu_times()
    return t.user + t.system, t.children_user + t.children_system


def process_kind(proc: psutil.Process, *, root: int) -> str:
    """One of :data:`KINDS` for ``proc``, a descendant of ``root`` (or ``root`` itself: the driver)."""
    if proc.pid == root:
        return "driver"
    name = proc.name()
    if name in ("raylet", "gcs_server"):
        return name.replace("_server", "")
    if name.startswith("ray::"):  # Ray names its worker processes after what they run
        return "daemon" if name.endswith("Agent") else "worker"  # ray::DashboardAgent, ray::RuntimeEnvAgent
    if any(arg.startswith(_RAY_DIR) for arg in proc.cmdline()[1:3]):  # python [-u] …/ray/…/log_monitor.py
        return "daemon"
    return "other"


def process_tree_cpu(*, root: int) -> dict[int, tuple[str, float]] | None:
    """``{pid: (kind, user + system CPU seconds)}`` of process ``root`` and of each of its live
    descendants; ``None`` where ``root`` is not there. A process that ended is missing (its time is
    in its parent's children times only once waited for, and Ray's raylet does not wait for its
    workers): :class:`TreeCPU` samples while a run lasts."""
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return None
    out: dict[int, tuple[str, float]] = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (process_kind(p, root=root), t.user + t.system)
        except psutil.Error:  # ended meanwhile, or not ours to read
            continue
    return out if root in out else None


class TreeCPU:
    """CPU seconds spent by this process and every process it started, directly or not, while in
    the ``with`` block, in total (``seconds``) and per :data:`KINDS` (``by_kind``). Sampled every
    ``interval`` s, so a process that ends loses at most its last interval; the sampler's own time
    is left out. ``seconds`` is ``None`` where the process table cannot be read."""

    def __init__(self, *, interval: float = 0.5) -> None:
        self.interval = interval
        self.seconds: float | None = None
        self.by_kind: dict[str, float] = {}
        self._root = psutil.Process().pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._base: dict[int, tuple[str, float]] | None = None
        self._last: dict[int, tuple[str, float]] = {}
        self._own = 0.0

    def _sample(self) -> None:
        snap = process_tree_cpu(root=self._root)
        if snap is not None:
            self._last.update(snap)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self._own = time.thread_time()  # this thread's CPU: sampling, not the measured work

    def __enter__(self) -> TreeCPU:
        self._base = process_tree_cpu(root=self._root)
        if self._base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        by_kind = dict.fromkeys(KINDS, 0.0)
        for pid, (kind, cpu) in self._last.items():
            by_kind[kind] += cpu - self._base.get(pid, (kind, 0.0))[1]
        by_kind["driver"] -= self._own
        self.by_kind = {k: round(v, 3) for k, v in by_kind.items()}
        self.seconds = sum(by_kind.values())
