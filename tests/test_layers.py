"""The package layers: the core, models, data, io, stages, train and report never import Ray.

Two checks: an AST scan of every module of those packages (an import inside a function
counts too), and a fresh interpreter that imports every one of them with ``ray`` made
unimportable. The core also stays free of every other layer (numpy/torch only).
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dtd_ray"
RAY_FREE = ("core", "models", "data", "io", "stages", "train", "report")
TOP_LEVEL_RAY_FREE = ("config.py", "cli.py", "__init__.py")


def modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (PKG / pkg).rglob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Every module name an ``import`` / ``from … import`` in ``path`` names (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level)[0]
                out.add(f"{base}.{node.module}" if node.module else base)
            else:
                out.add(node.module or "")
    return out


def test_every_layer_exists_and_has_modules():
    for pkg in RAY_FREE + ("ray",):
        assert (PKG / pkg / "__init__.py").is_file(), pkg
        assert len(modules(pkg)) >= 2, f"dtd_ray/{pkg} has no modules"


@pytest.mark.parametrize("path", modules(*RAY_FREE) + [PKG / f for f in TOP_LEVEL_RAY_FREE],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_no_ray_import_in_ray_free_layers(path):
    bad = sorted(n for n in imported_names(path) if n == "ray" or n.startswith("ray.") or n.startswith("dtd_ray.ray"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; only dtd_ray/ray/ and jobs/ may use Ray"


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: str(p.relative_to(PKG)))
def test_core_imports_no_other_layer(path):
    bad = sorted(n for n in imported_names(path)
                 if n.startswith("dtd_ray.") and not n.startswith("dtd_ray.core"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; the core is numpy/torch only"


def test_ray_free_layers_import_with_ray_unimportable():
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in modules(*RAY_FREE)] + ["dtd_ray.config"]
    code = (
        "import sys, importlib\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is unimportable in this check')\n"
        "sys.meta_path.insert(0, NoRay())\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "importlib.import_module('dtd_ray.config').versions()  # records Ray's version without importing it\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray got imported'\n"
        "print('ok', len(sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")


def test_readme_layout_names_every_module():
    """README's Layout section lists every package and module of the tree (so the two cannot drift)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.name == "__init__.py":
            top = rel.parts[0] if len(rel.parts) > 1 else None
            if top and f"dtd_ray/{top}/" not in block:
                missing.append(f"dtd_ray/{top}/")
            continue
        if rel.name not in block:
            missing.append(str(rel))
    assert not missing, f"README's Layout section does not name: {', '.join(sorted(set(missing)))}"


def test_pipeline_cpu_tasks_import_no_torch():
    """What the extraction pipeline's CPU tasks unpickle (the decode function with its backbone's
    Preprocessing record) imports no torch: every fresh Ray worker that runs one of those tasks would
    otherwise pay torch's import (1.6 s a process on the 2-core machine). (The records are written by
    the model stage, which has torch anyway.)"""
    import pickle

    from dtd_ray.data.transforms import prepare_batch
    from dtd_ray.models.backbones import get_backbone

    blob = pickle.dumps((prepare_batch, get_backbone("cifar_resnet20", weights=None).preprocessing))
    code = ("import pickle, sys; f = pickle.loads(sys.stdin.buffer.read()); "
            "print(type(f[1]).__name__, sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])")
    r = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode().split() == ["Preprocessing", "[]"], r.stdout.decode()


# ----------------------------------------------------------------------------- the house rules

MODULE_LINES, JOB_LINES = 500, 400


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _module_imports(path: Path, known: set[str]) -> set[str]:
    """The ``dtd_ray`` modules (not packages) that ``path`` imports, anywhere in it, with
    ``from pkg import mod`` resolved to ``pkg.mod``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
                pkg = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known}


def test_no_import_circle():
    """No module of the package imports, directly or through others, a module that imports it back
    (package ``__init__`` files, which only re-export, are left out)."""
    paths = {_module_name(p): p for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    known = set(paths)
    graph = {m: _module_imports(p, known) - {m} for m, p in paths.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_module_and_job_sizes():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MODULE_LINES]
    big += [f"{p.relative_to(ROOT)} ({n} lines)" for p in (ROOT / "jobs").glob("*.py")
            if (n := len(p.read_text().splitlines())) > JOB_LINES]
    assert not big, f"over {MODULE_LINES} lines (a module) or {JOB_LINES} (a job): {', '.join(big)}"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_hacks_or_source_reading(path):
    """The package is installed (editable): nothing edits sys.path, loads a file by path or reads
    its own source to find its options."""
    calls = {"sys.path.insert", "sys.path.append", "inspect.getsource", "importlib.util.spec_from_file_location"}
    tree = ast.parse(path.read_text(), filename=str(path))
    found = sorted({ast.unparse(n.func) for n in ast.walk(tree)
                    if isinstance(n, ast.Call) and ast.unparse(n.func) in calls})
    assert not found, f"{path.relative_to(ROOT)} calls {found}"


def test_every_command_resolves_with_every_option_described():
    """Each ``dtd-ray`` command (the same functions as jobs/*.py) imports, and every option of its
    config has a description for ``--help``."""
    from dtd_ray import cli
    from dtd_ray.config import describe

    for name in cli.COMMANDS:
        command = cli.resolve(name)
        missing = [f.name for f in dataclasses.fields(command.config) if not describe(command.config, f.name)]
        assert not missing, f"dtd-ray {name}: options without a description: {missing}"
        job = ROOT / "jobs" / f"{name}.py"
        assert job.is_file() and f'cli.main("{name}")' in job.read_text(), f"jobs/{name}.py does not run dtd-ray {name}"
