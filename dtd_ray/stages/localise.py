"""Measure localisation: do a class's selected channels fire on the object? (``jobs/localise.py``)

The paper's contribution 4 says the selected filters correspond to the object in the image;
the activation-map pictures (:mod:`dtd_ray.report.cam`) only show it. Here it is measured on
a test set where the object's position is known:

1. the sweep's evaluation split (CIFAR-10 test: 10,000 images, or a seeded subset) pasted at
   seeded random positions on ``canvas × canvas`` canvases over another class's image
   (:func:`dtd_ray.data.canvas.paste_on_canvas`; background ``blur`` by default);
2. each model of the sweep run fully convolutionally on the canvases (the CIFAR ResNets pool
   adaptively), with its unit's normalisation, giving the last block's maps ``A`` (N, m, h, w);
3. per image, for its true class ``y``, one map per method (``METHODS``), upsampled bilinearly
   to the canvas and scored by energy-in-box and the pointing game
   (:mod:`dtd_ray.core.localisation`).

Output, under ``<output>/localisation/``: ``<model>.parquet`` (one row per image and method,
:data:`LOCALISATION_SCHEMA`, written with the project's atomic writer) and
``localise_config.json`` (the resolved config, what each method is, per model what ran).
:mod:`dtd_ray.report.localisation_summary` summarises them with paired bootstrap intervals.
No Ray.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from pydantic import Field

from dtd_ray import config as config_lib
from dtd_ray.cli import Command
from dtd_ray.config import config_class
from dtd_ray.core import localisation as loc
from dtd_ray.core import selection
from dtd_ray.data import canvas as canvas_lib
from dtd_ray.data.transforms import prepare_batch
from dtd_ray.io import layout, schema, storage
from dtd_ray.io.maptables import map_from_table
from dtd_ray.models.runtime import Runtime, resolve_device
from dtd_ray.stages.units import last_block_maps, load_unit_backbone, unit_source

# The maps scored per image, for the image's true class y (k channels each where a set is chosen), and
# the class-specific controls: another class's selected channels on the same canvas.
METHODS = ("selected", "other_class", "background_class", "random", "weight_l1", "contribution", "cam_selected",
           "cam", "uniform")
METHOD_DOC = {
    "selected": "Σ_{c ∈ I_y} A_c, I_y the frequency map at k1 = k2 = k (the paper's selection)",
    "other_class": "Σ_{c ∈ I_y'} A_c: the selected channels of a class y' that is neither y nor the background's, "
                   "drawn per image by default_rng([seed, sample_id, 3]) (the class-specific control)",
    "background_class": "Σ_{c ∈ I_b} A_c: the selected channels of the background donor's class b (a class-specific "
                        "map that should sit off the box)",
    "cam_selected": "Σ_{c ∈ I_y} W[y, c] A_c: the CAM restricted to the selected channels, weighted like the CAM",
    "random": "Σ_{c ∈ R_y} A_c, R_y = default_rng([s, y]).choice(m, k, replace=False); each seed s = 0..random_seeds−1 "
              "scored on its own, the scores then averaged per image",
    "weight_l1": "Σ_{c ∈ T_y} A_c, T_y the k channels with the largest |W[y, c]| (the weight_l1 map)",
    "contribution": "Σ_{c ∈ K_y} A_c, K_y the contribution map at k (where the sweep has it)",
    "cam": "Σ_c W[y, c] A_c over all channels: the class activation map of Zhou et al. 2016",
    "uniform": "a constant map: energy-in-box = pointing = box area / canvas area (the chance level)",
}

LOCALISATION_SCHEMA = schema.LOCALISATION_SCHEMA  # defined with every other schema (io/schema.py)


@config_class
class LocaliseConfig:
    sweep: Annotated[str, Field(description="sweep folder: sweep_config.json (resolved units) and decompose/maps/")] = "results/cifar10_resnets"
    models: Annotated[tuple[str, ...] | None, Field(description="model tags to measure, e.g. cifar_resnet20,cifar_resnet56 (default: every model)")] = None
    k: Annotated[int, Field(description="channels per class map (the frequency map at k1 = k2 = k)")] = 5
    canvas: Annotated[int, Field(description="canvas side in pixels (the image keeps its size: 32 px on 64 covers 25 %, on 96 11 %)")] = 64
    background: Annotated[str, Field(description="blur (another class's image, blurred), scramble (its patches shuffled) or noise")] = "blur"
    n_images: Annotated[int | None, Field(description="images of the split: a seeded random subset of this size (default: all)")] = None
    random_seeds: Annotated[int, Field(description="random channel sets per class; each is scored, the scores averaged per image")] = 10
    seed: Annotated[int, Field(description="seed of the subset and the canvases (positions, backgrounds)")] = 0
    batch_size: Annotated[int, Field(description="canvases per forward pass")] = 250
    split: Annotated[str | None, Field(description="the split to paste (default: the sweep's eval_split)")] = None
    use_gpu: Annotated[bool | None, Field(description="None: CUDA where this process sees one; the run is strict fp32 either way")] = None
    output: Annotated[str | None, Field(description="where localisation/ goes (default: the sweep folder)")] = None

    def __post_init__(self) -> None:
        if self.background not in canvas_lib.BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(canvas_lib.BACKGROUNDS)}, got {self.background!r}")
        if self.k < 1 or self.random_seeds < 1 or self.batch_size < 1:
            raise ValueError(f"k, random_seeds and batch_size must be >= 1, got {self.k}, {self.random_seeds}, "
                             f"{self.batch_size}")
        if self.n_images is not None and self.n_images < 1:
            raise ValueError(f"n_images must be >= 1 (or none for the whole split), got {self.n_images}")
        if self.canvas < 1:
            raise ValueError(f"canvas must be >= 1 px, got {self.canvas}")

    def settings(self) -> dict[str, Any]:
        """What defines the measurement (not where it runs or goes): the hash beside each model's rows."""
        return {k: getattr(self, k) for k in ("k", "canvas", "background", "n_images", "random_seeds", "seed", "split")}


