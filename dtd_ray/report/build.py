"""The report itself: :class:`ReportConfig` and :func:`make_report`, which reads a sweep
folder, draws the plots and writes ``report.md`` (see :mod:`dtd_ray.report` for what it holds)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd

from pydantic import Field

from dtd_ray import console
from dtd_ray.cli import Command
from dtd_ray.config import config_class
from dtd_ray.core import selection, stats
from dtd_ray.io import layout, storage
from dtd_ray.report import protocol
from dtd_ray.report.augmented import augmented_section, augmented_table, parse_published
from dtd_ray.report.cam import cam_figure
from dtd_ray.report.claims import Claim, claims_frame, claims_table, findings
from dtd_ray.report.evidence import Evidence, evidence_or_none
from dtd_ray.report.families import FamilyView, family_view
from dtd_ray.report.localisation_summary import localisation_differences, localisation_section, read_localisation
from dtd_ray.report.plots import (plot_accuracy_vs_k, plot_accuracy_vs_share, plot_gap_vs_depth, plot_head_cost,
                                  plot_kgrid, plot_psi_vs_depth, plot_retraining)
from dtd_ray.report.tables import (EXTRACTION_FILE, MODE_LABELS, SweepOutput, accuracy_by_k, copy_tables,
                                   depth_series, extraction_table, headline_table, markdown_table, model_table,
                                   read_sweep)


@config_class
class ReportConfig:
    sweep: Annotated[str, Field(description="the sweep's output folder (sweep_config.json, trials/, decompose/)")] = "runs/quickstart"
    output: Annotated[str | None, Field(description="where report.md and plots/ go (default: the sweep folder); another folder also gets the tables")] = None
    k: Annotated[int, Field(description="the fixed k of the depth plots and the headline table (must be in the sweep's grid)")] = 5
    cam_images: Annotated[int, Field(description="test images per class in the activation maps (0: no activation maps)")] = 2
    cam_models: Annotated[tuple[str, ...] | None, Field(description="models (tags) to draw activation maps for (default: every model)")] = None
    cam_strategy: Annotated[str, Field(description="the strategy whose selected channels the activation maps show")] = "frequency"
    cam_classes: Annotated[int, Field(description="at most this many classes (rows) per activation-map figure")] = 10
    cam_correct_only: Annotated[bool, Field(description="show only test images the model classifies correctly")] = True
    augmented: Annotated[str | None, Field(description="another sweep folder of the same models whose maps come from an augmented pass (select_augment): compared with this sweep's at k")] = None
    published: Annotated[str | None, Field(description="model=path.json[,…]: a published map at k1 = k2 = k to count the overlap of both sweeps' maps with (may use ${data_root})")] = None
    data_root: Annotated[str, Field(description="replaces ${data_root} in published")] = "../shared/data"
    replication: Annotated[str | None, Field(description="another sweep folder on the same test set whose depth series of other checkpoints replicate C3 (e.g. results/cifar10_zoo: the projection-shortcut ResNets)")] = None

    def __post_init__(self) -> None:
        if self.cam_images < 0 or self.cam_classes < 1 or self.k < 1:
            raise ValueError("cam_images must be >= 0, cam_classes and k >= 1")


@dataclass
class ReportTables:
    """Every number the report's text states, computed from a sweep folder (see :func:`report_tables`)."""

    evidence: Evidence | None
    models: pd.DataFrame
    headline: pd.DataFrame
    claims: list[Claim]
    findings: list[str]
    localisation: pd.DataFrame | None  # selected − each alternative on the canvases, where the sweep has them
    families: FamilyView  # the cross-family questions, where the models differ in family or width
    c1: pd.DataFrame  # C1 by both measures, against the controls, at every margin (protocol.c1_table)
    kgrid: dict[str, dict[str, Any]]  # model -> its (k1, k2) grid and the k1 chosen on validation
    choices: pd.DataFrame  # what the validation split chose


