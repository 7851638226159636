"""The sweep's Ray Tune wiring: the retrain trials of modes ``head`` and ``finetune``.

Resources are decided on the driver (:func:`trial_resources`, from ``cluster.probe()``);
each trial runs a trainable of :mod:`dtd_ray.ray.trainables` (per-epoch reports,
checkpoints) and :class:`RowWriter`, a callback on the driver, writes its row the
moment it finishes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from ray import tune

from dtd_ray import console
from dtd_ray.core import holdout, stats
from dtd_ray.io import records, schema
from dtd_ray.models.linear_head import load_head
from dtd_ray.ray import cluster, trainables
from dtd_ray.ray.sweep.spec import RetrainSpec
from dtd_ray.ray.sweep.plan import SweepPlan, TrialSpec, Unit
from dtd_ray.ray.sweep.store import finished_trial_ids, timestamp, write_trial_row


def _run_trial(config: dict[str, Any], *, mode: str, params: dict[str, dict[str, Any]], data: dict | None = None) -> None:
    """The Tune trainable of every retrain trial: looks up the trial's config by its id
    (and, in mode head, its unit's cached features in ``data``, keyed by the records' model tag)."""
    p = params[config["trial_id"]]
    if mode == "head":
        trainables.head_trainable(p, data=data[p["model"]] if data is not None else None)
    else:
        trainables.finetune_trainable(p)


def _trial_name(trial) -> str:  # Tune names trial folders by this (stable, short)
    return str(trial.config["trial_id"])


def trial_resources(mode: str, spec: RetrainSpec, info: cluster.Cluster, *, use_gpu: bool) -> tuple[dict[str, float], int, bool, int]:
    """``(resources, max_concurrent, trial_uses_gpu, cpu_threads)`` of a mode's trials.

    Decided here, on the driver: a GPU only for finetune and only where the cluster has
    GPUs (Ray would wait forever for one that never comes); fractional CPUs on small
    machines, so that trials never starve each other or the driver on 2 cores.
    """
    small = info.cpus_per_node < 4
    cpus = float(spec.cpus) if spec.cpus is not None else (0.5 if small else 1.0)
    gpus = 0.0
    if mode == "finetune":
        gpus = float(spec.gpus) if spec.gpus is not None else (1.0 if use_gpu else 0.0)
        if gpus > 0 and not use_gpu:
            raise RuntimeError(f"retrain.finetune.gpus={gpus} but this sweep runs without GPUs "
                               "(the cluster has none; a trial would wait forever): pass --use_gpu true "
                               "on an autoscaling cluster, or drop gpus")
    if spec.max_concurrent is not None:
        conc = int(spec.max_concurrent)
    elif mode == "finetune" and gpus > 0:
        conc = 0  # bounded by the GPUs (0: no limit beyond resources)
    elif mode == "finetune":
        conc = info.nodes  # a CPU finetune uses every core of its node
    else:
        conc = max(1, int(info.cpus // max(cpus, 1.0)))
    threads = info.cpus_per_node if (mode == "finetune" and gpus == 0) else max(1, int(cpus))
    return {"cpu": cpus, "gpu": gpus}, conc, gpus > 0, threads


def trainable_config(plan: SweepPlan, unit: Unit, t: TrialSpec, idx: np.ndarray, *, use_gpu: bool, threads: int) -> dict:
    """The config one trainable receives: the class map ``idx`` and the mode's training options."""
    cfg = plan.cfg
    spec = plan.modes[t.mode]
    common = {
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "idx": np.asarray(idx).astype(int).tolist(),
        "epochs": int(spec.epochs),
        "lr": float(t.lr),
        "batch_size": int(spec.batch_size),
        "weight_decay": float(spec.weight_decay or 0.0),
        "seed": int(t.seed),
        "val_fraction": cfg.val_fraction,
        "val_seed": int(cfg.seed),  # the split is the sweep's, whatever the trial's training seed
    }
    if t.mode == "head":
        return {"records": f"{plan.output}/records", "model": unit.key, **common, "use_gpu": False,
                "cpu_threads": int(threads)}
    return {
        "model": unit.model.name,
        "weights": unit.weights_abs,
        "normalization": unit.model.normalization,
        "input_size": unit.model.input_size,
        "resize": unit.model.resize,
        "dataset": unit.dataset_abs,
        **common,
        "augment": spec.augment,
        "precision": spec.precision,
        "max_train_rows": spec.max_train_rows,
        "max_eval_rows": spec.max_eval_rows,
        "use_gpu": bool(use_gpu),
        "cpu_threads": int(threads),
    }


