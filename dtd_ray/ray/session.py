"""The one way a job starts and stops Ray, and how much of Ray's own output reaches the console.

    with session.start(verbose=cfg.verbose):
        run_sweep(cfg, plan=plan)

Connects to the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it; "auto" names a
``ray start`` cluster), else starts a fresh local Ray: never one that happens to run on this
machine. Shuts Ray down on the way out, also after an error. A local Ray it starts keeps more idle
worker processes than Ray's default (:func:`local_system_config`: the extraction pipeline runs more
processes than CPUs, and a worker Ray ends is started again with all its imports).

Quiet (the default): the console keeps the project's own lines (``[extract]``, ``[sweep]``, …,
with rates), warnings, and one line per failure (a failed Tune trial: its id and the cause, not
the traceback). Everything Ray writes to its log files stays there. Per source:

* Ray Data: its console handler at WARNING, one line per record (the execution plans and
  "execution finished" lines go only to ``ray-data.log``), no progress bars (the stages print
  their own progress), and not the notice that the progress bars are off.
* Tune: the legacy console reporter (``RAY_AIR_NEW_OUTPUT=0``), which honours the sweep's
  ``verbose=0``; the default one prints its experiment tables at any verbosity.
* Ray's Python loggers (``ray``, ``ray.tune``, ``ray.train``, …) at WARNING, in this process
  and, through the job's ``runtime_env`` (so also on a cluster's nodes), in every worker:
  ``RAY_LOGGER_LEVEL=warning`` drops Tune's "Checkpoint successfully created" from the trials.
  ``log_to_driver`` stays on: the workers' own prints and warnings (``[train]`` epochs, skipped
  inputs) are project output.
* This process's C++ core worker at FATAL (the GCS, raylet and workers keep their levels): it
  logs one ERROR per process for any Ray Data actor pool ("has constructor arguments in the
  object store and max_restarts > 0", about the ``DataContext`` and UDF references Ray Data
  itself passes to its actors; ray-project/ray#57733). Only ``max_restarts=0`` avoids it, and
  that would give up restarting a killed model actor. Ray's C++ logging announces the level in
  one line as Ray starts ("Set ray log level from environment variable …"): the one line of
  Ray's that a quiet job still prints.
* Not the notice that a new local Ray has token authentication on.

``verbose=True`` leaves all of this at Ray's defaults. A variable the user set in the
environment (``RAY_AIR_NEW_OUTPUT``, ``RAY_LOGGER_LEVEL``, ``RAY_BACKEND_LOG_LEVEL``) wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

import ray
import ray.data  # also sets up the "ray.data" logger whose console handler quiet mode adjusts

from dtd_ray.ray.extract import failure_cause

# What the workers of a quiet job get through its runtime_env (Ray's loggers at WARNING there too).
_WORKER_ENV = {"RAY_LOGGER_LEVEL": "warning"}

# Loggers quiet mode raises to ERROR: they only ever say something the console does not need.
_NOTICE_LOGGERS = (
    "ray.data._internal.progress",  # "Progress bars disabled. To enable, set …"
    "ray._private.authentication.authentication_token_setup",  # "Token authentication is enabled …"
)


@contextlib.contextmanager
def start(*, verbose: bool = False) -> Iterator[None]:
    """Start or join Ray for the body of the ``with``; quiet unless ``verbose`` (see the module doc)."""
    address = os.environ.get("RAY_ADDRESS") or "local"
    # Only a Ray this process starts takes system settings; a cluster keeps those it was started with.
    system = {"_system_config": local_system_config()} if address == "local" else {}
    with contextlib.ExitStack() as stack:
        if verbose:
            ray.init(address=address, include_dashboard=False, **system)
        else:
            worker_env = {k: v for k, v in _WORKER_ENV.items() if k not in os.environ}
            stack.enter_context(_quiet_loggers())  # before ray.init: the token notice comes from it
            with _driver_only_env("RAY_BACKEND_LOG_LEVEL", "fatal"), _stderr_without(_LEVEL_NOTICE):
                ray.init(address=address, include_dashboard=False, configure_logging=False,
                         runtime_env={"env_vars": worker_env} if worker_env else None, **system)
            stack.enter_context(_one_line_handler())  # after: ray.init(configure_logging=False) clears "ray"'s handlers
            stack.enter_context(_env({"RAY_AIR_NEW_OUTPUT": "0"}))  # read when a Tuner starts
        stack.callback(ray.shutdown)
        ray.data.DataContext.get_current().enable_progress_bars = False  # the stages print their own progress
        yield


def local_system_config(num_cpus: int | None = None) -> dict[str, int]:
    """Ray's system settings for a local Ray that a job (or the test session) starts itself.

    ``num_workers_soft_limit`` = 4 × CPUs. Ray's default keeps one idle worker process per CPU
    and kills the others after 1 s idle, but the extraction pipeline runs more processes than
    CPUs at once: its decode tasks take 0.5 CPU on a CPU node and its writes 0.25, beside the model
    actor. A killed worker's replacement pays its imports again (Python, numpy, pyarrow, Ray Data) in
    the middle of the pipeline; ``jobs/bench_extract.py``'s array proxy measured this setting
    alone as a several-fold rise of the steady rate (README, "Extraction speed"). A cluster started
    with ``ray start`` keeps its own settings (Ray reads them from ``RAY_<name>`` variables, e.g.
    ``RAY_num_workers_soft_limit``; not tried on a cluster here).
    """
    cpus = int(num_cpus or os.cpu_count() or 1)
    return {"num_workers_soft_limit": 4 * cpus}


class _OneLine(logging.Formatter):
    """``[ray] <level>: <message>``, and an exception as its one-line cause, not its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            kind, cause = failure_cause(record.exc_info[1])
            msg = f"{msg}: {kind}: {cause}"
        return f"[ray] {record.levelname.lower()}: {msg}"


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` (not those already set) for the duration; restore after."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# The core worker announces a level given by RAY_BACKEND_LOG_LEVEL in an INFO line on stderr.
_LEVEL_NOTICE = "Set ray log level from environment variable"


@contextlib.contextmanager
def _stderr_without(notice: str) -> Iterator[None]:
    """Drop the lines containing ``notice`` that anything (C++ included) writes to fd 2 meanwhile.

    The core worker writes straight to file descriptor 2, past ``sys.stderr``: fd 2 points at a
    temporary file for the duration, and every other line is written back to the real stderr
    afterwards, in order.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True) if notice not in ln]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def _driver_only_env(name: str, value: str) -> Iterator[None]:
    """Set ``name`` for this process's C++ code only, while Ray starts (unless the user set it).

    ``os.putenv`` without ``os.environ``: the core worker ``ray.init`` creates in this process
    reads it with getenv, while the GCS, raylet and workers ``ray.init`` spawns get a copy of
    ``os.environ`` and keep their usual log levels (their log files stay complete).
    """
    if name in os.environ:
        yield
        return
    os.putenv(name, value)
    try:
        yield
    finally:
        os.unsetenv(name)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Ray's loggers at WARNING (the notices at ERROR), Ray Data's console one line per record; restored after."""
    levels = {"ray": logging.WARNING} | {name: logging.ERROR for name in _NOTICE_LOGGERS}
    old_levels = {name: logging.getLogger(name).level for name in levels}
    # Ray Data's logger does not propagate: it has its own console handler (its file handler,
    # ray-data.log, keeps every level).
    console = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    old_console = [(h.level, h.formatter) for h in console]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for h in console:
        h.setLevel(logging.WARNING)
        h.setFormatter(_OneLine())
    try:
        yield
    finally:
        for name, level in old_levels.items():
            logging.getLogger(name).setLevel(level)
        for h, (level, formatter) in zip(console, old_console):
            h.setLevel(level)
            h.setFormatter(formatter)


@contextlib.contextmanager
def _one_line_handler() -> Iterator[None]:
    """Ray's WARNING and ERROR records on stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    handler.setLevel(logging.WARNING)
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    try:
        yield
    finally:
        ray_logger.removeHandler(handler)
