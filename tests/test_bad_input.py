"""Bad input: every user mistake gets one clear line (or a counted skip), and nothing finished is lost.

One test per case of the bad-input table in README.md. Command-line cases run the real entry points
(``jobs/extract.py``, ``jobs/decompose.py``) as subprocesses and assert what a user sees:
exit status 2 and one ``error: …`` line as the last line of stderr, with no traceback.
All command-line cases fail before Ray starts; they run concurrently (``cli`` fixture)
to keep the suite fast.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dtd_ray import cli as cli_lib
from dtd_ray import config as config_lib
from dtd_ray.io import records
from dtd_ray.io import schema
from dtd_ray.io import storage

ROOT = Path(__file__).resolve().parents[1]
TAG = "bad"

# Per-test bound (pytest-timeout; a plain marker where the plugin is absent). The whole file takes
# about a minute on 2 busy cores; a Ray Data execution that stalls must fail, not hang CI.
pytestmark = pytest.mark.timeout(240)


# ----------------------------------------------------------------------------- inputs


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


class CarriesCode:
    """Pickles as a call of ``os.system`` (the classic malicious checkpoint / dataset file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 3-class imagefolder, checkpoints (good, other architecture, carrying code), CIFAR pickles,
    and synthetic records for the decompose job."""
    from dtd_ray.models.backbones import get_backbone

    root = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            for i in range(4):
                png(root / "data" / split / c / f"{i}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    sd = get_backbone("cifar_resnet20", weights=None, num_classes=3).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / "ckpt.th")
    sd32 = get_backbone("cifar_resnet32", weights=None, num_classes=3).state_dict()
    torch.save({"state_dict": sd32}, root / "resnet32.th")
    torch.save({"state_dict": sd, "hook": CarriesCode(root / "PWNED_ckpt")}, root / "code.th")
    # CIFAR-10 batches whose pickle carries code
    cifar = root / "cifar_code" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    (cifar / "batches.meta").write_bytes(pickle.dumps(CarriesCode(root / "PWNED_cifar"), protocol=2))
    empty = root / "cifar_empty" / "cifar-10-batches-py"  # a zero-byte (e.g. interrupted download) batch file
    empty.mkdir(parents=True)
    (empty / "batches.meta").write_bytes(b"")
    write_toy_records(root / "records", root / "head.npz")
    return root


def write_toy_records(root: Path, head: Path, *, C: int = 4, m: int = 16, kmax: int = 8) -> None:
    """Finished records (train, test) of a toy 4-class, 16-feature problem, kmax 8, and its head."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((C, m)), rng.standard_normal(C) * 0.1
    for split, n in (("train", 200), ("test", 100)):
        y = rng.integers(0, C, n).astype(np.int32)
        f = rng.random((n, m)).astype(np.float32)
        for c in range(C):
            f[y == c, 4 * c : 4 * c + 4] += 2.0
        order = np.argsort(-np.abs(f), axis=1, kind="stable")[:, :kmax]
        arrays = {schema.SAMPLE_ID: np.arange(n), schema.LABEL: y, schema.PRED: (f @ w.T + b).argmax(1),
                  schema.TOPK_IDX: order, schema.TOPK_VAL: np.take_along_axis(f, order, 1), schema.FEATURES: f}
        fs, path = storage.resolve(records.partition_uri(str(root), model="toy", split=split))
        fs.create_dir(path, recursive=True)
        pq.write_table(records.records_to_table(arrays), f"{path}/part-00000.parquet")
        storage.write_json(fs, f"{path}/{schema.MANIFEST_NAME}",
                           {"rows": n, "kmax": kmax, "feature_dim": m, "num_classes": C, "config": {"model": "toy"}})
    np.savez(head, weight=w, bias=b)


def extract_cfg(inputs: Path, out: Path, **kw):
    from dtd_ray.ray.extract import ExtractConfig

    base = dict(model="cifar_resnet20", weights=str(inputs / "ckpt.th"), dataset=f"imagefolder:{inputs / 'data'}",
                splits=("test",), output=str(out), tag=TAG, kmax=8, batch_size=8, rows_per_file=8)
    base.update(kw)
    return ExtractConfig(**base)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg.strip() and "\n" not in msg.strip(), f"not one line: {type(e).__name__}: {msg!r}"
    return msg


# ----------------------------------------------------------------------------- the command line


def _cli_cases(inputs: Path, out: Path) -> dict[str, list[str]]:
    ex = ["jobs/extract.py", "--weights", str(inputs / "ckpt.th"), "--dataset", f"imagefolder:{inputs / 'data'}",
          "--output", str(out / "extract")]
    de = ["jobs/decompose.py", "--records", str(inputs / "records"), "--model", "toy",
          "--head", str(inputs / "head.npz"), "--output", str(out / "decompose")]
    (out / "a_file").write_text("not a folder")
    return {
        "extract_misspelt": ex + ["--batchsize", "8"],
        "decompose_misspelt": de + ["--k1s", "1..4"],
        "extract_wrong_type": ex + ["--kmax", "abc"],
        "decompose_wrong_type": de + ["--psi_q", "abc"],
        "extract_kmax_0": ex + ["--kmax", "0"],
        "decompose_k1_range": de + ["--k1", "1..20"],
        "other_architecture": ex[:2] + [str(inputs / "resnet32.th")] + ex[3:],
        "ckpt_code": ex[:2] + [str(inputs / "code.th")] + ex[3:],
        "cifar_code": ex[:4] + [f"cifar10:{inputs / 'cifar_code'}"] + ex[5:],
        "cifar_empty": ex[:4] + [f"cifar10:{inputs / 'cifar_empty'}"] + ex[5:],
        "extract_unwritable": ex[:-1] + ["/proc/dtd_ray_out"],
        "decompose_unwritable": de[:-1] + [str(out / "a_file" / "decompose")],
    }


@pytest.fixture(scope="module")
def cli(inputs, tmp_path_factory):
    """Every command-line case, run once (4 at a time); name -> CompletedProcess."""
    out = tmp_path_factory.mktemp("cli")
    # RAY_ADDRESS=local: should a case reach ray.init, it must not attach to another Ray on this machine.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}

    def run(args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
                              check=False)

    cases = _cli_cases(inputs, out)
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(cases, pool.map(run, cases.values())))
    return done


