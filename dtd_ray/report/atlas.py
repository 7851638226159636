"""The feature atlas: a static web page per sweep that shows each class's filters, what they respond to and
where on the image they fire.

For every model of a sweep, at one k (default 5):

* **overview**: the full and decomposed accuracy (frequency map), the channels any class uses, and the
  class × feature matrix of the maps (which classes share which filters) with the overlap counts;
* **one section per class**: its selected features in frequency order, each with its count (the class's
  instances that have it in their top-k1) and its weight ``W[y, j]``; the feature's top-activating training
  images (one row of the class's own, one of any class), each with the feature's channel map over it; the
  feature's mean activation per class (a small bar chart); and the class's confusion, where its test
  errors go, with the full and with the decomposed head;
* **comparison**: the same class's features under a second strategy (default ``contribution``), those it
  shares with frequency marked, each with its own-class top images.

Every top image comes from one pass over the train records: :func:`top_rows` ranks every column of the
(N, m) feature matrix at once (one ``argpartition``), and the own-class rows rank each class's selected
columns at once. Channel maps are computed only for the images shown. The page is plain HTML and CSS with
one small inline script (it counts images that failed to load, for the browser test) and loads nothing
from the network. Where images or weights are missing it says what it left out, and why, and builds the
rest. Models with more than ``per_class_pages_over`` classes get one page per class behind the index.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd

from pydantic import Field

from dtd_ray import console
from dtd_ray.cli import Command
from dtd_ray.config import config_class
from dtd_ray.core import heads, localisation, selection
from dtd_ray.io import records, schema, storage
from dtd_ray.io.maptables import map_from_table
from dtd_ray.models.linear_head import load_head
from dtd_ray.report.tables import read_sweep


@config_class
class AtlasConfig:
    sweep: Annotated[str, Field(description="the sweep's output folder (local or s3://…): sweep_config.json, trials/, decompose/, records/")] = "runs/quickstart"
    output: Annotated[str | None, Field(description="the site's folder (default: <sweep>/atlas, for a local sweep)")] = None
    k: Annotated[int, Field(description="k1 = k2 of the maps shown (must be in the sweep's grid)")] = 5
    strategy: Annotated[str, Field(description="the strategy each class section shows")] = "frequency"
    compare: Annotated[str | None, Field(description="the strategy set beside it (None: no comparison)")] = "contribution"
    top: Annotated[int, Field(description="top-activating training images per row")] = 8
    models: Annotated[tuple[str, ...] | None, Field(description="model tags (default: every model of the sweep)")] = None
    split: Annotated[str | None, Field(description="the split the top images come from (default: the sweep's train split)")] = None
    scale: Annotated[int, Field(description="on-screen magnification of the images (CSS; the files keep the data's resolution)")] = 2
    per_class_pages_over: Annotated[int, Field(description="more classes than this: one page per class (ImageNet), else one page")] = 50

    def __post_init__(self) -> None:
        for s in (self.strategy, self.compare):
            if s is not None and s not in selection.STRATEGIES:
                raise ValueError(f"unknown strategy {s!r}; valid: {', '.join(selection.STRATEGIES)}")
        if self.k < 1 or self.top < 1 or self.scale < 1:
            raise ValueError("k, top and scale must be >= 1")


# ----------------------------------------------------------------------------- the numbers


def top_rows(values: np.ndarray, n: int) -> np.ndarray:
    """``(n', m)`` row indices of the ``n' = min(n, N)`` largest values of every column of ``values`` (N, m),
    largest first (ties: the lower row first): one ``argpartition`` for all columns."""
    v = np.asarray(values)
    n = min(int(n), v.shape[0])
    if n == 0:
        return np.zeros((0, v.shape[1]), np.int64)
    part = np.argpartition(-v, n - 1, axis=0)[:n] if n < v.shape[0] else np.tile(np.arange(v.shape[0])[:, None], (1, v.shape[1]))
    vals = np.take_along_axis(v, part, axis=0)
    # sort each column's n candidates: by value desc, then row asc (lexsort's last key is primary)
    order = np.lexsort((part, -vals), axis=0)
    return np.take_along_axis(part, order, axis=0).astype(np.int64)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, m)``: the mean of each feature over each class's instances."""
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels, features)
    n = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return sums / np.maximum(n, 1)[:, None]


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts: row = true class, column = predicted class."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (labels, preds), 1)
    return out