def _maps_file(root: str, model: str, sweep_cfg: dict[str, Any]) -> str:
    """The model's maps file, of the selection the sweep's config names."""
    f = layout.sweep_maps_file(root, model=model, sweep_config=sweep_cfg)
    if f is None:
        raise FileNotFoundError(f"no maps for {model} of the sweep's selection under decompose/maps/ of {root}")
    return f


def localisation_set(*, unit: dict[str, Any], preprocessing: Any, split: str, n_images: int | None, seed: int,
                     canvas: int, background: str) -> dict[str, np.ndarray]:
    """The pasted test set of one unit's dataset: ``sample_id``, ``label``, ``canvas`` (N, H, W, C) uint8,
    ``box`` (N, 4), ``donor_sample_id``, ``skipped`` (rows that could not be decoded).

    The subset is ``sorted(default_rng(seed).permutation(N)[:n_images])`` (all rows where
    ``n_images`` is none or ≥ N); positions and donors are seeded per ``sample_id``."""
    src = unit_source(unit)
    cols = src.read_numpy(split)
    n_all = len(cols["sample_id"])
    rows = np.arange(n_all) if n_images is None or n_images >= n_all else \
        np.sort(np.random.default_rng(seed).permutation(n_all)[:n_images])
    t0 = time.perf_counter()
    imgs, sids, labels, skipped = [], [], [], 0
    for s in range(0, len(rows), 1000):
        batch = {name: np.asarray(v)[rows[s:s + 1000]] for name, v in cols.items()}
        prep = prepare_batch(batch, preprocessing=preprocessing)
        ok = prep["ok"]
        skipped += int((~ok).sum())
        imgs.append(prep["image"][ok])
        sids.append(prep["sample_id"][ok])
        labels.append(prep["label"][ok])
    images, sample_id, label = np.concatenate(imgs), np.concatenate(sids), np.concatenate(labels)
    canv, boxes = canvas_lib.paste_on_canvas(images=images, labels=label, canvas=canvas, background=background,
                                             seed=seed, ids=sample_id)
    _, donors = canvas_lib.canvas_layout(labels=label, image_size=images.shape[1:3], canvas=canvas, seed=seed,
                                         ids=sample_id)
    donor_label = label[donors]
    num_classes = len(src.classes)
    other = np.array([other_class(int(y), int(b), num_classes=num_classes, seed=seed, sample_id=int(i))
                      for y, b, i in zip(label, donor_label, sample_id)], dtype=np.int64)
    print(f"[localise] {len(sample_id)} {split} images pasted on {canvas}x{canvas} canvases ({background}) in "
          f"{time.perf_counter() - t0:.1f} s" + (f"; {skipped} undecodable, skipped" if skipped else ""), flush=True)
    return {"sample_id": sample_id, "label": label, "canvas": canv, "box": boxes,
            "donor_sample_id": sample_id[donors], "donor_label": donor_label, "other_label": other,
            "skipped": np.int64(skipped)}