def report_tables(sw: SweepOutput, *, k: int) -> ReportTables:
    """The model table, the headline at ``k``, the claims and the findings of one sweep folder.

    One function for :func:`make_report` and for the test that checks README and the
    committed reports against the committed tables, so the two cannot drift apart.
    """
    trials = sw.trials
    ks = sorted(set(int(x) for x in trials["k2"]))
    if k not in ks:
        raise ValueError(f"--k {k} is not in the sweep's k grid {ks}")
    ev = evidence_or_none(sw.root, trials, selection=layout.sweep_selection(sw.config))
    psi = {m: float(np.nanmean(ev.psi(m))) for m in ev.instances} if ev is not None else None
    models = model_table(trials, sw.analysis, psi=psi)
    loc, _ = read_localisation(sw.root)
    diffs = localisation_differences(loc) if not loc.empty else None
    grids = {}
    if sw.eval_test is not None and len(sw.eval_test) and "frequency" in set(trials["strategy"]):
        grids = {m: protocol.kgrid_tables(sw.eval_test, sw.eval_val, model=m) for m in models["model"]}
    return ReportTables(evidence=ev, models=models, headline=headline_table(trials, models, k=k),
                        claims=claims_table(trials, models, k=k, evidence=ev, localisation=diffs,
                                            controls=sw.with_controls),
                        localisation=diffs,
                        findings=findings(trials, models, k=k, evidence=ev),
                        families=family_view(trials, models, k=k, evidence=ev),
                        c1=protocol.c1_table(sw.with_controls if sw.with_controls is not None else trials, ev, k=k,
                                             models=list(models["model"])),
                        kgrid=grids, choices=sw.choices if sw.choices is not None else pd.DataFrame())


def replication_section(root: str, *, k: int, own: set[str]) -> list[str]:
    """C3's rows of another sweep folder whose depth series holds none of this sweep's models: the same
    test of depth on independently trained checkpoints."""
    rt = report_tables(read_sweep(root), k=k)
    series = [(label, mdf) for label, mdf in depth_series(rt.models) if not set(mdf["model"]) & own]
    scopes = {s for label, mdf in series for s in (label, f"{label}: depth")}
    rows = [c for c in rt.claims if c.claim.startswith("C3") and any(c.scope.startswith(s) for s in scopes)]
    if not rows:
        return []
    return ["## C3 on independently trained checkpoints", "",
            f"The same depth test on the other series of `{root}` (same test images; its own trial rows and "
            f"intervals): {', '.join(' → '.join(mdf['model']) for _, mdf in series)}.", "",
            markdown_table(claims_frame(rows))]


def _val_split(trials: pd.DataFrame) -> str | None:
    v = trials["val_split"].dropna().unique() if "val_split" in trials else []
    return str(v[0]) if len(v) else None


def _full_acc(sw: SweepOutput) -> dict[str, tuple[float, float]]:
    """model -> the original head's (validation, test) accuracy (%), from decompose's eval tables."""
    if sw.eval_val is None or sw.eval_test is None or sw.eval_val.empty:
        return {}
    v = sw.eval_val.groupby("model", sort=False)["acc_full"].first() * 100
    t = sw.eval_test.groupby("model")["acc_full"].first() * 100
    return {m: (float(v[m]), float(t[m])) for m in v.index if m in t.index}


def _n_val(sw: SweepOutput) -> int | None:
    ev = sw.eval_val
    return int(ev["n_instances"].iloc[0]) if ev is not None and len(ev) else None


