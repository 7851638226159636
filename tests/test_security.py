"""Security: no unsafe deserialisation or code execution in the package, a locked-down cluster.yaml,
and nothing secret in the repository.

The code checks parse every ``.py`` under ``dtd_ray/`` and ``jobs/`` (an AST, so calls split over
lines and aliases such as ``from torch import load`` are seen) and refuse:

- ``torch.load(...)`` without ``weights_only=True`` (a checkpoint's pickle can run any code);
- ``pickle.load``/``pickle.loads``/``pickle.Unpickler`` (and ``cPickle``, ``dill``, ``joblib.load``,
  ``pandas.read_pickle``, ``numpy.load(allow_pickle=True)``, ``torch.hub.load``) except the
  allow-listed CIFAR unpickler in ``dtd_ray/data/sources.py``, which resolves only numpy globals;
- ``eval``/``exec``/``compile`` (configs are data, parsed by fire's literal parser or yaml.safe_load);
- ``yaml.load`` without a safe loader, ``yaml.unsafe_load``/``full_load``/``load_all``;
- ``subprocess`` with ``shell=True``, ``os.system``, ``os.popen``.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("dtd_ray", "jobs")
# (file, class) allowed to subclass pickle.Unpickler: it must override find_class (checked below).
ALLOWED_UNPICKLERS = {("dtd_ray/data/sources.py", "_CifarUnpickler")}


# ----------------------------------------------------------------------------- the scanner


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> fully qualified name, from every import in the module."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNSAFE_CALLS = {
    "pickle.load": "pickle.load runs code from the file",
    "pickle.loads": "pickle.loads runs code from the data",
    "pickle.Unpickler": "a bare pickle.Unpickler runs code from the file",
    "_pickle.load": "pickle.load runs code from the file",
    "_pickle.loads": "pickle.loads runs code from the data",
    "cPickle.load": "pickle.load runs code from the file",
    "cPickle.loads": "pickle.loads runs code from the data",
    "dill.load": "dill.load runs code from the file",
    "dill.loads": "dill.loads runs code from the data",
    "joblib.load": "joblib.load unpickles",
    "pandas.read_pickle": "read_pickle unpickles",
    "torch.hub.load": "torch.hub.load imports code from a repository",
    "yaml.unsafe_load": "yaml.unsafe_load builds arbitrary objects",
    "yaml.full_load": "yaml.full_load: use yaml.safe_load",
    "yaml.load_all": "yaml.load_all: use yaml.safe_load_all",
    "os.system": "os.system runs a shell",
    "os.popen": "os.popen runs a shell",
    "eval": "eval runs code",
    "exec": "exec runs code",
    "compile": "compile makes code from a string",
    "builtins.eval": "eval runs code",
    "builtins.exec": "exec runs code",
}


def scan_source(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe call in ``source`` as ``file:line: what``."""
    tree = ast.parse(source, filename)
    alias = _aliases(tree)
    problems: list[str] = []

    def qualify(name: str) -> str:
        head, _, rest = name.partition(".")
        full = alias.get(head, head)
        return f"{full}.{rest}" if rest else full

    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if (d := _dotted(base)) and qualify(d) in ("pickle.Unpickler", "_pickle.Unpickler"):
                    if (filename, node.name) not in ALLOWED_UNPICKLERS:
                        problems.append(f"{where}: class {node.name} subclasses pickle.Unpickler (not allow-listed)")
                    elif not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                        problems.append(f"{where}: {node.name} does not restrict find_class")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        full = qualify(name)
        if full == "torch.load":
            if not _is_true(_kw(node, "weights_only")):
                problems.append(f"{where}: torch.load without weights_only=True")
        elif full in UNSAFE_CALLS:
            problems.append(f"{where}: {full}: {UNSAFE_CALLS[full]}")
        elif full == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not (loader is not None and (_dotted(loader) or "").endswith(("SafeLoader", "CSafeLoader"))):
                problems.append(f"{where}: yaml.load without SafeLoader (use yaml.safe_load)")
        elif full == "numpy.load" and _is_true(_kw(node, "allow_pickle")):
            problems.append(f"{where}: numpy.load(allow_pickle=True) unpickles")
        elif full.split(".")[0] == "subprocess" and _is_true(_kw(node, "shell")):
            problems.append(f"{where}: {full}(shell=True) runs a shell")
    return problems


def package_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


# ----------------------------------------------------------------------------- the checks


def test_scanner_finds_what_it_must():
    bad = '''
import torch, pickle, yaml, subprocess, os
from torch import load as tload
import numpy as np
torch.load(p)
torch.load(p, weights_only=False)
torch.load(
    p,
    map_location="cpu")
tload(p)
pickle.loads(b)
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
eval(cfg)
exec(code)
subprocess.run(cmd, shell=True)
os.system(cmd)
np.load(f, allow_pickle=True)
class U(pickle.Unpickler):
    pass
'''
    found = scan_source(bad)
    assert len(found) == 13, "\n".join(found)
    ok = '''
import torch, yaml, subprocess
torch.load(p, map_location="cpu", weights_only=True)
torch.load(
    p, weights_only=True)
yaml.safe_load(s)
yaml.load(s, Loader=yaml.SafeLoader)
model.eval()
subprocess.run(["ls"], check=True)
re.compile("x")
'''
    assert scan_source(ok) == []


