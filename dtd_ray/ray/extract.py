"""Extraction: run a backbone over a dataset with Ray Data and write per-instance records.

Pipeline per (model, split) partition, built in :func:`build_pipeline`::

    source rows ─► prepare_batch (CPU tasks: decode, convert, resize/crop, augment; not for decoded arrays
                   at the model's size, whose copy the model stage does)
                ─► FeatureExtractor (actor pool; GPU with fp16 autocast + channels_last when the cluster has GPUs):
                   a call runs the model on one file's rows and writes the file into a staging folder

The driver commits a partition only after every row is accounted for (written or
skipped): it moves the files its summaries name out of the staging folder and writes
the manifest last. Files from failed or retried tasks are never named by a summary,
so they are dropped with the staging folder and no row is written twice. A pipeline that
fails (bad input with ``on_bad_input="fail"``, a write that fails) raises one line naming the
partition and the cause (``ValueError`` / :class:`ExtractionError`), removes the staging
folder and releases the model actors at once, so the next extraction in the driver can run.

For a benchmark (``jobs/bench_extract.py``), :func:`run_extract` takes another class for the model stage
(``model_stage``) and hands each partition's per-operator block times to ``on_stats`` (:class:`PartitionStats`).
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import ray
from pydantic import Field

from dtd_ray import config as config_lib
from dtd_ray import console
from dtd_ray.config import config_class
from dtd_ray.data.sources import parse_source, subset_positions
from dtd_ray.data.transforms import prepare_batch
from dtd_ray.io import records, schema, storage
from dtd_ray.models import factories
from dtd_ray.models.backbones import get_backbone
from dtd_ray.models.extractor import FeatureExtractor, writing_stage
from dtd_ray.models.linear_head import stored_head
from dtd_ray.models.runtime import check_precision
from dtd_ray.ray import cluster
from dtd_ray.ray.datasets import to_ray_dataset
from dtd_ray.ray.pipeline_stats import PartitionStats, partition_stats

log = logging.getLogger(__name__)


@config_class
class ExtractConfig:
    model: Annotated[str, Field(description="backbone registry name (dtd_ray.models.backbones.list_backbones()), or a model factory: module.path:callable or file.py:callable")] = "cifar_resnet20"
    weights: Annotated[str | None, Field(description="\"default\", a local file, an http(s) URL, \"torchvision:<ENUM>\", or None (random init)")] = "default"
    normalization: Annotated[str | None, Field(description="override the weights' mean/std: \"cifar10\", \"imagenet\", \"cifar100\", \"fashion-mnist\"")] = None
    input_size: Annotated[int | None, Field(description="override the input size (px; with a model factory: its input, default 224)")] = None
    resize: Annotated[int | None, Field(description="with input_size: resize the shorter side to this, then center-crop (default: images come at input_size)")] = None
    dataset: Annotated[str, Field(description="imagefolder:PATH | cifar10:PATH | cifar100:PATH | fashion-mnist[:PATH]")] = "imagefolder:../shared/data/cifar10"
    splits: Annotated[tuple[str, ...], Field(description="which splits of the dataset to extract")] = ("train", "test")
    output: Annotated[str, Field(description="root URI; records go to <output>/records/model=<tag>/split=<split>/")] = "runs/extract"
    shared_fs: Annotated[bool, Field(description="the local output is on a filesystem every node mounts (NFS); without it a local output on a multi-node cluster is refused")] = False
    tag: Annotated[str | None, Field(description="partition name for the model (default: the model name); set it for custom weights")] = None
    kmax: Annotated[int, Field(description="ranked top-k feature indices stored per instance (capped at the feature dimension)")] = 64
    batch_size: Annotated[int, Field(description="images per model batch (use 1024+ on a GPU)")] = 256
    num_actors: Annotated[int | None, Field(description="model actors (None: one per GPU, else one per node)")] = None
    use_gpu: Annotated[bool | None, Field(description="None: decided on the driver from the cluster's resources")] = None
    cpu_threads: Annotated[int | None, Field(description="torch threads of each call of a model actor (None: the node's cores over actor_calls on a CPU node, 1 with a GPU)")] = None
    precision: Annotated[str, Field(description="\"auto\" (fp16 autocast on GPU, fp32 on CPU), \"fp32\", \"tf32\" (GPU), \"bf16\" or \"fp16\"")] = "auto"
    channels_last: Annotated[bool, Field(description="NHWC memory format on GPU (measured faster for convs there)")] = True
    augment: Annotated[str | None, Field(description="\"cifar\": seeded 4-px pad + random crop + flip; the split is stored as <split>_aug<seed>")] = None
    seed: Annotated[int, Field(description="seed of the augmentation (per instance: (seed, sample_id))")] = 0
    on_bad_input: Annotated[str, Field(description="\"skip\": count undecodable / wrong-size images in the manifest; \"fail\": stop at the first")] = "skip"
    max_rows: Annotated[dict[str, int] | None, Field(description="split -> extract at most this many of its rows: a seeded random subset (--seed), e.g. {train: 20000}")] = None
    rows_per_file: Annotated[int | None, Field(description="rows per Parquet file, at least batch_size: one model-actor call runs the model on them and writes them (also the granularity of the progress lines); None: 4096 with GPU actors, 1024 on the CPU (a CPU model is far slower: about a second a call)")] = None
    actor_calls: Annotated[int, Field(description="calls a model actor runs at once, in threads: one call's write overlaps the next one's model")] = 2
    overwrite: Annotated[bool, Field(description="recompute partitions even when finished with the same config")] = False
    verbose: Annotated[bool, Field(description="show Ray's and Tune's own INFO output")] = False

    def __post_init__(self) -> None:
        if self.kmax < 1:
            raise ValueError(f"kmax must be >= 1, got {self.kmax}")
        if self.batch_size < 1 or (self.rows_per_file is not None and self.rows_per_file < 1) or self.actor_calls < 1:
            raise ValueError("batch_size, rows_per_file and actor_calls must be >= 1")
        check_precision(self.precision)
        if self.on_bad_input not in ("skip", "fail"):
            raise ValueError(f"on_bad_input must be 'skip' or 'fail', got {self.on_bad_input!r}")
        if self.max_rows is not None:
            bad = {k: v for k, v in self.max_rows.items() if int(v) < 1}
            if bad:
                raise ValueError(f"max_rows must be >= 1 per split, got {bad}")

    @property
    def model_key(self) -> str:
        return self.tag or (factories.default_tag(self.model) if factories.is_factory(self.model) else self.model)

    def backbone(self) -> Any:
        """The backbone this config names (weights loaded, preprocessing with its overrides)."""
        return get_backbone(self.model, weights=self.weights, normalization=self.normalization,
                            input_size=self.input_size, resize=self.resize)

    def split_key(self, split: str) -> str:
        return schema.split_key(split, augment=self.augment, seed=self.seed)

    def rows_of(self, source: Any, split: str) -> np.ndarray | None:
        """The positions of the rows of ``split`` to extract (``None``: all), after ``max_rows``."""
        cap = (self.max_rows or {}).get(split)
        return subset_positions(num_rows=source.num_rows(split), max_rows=cap, seed=self.seed)


# Rows per file (and model-stage call) without rows_per_file: a fraction of a second on a GPU, about one on a CPU.
GPU_ROWS_PER_FILE, CPU_ROWS_PER_FILE = 4096, 1024

# Fields that change what a partition holds; the others (resources, batch sizes, paths) do not.
_CONTENT_FIELDS = ("model", "weights", "normalization", "dataset", "kmax", "augment", "seed")


# ----------------------------------------------------------------------------- Ray pipeline


@dataclass(frozen=True)
class Resources:
    """What the driver decided about the cluster (never ``num_gpus`` on a cluster without GPUs)."""

    use_gpu: bool
    num_actors: int
    actor_cpus: float
    prepare_cpus: float
    cpu_threads: int  # torch threads of each of an actor's concurrent calls
    rows_per_file: int  # rows of one model-stage call and of the file it writes
    cpus: float  # the cluster's, for the decode blocks' count


def plan_resources(cfg: ExtractConfig) -> Resources:
    info = cluster.probe()
    gpus = int(info.gpus)
    use_gpu = bool(gpus) if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not gpus:
        raise RuntimeError("use_gpu=True but the Ray cluster has no GPU (an actor would wait forever)")
    cpus_per_node = info.cpus_per_node
    if use_gpu:
        num_actors = cfg.num_actors or gpus
        return Resources(True, num_actors, 1.0, 1.0, cfg.cpu_threads or 1,
                         max(cfg.rows_per_file or GPU_ROWS_PER_FILE, cfg.batch_size), info.cpus)
    num_actors = cfg.num_actors or info.nodes
    # A CPU actor takes one logical CPU; torch runs on the node's cores, split between its concurrent calls (all
    # cores each oversubscribed them). Prepare tasks get fractional CPUs so that they are never starved by the
    # actors (on 2 cores, whole-CPU actors can deadlock reads).
    threads = cfg.cpu_threads or max(1, cpus_per_node // cfg.actor_calls)
    return Resources(False, num_actors, 1.0 if cpus_per_node > 1 else 0.5, 0.5, threads,
                     max(cfg.rows_per_file or CPU_ROWS_PER_FILE, cfg.batch_size), info.cpus)


def build_pipeline(cfg: ExtractConfig, *, split: str, staging_uri: str, res: Resources, source=None,
                   model_stage: type | None = None, preprocessing: Any = None):
    """The Ray Dataset whose rows are per-file summaries (executing it writes the records).

    ``model_stage``: the callable class of the model stage in place of :class:`FeatureExtractor`,
    built in each actor with the same keyword arguments (a subclass that sets something up in the
    actor's process first, as a benchmark's own backbone; ``None``: ``FeatureExtractor``).
    ``preprocessing``: the backbone's, where the caller has it (``check_extract`` does); else the
    backbone is built here to read it.
    """
    source = source or parse_source(cfg.dataset)
    pre = preprocessing or cfg.backbone().preprocessing
    prepare = {"preprocessing": pre, "augment": cfg.augment, "seed": cfg.seed, "on_bad_input": cfg.on_bad_input}
    # Decoded arrays at the model's size need only a vectorised copy: the model stage does it, saving a trip of
    # every block through the object store. Files, bytes, resizes and augmentation are per-image: decode tasks.
    inline = source.decoded and pre.resize is None and cfg.augment is None
    # Blocks hold whole calls of the model stage (no call cut short at a block's end; datasets.whole_calls).
    ds = to_ray_dataset(source, split, read_cpus=res.prepare_cpus, rows=cfg.rows_of(source, split),
                        rows_multiple=res.rows_per_file, decoded_bytes=pre.size ** 2 * pre.channels, cpus=res.cpus)
    if not inline:
        ds = ds.map_batches(
            prepare_batch,
            fn_kwargs=prepare,
            batch_format="numpy",
            # One decode task per source block (512 to 2,048 paths, or a few MiB of arrays), whatever the
            # model's batch: the decode rate must not depend on it (a 1,024-image model batch made Ray Data bundle
            # two blocks per task, half as many tasks to spread over the cores); the model stage re-batches.
            batch_size=None,
            num_cpus=res.prepare_cpus,
        )
    # Ray Data reserves half of the cluster's resources evenly among the operators: beside a model actor holding
    # a whole CPU, the decode operator ran about one task at a time where the cores had room for two (bench_extract's
    # pngproxy). Without it the fixed-size actor pool takes its CPUs or GPUs at the start; decode tasks fill the rest.
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(
        writing_stage(model_stage or FeatureExtractor),
        fn_constructor_kwargs={
            "model": cfg.model,
            "weights": cfg.weights,
            "normalization": cfg.normalization,
            "input_size": cfg.input_size,
            "resize": cfg.resize,
            "kmax": cfg.kmax,
            "use_gpu": res.use_gpu,
            "precision": cfg.precision,
            "channels_last": cfg.channels_last,
            "cpu_threads": res.cpu_threads,
            "staging_uri": staging_uri,
            "model_batch": cfg.batch_size,
            "prepare": prepare if inline else None,
        },
        # Ray Data's default max_restarts=-1 stays: a killed model actor is restarted and its batch retried.
        # (With it, Ray's core worker logs an ERROR about the references Ray Data itself passes to the actor's
        # constructor; dtd_ray.ray.session keeps that off the console.) Concurrent calls run in the actor's
        # threads: torch and Parquet's encoder release the GIL, so one call's write overlaps another's model.
        # One call queued per running one, not Ray's four: with four, the actors ready first took all of a small
        # run's calls while another idled (tests/test_s3.py), and a run's last calls queue behind one actor.
        compute=ray.data.ActorPoolStrategy(size=res.num_actors, max_concurrent_calls_per_actor=cfg.actor_calls,
                                           enable_true_multi_threading=cfg.actor_calls > 1,
                                           max_tasks_in_flight_per_actor=2 * cfg.actor_calls),
        num_gpus=1 if res.use_gpu else 0,
        num_cpus=res.actor_cpus,
        batch_size=res.rows_per_file,
        batch_format="numpy",
    )


def content_config(cfg: ExtractConfig, *, split: str, feature_dim: int) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in _CONTENT_FIELDS}
    # set only: a partition extracted before these options existed keeps its hash
    out.update({k: getattr(cfg, k) for k in ("input_size", "resize") if getattr(cfg, k) is not None})
    out["kmax"] = min(cfg.kmax, feature_dim)
    out["split"] = split
    # set only where they change the content, so that earlier partitions keep their hash: a subset,
    # and a precision other than the device's default (bf16 features differ from fp32 ones)
    if (cfg.max_rows or {}).get(split) is not None:
        out["max_rows"] = int(cfg.max_rows[split])
    if cfg.precision != "auto":
        out["precision"] = cfg.precision
    return out


def _commit(
    cfg: ExtractConfig,
    *,
    summaries: list[dict[str, Any]],
    part_fs,
    part_path: str,
    staging_path: str,
    expected_rows: int,
    manifest: dict[str, Any],
    head: dict[str, Any],
) -> dict[str, Any]:
    written = [s for s in summaries if s["file"]]
    rows = int(sum(s["rows"] for s in summaries))
    skipped = [x for s in summaries for x in json.loads(s["skipped"])]
    if rows + len(skipped) != expected_rows:
        raise RuntimeError(
            f"{part_path}: {rows} rows written + {len(skipped)} skipped != {expected_rows} inputs; not committed"
        )
    # Deterministic file names, in sample_id order: part-00000.parquet, part-00001.parquet, …
    for i, s in enumerate(sorted(written, key=lambda s: s["min_id"])):
        part_fs.move(f"{staging_path}/{s['file']}", f"{part_path}/part-{i:05d}.parquet")
    storage.remove_tree(part_fs, staging_path)
    # The head before the manifest: a committed partition always has it, so no later stage rebuilds the network.
    records.write_head(part_fs, part_path, weight=head["weight"], bias=head["bias"], identity=head["identity"])
    manifest.update(rows=rows, files=len(written), skipped=len(skipped), skipped_items=skipped[:1000],
                    head={"file": records.HEAD_NAME, **head["identity"]})
    storage.write_json(part_fs, f"{part_path}/{schema.MANIFEST_NAME}", manifest)
    return manifest


class ExtractionError(RuntimeError):
    """A partition's pipeline failed (one line: the partition, "nothing committed", the cause)."""