def overlap_counts(idx: np.ndarray) -> np.ndarray:
    """``(C, C)``: ``|I_a ∩ I_b|``, the features two classes' maps share (the diagonal is k)."""
    C = idx.shape[0]
    member = np.zeros((C, int(idx.max()) + 1), np.int64)
    member[np.arange(C)[:, None], idx] = 1
    return member @ member.T


# ----------------------------------------------------------------------------- images


def _save_strip(tiles: list[np.ndarray], path: str) -> None:
    """Tiles (h, w, 3) uint8 side by side, saved losslessly as WebP."""
    from PIL import Image

    strip = np.concatenate(tiles, axis=1)
    # method 1 of libwebp's 0-6 effort scale: on a sample of the quickstart's strips, 9x faster
    # than method 4 (most of the atlas' time went to encoding) for files 1 % larger.
    Image.fromarray(strip).save(path, format="WEBP", lossless=True, method=1)


def overlay(image: np.ndarray, cmap_values: np.ndarray | None) -> np.ndarray:
    """The image (h, w, c) uint8 with a [0, 1] map (h, w) blended over it in the jet colours, as RGB uint8."""
    import matplotlib

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    if cmap_values is None:
        return rgb
    heat = matplotlib.colormaps["jet"](np.clip(cmap_values, 0, 1))[..., :3] * 255
    return (0.5 * rgb + 0.5 * heat).astype(np.uint8)


class _Pixels:
    """The images of one split, decoded once as the backbone expects them, and their channel maps."""

    def __init__(self, unit: dict[str, Any], split: str, backbone: Any | None) -> None:
        from dtd_ray.stages.units import unit_source

        self.src = unit_source(unit)
        self.cols = self.src.read_numpy(split)
        self.row_of = {int(s): i for i, s in enumerate(self.cols["sample_id"])}
        self.backbone = backbone
        self.classes = list(self.src.classes)

    def prepare(self, sample_ids: np.ndarray, preprocessing: Any) -> np.ndarray:
        from dtd_ray.data.transforms import prepare_batch

        rows = np.array([self.row_of[int(s)] for s in sample_ids])
        batch = {name: np.asarray(v)[rows] for name, v in self.cols.items()}
        return prepare_batch(batch, preprocessing=preprocessing)["image"]

    def channel_maps(self, images: np.ndarray) -> np.ndarray:
        """``(N, C, h, w)`` last-block maps of the images (uint8 NHWC), on the CPU in fp32."""
        import torch

        from dtd_ray.models.runtime import Runtime
        from dtd_ray.stages.units import last_block_maps

        pre = self.backbone.preprocessing
        rt = Runtime(device=torch.device("cpu"), precision="fp32", mean=pre.mean, std=pre.std)
        out = []
        with torch.inference_mode():
            for s in range(0, len(images), 256):
                out.append(last_block_maps(self.backbone, rt.images(images[s:s + 256])).numpy())
        return np.concatenate(out) if out else np.zeros((0,))


# ----------------------------------------------------------------------------- one model


@dataclass
class _ModelData:
    key: str
    classes: list[str]
    idx: np.ndarray  # (C, k) the strategy's map
    count: np.ndarray | None  # (C, k) frequency counts
    cmp_idx: np.ndarray | None  # (C, k) the comparison strategy's map
    weight: np.ndarray | None  # (C, m)
    acc_full: float
    acc_dec: float | None
    acc_cmp: float | None
    means: np.ndarray  # (C, m) mean feature per class (train)
    conf_full: np.ndarray
    conf_dec: np.ndarray | None
    top_any: np.ndarray  # (top, m) sample ids
    top_own: dict[tuple[int, int], np.ndarray]  # (class, feature) -> sample ids
    strips: dict[tuple[str, int, int], str]  # (row kind, class, feature) -> file name
    notes: list[str]
    tile: int = 32  # the images' side in pixels, as drawn