def test_package_has_no_unsafe_loads_or_code_execution():
    files = package_files()
    assert any(p.name == "backbones.py" for p in files) and any(p.parent.name == "jobs" for p in files)
    problems = [x for p in files for x in scan_source(p.read_text(), str(p.relative_to(ROOT)))]
    assert problems == [], "\n".join(problems)


def test_every_torch_load_uses_weights_only_textually():
    """A plain-text cross-check of the AST scan: every `torch.load(` call's argument list holds weights_only=True."""
    offenders = []
    for p in package_files():
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            line = text.count("\n", 0, m.start()) + 1
            prefix = text[text.rfind("\n", 0, m.start()) + 1 : m.start()]
            if "#" in prefix or "``" in prefix or prefix.strip().startswith(("\"", "'")):
                continue  # a comment or docstring naming the call
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if not re.search(r"weights_only\s*=\s*True", text[m.end() : i]):
                offenders.append(f"{p.relative_to(ROOT)}:{line}")
    assert offenders == []


def test_cifar_unpickler_is_the_only_unpickler_and_is_restricted():
    src = (ROOT / "dtd_ray/data/sources.py").read_text()
    assert "class _CifarUnpickler(pickle.Unpickler)" in src and "def find_class" in src
    import io
    import pickle

    from dtd_ray.data.sources import _CifarUnpickler

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        _CifarUnpickler(io.BytesIO(pickle.dumps(print, protocol=2))).load()


# ----------------------------------------------------------------------------- cluster.yaml


def _cluster_yaml() -> dict:
    path = ROOT / "cluster.yaml"
    if not path.exists():
        pytest.skip("cluster.yaml is not written yet (it comes with the sweep)")
    return yaml.safe_load(path.read_text())


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _ray_starts(commands: list[str]) -> list[tuple[str, str]]:
    """``(command, what ran before it in the same list)`` for every ``ray start`` in ``commands``."""
    out = []
    for i, c in enumerate(commands or []):
        for part in re.split(r";|&&|\n", c):
            if re.search(r"\bray\s+start\b", part):
                out.append((part, "\n".join(commands[:i]) + "\n" + c[: c.find(part)]))
    return out


def _token_auth(cmd: str, before: str) -> bool:
    return bool(re.search(r"\bRAY_AUTH_MODE=token\b", cmd)
                or re.search(r"\bexport\s+RAY_AUTH_MODE=token\b", before))


def test_cluster_yaml_keeps_dashboard_and_job_api_on_localhost():
    cfg = _cluster_yaml()
    heads = _ray_starts(cfg.get("head_start_ray_commands"))
    assert heads, "cluster.yaml has no `ray start --head` command"
    for cmd, _ in heads:
        assert "--head" in cmd
        m = re.search(r"--dashboard-host[= ](\S+)", cmd)
        assert m and m.group(1) in ("127.0.0.1", "localhost"), (
            f"the dashboard (and its job API) must listen on the head's localhost: {cmd.strip()}")
        assert not re.search(r"--include-dashboard[= ](true|True)", cmd) or m
    everything = " ".join(_strings(cfg))
    assert "0.0.0.0" not in everything, "a service bound to every interface"
    assert not re.search(r"--ray-client-server-port", everything) or "127.0.0.1" in everything


def test_cluster_yaml_turns_token_authentication_on_everywhere():
    cfg = _cluster_yaml()
    starts = _ray_starts(cfg.get("head_start_ray_commands")) + _ray_starts(cfg.get("worker_start_ray_commands"))
    assert len(starts) >= 2
    missing = [c.strip() for c, before in starts if not _token_auth(c, before)]
    assert missing == [], f"`ray start` without RAY_AUTH_MODE=token: {missing}"
    # The token itself is never in the file (it is copied from the launching machine).
    everything = "\n".join(_strings(cfg))
    assert not re.search(r"RAY_AUTH_TOKEN\s*=\s*['\"]?[A-Za-z0-9_\-]{8,}", everything)


# ----------------------------------------------------------------------------- secrets


SECRET_PATTERNS = {
    "AWS access key id": re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    "AWS secret key assignment": re.compile(rb"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}"),
    "GitHub token": re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Slack token": re.compile(rb"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
}


def repo_files() -> list[Path]:
    """Tracked files and new files git would add (not ignored)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, check=False)
    if r.returncode:
        pytest.skip(f"not a git checkout: {r.stderr.decode().strip()}")
    return [ROOT / n for n in r.stdout.decode().split("\0") if n and (ROOT / n).is_file()]


def test_scanner_detects_secrets():
    fake_key = b"AKIA" + b"ABCDEFGHIJKLMNOP"
    fake_pem = b"-----BEGIN " + b"RSA PRIVATE KEY-----\nMIIB..."
    assert SECRET_PATTERNS["AWS access key id"].search(b"key = '" + fake_key + b"'")
    assert SECRET_PATTERNS["private key"].search(fake_pem)


def test_nothing_secret_in_the_repository():
    files = repo_files()
    assert any(p.name == "README.md" for p in files)
    hits = []
    for p in files:
        data = p.read_bytes()
        for what, pattern in SECRET_PATTERNS.items():
            if pattern.search(data):
                hits.append(f"{p.relative_to(ROOT)}: {what}")
    assert hits == [], "\n".join(hits)
    names = [p.name for p in files]
    for bad in ("id_rsa", "id_ed25519", ".env", "credentials", "auth_token"):
        assert bad not in names, f"a {bad} file is in the repository"
