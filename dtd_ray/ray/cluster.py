"""The one cluster probe: what the running Ray cluster has, read on the driver.

Resources are decided here, never in a worker: a ``num_gpus=1`` request on a cluster
without GPUs waits forever, so every stage asks :func:`probe` (or :func:`decide_gpu`)
first and requests a GPU only when one exists or the autoscaler is asked for one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ray
from ray.autoscaler.sdk import request_resources

from dtd_ray.io import storage


@dataclass(frozen=True)
class Cluster:
    """The running cluster's totals: CPUs, GPUs, alive nodes with CPUs, and the smallest node's CPUs."""

    cpus: float
    gpus: float
    nodes: int
    cpus_per_node: int


def probe() -> Cluster:
    """The resources of the cluster this driver is connected to (``ray.init`` first)."""
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    per = max(1, int(min(n["Resources"]["CPU"] for n in nodes))) if nodes else 1
    return Cluster(cpus=float(total.get("CPU", 0)), gpus=float(total.get("GPU", 0)), nodes=max(1, len(nodes)),
                   cpus_per_node=per)


def autoscaler_max_nodes() -> int:
    """Nodes the autoscaler's config allows (best effort; 0 where there is no autoscaler, as on a local Ray)."""
    try:
        from ray._private.state import state  # private API: absent or different in other Ray versions

        config = state.get_cluster_config()
        if config is None:
            return 0
        counts = [int(g.max_count) for g in config.node_group_configs]
        return sys.maxsize if any(c < 0 for c in counts) else sum(counts)
    except Exception:  # noqa: BLE001
        return 0


def check_output(uri: str, *, shared_fs: bool) -> None:
    """Refuse a local ``uri`` as the output of a cluster that has (or may autoscale to) more than one node,
    unless ``shared_fs`` declares it mounted on every node (:func:`dtd_ray.io.storage.check_shared`)."""
    if shared_fs or not storage.is_local(uri):
        return  # no cluster query needed
    storage.check_shared(uri, nodes=probe().nodes, max_nodes=autoscaler_max_nodes(), shared_fs=shared_fs)


def autoscaler_max_gpus() -> float:
    """GPUs the autoscaler could add (best effort; 0 where Ray does not say)."""
    try:
        from ray._private.state import state  # private API: absent or different in other Ray versions

        mx = state.get_max_resources_from_cluster_config() or {}
        return float(mx.get("GPU", 0))
    except Exception:  # noqa: BLE001
        return 0.0


def decide_gpu(*, use_gpu: bool | None, wait_s: float) -> bool:
    """Whether a run uses GPUs: ``None`` → when the cluster has or can add some; ``True`` waits up to
    ``wait_s`` seconds for the autoscaler to add a GPU node (then one line, not a hang)."""
    info = probe()
    want = use_gpu
    if want is None:
        want = info.gpus > 0 or autoscaler_max_gpus() > 0
    if not want:
        return False
    if info.gpus > 0:
        return True
    print(f"[sweep] waiting up to {wait_s:.0f} s for the autoscaler to add a GPU node", flush=True)
    request_resources(bundles=[{"GPU": 1}])
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        if ray.cluster_resources().get("GPU", 0) > 0:
            print(f"[sweep] a GPU node joined after {time.monotonic() - t0:.0f} s", flush=True)
            return True
        time.sleep(5)
    raise RuntimeError(f"use_gpu=true but no GPU joined the cluster within {wait_s:.0f} s "
                       "(check the autoscaler: `ray monitor cluster.yaml`)")


def release_gpu_request() -> None:
    """Withdraw the GPU request :func:`decide_gpu` made (best effort: the autoscaler may be absent)."""
    try:
        request_resources(bundles=[])
    except Exception:  # noqa: BLE001
        pass