# "OSError: [Errno 28] …" / "ValueError: bad input …": an exception line at column 0 of a worker traceback.
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_cause(e: BaseException) -> tuple[str, str]:
    """``(type name, one-line message)`` of the error that made a Ray Data execution fail.

    Ray re-raises a UDF's exception on the driver as ``RayTaskError(UserCodeException)``
    whose text is the worker's whole traceback (the original exception object does not
    survive pickling); the first exception line in that text is the UDF's own error.
    """
    text = _ANSI.sub("", str(e))
    for line in text.splitlines():
        m = _EXC_LINE.match(line)
        if m and not m.group(1).startswith("ray."):
            return m.group(1).rsplit(".", 1)[-1], m.group(2).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return type(e).__name__, first or repr(e)


def _drop_traceback(e: BaseException) -> None:
    """Clear the frames that ``e`` (and its causes) pin.

    A failed Ray Data execution shuts down without ``ray.kill``: its actors die only when
    their handles are garbage, and the exception's traceback reaches them through the
    executor's frames. Anything that keeps the exception (a log handler holding the
    LogRecord that Ray Data logs it with, a caller that keeps the error) would otherwise
    keep the model actors and their CPUs/GPUs, and the next extraction in this driver
    waits for those resources forever.
    """
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        traceback.clear_frames(x.__traceback__)
        x.__traceback__ = None
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]