def _model_data(cfg: AtlasConfig, sw: Any, unit: dict[str, Any], out_dir: str, split: str) -> _ModelData:
    key = unit["key"]
    notes: list[str] = []
    maps = pd.read_parquet(sw.maps_files[key])
    def k1_of(strategy: str) -> int:
        return selection.K1_NOT_APPLICABLE if strategy in selection.K1_INDEPENDENT else cfg.k

    cm = map_from_table(maps, strategy=cfg.strategy, k1=k1_of(cfg.strategy), k2=cfg.k)
    cmp_idx = None
    if cfg.compare is not None and (maps["strategy"] == cfg.compare).any():
        cmp_idx = map_from_table(maps, strategy=cfg.compare, k1=k1_of(cfg.compare), k2=cfg.k).idx
    elif cfg.compare is not None:
        notes.append(f"no {cfg.compare} map in the sweep: the comparison is left out")
    t = sw.trials
    rows = t[(t["model"] == key) & (t["retrain_mode"] == "none") & (t["k2"] == cfg.k)]
    acc_of = rows.groupby("strategy")["acc_decomposed"].mean()
    acc_full = float(t[t["model"] == key]["acc_full"].iloc[0])
    root = storage.join(sw.root, "records")
    train = records.load_records(root, model=key, split=split, columns=[schema.LABEL, schema.FEATURES])
    f, y = train[schema.FEATURES], train[schema.LABEL].astype(np.int64)
    ids = train[schema.SAMPLE_ID]
    C = cm.idx.shape[0]
    test = records.load_records(root, model=key, split=str(t["eval_split"].iloc[0]),
                                columns=[schema.LABEL, schema.PRED, schema.FEATURES])
    weight = conf_dec = None
    try:  # the head extraction stored beside the records: no network needed for W
        weight, bias, _ = load_head(root=root, manifest=records.read_manifest(root, model=key, split=split))
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        notes.append(f"no head ({str(e).splitlines()[0]}): no W[y, j], no decomposed confusion")
    backbone = None
    try:
        from dtd_ray.stages.units import load_unit_backbone

        backbone = load_unit_backbone(unit)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        notes.append(f"weights not loadable ({str(e).splitlines()[0]}): no channel maps over the images")
    if weight is not None:
        z = heads.decomposed_logits(features=test[schema.FEATURES], weight=weight, bias=bias, idx=cm.idx)
        conf_dec = confusion(test[schema.LABEL].astype(np.int64), z.argmax(1).numpy(), C)
    conf_full = confusion(test[schema.LABEL].astype(np.int64), test[schema.PRED].astype(np.int64), C)
    # one pass: the top rows of every feature over all classes, then of each class's shown features
    top_any = ids[top_rows(f, cfg.top)]
    shown = {c: list(dict.fromkeys(list(cm.idx[c]) + (list(cmp_idx[c]) if cmp_idx is not None else [])))
             for c in range(C)}
    top_own: dict[tuple[int, int], np.ndarray] = {}
    for c in range(C):
        rows_c = np.flatnonzero(y == c)
        feats = np.array(shown[c], np.int64)
        best = top_rows(f[rows_c][:, feats], cfg.top)
        for j, feat in enumerate(feats):
            top_own[(c, int(feat))] = ids[rows_c[best[:, j]]]
    data = _ModelData(key=key, classes=[], idx=cm.idx, count=cm.count, cmp_idx=cmp_idx, weight=weight,
                      acc_full=acc_full, acc_dec=float(acc_of[cfg.strategy]) if cfg.strategy in acc_of else None,
                      acc_cmp=float(acc_of[cfg.compare]) if cfg.compare in acc_of else None,
                      means=class_means(f, y, C), conf_full=conf_full, conf_dec=conf_dec, top_any=top_any,
                      top_own=top_own, strips={}, notes=notes)
    _draw_strips(cfg, data, unit, split, backbone, out_dir, shown)
    return data