def make_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write ``report.md`` and ``plots/*.png``; returns paths, findings and the headline table."""
    t0 = time.perf_counter()
    sw = read_sweep(cfg.sweep)
    out = (cfg.output or sw.root).rstrip("/")
    # Plots and markdown are drawn in a local folder: ``out`` itself, or for an object store
    # (``s3://…``) a temporary one whose files are uploaded at the end.
    work = out if storage.is_local(out) else tempfile.mkdtemp(prefix="dtd-report-")
    os.makedirs(os.path.join(work, "plots"), exist_ok=True)
    if not storage.same_location(out, sw.root):
        copy_tables(sw.root, out)
    trials = sw.trials
    rt = report_tables(sw, k=cfg.k)
    ev, models, head, claims, facts = rt.evidence, rt.models, rt.headline, rt.claims, rt.findings
    plots: dict[str, str] = {}

    def _p(name: str) -> str:
        return os.path.join(work, "plots", name)

    print(f"[report] {len(trials)} trial rows, {len(models)} model(s) -> {out}", flush=True)
    plot_accuracy_vs_k(trials, models, _p("accuracy_vs_k.png"), evidence=ev)
    plots["Accuracy against k"] = "plots/accuracy_vs_k.png"
    if models["feature_dim"].nunique() > 1 and plot_accuracy_vs_share(trials, models, _p("accuracy_vs_share.png")):
        plots["Accuracy against k and k / m, every model"] = "plots/accuracy_vs_share.png"
    if plot_gap_vs_depth(trials, models, _p("gap_vs_depth.png"), k=cfg.k, evidence=ev):
        plots["Gap to the full head against depth"] = "plots/gap_vs_depth.png"
    if plot_psi_vs_depth(models, _p("psi_vs_depth.png"), evidence=ev):
        plots["Ψ against depth"] = "plots/psi_vs_depth.png"
    if plot_retraining(trials, models, _p("retraining.png"), evidence=ev):
        plots["Retraining recovery"] = "plots/retraining.png"
    plot_head_cost(trials, models, _p("head_cost.png"))
    plots["Head cost"] = "plots/head_cost.png"
    if rt.kgrid and plot_kgrid(rt.kgrid, models, _p("kgrid.png")):
        plots["The (k1, k2) grid, frequency"] = "plots/kgrid.png"

    cams: list[dict[str, Any]] = []
    units = {u["key"]: u for u in sw.config.get("resolved", {}).get("units", [])}
    eval_split = sw.config.get("config", {}).get("eval_split", "test")
    cam_models = (cfg.cam_models if cfg.cam_models is not None else list(models["model"])) if cfg.cam_images > 0 else []
    with console.progress(total=len(cam_models), desc="[report] activation maps", unit="model") as bar:
        for model in cam_models:
            if model not in units or model not in sw.maps_files:
                cams.append({"model": model, "shown": 0, "reason": "no resolved unit or maps for it in the sweep folder"})
                bar.update(1)
                continue
            try:
                info = cam_figure(unit=units[model], maps_file=sw.maps_files[model], k=cfg.k, strategy=cfg.cam_strategy,
                                  n_images=cfg.cam_images, max_classes=cfg.cam_classes, split=eval_split,
                                  path=_p(f"cam_{model}.png"), correct_only=cfg.cam_correct_only)
            except (FileNotFoundError, ValueError, OSError) as e:
                # The tables and the other plots need neither weights nor images: say why and go on.
                info = {"model": model, "shown": 0, "reason": str(e).splitlines()[0]}
            if info.get("shown"):
                plots[f"Activation maps, {model}"] = f"plots/cam_{model}.png"
            else:
                bar.write(f"[report] no activation maps for {model}: {info.get('reason')}")
            cams.append(info)
            bar.update(1)

    extraction = extraction_table(sw.root)
    with open(os.path.join(work, EXTRACTION_FILE), "w") as f:
        json.dump({"rows": extraction.to_dict(orient="records")}, f, indent=2)
    aug_md: list[str] = []
    if cfg.augmented:
        published = parse_published((cfg.published or "").replace("${data_root}", cfg.data_root.rstrip("/")))
        table = augmented_table(sw, read_sweep(cfg.augmented), ev, k=cfg.k, published=published)
        aug_md = augmented_section(table, k=cfg.k, aug_root=cfg.augmented, render=markdown_table)
    if cfg.replication:
        aug_md += replication_section(cfg.replication, k=cfg.k, own=set(models["model"]))
    md = render_markdown(cfg, sw=sw, models=models, head=head, facts=facts, plots=plots, cams=cams,
                         extraction=extraction,
                         claims=claims_frame(claims),
                         localisation=localisation_section(sw.root, differences=rt.localisation),
                         families=rt.families.markdown(markdown_table),
                         protocol_md=protocol.sections(c1=rt.c1, kgrid=rt.kgrid, choices=rt.choices,
                                                       val_split=_val_split(trials), n_val=_n_val(sw),
                                                       table=markdown_table, full_acc=_full_acc(sw)) + aug_md)
    path = os.path.join(work, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write(md)
    os.replace(path + ".tmp", path)
    with open(os.path.join(work, "report_config.json"), "w") as f:
        json.dump({"config": {**cfg.__dict__, "cam_models": list(cfg.cam_models) if cfg.cam_models else None},
                   "cams": cams}, f, indent=2)
    if work != out:  # upload: the plots first, report.md (which links them) last
        storage.copy_tree(os.path.join(work, "plots"), storage.join(out, "plots"))
        for name in ("report_config.json", EXTRACTION_FILE, "report.md"):
            storage.copy_file(os.path.join(work, name), storage.join(out, name))
        shutil.rmtree(work, ignore_errors=True)
        path = storage.join(out, "report.md")
    print(f"[report] wrote {path} and {len(plots)} plot(s) in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"report": path, "plots": {k: storage.join(out, v) for k, v in plots.items()}, "findings": facts,
            "headline": head, "models": models, "cams": cams, "claims": claims}


def render_markdown(
    cfg: ReportConfig,
    *,
    sw: SweepOutput,
    models: pd.DataFrame,
    head: pd.DataFrame,
    facts: list[str],
    plots: dict[str, str],
    cams: list[dict[str, Any]],
    claims: pd.DataFrame | None = None,
    localisation: list[str] | None = None,
    families: list[str] | None = None,
    extraction: pd.DataFrame | None = None,
    protocol_md: list[str] | None = None,
) -> str:
    """The text of ``report.md``: the headline table, the findings, the tables by k, retraining,
    essentiality and Ψ, head cost, the activation maps' summary and the plots (``title → path``)."""
    trials = sw.trials
    name = str(trials["sweep"].iloc[0])
    started = sw.config.get("started_at", "?")
    versions = sw.config.get("versions", {})
    L = [f"# dtd-ray sweep report: {name}", ""]
    again = f"--sweep {sw.root}" + (f" --output {cfg.output}" if cfg.output else "") + "".join(
        f" --{opt} {getattr(cfg, opt)}" for opt in ("augmented", "replication") if getattr(cfg, opt)) + (
        f" --published '{cfg.published}'" if cfg.published else "")
    L.append(f"Made by `python jobs/report.py {again}` from {len(trials)} trial rows "
             f"(sweep started {started}; {', '.join(f'{k} {v}' for k, v in versions.items() if k in ('ray', 'torch'))}). "
             f"Accuracies are % on the `{trials['eval_split'].iloc[0]}` split; the maps were selected on "
             f"`{trials['select_split'].iloc[0]}`; k1 = k2 = k.")
    L += ["", f"## Headline at k = {cfg.k}", ""]
    L.append(markdown_table(head))
    L.append("Columns: `full` the original head; one column per strategy, the decomposed head without "
             "retraining (`random`: the mean over its map seeds); `gap` full − frequency; the retrained heads "
             "(frequency map); Ψ the share of the penultimate features that hold 90 % of an instance's L1 mass "
             "(mean over the evaluation instances; smaller = more concentrated); head MACs decomposed / full per "
             "instance; channels used ∪ I_y.")
    if claims is not None and len(claims):
        L += ["", "## The paper's claims", ""]
        L.append("Each claim of the paper as a measured difference with its 95 % interval (percentile bootstrap, "
                 f"{stats.N_BOOT} resamples of the test images, paired: both numbers of a difference are computed on "
                 "the same resampled images). **supported**: the whole interval lies on the claimed side; "
                 "**contradicted**: it lies wholly on the other side; **not resolved**: it includes no effect.")
        L.append("")
        L.append(markdown_table(claims))
    L += ["", "## What the data says", ""]
    L += [f"- {f}" for f in facts] or ["- (too few points)"]
    if localisation:
        L += [""] + list(localisation)
    if families:
        L += [""] + list(families)
    if protocol_md:
        L += [""] + list(protocol_md)
    L += ["", "## Decomposed accuracy against k (no retraining)", ""]
    acc = accuracy_by_k(trials)
    for s in [s for s in selection.STRATEGIES if s in set(acc["strategy"])]:
        a = acc[acc["strategy"] == s]
        piv = a.pivot_table(index="model", columns="k", values="acc_decomposed")
        if int(a["seeds"].max()) > 1:  # random: mean ± sd over its map seeds
            sd = a.pivot_table(index="model", columns="k", values="acc_decomposed_sd")
            piv = piv.combine(sd, lambda m_, s_: m_.map("{:.2f}".format) + " ± " + s_.map("{:.2f}".format))
            s = f"{s} (mean ± sd over {int(a['seeds'].max())} map seeds)"
        piv = piv.reindex([m for m in models["model"] if m in piv.index])
        piv.insert(0, "full", models.set_index("model")["acc_full"].reindex(piv.index))
        piv.columns = [str(c) if c == "full" else f"k={c}" for c in piv.columns]
        L += [f"**{s}**", "", markdown_table(piv.reset_index())]
    rt = trials[trials["retrain_mode"] != "none"]
    if len(rt):
        L += ["## Retraining", ""]
        t = rt.assign(k=rt["k2"]).pivot_table(index=["model", "strategy", "k"], columns="retrain_mode",
                                              values="acc_retrained", aggfunc="mean")
        base = acc.set_index(["model", "strategy", "k"])["acc_decomposed"]
        t.insert(0, "decomposed", base.reindex(t.index))
        t = t[["decomposed"] + [m for m in ("head", "finetune") if m in t.columns]]
        t.columns = [MODE_LABELS.get(c, c) for c in t.columns]
        secs = rt.groupby("retrain_mode")["seconds"].median()
        L.append(markdown_table(t.reset_index()))
        L.append("Median trial wall time: " + ", ".join(f"{MODE_LABELS[m]} {s:.1f} s" for m, s in secs.items()) + ".")
        L.append("")
    if not sw.analysis.empty:
        L += [f"## Essentiality and Ψ (k = 5, {sw.analysis['split'].iloc[0]} split)", ""]
        a = sw.analysis.groupby(["model", "strategy"], sort=False)[
            ["acc_clean", "acc_selected_noise", "acc_others_noise"]].mean() * 100
        L.append(markdown_table(a.reset_index()))
        L.append("Mean per-class accuracy (%) with the class's k selected features replaced by N(0, 1) noise "
                 "(`acc_selected_noise`) against the other m − k features replaced (`acc_others_noise`); each the "
                 "mean over the noise draws (and, for random, over its map seeds). The intervals of these numbers "
                 "(paired over the test images) are in \"The paper's claims\" (C4).")
        L.append("")
    L += ["## Head cost", ""]
    hc = trials[(trials["retrain_mode"] == "none") & (trials["strategy"] == "frequency")]
    hc = hc.assign(k=hc["k2"]).pivot_table(index="model", columns="k", values="channels_used", aggfunc="first")
    if len(hc):
        hc.columns = [f"k={c}" for c in hc.columns]
        L.append("Channels of the last block any class uses (|∪_y I_y|, frequency maps); the decomposed head "
                 "costs C·k multiply-adds per instance against C·m for the full head.")
        L.append("")
        L.append(markdown_table(models.set_index("model")[["feature_dim"]].join(hc).reset_index(), floatfmt="{:.0f}"))
    if extraction is not None and len(extraction):
        L += ["## Extraction", ""]
        L.append("Each (model, split) partition of `records/` as its manifest states it: the images, the seconds "
                 "from the pipeline's start to its commit (a model actor's start-up included), the rate, the "
                 "actors and whether they ran on a GPU.")
        L.append("")
        L.append(markdown_table(extraction.drop(columns=["finished_at"], errors="ignore"), floatfmt="{:.1f}"))
    if cams:
        L += ["## Class-specific activation maps", ""]
        L.append(f"For the first {'correctly classified ' if cfg.cam_correct_only else ''}`{sw.config.get('config', {}).get('eval_split', 'test')}` "
                 f"images of each class: the image, the sum of the class's {cfg.cam_strategy} channels (k = {cfg.k}) "
                 "of the last block before pooling, upsampled over it, and the same with the random strategy's "
                 "channels: first both on one colour scale per image (colour bar), then each on its own scale. "
                 "`mass ratio`: median over images of the selected map's total activation over the random map's. "
                 "The pictures show; the localisation section measures.")
        L.append("")
        L.append(markdown_table(pd.DataFrame(cams)))
    L += ["## Plots", ""]
    for title, p in plots.items():
        L += [f"### {title}", "", f"![{title}]({p})", ""]
    return "\n".join(L)


# The command line (jobs/report.py, ``dtd-ray``): it prints its own progress; the returned
# summary is for library callers.
COMMAND = Command(summary="The sweep report: report.md with tables and plots/*.png from a sweep's output folder.", config=ReportConfig, run=make_report)