def extract_split(cfg: ExtractConfig, *, split: str, res: Resources, source, feature_dim: int, num_classes: int,
                  head: dict[str, Any] | None = None, preprocessing: Any = None, model_stage: type | None = None,
                  on_stats: Callable[[PartitionStats], None] | None = None):
    """Extract one partition unless it is finished; returns its manifest (``status`` says which).

    ``head``: the backbone's final linear layer as :func:`dtd_ray.models.linear_head.stored_head`
    gives it, and ``preprocessing`` its input record (``check_extract`` has both); built here where
    the caller has none.
    """
    root = f"{cfg.output.rstrip('/')}/records"
    key = cfg.split_key(split)
    uri = records.partition_uri(root, model=cfg.model_key, split=key)
    fs, path = storage.resolve(uri)
    content = content_config(cfg, split=split, feature_dim=feature_dim)
    chash = config_lib.config_hash(content)
    old = storage.read_json(fs, f"{path}/{schema.MANIFEST_NAME}")
    if old is not None and not cfg.overwrite:
        if old.get("config_hash") == chash:
            print(f"[extract] {cfg.model_key}/{key}: finished earlier ({old['rows']} rows), skipped", flush=True)
            return {**old, "status": "skipped"}
        diff = sorted(k for k in content if old.get("content", {}).get(k) != content[k])
        raise ValueError(
            f"{uri} holds records of another config (differs in {', '.join(diff) or 'version'}); "
            "pass --overwrite to replace them or --tag to write beside them"
        )
    # Unfinished (or overwritten): start clean, so no stale file from an earlier try survives.
    storage.remove_tree(fs, path)
    staging_path = f"{path}/{schema.STAGING_PREFIX}-{uuid.uuid4().hex[:8]}"
    fs.create_dir(staging_path, recursive=True)
    staging_uri = f"{uri}/{staging_path.rsplit('/', 1)[1]}"

    subset = cfg.rows_of(source, split)
    expected = source.num_rows(split) if subset is None else len(subset)
    print(f"[extract] {cfg.model_key}/{key}: {expected} inputs, {res.num_actors} "
          f"{'GPU' if res.use_gpu else 'CPU'} actor(s), batch {cfg.batch_size}", flush=True)
    t0 = time.perf_counter()
    ds = build_pipeline(cfg, split=split, staging_uri=staging_uri, res=res, source=source, model_stage=model_stage,
                        preprocessing=preprocessing)
    summaries: list[dict[str, Any]] = []
    done = 0
    failure: tuple[str, str] | None = None
    bar = console.progress(total=expected, desc=f"[extract] {cfg.model_key}/{key}", unit="img")
    try:
        for row in ds.iter_rows():
            summaries.append(row)
            n = int(row["rows"]) + len(json.loads(row["skipped"]))
            done += n
            bar.update(n)
    except Exception as e:  # a UDF raised (bad input with on_bad_input="fail", a failed write, …)
        failure = failure_cause(e)
        log.debug("%s/%s: Ray Data execution failed:\n%s", cfg.model_key, key, str(e))  # text: pins nothing
        _drop_traceback(e)
    stats = None
    if on_stats is not None and failure is None:
        stats = partition_stats(ds, model=cfg.model_key, split=key, model_stage=model_stage or FeatureExtractor,
                                started_s=t0, ended_s=time.perf_counter())
    # Ray Data ends an execution by dropping its actor handles, not by killing the actors: they
    # die when the handles are garbage. Collect now, so that the model actors (and their CPUs or
    # GPUs) are free before the next partition or model asks for them, on success and on failure
    # (a failed run's actors are reachable from the error's frames until _drop_traceback clears them).
    del ds
    gc.collect()
    if failure is not None:
        bar.close()
        # Raised outside the except block, so the new error carries no reference to Ray's.
        try:  # best effort: frees the space of the rows already staged (a rerun starts clean anyway)
            storage.remove_tree(fs, staging_path)
        except OSError:
            pass
        kind, cause = failure
        msg = (f"{cfg.model_key}/{key}: extraction failed after {done} of {expected} inputs, nothing committed "
               f"(a rerun redoes this partition): {kind}: {cause}")
        raise (ValueError if kind == "ValueError" else ExtractionError)(msg)
    seconds = time.perf_counter() - t0
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "model": cfg.model_key,
        "split": key,
        "source_split": split,
        "config": config_lib.to_dict(cfg),
        "content": content,
        "config_hash": chash,
        "versions": config_lib.versions(),
        "seconds": round(seconds, 3),
        "kmax": content["kmax"],
        "feature_dim": feature_dim,
        "num_classes": num_classes,
        "use_gpu": res.use_gpu,
        "num_actors": res.num_actors,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        if head is None:
            backbone = cfg.backbone()
            head = stored_head(backbone, weights=cfg.weights)
        manifest = _commit(cfg, summaries=summaries, part_fs=fs, part_path=path, staging_path=staging_path,
                           expected_rows=expected, manifest=manifest, head=head)
        bar.set_postfix_str(f"wrote {manifest['rows']} rows ({manifest['skipped']} skipped)")
    finally:
        bar.close()
    if stats is not None:
        on_stats(stats)
    return {**manifest, "status": "written"}