def _draw_strips(cfg: AtlasConfig, data: _ModelData, unit: dict[str, Any], split: str, backbone: Any | None,
                 out_dir: str, shown: dict[int, list[int]]) -> None:
    """One image file per row of top images: every image with the feature's channel map over it."""
    wanted: list[tuple[str, int, int, np.ndarray]] = []
    for c, feats in shown.items():
        for feat in feats:
            wanted.append(("own", c, feat, data.top_own[(c, feat)]))
            if feat in data.idx[c]:
                wanted.append(("any", c, feat, data.top_any[:, feat]))
    try:
        px = _Pixels(unit, split, backbone)
    except (FileNotFoundError, ValueError, OSError) as e:
        data.notes.append(f"images not readable ({str(e).splitlines()[0]}): no top images")
        return
    data.classes = px.classes
    pre = backbone.preprocessing if backbone is not None else None
    if pre is None:
        from dtd_ray.data.preprocessing import Preprocessing

        h = int(np.asarray(px.cols["image"]).shape[1]) if "image" in px.cols else 32
        pre = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, size=h)
    uniq = np.unique(np.concatenate([w[3] for w in wanted]))
    try:
        images = px.prepare(uniq, pre)
    except (OSError, ValueError) as e:
        data.notes.append(f"images not readable ({str(e).splitlines()[0]}): no top images")
        return
    pos = {int(s): i for i, s in enumerate(uniq)}
    maps = px.channel_maps(images) if backbone is not None else None
    size = data.tile = int(images.shape[1])
    os.makedirs(out_dir, exist_ok=True)
    for kind, c, feat, sids in wanted:
        rows = [pos[int(s)] for s in sids]
        heats = localisation.upsample(maps[rows, feat], size=size) if maps is not None else [None] * len(rows)
        tiles = [overlay(images[i], None if h is None else h / max(float(h.max()), 1e-8))
                 for i, h in zip(rows, heats)]
        name = f"{kind}_c{c}_f{feat}.webp"
        _save_strip(tiles, os.path.join(out_dir, name))
        data.strips[(kind, c, feat)] = name


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 2em 4em;color:#222;max-width:1400px}
h1{margin-top:.6em} h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin:1.4em 0 .3em} table{border-collapse:collapse;margin:.4em 0} td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right} th{background:#f4f4f4} .feat{display:flex;gap:1.2em;align-items:flex-start;margin:.5em 0 1em;
flex-wrap:wrap} .strips img{display:block;margin:2px 0;image-rendering:pixelated} .note{color:#a40}
.shared{background:#dfd} .m{background:#36c;color:#fff} .idx a{margin-right:.6em} nav{position:sticky;top:0;
background:#fff;padding:.3em 0;border-bottom:1px solid #eee} code{background:#f4f4f4;padding:0 3px}
"""

_CHECK = """<script>
window.addEventListener('load',function(){var b=0;document.querySelectorAll('img').forEach(function(i){
if(!i.complete||i.naturalWidth===0){b++;}});document.body.setAttribute('data-broken-images',String(b));
document.body.setAttribute('data-images',String(document.images.length));});
</script>"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _bars(values: np.ndarray, classes: list[str], highlight: int) -> str:
    """A small inline SVG bar chart: one bar per class, the section's class in blue."""
    w, h, n = 150, 40, len(values)
    top = max(float(np.max(values)), 1e-8)
    bw = w / max(n, 1)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - h * v / top:.1f}" width="{bw * 0.8:.1f}" height="{h * v / top:.1f}" '
        f'fill="{"#36c" if i == highlight else "#999"}"><title>{_e(classes[i] if i < len(classes) else i)}: '
        f'{v:.3f}</title></rect>' for i, v in enumerate(values))
    return f'<svg width="{w}" height="{h}" role="img" aria-label="mean activation per class">{bars}</svg>'


def _img(src: str, ids: np.ndarray, alt: str, scale: int, size: int, n: int) -> str:
    return (f'<img src="{_e(src)}" alt="{_e(alt)}" width="{size * n * scale}" height="{size * scale}" '
            f'data-sample-ids="{",".join(str(int(s)) for s in ids)}">')