def head_data(plan: SweepPlan, unit: Unit) -> dict[str, np.ndarray]:
    """Cached features, labels and the original head of one unit (put in the object store once); with a
    validation split, the training rows without it and the held-out rows as ``val_*``."""
    root = f"{plan.output}/records"
    tr = records.load_records(root, model=unit.key, split=plan.cfg.train_split, columns=[schema.LABEL, schema.FEATURES])
    ev = records.load_records(root, model=unit.key, split=plan.cfg.eval_split, columns=[schema.LABEL, schema.FEATURES])
    man = records.read_manifest(root, model=unit.key, split=plan.cfg.train_split)
    w, b, _ = load_head(root=root, manifest=man)
    val = holdout.val_mask(sample_id=tr[schema.SAMPLE_ID], fraction=plan.cfg.val_fraction, seed=plan.cfg.seed)
    f, y = tr[schema.FEATURES].astype(np.float32, copy=False), tr[schema.LABEL].astype(np.int64)
    out = {
        "train_features": f[~val] if val.any() else f,
        "train_labels": y[~val] if val.any() else y,
        "eval_features": ev[schema.FEATURES].astype(np.float32, copy=False),
        "eval_labels": ev[schema.LABEL].astype(np.int64),
        "weight": w.astype(np.float32),
        "bias": b.astype(np.float32),
    }
    if val.any():
        out.update(val_features=f[val], val_labels=y[val])
    return out


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def epoch_history(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's results with ``acc_eval``, one per epoch in epoch order (a result repeated after a
    restore, or an epoch replayed after a failure, counts once: the latest)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, r in enumerate(results):
        if "acc_eval" in r:
            by_epoch[int(r.get("epoch", i + 1))] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The position in ``history`` (:func:`epoch_history`) of the head a trial's row keeps: the best
    ``acc_val`` (the earliest of equals) where every epoch reported one, else the last. Never chosen
    on the eval split."""
    if history and all(h.get("acc_val") is not None for h in history):
        return int(np.argmax([float(h["acc_val"]) for h in history]))
    return len(history) - 1


class RowWriter(tune.Callback):
    """On the driver: writes each trial's row the moment it finishes, and shows the Tuner's progress.

    ``rows`` holds each trial's columns known before it runs, ``configs`` what its row's
    ``config`` column records; ``failed`` collects the trials that ended without a row.
    ``bar`` (a :func:`dtd_ray.console.progress`) advances by one per finished trial; a line
    per epoch and per trial only with ``verbose``. A failure always prints.
    """

    def __init__(self, *, output: str, rows: dict[str, dict[str, Any]], configs: dict[str, dict], total: int,
                 bar: Any, verbose: bool = False) -> None:
        self.output = output
        self.bar = bar
        self.verbose = verbose
        self.rows = rows
        self.configs = configs
        self.total = total
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.done = 0
        self.failed: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment's state; a progress display (a stream, a
        # lock) stays on the driver that draws it.
        return {**self.__dict__, "bar": None}

    def _write(self, line: str) -> None:
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def _advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.config["trial_id"]
        self.history.setdefault(tid, []).append(dict(result))
        if not self.verbose:
            return
        r = self.rows[tid]
        acc = result.get("acc_eval")
        self._write(f"[sweep] {r['retrain_mode']} {r['model']} {r['strategy']} k={r['k2']}: epoch "
              f"{result.get('epoch', '?')}/{r['epochs']} acc {acc if acc is None else f'{acc:.2f}'} % "
              f"(decomposed {r['acc_decomposed']:.2f} %, full {r['acc_full']:.2f} %)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid = trial.config["trial_id"]
        hist = epoch_history(self.history.get(tid, []))
        if not hist:
            self.failed.append(tid)
            self._write(f"[sweep] trial {tid} finished without reporting acc_eval: no row written")
            self._advance()
            return
        first, last = hist[0], hist[-1]
        chosen = hist[best_epoch(hist)]
        ckpt = getattr(trial, "checkpoint", None)
        row = dict(self.rows[tid])
        have_val = all("acc_val" in h for h in hist)
        row.update(
            acc_decomposed_init=_float(first.get("acc_decomposed_init")),
            acc_retrained=_float(chosen.get("acc_eval")),
            acc_by_epoch=[float(h["acc_eval"]) for h in hist],
            acc_val=_float(chosen.get("acc_val")) if have_val else None,
            acc_val_by_epoch=[float(h["acc_val"]) for h in hist] if have_val else None,
            best_epoch=int(chosen.get("epoch", len(hist))),
            outcomes=stats.outcomes_from_text(chosen["outcomes"]) if chosen.get("outcomes") else None,
            loss=_float(last.get("loss")),
            seconds=_float(last.get("time_total_s", sum(float(h.get("seconds") or 0) for h in hist))),
            checkpoint=getattr(ckpt, "path", None),
            config=json.dumps(self.configs[tid], sort_keys=True, default=str),
            finished_at=timestamp(),
        )
        path = write_trial_row(self.output, row)
        self.done += 1
        if self.verbose:
            self._write(f"[sweep] trial {tid} done ({self.done}/{self.total}): {row['retrain_mode']} {row['model']} "
                           f"{row['strategy']} k={row['k2']} acc {row['acc_retrained']:.2f} % -> {path}")
        self._advance()

    def on_trial_error(self, iteration, trials, trial, **info):
        tid = trial.config["trial_id"]
        self.failed.append(tid)
        r = self.rows[tid]
        self._write(f"[sweep] trial {tid} failed ({r['retrain_mode']} {r['model']} "
                       f"{r['strategy']} k={r['k2']}); see {getattr(trial, 'path', '')}")
        self._advance()


def run_tune(plan: SweepPlan, mode: str, todo: list[TrialSpec], *, maps: dict[str, np.ndarray],
             rows: dict[str, dict[str, Any]], use_gpu: bool, units: list[Unit] | None = None) -> list[str]:
    """One Tuner over ``todo`` (trials of ``mode``); returns the ids of failed trials.

    ``maps[trial_id]`` is the trial's class map (from the decomposition), ``rows[trial_id]``
    the columns of its row known before it runs; ``units`` (mode head): the units whose
    cached features the trials read (put in the object store once, with the Tuner).
    """
    if not todo:
        return []
    spec = plan.modes[mode]
    info = cluster.probe()
    resources, conc, trial_gpu, threads = trial_resources(mode, spec, info, use_gpu=use_gpu)
    by_key = {u.key: u for u in plan.units}
    params: dict[str, dict] = {}
    full_rows: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    for t in todo:
        params[t.trial_id] = trainable_config(plan, by_key[t.unit], t, maps[t.trial_id], use_gpu=trial_gpu,
                                              threads=threads)
        full_rows[t.trial_id] = {**rows[t.trial_id], "use_gpu": trial_gpu}
        configs[t.trial_id] = {"identity": t.identity,
                               "trainable": {k: v for k, v in params[t.trial_id].items() if k != "idx"}}
    data = {u.key: head_data(plan, u) for u in units} if (mode == "head" and units) else None
    kwargs: dict[str, Any] = {"mode": mode, "params": params}
    if data is not None:
        kwargs["data"] = data
    trainable = tune.with_resources(tune.with_parameters(_run_trial, **kwargs), resources)
    label = units[0].key + (f"+{len(units) - 1}" if len(units) > 1 else "") if units else "all"
    name = f"{plan.cfg.name}-{mode}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    bar = console.progress(total=len(todo), desc=f"[sweep] {mode} {label}", unit="trial")
    writer = RowWriter(output=plan.output, rows=full_rows, configs=configs, total=len(todo), bar=bar,
                       verbose=plan.cfg.verbose)
    bar.write(f"[sweep] {mode}{' ' + ','.join(u.key for u in units) if units else ''}: {len(todo)} Tune trial(s), {resources} each"
          f"{f', at most {conc} at once' if conc else ''} -> {plan.output}/tune/{name}")
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search([t.trial_id for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=conc or None,
            # A trial's own work can be tiny (head mode); a fresh actor per trial
            # costs a process and a torch import, many times the work. Trials of one Tuner share resources.
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            storage_path=f"{plan.output}/tune",
            name=name,
            callbacks=[writer],
            failure_config=tune.FailureConfig(max_failures=plan.cfg.max_failures),
            verbose=0,
        ),
    )
    try:
        grid = tuner.fit()
    finally:
        bar.close()
    failed = set(writer.failed)
    for r in grid:
        if r.error is not None:
            failed.add(r.config.get("trial_id") if r.config else "?")
    done = finished_trial_ids(plan.output)
    failed |= {t.trial_id for t in todo if t.trial_id not in done}
    return sorted(failed)