@dataclass(frozen=True)
class ExtractCheck:
    """What the driver checked before touching Ray: the source, the backbone's shape and its final linear layer."""

    source: Any
    feature_dim: int
    num_classes: int
    # linear_head.stored_head of the backbone, written beside every partition (arrays: kept out of repr and ==).
    head: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # the backbone's input record, which the decode tasks receive: the checkpoint is not read again per split
    preprocessing: Any = None


def check_extract(cfg: ExtractConfig) -> ExtractCheck:
    """Validate names, paths, splits, weights and the output before anything is scheduled.

    Raises one-line ``ValueError`` / ``FileNotFoundError`` / ``PermissionError``; needs no Ray.
    """
    source = parse_source(cfg.dataset)
    for split in cfg.splits:
        if split not in source.splits():
            raise ValueError(f"split {split!r} not in {cfg.dataset}; valid: {', '.join(source.splits())}")
    backbone = cfg.backbone()
    if backbone.num_classes != len(source.classes):
        log.warning("%s has %d classes but %s has %d", cfg.model, backbone.num_classes, cfg.dataset,
                    len(source.classes))
    storage.check_writable(cfg.output)
    return ExtractCheck(source=source, feature_dim=backbone.feature_dim, num_classes=backbone.num_classes,
                        head=stored_head(backbone, weights=cfg.weights), preprocessing=backbone.preprocessing)