def _class_section(cfg: AtlasConfig, d: _ModelData, c: int, prefix: str, size: int) -> str:
    names = d.classes or [str(i) for i in range(d.idx.shape[0])]
    L = [f'<section id="{_e(d.key)}-c{c}" class="cls" data-class="{c}"><h3>{_e(d.key)}: class {c} '
         f'<b>{_e(names[c])}</b></h3>']
    for r, feat in enumerate(d.idx[c]):
        feat = int(feat)
        cnt = f"count {int(d.count[c, r])}" if d.count is not None else ""
        w = f"W[y, j] = {d.weight[c, feat]:+.3f}" if d.weight is not None else ""
        L.append(f'<div class="feat" data-feature="{feat}"><div><b>feature {feat}</b><br>{cnt}<br>{w}<br>'
                 f'{_bars(d.means[:, feat], names, c)}<br><small>mean per class ({_e(names[c])} blue)</small>'
                 f'</div><div class="strips">')
        for kind, label in (("own", f"top {cfg.top} {names[c]} images"), ("any", f"top {cfg.top} of any class")):
            if (kind, c, feat) in d.strips:
                ids = d.top_own[(c, feat)] if kind == "own" else d.top_any[:, feat]
                L.append(f"<small>{_e(label)}</small>" + _img(f"{prefix}{d.strips[(kind, c, feat)]}", ids,
                                                              f"{label}, feature {feat}", cfg.scale, size, len(ids)))
        L.append("</div></div>")
    row = d.conf_full[c]
    errs = [(j, int(row[j])) for j in range(len(row)) if j != c]
    head = "".join(f"<th>{_e(names[j])}</th>" for j, _ in errs)
    L.append(f"<table><tr><th>test errors → predicted</th>{head}</tr>"
             f"<tr><th>full head</th>{''.join(f'<td>{n}</td>' for _, n in errs)}</tr>")
    if d.conf_dec is not None:
        L.append(f"<tr><th>decomposed ({_e(cfg.strategy)}, k = {cfg.k})</th>"
                 f"{''.join(f'<td>{int(d.conf_dec[c, j])}</td>' for j, _ in errs)}</tr>")
    L.append("</table>")
    if d.cmp_idx is not None:
        mine = set(int(x) for x in d.idx[c])
        wt = (lambda x: f" (W {d.weight[c, x]:+.3f})") if d.weight is not None else (lambda x: "")
        L.append(f"<p><b>{_e(cfg.compare)}</b> picks: " + ", ".join(
            f'<span class="{"shared" if int(x) in mine else ""}">{int(x)}{wt(int(x))}</span>' for x in d.cmp_idx[c])
            + f" (shared with {_e(cfg.strategy)} in green)</p><div class='strips'>")
        for x in d.cmp_idx[c]:
            x = int(x)
            if x not in mine and ("own", c, x) in d.strips:
                ids = d.top_own[(c, x)]
                L.append(f"<small>feature {x}, top {names[c]} images</small>"
                         + _img(f"{prefix}{d.strips[('own', c, x)]}", ids, f"{cfg.compare} feature {x}",
                                cfg.scale, size, len(ids)))
        L.append("</div>")
    L.append("</section>")
    return "\n".join(L)


def _overview(cfg: AtlasConfig, d: _ModelData) -> str:
    names = d.classes or [str(i) for i in range(d.idx.shape[0])]
    used = sorted({int(x) for x in d.idx.ravel()})
    acc = f"full {d.acc_full:.2f} %"
    if d.acc_dec is not None:
        acc += f", decomposed ({cfg.strategy}, k = {cfg.k}) {d.acc_dec:.2f} %"
    if d.acc_cmp is not None:
        acc += f", decomposed ({cfg.compare}) {d.acc_cmp:.2f} %"
    L = [f'<h2 id="{_e(d.key)}">{_e(d.key)}</h2>', f"<p>{_e(acc)}; channels used |∪ I_y| = {len(used)} "
         f"of {d.means.shape[1]}.</p>"]
    L += [f'<p class="note">{_e(n)}</p>' for n in d.notes]
    head = "".join(f"<th>{j}</th>" for j in used)
    rows = []
    for c in range(d.idx.shape[0]):
        cells = "".join(f'<td class="{"m" if j in set(int(x) for x in d.idx[c]) else ""}"></td>' for j in used)
        rows.append(f'<tr><th><a href="#{_e(d.key)}-c{c}">{_e(names[c])}</a></th>{cells}</tr>')
    L.append(f"<p>Class × feature: which classes' maps hold which features.</p><table class='matrix'>"
             f"<tr><th>class \\ feature</th>{head}</tr>{''.join(rows)}</table>")
    ov = overlap_counts(d.idx)
    hdr = "".join(f"<th>{_e(n)}</th>" for n in names)
    body = "".join(f"<tr><th>{_e(names[a])}</th>" + "".join(f"<td>{int(ov[a, b])}</td>" for b in range(len(names)))
                   + "</tr>" for a in range(len(names)))
    L.append(f"<p>Features two classes share, |I_a ∩ I_b| (the diagonal is k).</p><table>"
             f"<tr><th></th>{hdr}</tr>{body}</table>")
    L.append('<p class="idx">Classes: ' + " ".join(f'<a href="#{_e(d.key)}-c{c}">{_e(n)}</a>'
                                                    for c, n in enumerate(names)) + "</p>")
    return "\n".join(L)


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}{_CHECK}</body></html>")


