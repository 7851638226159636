"""The command line of every job: fire parses, the config class validates, one exit policy.

    dtd-ray sweep --config cifar10_resnets --models cifar_resnet20
    dtd-ray extract --model cifar_resnet20 --dataset imagefolder:../shared/data/cifar10
    python jobs/sweep.py …            # the same function, as the `ray job submit` target

A :class:`Command` is a config class and the function that runs it. :func:`parse` reads
``--name value`` / ``--name=value`` / ``--flag`` with fire into the config; :func:`main` adds
the one exit policy: a user's error (:data:`USER_ERRORS`) prints ``error: <one line>`` on
stderr and exits 2, Ctrl-C exits 130, anything else is a bug and keeps its traceback.
``DTD_TRACEBACK=1`` keeps the traceback of a user's error too. :data:`COMMANDS` are the
package's jobs; the benchmarks and the soak in ``jobs/`` build their own :class:`Command`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import Field

from dtd_ray import config as config_lib
from dtd_ray.config import config_class

# The errors a user's input or environment causes (a bad option, a missing file, an object
# store that fails mid-run, failed trials): one line each, not a traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


@dataclasses.dataclass(frozen=True)
class Command:
    """A job: its one-line summary, its config class and what runs it."""

    summary: str
    config: type
    run: Callable[[Any], Any]
    # flags given → config; default ``config(**flags)`` (the sweep merges them into its preset)
    build: Callable[[dict[str, Any]], Any] | None = None
    # text between the summary and the options in --help
    help: str = ""


def _read_flags(argv: list[str]) -> dict[str, Any]:
    """The ``--name value`` flags of ``argv`` as fire parses them (values typed as Python
    literals where they read as one); nothing runs here, the config class validates them. A
    stray word is refused in one line (fire would answer with its usage page)."""
    import fire  # the CLI: imported where a command line is parsed, not by every library import

    got: dict[str, Any] = {}

    def collect(**flags: Any) -> None:
        got.update(flags)

    stray = [a for i, a in enumerate(argv)
             if not a.startswith("--") and (i == 0 or not argv[i - 1].startswith("--") or "=" in argv[i - 1])]
    if stray:
        raise ValueError(f"unexpected argument {stray[0]!r}: options are --name value (see --help)")
    fire.Fire(collect, command=argv, name="dtd-ray")
    return {k.replace("-", "_"): v for k, v in got.items()}


def parse(command: Command, argv: list[str]) -> Any:
    """The config of ``command`` from ``argv``; ``None`` after printing the help for ``--help``."""
    if any(a in ("-h", "--help", "-help") for a in argv):
        lines = [command.summary, ""] + ([command.help, ""] if command.help else [])
        print("\n".join(lines + ["Options (all --name value):"] + config_lib.field_help(command.config)))
        return None
    flags = _read_flags(argv)
    return (command.build or (lambda f: command.config(**f)))(flags)


def run_cli(command: Command, argv: list[str] | None = None) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the command's config and run it; errors raise."""
    cfg = parse(command, list(sys.argv[1:] if argv is None else argv))
    return None if cfg is None else command.run(cfg)


def resolve(name: str) -> Command:
    """The :class:`Command` of a name of :data:`COMMANDS` (its module imported now)."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
    module, attr = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _lookup(entry: str | Command | Mapping[str | None, Command], argv: list[str]) -> tuple[Command, list[str]]:
    """The command ``entry`` names, and the arguments left for its options."""
    if isinstance(entry, Command):
        return entry, argv
    if isinstance(entry, str) and entry != "dtd-ray":
        return resolve(entry), argv
    if entry == "dtd-ray":
        return resolve(argv[0] if argv else ""), argv[1:]
    if argv and argv[0] in entry:
        return entry[argv[0]], argv[1:]
    if None in entry:
        return entry[None], argv
    raise ValueError(f"name a command first: {', '.join(k for k in entry if k)} (then --help for its options)")


def main(entry: str | Command | Mapping[str | None, Command] = "dtd-ray", argv: list[str] | None = None) -> None:
    """Run a job under the one exit policy (see the module docstring) and exit.

    ``entry``: a name of :data:`COMMANDS`, a :class:`Command`, a mapping of sub-command names
    to commands (key ``None``: the one run without a name), or ``"dtd-ray"`` (the console
    script: the first word names the command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if entry == "dtd-ray" and (not argv or argv[0] in ("-h", "--help", "-help")):
        print("usage: dtd-ray COMMAND [--name value ...]   (dtd-ray COMMAND --help lists its options)\n\n"
              f"commands: {', '.join(COMMANDS)}")
        sys.exit(0 if argv else EXIT_USER_ERROR)
    try:
        command, rest = _lookup(entry, argv)
        run_cli(command, rest)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except USER_ERRORS as e:
        if os.environ.get("DTD_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# The package's jobs, by name: "module:attribute" of a Command (imported when run, so that
# `dtd-ray report` never imports Ray).
COMMANDS = {
    "sweep": "dtd_ray.ray.commands:SWEEP",
    "extract": "dtd_ray.ray.commands:EXTRACT",
    "pack": "dtd_ray.ray.commands:PACK",
    "decompose": "dtd_ray.ray.commands:DECOMPOSE",
    "train": "dtd_ray.ray.commands:TRAIN",
    "report": "dtd_ray.report.build:COMMAND",
    "atlas": "dtd_ray.report.atlas:COMMAND",
    "localise": "dtd_ray.stages.localise:COMMAND",
    "migrate": "dtd_ray.cli:MIGRATE",
}


def console() -> None:
    """The ``dtd-ray`` console script."""
    main("dtd-ray")


@config_class
class MigrateConfig:
    sweep: Annotated[str, Field(description="a sweep's output folder (or a decompose output) of an earlier version, "
                                            "local or s3://…")] = "runs/quickstart"


def migrate(cfg: MigrateConfig) -> list[tuple[str, str]]:
    """Rewrite an output's flat-layout tables in the one layout (:func:`dtd_ray.io.layout.migrate`)."""
    from dtd_ray.io import layout, storage

    fs, path = storage.resolve(cfg.sweep)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"no such folder: {cfg.sweep}")
    root = storage.join(cfg.sweep, "decompose") if storage.exists(fs, f"{path}/decompose") else cfg.sweep
    moved = layout.migrate(root)
    print(f"[migrate] {root}: {len(moved)} file(s) moved to the partitioned layout", flush=True)
    return moved


MIGRATE = Command(summary="Rewrite an earlier version's decompose tables in the one partitioned layout.",
                  config=MigrateConfig, run=migrate)
