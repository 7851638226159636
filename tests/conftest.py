"""Shared fixtures: one local Ray instance for the whole session, and the real-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DTD_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR10_DIR = SHARED_DATA / "cifar10"
CIFAR_RESNETS_DIR = SHARED_DATA / "cifar_resnets"
CIFAR_ZOO_DIR = SHARED_DATA / "cifar_zoo"
UPSTREAM_DTD_DIR = SHARED_DATA / "upstream_dtd"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def needs_shared_data():
    """Skip marker for tests that read ../shared/data (absent in a user's fresh clone)."""
    return pytest.mark.skipif(
        not (CIFAR10_DIR.is_dir() and CIFAR_RESNETS_DIR.is_dir()),
        reason=f"real-data test: {SHARED_DATA} (CIFAR-10 + pretrained CIFAR ResNets) is not present",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (minutes: the fault soak) run only when asked for, and say so when skipped:
    ``DTD_SLOW=1`` or ``-m slow``. CI's default run lists them as skipped with this reason, never silently."""
    if os.environ.get("DTD_SLOW") == "1" or "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow (minutes): run with DTD_SLOW=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def start_local_ray() -> None:
    """The test session's local Ray: 2 CPUs, a 1 GB object store, the jobs' worker-pool setting, quiet.

    ``ray_local`` starts it; the multi-node tests start it again after their cluster."""
    import ray

    from dtd_ray.ray.session import local_system_config

    ray.init(
        address="local",  # never attach to a cluster someone started with `ray start`
        num_cpus=2,
        _system_config=local_system_config(2),  # the jobs' worker-pool setting
        object_store_memory=1_000_000_000,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs (:func:`start_local_ray`), shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar10_resnet20_records(ray_local, tmp_path_factory):
    """Records of cifar_resnet20 (the shared checkpoint) on the shared CIFAR-10, train and test.

    Extracted once per test session under the paper's `cifar10` normalisation, tag
    ``cifar_resnet20``; returns the records root. Tests using it must carry
    ``needs_shared_data()``.
    """
    from dtd_ray.ray.extract import ExtractConfig, run_extract

    out = tmp_path_factory.mktemp("cifar10_records")
    cfg = ExtractConfig(
        model="cifar_resnet20",
        weights=str(CIFAR_RESNETS_DIR / "resnet20-12fca82f.th"),
        normalization="cifar10",
        dataset=f"imagefolder:{CIFAR10_DIR}",
        splits=("train", "test"),
        output=str(out),
        kmax=64,
        batch_size=500,
    )
    run_extract(cfg)
    return str(out / "records")