def cli_error(cli, name: str) -> str:
    """The one ``error: …`` line a user sees (asserting exit status 2 and no traceback)."""
    p = cli[name]
    lines = p.stderr.strip().splitlines()
    assert lines, f"{name}: nothing on stderr (rc={p.returncode})"
    assert p.returncode == 2 and "Traceback" not in p.stderr, f"{name}: rc={p.returncode}, stderr ends:\n{p.stderr[-1500:]}"
    assert lines[-1].startswith("error: "), lines[-1]
    return lines[-1]


# ----------------------------------------------------------------------------- images (one extraction)


@pytest.fixture(scope="module")
def bad_images(ray_local, inputs, tmp_path_factory):
    """One extraction of a test split that holds a corrupt, a truncated, a zero-byte, a grey and an
    RGBA image and an empty class folder; returns its manifest, records and the ids of those files."""
    from dtd_ray.data.sources import parse_source
    from dtd_ray.ray.extract import run_extract

    root = tmp_path_factory.mktemp("bad_images")
    data = root / "data"
    shutil.copytree(inputs / "data", data)
    for split in ("train", "test"):
        (data / split / "b_empty").mkdir()  # a class folder with no images (sorted between a and b)
    cat = data / "test" / "a"
    (cat / "corrupt.png").write_bytes(b"this is not an image, whatever its name says\n" * 8)
    good = (cat / "0.png").read_bytes()
    (cat / "truncated.png").write_bytes(good[: len(good) // 2])
    (cat / "zero.png").write_bytes(b"")
    rng = np.random.default_rng(1)
    png(cat / "grey.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    png(cat / "rgba.png", rng.integers(0, 256, (32, 32, 4), dtype=np.uint8))
    source = parse_source(f"imagefolder:{data}")
    cols = source.read_numpy("test")
    ids = {Path(p).name: int(s) for p, s in zip(cols["path"], cols["sample_id"]) if Path(p).parent.name == "a"}
    labels = dict(zip(source.classes, range(len(source.classes))))
    out = root / "out"
    handler = _Capture()
    logging.getLogger("dtd_ray").addHandler(handler)
    try:
        summary = run_extract(extract_cfg(inputs, out, dataset=f"imagefolder:{data}"))
    finally:
        logging.getLogger("dtd_ray").removeHandler(handler)
    return dict(summary=summary, n=len(cols["sample_id"]), ids=ids, classes=labels, data=data, warnings=handler.lines,
                manifest=records.read_manifest(str(out / "records"), model=TAG, split="test"),
                rec=records.load_records(str(out / "records"), model=TAG, split="test"))


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def skip_reason(bad_images, name: str) -> str | None:
    sid = bad_images["ids"][name]
    reasons = [x["reason"] for x in bad_images["manifest"]["skipped_items"] if x["sample_id"] == sid]
    assert len(reasons) <= 1
    return reasons[0] if reasons else None


def test_corrupt_image_is_a_counted_skip(bad_images):
    man, rec = bad_images["manifest"], bad_images["rec"]
    assert skip_reason(bad_images, "corrupt.png") == "undecodable: not a recognised image format"
    assert skip_reason(bad_images, "truncated.png").startswith("undecodable: image file is truncated")
    assert man["skipped"] == 3 and man["rows"] + man["skipped"] == bad_images["n"]  # every input accounted for
    kept = set(rec["sample_id"].tolist())
    assert bad_images["ids"]["corrupt.png"] not in kept and bad_images["ids"]["truncated.png"] not in kept
    assert bad_images["summary"]["skipped"] == 3


def test_zero_byte_image_is_a_counted_skip(bad_images):
    assert skip_reason(bad_images, "zero.png") == "undecodable: empty file"
    assert bad_images["ids"]["zero.png"] not in set(bad_images["rec"]["sample_id"].tolist())


@pytest.mark.parametrize("name", ["grey.png", "rgba.png"])
def test_grey_and_rgba_images_are_converted_to_rgb(bad_images, inputs, name):
    from dtd_ray.models.extractor import FeatureExtractor

    assert skip_reason(bad_images, name) is None
    rec = bad_images["rec"]
    row = int(np.flatnonzero(rec["sample_id"] == bad_images["ids"][name])[0])
    # The record is what the model gives for PIL's RGB conversion of the file (grey replicated, alpha dropped).
    rgb = np.asarray(Image.open(bad_images["data"] / "test" / "a" / name).convert("RGB"))
    ref = FeatureExtractor(model="cifar_resnet20", weights=str(inputs / "ckpt.th"), kmax=8, use_gpu=False)(
        {"image": rgb[None], "sample_id": np.array([0]), "label": np.array([0])})
    np.testing.assert_allclose(rec["features"][row], ref["features"][0], rtol=1e-5, atol=1e-5)
    assert rec["pred"][row] == ref["pred"][0]


def test_class_folder_with_no_images_warns_and_keeps_labels(bad_images):
    classes = bad_images["classes"]
    assert list(classes) == ["a", "b", "b_empty", "c"]  # the empty class keeps its label index (2)
    rec = bad_images["rec"]
    assert set(rec["label"].tolist()) == {0, 1, 3} and (rec["label"] != classes["b_empty"]).all()
    warned = [w for w in bad_images["warnings"] if "b_empty" in w]
    assert warned and warned[0].endswith("class folder 'b_empty' has no images; it contributes no rows")
    assert "\n" not in warned[0]


def test_bad_image_with_on_bad_input_fail_stops_with_one_line(ray_local, inputs, bad_images, tmp_path):
    """on_bad_input='fail': the run stops at the first bad file with one line naming it; nothing is committed."""
    from dtd_ray.ray.extract import run_extract

    out = tmp_path / "out"
    kind, msg, _ = _failure(lambda: run_extract(
        extract_cfg(inputs, out, dataset=f"imagefolder:{bad_images['data']}", on_bad_input="fail")))
    assert records.read_manifest(str(out / "records"), model=TAG, split="test") is None
    # What a user should see (jobs/extract.py prints `error: <message>` for ValueError): one line.
    assert kind == "ValueError", f"{kind} is not caught by jobs/extract.py (the user gets a traceback)"
    assert "\n" not in msg.strip(), f"not one line: {msg[:300]!r}"
    assert "bad input sample" in msg and ".png" in msg and "undecodable" in msg


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_for_another_architecture_is_refused(inputs, cli):
    from dtd_ray.models.backbones import get_backbone

    with pytest.raises(ValueError) as ei:
        get_backbone("cifar_resnet20", weights=str(inputs / "resnet32.th"))
    msg = one_line(ei.value)
    assert "does not fit cifar_resnet20" in msg and "cifar_resnet32" in msg
    line = cli_error(cli, "other_architecture")
    assert "does not fit cifar_resnet20" in line and "looks like a depth-32 CIFAR ResNet (cifar_resnet32)" in line


def test_checkpoint_whose_pickle_carries_code_is_refused(inputs, cli):
    from dtd_ray.models.backbones import get_backbone

    with pytest.raises(ValueError) as ei:
        get_backbone("cifar_resnet20", weights=str(inputs / "code.th"))
    msg = one_line(ei.value)
    assert "refused: the checkpoint carries code (weights_only=True)" in msg and "system" in msg
    line = cli_error(cli, "ckpt_code")
    assert "refused: the checkpoint carries code (weights_only=True)" in line
    assert not (inputs / "PWNED_ckpt").exists()  # the code never ran


def test_dataset_pickle_that_carries_code_is_refused(inputs, cli):
    from dtd_ray.data.sources import parse_source

    with pytest.raises(pickle.UnpicklingError) as ei:
        parse_source(f"cifar10:{inputs / 'cifar_code'}")
    assert "refusing to load" in one_line(ei.value)
    assert not (inputs / "PWNED_cifar").exists()
    line = cli_error(cli, "cifar_code")  # jobs/extract.py must turn it into one line, too
    assert "batches.meta" in line and "refusing to load" in line


def test_empty_dataset_file_is_one_line(inputs, cli):
    from dtd_ray.data.sources import parse_source

    with pytest.raises(Exception) as ei:
        parse_source(f"cifar10:{inputs / 'cifar_empty'}")
    assert isinstance(ei.value, (pickle.UnpicklingError, ValueError)), type(ei.value).__mro__
    assert "batches.meta" in one_line(ei.value)
    line = cli_error(cli, "cifar_empty")
    assert "batches.meta" in line


# ----------------------------------------------------------------------------- k out of range


def test_extract_kmax_out_of_range(cli):
    from dtd_ray.ray.extract import ExtractConfig

    with pytest.raises(ValueError, match=r"^kmax must be >= 1, got 0$"):
        ExtractConfig(kmax=0)
    assert cli_error(cli, "extract_kmax_0") == "error: kmax must be >= 1, got 0"


@pytest.fixture
def finished_decompose(inputs, tmp_path):
    """A finished decompose run (k1 1..8); returns (base kwargs, a snapshot function)."""
    from dtd_ray.stages.decompose import DecomposeConfig, run_decompose

    base = dict(records=str(inputs / "records"), model="toy", head=str(inputs / "head.npz"),
                output=str(tmp_path / "dec"), analysis_k=2)
    run_decompose(DecomposeConfig(**base, k1="1..8"))

    def snapshot():
        return {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "dec").rglob("*")) if p.is_file()}

    return base, snapshot


@pytest.mark.parametrize("kw, pattern", [
    (dict(k1="1..20"), r"^k1=20 exceeds the records' kmax=8 \(the top-k lists are that long\)$"),
    (dict(k1="0..4"), r"^k1=0 is not ≥ 1$"),
    (dict(k1="5..2"), r"^k1 grid '5\.\.2': need lo ≤ hi and step ≥ 1$"),
    (dict(k2_max=100), r"^k2_max=100 is outside \[1, 16\] \(the feature dimension\)$"),
    (dict(k1="1..4", analysis_k=7), r"^analysis_k=7 is not in the k1 grid '1\.\.4'$"),
], ids=["k1>kmax", "k1=0", "lo>hi", "k2_max>m", "analysis_k"])
def test_decompose_k_out_of_range_is_refused_before_anything_is_written(finished_decompose, kw, pattern):
    from dtd_ray.stages.decompose import DecomposeConfig, run_decompose

    base, snapshot = finished_decompose
    before = snapshot()
    with pytest.raises(ValueError, match=pattern):
        run_decompose(DecomposeConfig(**{**base, **kw}))
    assert snapshot() == before  # the earlier finished result is neither lost nor altered


def test_decompose_k_out_of_range_on_the_command_line(cli):
    assert cli_error(cli, "decompose_k1_range") == (
        "error: k1=20 exceeds the records' kmax=8 (the top-k lists are that long)")


@pytest.mark.parametrize("option", ["export_json", "print_k"])
def test_decompose_output_k_out_of_range_alters_nothing(finished_decompose, option):
    """--export_json / --print_k with a k beyond the grid: refused up front, naming the option,
    before any file of the earlier finished run is overwritten."""
    from dtd_ray.stages.decompose import DecomposeConfig, run_decompose

    base, snapshot = finished_decompose
    before = snapshot()
    with pytest.raises(ValueError) as ei:
        run_decompose(DecomposeConfig(**{**base, "k1": "1..4", option: "100"}))
    changed = sorted(str(p) for p in set(before) | set(snapshot()) if before.get(p) != snapshot().get(p))
    assert changed == [], f"a failed run altered the finished result: {changed}"
    assert option in one_line(ei.value), f"the message does not name --{option}: {ei.value}"


def test_k2_larger_than_k1_is_refused():
    from dtd_ray.core import counting
    from dtd_ray.core import selection

    freq = counting.reduce_arrays(labels=np.array([0, 1]), topk_idx=np.array([[0, 1, 2], [1, 2, 0]]),
                                num_classes=2, feature_dim=4, k1_grid=[1, 3])
    with pytest.raises(ValueError, match=r"^k2=5 > k1=3: a class's top-k2 frequent features must come from "
                                         r"its top-k1 lists$"):
        selection.select_frequency(freq=freq, k1=3, k2=5)
    with pytest.raises(ValueError, match=r"^k2=0 is not ≥ 1$"):
        selection.select_frequency(freq=freq, k1=3, k2=0)


# ----------------------------------------------------------------------------- config keys and values


def test_misspelt_config_key_is_refused():
    from dtd_ray.stages.decompose import DecomposeConfig
    from dtd_ray.ray.extract import ExtractConfig

    with pytest.raises(ValueError) as ei:
        cli_lib.run_cli(cli_lib.Command("", ExtractConfig, lambda cfg: cfg), ["--batchsize", "8"])
    assert one_line(ei.value).startswith("unknown ExtractConfig option(s) batchsize; valid: ")
    with pytest.raises(ValueError, match=r"^unknown DecomposeConfig option\(s\) k1s; valid: .*\bk1\b"):
        config_lib.check_keys(DecomposeConfig, {"k1s": "1..4"})
    assert config_lib.check_keys(ExtractConfig, {"kmax": 5}) is None


def test_misspelt_option_on_the_command_line(cli):
    assert cli_error(cli, "extract_misspelt").startswith("error: unknown ExtractConfig option(s) batchsize; valid: ")
    assert cli_error(cli, "decompose_misspelt").startswith("error: unknown DecomposeConfig option(s) k1s; valid: ")


@pytest.mark.parametrize("name, option", [("extract_wrong_type", "kmax"), ("decompose_wrong_type", "psi_q")])
def test_option_value_of_the_wrong_type_is_one_line(cli, name, option):
    """`--kmax abc`: a typo in a value must get the same one-line answer as a typo in a name."""
    kind = {"kmax": "int", "psi_q": "float"}[option]
    assert cli_error(cli, name) == f"error: option {option}='abc': expected {kind}"


def test_boolean_option_written_false_is_false_or_refused():
    """`--overwrite false` (fire hands over the string "false") must not mean overwrite: a truthy
    "false" would delete a finished partition and recompute it. It is False; a non-boolean is refused."""
    from dtd_ray.ray.extract import ExtractConfig

    seen = []
    cli_lib.run_cli(cli_lib.Command("x", ExtractConfig, seen.append), ["--overwrite", "false", "--use_gpu", "false"])
    (cfg,) = seen
    assert cfg.overwrite is False and cfg.use_gpu is False
    cli_lib.run_cli(cli_lib.Command("x", ExtractConfig, seen.append), ["--overwrite", "yes", "--use_gpu", "auto"])
    assert seen[1].overwrite is True and seen[1].use_gpu is None
    with pytest.raises(ValueError) as ei:
        ExtractConfig(overwrite="maybe")
    assert one_line(ei.value) == "option overwrite='maybe': expected bool (true/false)"


# ----------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("path", ["/proc/dtd_ray_out", "{file}/sub"], ids=["under-/proc", "file-as-folder"])
def test_unwritable_output_is_refused_before_any_work(tmp_path, path):
    (tmp_path / "f").write_text("x")
    uri = path.format(file=tmp_path / "f")
    with pytest.raises(PermissionError) as ei:
        storage.check_writable(uri)
    assert one_line(ei.value).startswith(f"output {uri!r} is not writable: ")


def test_unwritable_output_on_the_command_line(cli):
    assert cli_error(cli, "extract_unwritable").startswith("error: output '/proc/dtd_ray_out' is not writable: ")
    line = cli_error(cli, "decompose_unwritable")
    assert "is not writable" in line and "Not a directory" in line


# ----------------------------------------------------------------------------- a write that fails midway


def _failure(call) -> tuple[str, str]:
    """``(type name, message)`` of the exception ``call()`` raises, with the exception itself dropped.

    A failed Ray Data execution's actors stay alive for as long as its exception's traceback
    does (a reference cycle), so tests must not keep it (nor let pytest keep it in a report).
    """
    try:
        call()
    except Exception as e:
        out = (type(e).__name__, str(e), isinstance(e, (ValueError, RuntimeError, OSError)))
    else:
        raise AssertionError("no error raised")
    gc.collect()
    return out


def _cpus_free_within(seconds: float) -> bool:
    import ray

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return True
        time.sleep(0.25)
    return False


@pytest.fixture(scope="module")
def disk_full(ray_local, inputs, tmp_path_factory):
    """Extraction of test (12 images) then train (600) onto a 320 KiB tmpfs: test fits, train fills the
    disk midway. Records what the failed run left and showed; the disk then grows to 64 MiB.

    Needs root and CAP_SYS_ADMIN (as in this project's containers) to mount the tmpfs."""
    from dtd_ray.ray.extract import run_extract

    tmp = tmp_path_factory.mktemp("disk_full")
    mnt = tmp / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)], capture_output=True, text=True,
                       check=False)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {r.stderr.strip()}")
    try:
        data = tmp / "data"
        rng = np.random.default_rng(3)
        for split, n in (("test", 12), ("train", 600)):
            for i in range(n):
                png(data / split / "abc"[i % 3] / f"{i:04d}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        out = mnt / "out"
        cfg = extract_cfg(inputs, out, dataset=f"imagefolder:{data}", splits=("test", "train"), rows_per_file=8)
        held: dict = {}
        try:
            run_extract(cfg)
        except Exception as e:
            held.update(type=type(e).__name__, message=str(e), reported=isinstance(e, (ValueError, RuntimeError, OSError)))
            # while the caller still holds the error (a sweep that logs it and goes on, a notebook):
            held["cpus_freed_while_held"] = _cpus_free_within(10)
        else:
            raise AssertionError("the 320 KiB disk did not fill up")
        gc.collect()
        held["cpus_freed_after_gc"] = _cpus_free_within(20)
        root = str(out / "records")
        test_part = Path(records.partition_uri(root, model=TAG, split="test"))
        train_part = Path(records.partition_uri(root, model=TAG, split="train"))
        state = dict(cfg=cfg, root=root, test_part=test_part, **held,
                     train_left=sorted(str(p.relative_to(train_part)) for p in train_part.rglob("*")),
                     test_manifest=records.read_manifest(root, model=TAG, split="test"),
                     train_manifest=records.read_manifest(root, model=TAG, split="train"),
                     test_files={p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in test_part.iterdir()})
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        yield state
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_write_failing_midway_commits_nothing_and_a_rerun_completes(disk_full):
    """No manifest for the partition being written; the earlier partition untouched; a rerun with
    space skips test (files untouched) and writes train with every sample exactly once."""
    from dtd_ray.ray.extract import run_extract

    assert disk_full["test_manifest"]["rows"] == 12
    assert disk_full["train_manifest"] is None  # nothing partial marked finished
    assert disk_full["train_left"] == []  # the rows staged before the failure were removed (space freed)
    assert disk_full["cpus_freed_after_gc"]
    summary = run_extract(disk_full["cfg"])
    assert summary["partitions"] == {"test": "skipped", "train": "written"}
    test_part, root = disk_full["test_part"], disk_full["root"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in test_part.iterdir()} == disk_full["test_files"]
    rec = records.load_records(root, model=TAG, split="train")
    assert (np.sort(rec["sample_id"]) == np.arange(600)).all()  # every sample exactly once
    train_part = Path(records.partition_uri(root, model=TAG, split="train"))
    man = records.read_manifest(root, model=TAG, split="train")
    assert sorted(p.name for p in train_part.iterdir()) == sorted([records.HEAD_NAME, schema.MANIFEST_NAME] + [
        f"part-{i:05d}.parquet" for i in range(man["files"])])


def test_write_failing_midway_says_so_in_one_line(disk_full):
    """What the user sees when the disk fills: one line naming the partition and the cause, of a type
    jobs/extract.py reports as `error: …` (Ray's own error is a multi-line worker traceback)."""
    assert disk_full["reported"], f"{disk_full['type']} is not caught by jobs/extract.py"
    assert disk_full["type"] == "ExtractionError"
    msg = disk_full["message"].strip()
    assert "\n" not in msg, f"not one line: {msg[:300]!r}…"
    assert msg.startswith(f"{TAG}/train: extraction failed after ") and "nothing committed" in msg
    assert msg.endswith("OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")


def test_failed_run_releases_its_actors(disk_full):
    """A failed extraction must not keep its model actors (and their CPUs/GPUs) while its error is
    held: a driver that logs the error and goes on (the sweep), or a log handler that keeps the record
    Ray Data logs the error with (pytest's), would otherwise keep them, and the next extraction in
    that driver waits forever (on 2 CPUs: the old actor's CPU + the new actor's leave none for the
    prepare tasks; with one GPU: the new actor never starts)."""
    assert disk_full["cpus_freed_while_held"], "the failed run's actors still hold their CPUs"