def run_extract(cfg: ExtractConfig, *, plan: ExtractCheck | None = None, model_stage: type | None = None,
                on_stats: Callable[[PartitionStats], None] | None = None) -> dict[str, Any]:
    """Extract every split of ``cfg`` on the running Ray cluster; returns a summary dict.

    Prints progress while it runs and one summary line at the end. ``plan`` is the result
    of :func:`check_extract` where the caller already ran it. ``model_stage``: see
    :func:`build_pipeline`. ``on_stats`` is called with the :class:`PartitionStats` of every
    partition written (not of those skipped as finished), after its commit.
    """
    plan = plan or check_extract(cfg)
    # Before anything is written: the records are written by tasks on any node of the cluster.
    cluster.check_output(cfg.output, shared_fs=cfg.shared_fs)
    source = plan.source
    res = plan_resources(cfg)
    t0 = time.perf_counter()
    parts = [
        extract_split(cfg, split=s, res=res, source=source, feature_dim=plan.feature_dim,
                      num_classes=plan.num_classes, head=plan.head, preprocessing=plan.preprocessing,
                      model_stage=model_stage, on_stats=on_stats)
        for s in cfg.splits
    ]
    seconds = time.perf_counter() - t0
    written = [p for p in parts if p["status"] == "written"]
    rows = sum(p["rows"] for p in written)
    skipped = sum(p["skipped"] for p in written)
    compute_s = sum(p["seconds"] for p in written)
    summary = {
        "model": cfg.model_key,
        "output": f"{cfg.output.rstrip('/')}/records",
        "partitions": {p["split"]: p["status"] for p in parts},
        "rows": rows,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "images_per_s": round((rows + skipped) / compute_s, 1) if compute_s else None,
    }
    print(f"[extract] done: {summary['model']} {len(written)} written / {len(parts) - len(written)} skipped "
          f"partitions, rows={rows} skipped_inputs={skipped} images/s={summary['images_per_s']} "
          f"seconds={seconds:.1f} -> {summary['output']}", flush=True)
    return summary


__all__ = ["ExtractConfig", "ExtractionError", "Resources", "build_pipeline", "check_extract", "plan_resources",
           "run_extract"]

