"""Benchmark decompose: the whole (strategy, k1, k2) grid against a naive per-configuration loop,
and the reduce of a synthetic ImageNet-size record set (time and peak RSS).

    python jobs/bench_decompose.py --records runs/cifar10/records --model cifar_resnet20

Part 1 (CIFAR-10 test features): the grid k1 in 1..64, k2 in 1..k1 for ``frequency``
and k2 in 1..64 for ``weight_l1``, ``contribution`` and ``random`` (k1 does not apply to
them), evaluated by :func:`dtd_ray.core.heads.evaluate_grid`, against a naive loop that, per
configuration, builds one masked head (an ``nn.Linear`` with ``W ⊙ M``) and evaluates
it on the same cached features — once in one full batch (the strongest naive loop) and
once in mini-batches of 128 like an inference loop. Both get the same maps; selection
(reduce + select) is timed separately. Without records (``--records ''``) it uses
synthetic features of the same shape and says so.

Part 2: writes (once, cached in ``--imagenet_dir``) a synthetic records partition of
1.28 M instances, kmax 100, 1000 classes, 2048 features (``features`` left empty: the
reduce reads only ``label``, ``topk_idx`` and ``topk_val``), then reduces it for every
k1 in 1..100 and selects the frequency maps of every k1, in a fresh process whose peak
RSS is reported.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from dtd_ray import cli
from dtd_ray import config as config_lib
from dtd_ray.config import config_class
from dtd_ray.core import counting, heads, selection
from dtd_ray.io import records, schema, storage


@config_class
class BenchConfig:
    records: Annotated[str, Field(description="records root with model=<m>/split=train and split=test ('' = synthetic features)")] = "runs/cifar10/records"
    model: Annotated[str, Field(description="model partition in the records")] = "cifar_resnet20"
    head: Annotated[str | None, Field(description=".npz with weight/bias (default: the head stored beside the records)")] = None
    kmax: Annotated[int, Field(description="grid: k1 in 1..kmax, k2 in 1..k1 (frequency), k2 in 1..kmax (the other strategies)")] = 64
    repeats: Annotated[int, Field(description="timed repetitions of the grid (best is reported)")] = 3
    naive_minibatch: Annotated[int, Field(description="batch size of the inference-style naive loop (0 skips it)")] = 128
    threads: Annotated[int, Field(description="torch / evaluator threads")] = 2
    imagenet: Annotated[bool, Field(description="run part 2 (synthetic ImageNet-size reduce)")] = True
    imagenet_dir: Annotated[str, Field(description="where the synthetic records are written (cached between runs)")] = "/tmp/dtd_bench_imagenet"
    imagenet_rows: Annotated[int, Field(description="instances (ImageNet-1k train)")] = 1_281_167
    imagenet_kmax: Annotated[int, Field(description="top-k stored per instance")] = 100
    imagenet_classes: Annotated[int, Field(description="classes of the synthetic records")] = 1000
    imagenet_features: Annotated[int, Field(description="feature width of the synthetic records")] = 2048
    output: Annotated[str | None, Field(description="write the results as JSON here")] = None


# --------------------------------------------------------------------------- part 1


def cifar_inputs(cfg: BenchConfig) -> dict:
    """Train records (selection) and test features (evaluation) with the head, or synthetic stand-ins."""
    if cfg.records and records.read_manifest(cfg.records, model=cfg.model, split="test") is not None:
        from dtd_ray.models.linear_head import load_head

        man = records.read_manifest(cfg.records, model=cfg.model, split="train")
        w, b, source = load_head(root=cfg.records, manifest=man, head=cfg.head)
        tr = records.load_records(cfg.records, model=cfg.model, split="train")
        te = records.load_records(cfg.records, model=cfg.model, split="test", columns=[schema.LABEL, schema.FEATURES])
        return {"source": f"records {cfg.records} ({source})", "train": tr, "test_f": te[schema.FEATURES],
                "test_y": te[schema.LABEL].astype(np.int64), "w": w, "b": b}
    print(f"[bench] no records at {cfg.records!r}: synthetic CIFAR-size features (10 classes, 64 features)")
    rng = np.random.default_rng(0)
    C, m = 10, 64
    w, b = rng.standard_normal((C, m)), rng.standard_normal(C) * 0.1
    out = {"source": "synthetic", "w": w, "b": b}
    for split, n in (("train", 50_000), ("test", 10_000)):
        y = rng.integers(0, C, n)
        f = rng.gamma(1.0, 1.0, (n, m)) + 2.0 * (w[y] > 1.0)
        if split == "train":
            idx = np.argsort(-f, axis=1, kind="stable")
            out["train"] = {schema.LABEL: y, schema.TOPK_IDX: idx, schema.TOPK_VAL: np.take_along_axis(f, idx, 1),
                            schema.FEATURES: f, schema.PRED: (f @ w.T + b).argmax(1)}
        else:
            out["test_f"], out["test_y"] = f.astype(np.float32), y
    return out


def naive_grid(*, f: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, maps, batch: int | None) -> list[int]:
    """Per configuration: build a masked ``nn.Linear`` and evaluate it (float32, torch)."""
    ft, yt = torch.from_numpy(np.array(f, dtype=np.float32)), torch.from_numpy(np.array(y))
    wt, bt = torch.from_numpy(w).float(), torch.from_numpy(b).float()
    C, m = w.shape
    out = []
    with torch.no_grad():
        for cm in maps:
            idx = torch.from_numpy(cm.idx)
            for k2 in range(1, cm.k2 + 1):
                mask = torch.zeros(C, m)
                mask.scatter_(1, idx[:, :k2], 1.0)
                head = torch.nn.Linear(m, C)
                head.weight.copy_(wt * mask)
                head.bias.copy_(bt)
                step = batch or len(yt)
                correct = 0
                for s in range(0, len(yt), step):
                    correct += int((head(ft[s : s + step]).argmax(1) == yt[s : s + step]).sum())
                out.append(correct)
    return out


def naive_select_and_eval(*, train: dict, f: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, maps) -> list[int]:
    """Per configuration, also select: count the top-k1 lists of the cached training records for
    this k1 (one ``np.bincount``), rank with the same tie-break, then build and evaluate the masked head."""
    C, m = w.shape
    lab = train[schema.LABEL].astype(np.int64)
    idx_all = train[schema.TOPK_IDX]
    mass = np.bincount((lab[:, None] * m + idx_all).ravel(), weights=np.abs(train[schema.TOPK_VAL]).ravel(),
                       minlength=C * m).reshape(C, m)
    mean_f = np.stack([train[schema.FEATURES][lab == c].mean(0) for c in range(C)])
    ft, yt = torch.from_numpy(np.array(f, dtype=np.float32)), torch.from_numpy(np.array(y))
    wt, bt = torch.from_numpy(w).float(), torch.from_numpy(b).float()
    out = []
    with torch.no_grad():
        for cm in maps:
            for k2 in range(1, cm.k2 + 1):
                if cm.strategy == "frequency":
                    counts = np.bincount((lab[:, None] * m + idx_all[:, : cm.k1]).ravel(), minlength=C * m).reshape(C, m)
                    sel = selection.rank_rows([counts, mass], k=k2)
                elif cm.strategy == "weight_l1":
                    sel = selection.select_weight_l1(weight=w, k2=k2).idx
                elif cm.strategy == "contribution":
                    sel = selection.select_contribution(weight=w, class_mean_features=mean_f, k2=k2).idx
                else:
                    sel = selection.select_random(num_classes=C, feature_dim=m, k2=k2, seed=0).idx
                mask = torch.zeros(C, m)
                mask.scatter_(1, torch.from_numpy(sel), 1.0)
                head = torch.nn.Linear(m, C)
                head.weight.copy_(wt * mask)
                head.bias.copy_(bt)
                out.append(int((head(ft).argmax(1) == yt).sum()))
    return out


def bench_grid(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    data = cifar_inputs(cfg)
    tr, w, b = data["train"], data["w"], data["b"]
    C, m = w.shape
    t = time.perf_counter()
    ft = counting.reduce_arrays(labels=tr[schema.LABEL], topk_idx=tr[schema.TOPK_IDX], topk_val=tr[schema.TOPK_VAL],
                              features=tr[schema.FEATURES], num_classes=C, feature_dim=m,
                              k1_grid=f"1..{cfg.kmax}", with_feature_sums=True)
    t_reduce = time.perf_counter() - t
    t = time.perf_counter()
    maps = selection.select_maps(strategies=selection.DEFAULT_STRATEGIES, freq=ft, weight=w, k2_max=cfg.kmax)
    t_select = time.perf_counter() - t
    configs = sum(cm.k2 for cm in maps)
    grid_times = []
    for _ in range(cfg.repeats):
        t = time.perf_counter()
        rows = heads.evaluate_grid(features=data["test_f"], labels=data["test_y"], weight=w, bias=b, maps=maps,
                                   threads=cfg.threads)
        grid_times.append(time.perf_counter() - t)
    t_grid = min(grid_times)
    grid32 = []
    for _ in range(cfg.repeats):
        t = time.perf_counter()
        rows32 = heads.evaluate_grid(features=data["test_f"], labels=data["test_y"], weight=w, bias=b, maps=maps,
                                     threads=cfg.threads, dtype=np.float32)
        grid32.append(time.perf_counter() - t)
    t_grid32 = min(grid32)
    differ32 = sum(int(r["correct"] != q["correct"]) for r, q in zip(rows, rows32))
    t = time.perf_counter()
    naive = naive_grid(f=data["test_f"], y=data["test_y"], w=w, b=b, maps=maps, batch=None)
    t_naive = time.perf_counter() - t
    t_naive_mb = None
    if cfg.naive_minibatch:
        t = time.perf_counter()
        naive_grid(f=data["test_f"], y=data["test_y"], w=w, b=b, maps=maps, batch=cfg.naive_minibatch)
        t_naive_mb = time.perf_counter() - t
    t = time.perf_counter()
    naive_sel = naive_select_and_eval(train=tr, f=data["test_f"], y=data["test_y"], w=w, b=b, maps=maps)
    t_naive_sel = time.perf_counter() - t
    differ = sum(int(r["correct"] != c) for r, c in zip(rows, naive))
    differ_sel = sum(int(r["correct"] != c) for r, c in zip(rows, naive_sel))
    t_ours_sel = t_reduce + t_select + t_grid
    res = {
        "source": data["source"],
        "instances": int(len(data["test_y"])),
        "classes": C,
        "features": m,
        "configurations": configs,
        "reduce_s": t_reduce,
        "select_s": t_select,
        "grid_s": t_grid,
        "grid_s_all": grid_times,
        "naive_full_batch_s": t_naive,
        "ratio_full_batch": t_naive / t_grid,
        "naive_minibatch_s": t_naive_mb,
        "naive_minibatch": cfg.naive_minibatch,
        "ratio_minibatch": (t_naive_mb / t_grid) if t_naive_mb else None,
        "grid_float32_s": t_grid32,
        "ratio_full_batch_float32": t_naive / t_grid32,
        "naive_select_and_eval_s": t_naive_sel,
        "ours_reduce_select_grid_s": t_ours_sel,
        "ratio_select_and_eval": t_naive_sel / t_ours_sel,
        "configs_with_different_counts": differ,
        "configs_with_different_counts_select_and_eval": differ_sel,
        "configs_with_different_counts_float32": differ32,
        "per_config_grid_ms": 1000 * t_grid / configs,
        "per_config_naive_ms": 1000 * t_naive / configs,
    }
    print(f"[bench] grid: {configs} configurations (frequency k1 1..{cfg.kmax}, k2 1..k1; weight_l1/contribution/random "
          f"k2 1..{cfg.kmax}) on {res['instances']} x {m} features, {C} classes [{data['source']}]")
    print(f"[bench]   reduce (train, all k1) {t_reduce:.3f} s, select {t_select:.3f} s")
    print(f"[bench]   grid evaluator      {t_grid:.3f} s  ({res['per_config_grid_ms']:.3f} ms/config, "
          f"best of {cfg.repeats})")
    print(f"[bench]   naive, full batch   {t_naive:.3f} s  ({res['per_config_naive_ms']:.3f} ms/config)  "
          f"ratio {res['ratio_full_batch']:.1f}x")
    if t_naive_mb:
        print(f"[bench]   naive, batch {cfg.naive_minibatch:<4d}    {t_naive_mb:.3f} s  "
              f"ratio {res['ratio_minibatch']:.1f}x")
    print(f"[bench]   grid evaluator f32  {t_grid32:.3f} s  "
          f"ratio to naive full batch {res['ratio_full_batch_float32']:.1f}x "
          f"({differ32} configurations differ from float64)")
    print(f"[bench]   naive, selecting per configuration from the cached train records + full batch "
          f"{t_naive_sel:.3f} s vs reduce+select+grid {t_ours_sel:.3f} s: ratio {res['ratio_select_and_eval']:.1f}x")
    print(f"[bench]   configurations whose correct count differs from the grid (float64): naive {differ}, "
          f"naive with selection {differ_sel}")
    return res


# --------------------------------------------------------------------------- part 2


def write_synthetic_imagenet(cfg: BenchConfig) -> str:
    """A records partition of ImageNet size (cached): class-dependent top-k lists, empty feature vectors."""
    root = f"{cfg.imagenet_dir}/records"
    man = records.read_manifest(root, model="synthetic", split="train")
    want = {"rows": cfg.imagenet_rows, "kmax": cfg.imagenet_kmax, "feature_dim": cfg.imagenet_features,
            "num_classes": cfg.imagenet_classes}
    if man is not None and all(man.get(k) == v for k, v in want.items()):
        return root
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.resolve(records.partition_uri(root, model="synthetic", split="train"))
    storage.remove_tree(fs, path)
    fs.create_dir(path, recursive=True)
    rng = np.random.default_rng(0)
    C, m, K, N = cfg.imagenet_classes, cfg.imagenet_features, cfg.imagenet_kmax, cfg.imagenet_rows
    # each class prefers its own random order of the features; an instance takes K distinct
    # positions along that order (increasing gaps of 1..max_gap), so counts are skewed per class
    perms = np.argsort(rng.random((C, m)), axis=1).astype(np.int32)
    max_gap = max(1, m // K)
    t = time.perf_counter()
    chunk = 131_072
    for i, s in enumerate(range(0, N, chunk)):
        n = min(chunk, N - s)
        y = rng.integers(0, C, n).astype(np.int32)
        pos = np.cumsum(rng.integers(1, max_gap + 1, (n, K), dtype=np.int32), axis=1) - 1
        idx = perms[y[:, None], pos]
        val = np.sort(rng.gamma(2.0, 1.0, (n, K)).astype(np.float32), axis=1)[:, ::-1]
        offsets = pa.array(np.arange(0, (n + 1) * K, K, dtype=np.int32))

        def lists(a: np.ndarray, t: pa.DataType) -> pa.ListArray:
            return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), t))

        table = pa.Table.from_arrays(
            [pa.array(np.arange(s, s + n, dtype=np.int64)), pa.array(y), pa.array(y),
             lists(idx, pa.int32()), lists(np.ascontiguousarray(val), pa.float32()),
             pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.float32()))],
            schema=schema.RECORDS_SCHEMA,
        )
        pq.write_table(table, f"{path}/part-{i:05d}.parquet")
    storage.write_json(fs, f"{path}/{schema.MANIFEST_NAME}", {**want, "synthetic": True})
    print(f"[bench] wrote synthetic ImageNet-size records to {path} in {time.perf_counter() - t:.1f} s")
    return root


_CHILD = r"""
import json, resource, time
from dtd_ray.core import selection
from dtd_ray.stages import reduce as stage_reduce
import numpy as np
t0 = time.perf_counter()
ft = stage_reduce.reduce_partition({root!r}, model="synthetic", split="train", k1_grid="1..{kmax}")
t1 = time.perf_counter()
pos0 = selection.frequency_tie_order(ft)
maps = [selection.select_frequency(freq=ft, k1=k, k2=k, tie_order=pos0) for k in ft.k1_grid.tolist()]
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"reduce_s": t1 - t0, "select_s": t2 - t1, "peak_rss_bytes": rss, "rows": ft.options["rows_used"],
                  "tables_bytes": int(ft.counts.nbytes), "maps": len(maps), "grid": len(ft.k1_grid)}}))
