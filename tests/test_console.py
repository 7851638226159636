"""What a user's console shows: a sweep prints the project's own lines, not Ray's chatter.

Runs ``jobs/sweep.py`` on the tiny project of tests/test_sweep.py (extraction through a Ray Data
actor pool, decomposition, one Tune trial) as a subprocess, quiet (the default) and with
``--verbose true``, and reads its stdout and stderr together.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtd_ray import console

from test_sweep import make_tiny_project, write_tiny_config

ROOT = Path(__file__).resolve().parents[1]

# What Ray prints by default during a sweep (each seen before the quiet session existed).
RAY_CHATTER = (
    " INFO ",  # Ray Data's execution plans, Tune's "Wrote the latest version of all result files"
    "ERROR",
    "core_worker.cc",  # "… has constructor arguments in the object store and max_restarts > 0"
    "logging.cc",  # "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"
    "Progress bars disabled",
    "Token authentication is enabled",
    "Configuration for experiment",  # Tune's experiment table
    "View detailed results here",
    "Checkpoint successfully created",  # from every trial, through the workers' logs
)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = make_tiny_project(tmp_path_factory.mktemp("console"))
    config = write_tiny_config(root, retrain={"none": {}, "head": {"k": [2], "strategies": ["frequency"], "epochs": 2}})
    # RAY_ADDRESS=local: never attach to another Ray on this machine.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}

    def run(*flags: str) -> str:
        out = root / f"out{len(flags)}"
        p = subprocess.run([sys.executable, "jobs/sweep.py", "--config", str(config), "--output", str(out),
                            "--report", "false", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
        assert p.returncode == 0, p.stdout[-3000:]
        return p.stdout

    return run


@pytest.mark.timeout(600)
def test_quiet_console_shows_the_project_lines_and_not_rays(tiny_sweep):
    text = tiny_sweep()
    lines = text.splitlines()
    # C++ log lines start "[<time> <I|W|E> <pid> <tid>] file.cc:line: …"
    cpp = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWEF] \d+ \d+\] ")
    noisy = [ln for ln in lines if any(s in ln for s in RAY_CHATTER) or cpp.match(ln)]
    assert not noisy, "Ray's own output on the console:\n" + "\n".join(noisy)
    # Off a terminal each stage ends with one progress line (count, rate, time); no line per epoch or trial.
    assert any(re.match(r"\[extract\] tiny/train: 18/18 img \(100%\), .* img/s, \d+:\d\d, wrote 18 rows \(0 skipped\)$", ln) for ln in lines), text
    assert any(ln.startswith("[extract] tiny/test: 18/18 img (100%)") and ln.endswith("wrote 18 rows (0 skipped)") for ln in lines), text
    assert any(re.match(r"\[decompose\] tiny: (\d+)/\1 step \(100%\), .* rows -> ", ln) for ln in lines), text
    assert any(ln.startswith("[sweep] head tiny: 1/1 trial (100%)") for ln in lines), text
    assert not [ln for ln in lines if " epoch " in ln or " done (1/1)" in ln], text
    assert any(ln.startswith("[sweep] done: ran 7 trial(s)") for ln in lines), text
    assert len(lines) < 40, text


@pytest.mark.timeout(600)
def test_verbose_brings_rays_info_output_back(tiny_sweep):
    text = tiny_sweep("--verbose", "true")
    assert "INFO streaming_executor" in text  # Ray Data's execution plans
    assert "Configuration for experiment" in text  # Tune's experiment table
    assert "[sweep] done: ran 7 trial(s)" in text
    lines = text.splitlines()
    assert any(ln.startswith("[sweep] head tiny frequency k=2: epoch 2/2 acc") for ln in lines), text
    assert any(ln.startswith("[sweep] trial ") and " done (1/1): head tiny" in ln for ln in lines), text


def test_lines_off_a_terminal_print_a_few_lines_with_rate_and_eta(monkeypatch):
    monkeypatch.delenv("DTD_PROGRESS", raising=False)
    out = io.StringIO()  # not a TTY
    assert console.mode(out) == "lines"
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    with console.progress(total=100, desc="[t] s", unit="img", stream=out, interval=1.5) as bar:
        bar.update(10)  # t=1: under the interval, no line
        bar.update(40)  # t=2: a line, with its ETA
        bar.update(50)  # t=3: the stage is complete: only the end line
        bar.set_postfix_str("wrote x")
    assert out.getvalue().splitlines() == [
        "[t] s: 50/100 img (50%), 25 img/s, 0:02, ETA 0:02",
        "[t] s: 100/100 img (100%), 25 img/s, 0:04, wrote x",
    ]


def test_progress_mode_follows_the_terminal_and_dtd_progress(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("DTD_PROGRESS", raising=False)
    assert console.mode(Tty()) == "bar"
    monkeypatch.setenv("DTD_PROGRESS", "off")
    out = io.StringIO()
    with console.progress(total=3, desc="[t] q", unit="it", stream=out, interval=0) as bar:
        bar.update(1)
        bar.update(1)
    assert out.getvalue().splitlines() == [ln for ln in out.getvalue().splitlines() if "2/3 it (67%)" in ln]
    assert len(out.getvalue().splitlines()) == 1  # off: the end line only
    monkeypatch.setenv("DTD_PROGRESS", "loud")
    with pytest.raises(ValueError, match="DTD_PROGRESS='loud': expected one of bar, lines, off"):
        console.mode(out)