def other_class(label: int, donor_label: int, *, num_classes: int, seed: int, sample_id: int) -> int:
    """The control class of one canvas: uniform among the classes that are neither ``label`` nor the
    background's (``default_rng([seed, sample_id, 3])``); the background's class where no third exists."""
    pool = [c for c in range(num_classes) if c not in (label, donor_label)]
    if not pool:
        return donor_label
    return int(pool[np.random.default_rng([int(seed), int(sample_id), 3]).integers(len(pool))])


def score_batch(*, feature_maps: torch.Tensor, labels: np.ndarray, boxes: np.ndarray, size: int,
                sets: dict[str, np.ndarray], random_sets: list[np.ndarray], weight: np.ndarray,
                controls: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Per method, ``{energy, pointing, empty, n_maps}`` (arrays over the batch) of the true class's maps.

    ``sets``: method → (C, k) channel sets; ``random_sets``: one (C, k) per seed (their scores
    are averaged per image); ``weight``: the head's W (C, m) for the CAM (and, with
    ``sets["selected"]``, the CAM restricted to the selected channels); ``controls``: method →
    the class (B,) whose selected channels are scored instead of the true class's."""
    a = feature_maps.float().cpu()
    out: dict[str, dict] = {}

    def score(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        up = loc.upsample(m, size=size)
        e, empty = loc.energy_in_box(maps=up, boxes=boxes)
        return e, loc.pointing_game(maps=up, boxes=boxes).astype(np.float64), empty

    for name, idx in sets.items():
        e, p, empty = score(loc.channel_sum(feature_maps=a, channels=idx[labels]))
        out[name] = {"energy": e, "pointing": p, "empty": empty.astype(np.int64), "n_maps": 1}
    if "selected" in sets:
        sel = sets["selected"]
        for name, cls in (controls or {}).items():
            e, p, empty = score(loc.channel_sum(feature_maps=a, channels=sel[np.asarray(cls, dtype=np.int64)]))
            out[name] = {"energy": e, "pointing": p, "empty": empty.astype(np.int64), "n_maps": 1}
        masked = np.zeros_like(weight)
        rows = np.arange(weight.shape[0])[:, None]
        masked[rows, sel] = weight[rows, sel]
        e, p, empty = score(loc.weighted_sum(feature_maps=a, weights=masked[labels]))
        out["cam_selected"] = {"energy": e, "pointing": p, "empty": empty.astype(np.int64), "n_maps": 1}
    acc = [score(loc.channel_sum(feature_maps=a, channels=r[labels])) for r in random_sets]
    out["random"] = {"energy": np.mean([x[0] for x in acc], 0), "pointing": np.mean([x[1] for x in acc], 0),
                     "empty": np.sum([x[2] for x in acc], 0).astype(np.int64), "n_maps": len(acc)}
    e, p, empty = score(loc.weighted_sum(feature_maps=a, weights=weight[labels]))
    out["cam"] = {"energy": e, "pointing": p, "empty": empty.astype(np.int64), "n_maps": 1}
    u = loc.uniform_energy(boxes=boxes, size=size)
    out["uniform"] = {"energy": u, "pointing": u, "empty": np.zeros(len(u), np.int64), "n_maps": 1}
    return out


def localise_model(cfg: LocaliseConfig, *, model: str, unit: dict[str, Any], maps_file: str, split: str,
                   cache: dict[Any, dict[str, np.ndarray]]) -> tuple[pa.Table, dict[str, Any]]:
    """Run one model over the pasted set; its rows and what ran (images, accuracy on the canvases, seconds)."""
    t0 = time.perf_counter()
    backbone = load_unit_backbone(unit)
    pre = backbone.preprocessing
    maps = pd.read_parquet(maps_file)
    sets = {"selected": map_from_table(maps, strategy="frequency", k1=cfg.k, k2=cfg.k).idx}
    na = selection.K1_NOT_APPLICABLE
    for name in ("weight_l1", "contribution"):
        if (maps["strategy"] == name).any():
            sets[name] = map_from_table(maps, strategy=name, k1=na, k2=cfg.k).idx
    C, m = backbone.num_classes, backbone.feature_dim
    if sets["selected"].shape[0] != C:
        raise ValueError(f"{model}: the maps have {sets['selected'].shape[0]} classes, the head {C}")
    random_sets = [loc.random_channel_sets(num_classes=C, feature_dim=m, k=cfg.k, seed=s) for s in range(cfg.random_seeds)]
    weight = backbone.head.weight.detach().cpu().numpy().astype(np.float32)

    # The pasted set depends on the data and its decoding, not on the model: made once per dataset.
    key = (unit.get("dataset_abs") or unit["dataset"], split, pre.size, pre.channels, pre.resize)
    if key not in cache:
        cache[key] = localisation_set(unit=unit, preprocessing=pre, split=split, n_images=cfg.n_images,
                                      seed=cfg.seed, canvas=cfg.canvas, background=cfg.background)
    data = cache[key]
    n = len(data["sample_id"])
    rt = Runtime(device=resolve_device(cfg.use_gpu), precision="fp32", mean=pre.mean, std=pre.std)
    backbone = rt.prepare(backbone)
    parts: dict[str, dict[str, list]] = {}
    preds: list[np.ndarray] = []
    every = max(1, (n // cfg.batch_size) // 10)
    print(f"[localise] {model}: {n} canvases, {len(sets) + 6} methods, "
          f"{cfg.random_seeds} random seeds, on {rt.device}", flush=True)
    t1 = time.perf_counter()
    for b, s in enumerate(range(0, n, cfg.batch_size)):
        e = min(n, s + cfg.batch_size)
        a = last_block_maps(backbone, rt.images(data["canvas"][s:e]))
        if a.shape[1] != m:
            raise ValueError(f"{model}: the last block has {a.shape[1]} channels but the head reads {m} features")
        with torch.inference_mode():
            preds.append(backbone.head(a.mean((2, 3))).argmax(1).cpu().numpy())
        res = score_batch(feature_maps=a, labels=data["label"][s:e].astype(np.int64), boxes=data["box"][s:e],
                          size=cfg.canvas, sets=sets, random_sets=random_sets, weight=weight,
                          controls={"other_class": data["other_label"][s:e],
                                    "background_class": data["donor_label"][s:e]})
        for name, r in res.items():
            d = parts.setdefault(name, {"energy": [], "pointing": [], "empty": [], "n_maps": r["n_maps"]})
            for f in ("energy", "pointing", "empty"):
                d[f].append(r[f])
        if (b + 1) % every == 0 or e == n:
            dt = time.perf_counter() - t1
            print(f"[localise] {model}: {e}/{n} canvases, {e / dt:.0f} img/s, {dt / e * (n - e):.0f} s left",
                  flush=True)
    pred = np.concatenate(preds)
    methods = [x for x in METHODS if x in parts]
    nm = len(methods)

    def rep(v: Any) -> np.ndarray:  # one row per (method, image), method-major
        return np.tile(np.asarray(v), nm)

    box = data["box"]
    cols = {
        "model": np.full(n * nm, model, dtype=object),
        "image": rep(np.arange(n)), "sample_id": rep(data["sample_id"]), "label": rep(data["label"]),
        "pred": rep(pred), "method": np.repeat(np.array(methods, dtype=object), n),
        "energy_in_box": np.concatenate([np.concatenate(parts[x]["energy"]) for x in methods]),
        "pointing": np.concatenate([np.concatenate(parts[x]["pointing"]) for x in methods]),
        "empty_maps": np.concatenate([np.concatenate(parts[x]["empty"]) for x in methods]),
        "n_maps": np.repeat([parts[x]["n_maps"] for x in methods], n),
        "k": np.full(n * nm, cfg.k), "canvas": np.full(n * nm, cfg.canvas),
        "background": np.full(n * nm, cfg.background, dtype=object), "seed": np.full(n * nm, cfg.seed),
        "x0": rep(box[:, 0]), "y0": rep(box[:, 1]), "x1": rep(box[:, 2]), "y1": rep(box[:, 3]),
        "donor_sample_id": rep(data["donor_sample_id"]), "donor_label": rep(data["donor_label"]),
        "other_label": rep(data["other_label"]),
    }
    table = pa.Table.from_arrays([pa.array(cols[f.name], type=f.type) for f in LOCALISATION_SCHEMA],
                                 schema=LOCALISATION_SCHEMA)
    acc = float((pred == data["label"]).mean() * 100)
    info = {"maps_file": maps_file, "unit": unit, "images": int(n), "skipped": int(data["skipped"]),
            "methods": methods, "canvas_accuracy_pct": round(acc, 2), "device": str(rt.device),
            "seconds": round(time.perf_counter() - t0, 1), "rows": table.num_rows,
            "settings": cfg.settings(), "settings_hash": config_lib.config_hash(cfg.settings())}
    return table, info


def result_name(model: str, background: str) -> str:
    """The name of one (model, background)'s rows under ``localisation/``: ``<model>__<background>``."""
    return f"{model}__{background}"


def run_localise(cfg: LocaliseConfig) -> dict[str, Any]:
    """Measure every chosen model of the sweep; returns ``{"output", "files", "models"}``."""
    t0 = time.perf_counter()
    root = cfg.sweep.rstrip("/")
    fs, path = storage.resolve(root)
    sweep_cfg = storage.read_json(fs, f"{path}/sweep_config.json")
    if sweep_cfg is None:
        raise FileNotFoundError(f"{root}/sweep_config.json not found: --sweep must be a sweep's output folder")
    units = {u["key"]: u for u in sweep_cfg.get("resolved", {}).get("units", [])}
    models = list(cfg.models) if cfg.models is not None else list(units)
    unknown = [x for x in models if x not in units]
    if unknown or not models:
        raise ValueError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; the sweep has {', '.join(units)}")
    split = cfg.split or sweep_cfg.get("config", {}).get("eval_split", "test")
    maps_files = {x: _maps_file(root, x, sweep_cfg) for x in models}  # every model checked before any work
    out = (cfg.output or root).rstrip("/")
    out_dir = storage.join(out, "localisation")
    storage.check_writable(out_dir)
    ofs, opath = storage.resolve(out_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"[localise] {len(models)} model(s) of {root}, {split} split, k = {cfg.k}, canvas {cfg.canvas} px, "
          f"background {cfg.background} -> {out_dir}", flush=True)
    cache: dict[Any, dict[str, np.ndarray]] = {}
    written, infos = [], {}
    previous = storage.read_json(ofs, f"{opath}/localise_config.json") or {}
    for model in models:
        table, info = localise_model(cfg, model=model, unit=units[model], maps_file=maps_files[model], split=split,
                                     cache=cache)
        # one file per (model, background): the three backgrounds of one model sit side by side
        written.append(storage.write_parquet(ofs, f"{opath}/{result_name(model, cfg.background)}.parquet", table))
        infos[result_name(model, cfg.background)] = info
        # Rewritten after every model, so a run stopped midway still describes the files it wrote;
        # models measured by an earlier run keep their entries (each carries its own settings).
        resolved = {
            "config": config_lib.to_dict(cfg), "settings_hash": config_lib.config_hash(cfg.settings()),
            "started_at": started, "sweep": root, "split": split, "versions": config_lib.versions(),
            "background": canvas_lib.DESCRIPTIONS[cfg.background], "methods": METHOD_DOC,
            "scores": {"energy_in_box": "Σ_{p∈box} max(M_p,0) / Σ_p max(M_p,0) on the map upsampled bilinearly to the "
                                        "canvas; 0 for a map with no positive mass (counted in empty_maps)",
                       "pointing": "1 if argmax_p M_p lies in the box (first maximum in row-major order; a constant "
                                   "map scores 0)"},
            "models": {**previous.get("models", {}), **infos},
        }
        storage.write_json(ofs, f"{opath}/localise_config.json", resolved)
        print(f"[localise] {model}: wrote {table.num_rows} rows ({info['images']} images × {len(info['methods'])} "
              f"methods; {info['canvas_accuracy_pct']:.2f} % of canvases classified correctly) in {info['seconds']:.1f} s",
              flush=True)
    print(f"[localise] done: {len(written)} model(s) in {time.perf_counter() - t0:.1f} s -> {out_dir}", flush=True)
    return {"output": out_dir, "files": written, "models": infos}


__all__ = ["LOCALISATION_SCHEMA", "METHODS", "METHOD_DOC", "LocaliseConfig", "localisation_set", "localise_model",
           "run_localise", "score_batch"]


# The command line (jobs/localise.py, ``dtd-ray``): it prints its own progress; the returned
# summary is for library callers.
COMMAND = Command(summary="Measure localisation: do the selected channels fire on the object? Writes <sweep>/localisation/.", config=LocaliseConfig, run=run_localise)