"""


def bench_imagenet(cfg: BenchConfig) -> dict:
    root = write_synthetic_imagenet(cfg)
    code = _CHILD.format(root=root, kmax=cfg.imagenet_kmax)
    # a fresh process, so the peak RSS is the reduce's own (not the generator's or part 1's)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ImageNet-size reduce failed: {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    gb = res["peak_rss_bytes"] / 1e9
    print(f"[bench] ImageNet-size reduce: {res['rows']:,} instances x kmax {cfg.imagenet_kmax}, "
          f"{cfg.imagenet_classes} classes, {cfg.imagenet_features} features, k1 grid 1..{cfg.imagenet_kmax} "
          f"({res['tables_bytes'] / 1e6:.0f} MB of int32 tables)")
    print(f"[bench]   reduce {res['reduce_s']:.1f} s, select {res['maps']} frequency maps {res['select_s']:.1f} s, "
          f"peak RSS {gb:.2f} GB")
    return res


def run(cfg: BenchConfig) -> dict:
    out = {"config": config_lib.to_dict(cfg), "versions": config_lib.versions(), "cpus": os.cpu_count()}
    out["grid"] = bench_grid(cfg)
    if cfg.imagenet:
        out["imagenet_reduce"] = bench_imagenet(cfg)
    out["driver_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cfg.output:
        fs, path = storage.resolve(cfg.output)
        storage.write_json(fs, path, out)
    return out


if __name__ == "__main__":
    cli.main(cli.Command(summary=__doc__.strip().splitlines()[0], config=BenchConfig, run=lambda cfg: run(cfg) and None))