def build_atlas(cfg: AtlasConfig) -> dict[str, Any]:
    """Write the atlas (``index.html`` and its images) for a sweep; returns what it wrote and left out."""
    t0 = time.perf_counter()
    sw = read_sweep(cfg.sweep)
    out = cfg.output or (os.path.join(sw.root, "atlas") if storage.is_local(sw.root) else None)
    if out is None or not storage.is_local(out):
        raise ValueError(f"--output must be a local folder (the sweep is at {sw.root})")
    os.makedirs(out, exist_ok=True)
    ks = sorted(set(int(x) for x in sw.trials["k2"]))
    if cfg.k not in ks:
        raise ValueError(f"--k {cfg.k} is not in the sweep's k grid {ks}")
    conf = sw.config.get("config", {})
    split = cfg.split or conf.get("train_split", "train")
    units = {u["key"]: u for u in sw.config.get("resolved", {}).get("units", [])}
    in_trials = set(sw.trials["model"])
    models = list(cfg.models) if cfg.models is not None else \
        [k for k in units if k in in_trials] + sorted(in_trials - set(units))  # the config's order
    nav, body, left_out = [], [], []
    bar = console.progress(total=len(models), desc="[atlas] models", unit="model")
    for key in models:
        try:
            if key not in units or key not in sw.maps_files:
                left_out.append(f"{key}: no resolved unit or maps in the sweep folder")
                continue
            try:
                d = _model_data(cfg, sw, units[key], os.path.join(out, key), split)
            except (FileNotFoundError, ValueError) as e:  # no records, no such map: this model only
                left_out.append(f"{key}: {str(e).splitlines()[0]}")
                continue
            size = d.tile
            left_out += [f"{key}: {n}" for n in d.notes]
            C = d.idx.shape[0]
            sections = [_class_section(cfg, d, c, f"{key}/", size) for c in range(C)]
            if C > cfg.per_class_pages_over:  # ImageNet-size: the index links one page per class
                for c, s in enumerate(sections):
                    with open(os.path.join(out, key, f"class_{c}.html"), "w") as fh:
                        fh.write(_page(f"{key} class {c}", s.replace(f'src="{key}/', 'src="')))
                sections = [f'<p><a href="{_e(key)}/class_{c}.html">class {c}</a></p>' for c in range(C)]
            body.append(_overview(cfg, d) + "\n" + "\n".join(sections))
            nav.append(f'<a href="#{_e(key)}">{_e(key)}</a>')
        finally:
            bar.update(1)
    bar.close()
    resolved = {"sweep": sw.root, "k": cfg.k, "strategy": cfg.strategy, "compare": cfg.compare, "top": cfg.top,
                "split": split, "sweep_config": sw.config.get("config", {}), "units": list(units.values())}
    head = (f"<h1>Feature atlas: {_e(conf.get('name', os.path.basename(sw.root)))}</h1>"
            f"<p>Each class's {cfg.k} {_e(cfg.strategy)} features (k1 = k2 = {cfg.k}), their top-activating "
            f"<code>{_e(split)}</code> images with the feature's channel map over them (jet, own maximum), and "
            f"where each class's test errors go. Every number comes from the sweep's Parquet tables "
            f"(<code>trials/</code>, <code>decompose/maps/</code>, <code>records/</code>); the resolved config is "
            f'<a href="atlas_config.json">atlas_config.json</a>. Made by '
            f"<code>python jobs/atlas.py --sweep {_e(sw.root)} --output {_e(out)}</code>.</p>"
            + "".join(f'<p class="note">left out: {_e(x)}</p>' for x in left_out))
    page = _page(f"atlas {conf.get('name', '')}", f"<nav>{' '.join(nav)}</nav>{head}{''.join(body)}")
    with open(os.path.join(out, "index.html.tmp"), "w") as fh:
        fh.write(page)
    os.replace(os.path.join(out, "index.html.tmp"), os.path.join(out, "index.html"))
    with open(os.path.join(out, "atlas_config.json"), "w") as fh:
        json.dump({**resolved, "left_out": left_out}, fh, indent=2, default=str)
    seconds = time.perf_counter() - t0
    print(f"[atlas] wrote {out}/index.html ({len(nav)} model(s)) in {seconds:.1f} s"
          + (f"; left out: {'; '.join(left_out)}" if left_out else ""), flush=True)
    return {"index": os.path.join(out, "index.html"), "models": len(nav), "left_out": left_out, "seconds": seconds}


__all__ = ["AtlasConfig", "build_atlas", "class_means", "confusion", "overlap_counts", "top_rows"]


# The command line (jobs/atlas.py, ``dtd-ray``): it prints its own progress; the returned
# summary is for library callers.
COMMAND = Command(summary="The feature atlas: a static web page per sweep with each class's filters, their top images and their maps.", config=AtlasConfig, run=build_atlas)
