"""The report's verdicts on the paper's claims, each with the interval that decides it.

The paper (arXiv 2112.07719) makes four contributions and one depth claim; each is
turned here into a measured difference with a 95 % paired bootstrap interval over the
test images (:mod:`dtd_ray.report.evidence`), and a verdict
(:func:`dtd_ray.core.stats.verdict`): **supported** where the whole interval lies on the
claimed side, **contradicted** where it lies on the other, else **not resolved by this
data**. Nothing is written in by hand; where a sweep has no per-instance outcomes the
point estimate is given and the verdict is "not resolved".

* C1 a few filters per class suffice: the gap full − decomposed (frequency map at k) after
  retraining, for each way the sweep retrained (the head alone: the original filters; the whole
  network fine-tuned), each against the full head trained the same way where the sweep has that
  control (else the original head), is below each margin of
  :data:`dtd_ray.report.protocol.MARGINS` (a non-inferiority test: its null is the margin);
* C2 the algorithm finds them: the frequency map beats random maps (mean over the map
  seeds) and the top-|W| map (``weight_l1``) at k;
* C3 depth: the gap at k, and Ψ (the share of features that hold 90 % of an instance's
  L1 mass; smaller = more concentrated), fall with depth: the least-squares slope over every
  depth of a series of ≥ 3 (:func:`dtd_ray.report.protocol.depth_trend`), else the shallowest
  against the deepest;
* C4 the filters are essential and sit on the object: ablating a class's k selected
  features (set to the training mean, or taken from a permuted instance) costs more accuracy
  than the same ablation of k random other features of the class, and more than ablating the
  k of top-|W| or of contribution; (the paper's noise test is a labelled extra in the
  findings); and on canvases with the object at a known place
  (:mod:`dtd_ray.report.localisation_summary`) the selected channels' map puts more of its mass in
  the object's box than another class's selected channels (on every background), the background
  class's, random channels and the CAM do.

(The module is not called ``findings`` so that ``dtd_ray.report.findings`` is
unambiguously the function.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from dtd_ray.core import stats
from dtd_ray.report import protocol
from dtd_ray.report.evidence import Evidence
from dtd_ray.report.tables import MODE_LABELS, accuracy_at, accuracy_by_k, depth_series

NEAR_FULL = max(protocol.MARGINS)  # points: C1's widest margin (every margin of protocol.MARGINS is judged)
NO_OUTCOMES = "not resolved (no per-instance outcomes in this sweep)"


@dataclass(frozen=True)
class Claim:
    """One verdict: which claim, where (a model or a depth pair), what was measured, and the result."""

    claim: str
    scope: str
    measure: str
    value: float
    est: stats.Estimate | None
    verdict: str
    fmt: str = "{:.2f}"

    def interval(self) -> str:
        return self.est.text(self.fmt) if self.est is not None else f"{self.fmt.format(self.value)} (no interval)"


def trend(values: Sequence[float]) -> str:
    """'decreasing' / 'increasing' (strictly monotone), else 'not monotone'; 'one point' for < 2 values."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    if len(v) < 2:
        return "one point"
    dif = np.diff(v)
    if (dif < 0).all():
        return "decreasing"
    if (dif > 0).all():
        return "increasing"
    return "not monotone"


def _verdict(est: stats.Estimate | None, *, expect: str, null: float = 0.0) -> str:
    return NO_OUTCOMES if est is None else stats.verdict(est, expect=expect, null=null)


def _row(trials: pd.DataFrame, model: str, strategy: str, k: int, mode: str) -> pd.DataFrame:
    t = trials
    return t[(t["model"] == model) & (t["strategy"] == strategy) & (t["k2"] == k) & (t["retrain_mode"] == mode)]


def _acc(trials: pd.DataFrame, model: str, strategy: str, k: int, mode: str) -> float:
    """The mean accuracy (%) of the rows (random: over its map seeds); NaN where none."""
    r = _row(trials, model, strategy, k, mode)
    col = "acc_decomposed" if mode == "none" else "acc_retrained"
    return float(r[col].mean()) if len(r) else np.nan


class Measures:
    """Differences of accuracies (points) with paired intervals where the evidence allows."""

    def __init__(self, trials: pd.DataFrame, models: pd.DataFrame, evidence: Evidence | None) -> None:
        self.trials, self.ev = trials, evidence
        self.full_acc = dict(zip(models["model"], models["acc_full"]))

    def vec(self, model: str, strategy: str | None, k: int, mode: str = "none") -> np.ndarray | None:
        if self.ev is None or not self.ev.has(model):
            return None
        return self.ev.full(model) if strategy is None else self.ev.outcome(model, strategy, k, mode)

    def acc(self, model: str, strategy: str | None, k: int, mode: str = "none") -> float:
        return self.full_acc[model] if strategy is None else _acc(self.trials, model, strategy, k, mode)

    def diff(self, model: str, a: tuple, b: tuple) -> tuple[float, stats.Estimate | None]:
        """``acc(a) − acc(b)`` (points) and its paired interval; ``a``/``b`` = (strategy|None, k, mode)."""
        point = self.acc(model, *a) - self.acc(model, *b)
        va, vb = self.vec(model, *a), self.vec(model, *b)
        if va is None or vb is None:
            return point, None
        return point, self.ev.estimate(va - vb, model)

    def gap_change(self, m0: str, m1: str, strategy: str, k: int) -> tuple[float, stats.Estimate | None]:
        """``gap(m0) − gap(m1)``, gap = full − decomposed: positive where the deeper m1's gap is smaller."""
        point = (self.acc(m0, None, k) - self.acc(m0, strategy, k)) - (self.acc(m1, None, k) - self.acc(m1, strategy, k))
        if self.ev is None or not self.ev.same_test_set([m0, m1]):
            return point, None
        parts = [self.vec(m, None, k) for m in (m0, m1)] + [self.vec(m, strategy, k) for m in (m0, m1)]
        if any(p is None for p in parts):
            return point, None
        f0, f1, d0, d1 = parts
        return point, self.ev.estimate((f0 - d0) - (f1 - d1), m0)

    def psi_change(self, m0: str, m1: str, psi0: float, psi1: float) -> tuple[float, stats.Estimate | None]:
        """``mean Ψ(m0) − mean Ψ(m1)`` per instance (paired on the same images); positive: m1 more concentrated."""
        point = psi0 - psi1
        if self.ev is None or not self.ev.same_test_set([m0, m1]):
            return point, None
        return point, self.ev.estimate(self.ev.psi(m0) - self.ev.psi(m1), m0, scale=1.0)


def _most_retrained(trials: pd.DataFrame, model: str, k: int) -> str:
    for mode in ("finetune", "head", "none"):
        if len(_row(trials, model, "frequency", k, mode)):
            return mode
    return "none"


def c1_claims(c1: pd.DataFrame, *, k: int) -> list[Claim]:
    """C1's rows of the claims table from :func:`dtd_ray.report.protocol.c1_table`: per model and way of
    retraining, against the like-for-like control where there is one, verdicts at every margin."""
    out: list[Claim] = []
    for (model, training), d in c1.groupby(["model", "training"], sort=False):
        like = d[d["reference"] == "full head trained the same way"]
        r = (like if len(like) else d).iloc[0]
        margins = " / ".join(f"{mg:g}" for mg in protocol.MARGINS)
        verdicts = "; ".join(f"{mg:g}: {r[f'< {mg:g} point']}" for mg in protocol.MARGINS)
        seeds = f"{int(r['seeds'])} seed{'s' if int(r['seeds']) > 1 else ''}"
        out.append(Claim("C1 a few filters per class suffice", str(model),
                         f"{r['reference']} − decomposed, {training} (frequency, k = {k}, {seeds}) "
                         f"< {margins} point", r["_est"].value, r["_est"], verdicts))
    return out


def claims_table(trials: pd.DataFrame, models: pd.DataFrame, *, k: int, evidence: Evidence | None,
                 localisation: pd.DataFrame | None = None, controls: pd.DataFrame | None = None) -> list[Claim]:
    """The verdict on each of the paper's claims, per model or depth pair (see the module docstring).

    ``localisation``: :func:`dtd_ray.report.localisation_summary.localisation_differences` of the sweep's
    localisation set (selected − each alternative, paired over the canvases), where it has one.
    ``controls``: the trial rows with the full-head control rows (``SweepOutput.with_controls``)."""
    M = Measures(trials, models, evidence)
    out: list[Claim] = []
    strategies = set(trials["strategy"])
    c1 = protocol.c1_table(trials if controls is None else controls, evidence, k=k, models=list(models["model"])) \
        if "frequency" in strategies else pd.DataFrame()
    if not c1.empty:
        out += c1_claims(c1, k=k)
    for _, mr in models.iterrows():
        m = mr["model"]
        if "frequency" not in strategies or (not c1.empty and m in set(c1["model"])):
            continue
        mode = _most_retrained(trials, m, k)  # no per-instance outcomes: the point estimate only
        point, est = M.diff(m, (None, k, "none"), ("frequency", k, mode))
        out.append(Claim("C1 a few filters per class suffice", m,
                         f"full − {MODE_LABELS[mode]} (frequency, k = {k}) < {NEAR_FULL:g} point(s)", point, est,
                         _verdict(est, expect="negative", null=NEAR_FULL)))
    for _, mr in models.iterrows():
        m = mr["model"]
        for other, what in (("random", "random maps (mean over seeds)"), ("weight_l1", "top-|W| maps")):
            if {"frequency", other} <= strategies:
                point, est = M.diff(m, ("frequency", k, "none"), (other, k, "none"))
                out.append(Claim("C2 the frequency rule finds them", m,
                                 f"frequency − {what}, decomposed at k = {k} (points)", point, est,
                                 _verdict(est, expect="positive")))
    for dataset, mdf in depth_series(models):
        if "frequency" not in strategies:
            continue
        trend = protocol.depth_trend(evidence, trials, mdf, k=k) if len(mdf) >= 3 else []
        if trend:
            scope = f"{dataset}: depths {', '.join(str(int(d)) for d in mdf['depth'])}"
            for t in trend:
                claim = "C3 deeper: a smaller gap" if t["measure"].startswith("gap") else \
                    "C3 deeper: lower-dimensional (smaller Ψ)"
                out.append(Claim(claim, scope, t["measure"], t["est"].value, t["est"],
                                 _verdict(t["est"], expect="negative"), fmt=t["fmt"]))
            continue
        first, last = mdf.iloc[0], mdf.iloc[-1]
        scope = f"{dataset}: depth {int(first['depth'])} → {int(last['depth'])}"
        point, est = M.gap_change(first["model"], last["model"], "frequency", k)
        out.append(Claim("C3 deeper: a smaller gap", scope, f"gap(shallow) − gap(deep), frequency, k = {k} (points)",
                         point, est, _verdict(est, expect="positive")))
        if np.isfinite([first["psi_mean"], last["psi_mean"]]).all():
            point, est = M.psi_change(first["model"], last["model"], first["psi_mean"], last["psi_mean"])
            out.append(Claim("C3 deeper: lower-dimensional (smaller Ψ)", scope, "Ψ(shallow) − Ψ(deep), mean per instance",
                             point, est, _verdict(est, expect="positive"), fmt="{:.3f}"))
    ablations = protocol.ablation_rows(evidence, list(models["model"]), k=k)
    for a in ablations:
        out.append(Claim("C4 the selected filters are essential", a["model"], a["measure"], a["est"].value, a["est"],
                         _verdict(a["est"], expect="positive")))
    if evidence is not None and not ablations:  # a sweep from before the matched ablations: the noise test
        for _, mr in models.iterrows():
            m = mr["model"]
            fq, rd = evidence.essential(m, "frequency"), evidence.essential(m, "random")
            if fq is None:
                continue
            est = evidence.estimate((fq["others_noise"] - fq["selected_noise"]).to_numpy(), m)
            out.append(Claim("C4 the selected filters are essential", m,
                             f"accuracy with the other m − k features noised − with the k selected noised (k = {k}, points)",
                             est.value, est, _verdict(est, expect="positive")))
            if rd is not None:
                est = evidence.estimate((rd["selected_noise"] - fq["selected_noise"]).to_numpy(), m)
                out.append(Claim("C4 the selected filters are essential", m,
                                 "accuracy with k random features noised − with the k selected noised (points)",
                                 est.value, est, _verdict(est, expect="positive")))
    if localisation is not None and not localisation.empty:
        loc = localisation[(localisation.get("subject", "selected") == "selected")
                           & (localisation["score"] == "energy-in-box")]
        bgs = list(dict.fromkeys(loc["background"])) if "background" in loc else []
        first_bg = "blur" if "blur" in bgs else (bgs[0] if bgs else None)
        for _, r in loc.iterrows():
            bg = r.get("background")
            # the class-specific control on every background; the other alternatives on the first (blur)
            if r["method"] not in LOCALISATION_ALTERNATIVES or (r["method"] != "other_class" and bg != first_bg):
                continue
            est = stats.Estimate(float(r["diff"]), float(r["lo"]), float(r["hi"]))
            out.append(Claim("C4 the selected filters sit on the object", f"{r['model']} ({bg} background)",
                             f"{r['score']}: selected − {LOCALISATION_ALTERNATIVES[r['method']]}",
                             est.value, est, str(r["verdict"]), fmt="{:.3f}"))
    return out


# The localisation comparisons the claims table states (energy-in-box; the pointing game, at its ceiling, and every
# other comparison are in the report's localisation section).
LOCALISATION_ALTERNATIVES = {"other_class": "another class's selected channels",
                             "background_class": "the background class's selected channels",
                             "random": "random channels", "cam": "CAM"}


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    """The claims as a table: claim, scope, measure, estimate [95 % interval], verdict."""
    return pd.DataFrame([{"claim": c.claim, "scope": c.scope, "measure": c.measure, "estimate [95 % CI]": c.interval(),
                          "verdict": c.verdict} for c in claims])


def _fmt(point: float, est: stats.Estimate | None) -> str:
    return est.text() if est is not None else f"{point:.2f}"


def findings(trials: pd.DataFrame, models: pd.DataFrame, *, k: int, evidence: Evidence | None = None) -> list[str]:
    """Plain statements computed from the tables, each comparison with its 95 % paired interval."""
    out: list[str] = []
    M = Measures(trials, models, evidence)
    acc = accuracy_by_k(trials)
    strategies = set(trials["strategy"])
    for dataset, mdf in depth_series(models):
        if "frequency" not in strategies:
            continue
        gaps = [M.diff(r["model"], (None, k, "none"), ("frequency", k, "none")) for _, r in mdf.iterrows()]
        depths = ", ".join(f"{int(d)}: {_fmt(*g)}" for d, g in zip(mdf["depth"], gaps))
        out.append(f"{dataset}: the gap full − decomposed (frequency, k = {k}, points, 95 % interval) by depth {depths}.")
        steps = []
        for (_, a), (_, b) in zip(mdf.iloc[:-1].iterrows(), mdf.iloc[1:].iterrows()):
            point, est = M.gap_change(a["model"], b["model"], "frequency", k)
            steps.append(f"{int(a['depth'])} → {int(b['depth'])}: {_fmt(point, est)} "
                         f"({_verdict(est, expect='positive').replace('supported', 'shrinks').replace('contradicted', 'grows')})")
        out.append(f"{dataset}: the gap's change with depth at k = {k} (gap(shallow) − gap(deep), paired): " + "; ".join(steps) + ".")
        tally: dict[str, list[int]] = {}
        first, last = mdf.iloc[0]["model"], mdf.iloc[-1]["model"]
        for kk in sorted(set(acc["k"])):
            point, est = M.gap_change(first, last, "frequency", int(kk))
            v = _verdict(est, expect="positive")
            key = {"supported": "shrinks", "contradicted": "grows"}.get(v, "not resolved")
            tally.setdefault(key, []).append(int(kk))
        out.append(f"{dataset}: from depth {int(mdf.iloc[0]['depth'])} to {int(mdf.iloc[-1]['depth'])} the gap "
                   f"(frequency) shrinks, by an interval that excludes 0, at k = {tally.get('shrinks', []) or 'none'}; "
                   f"grows at k = {tally.get('grows', []) or 'none'}; not resolved at k = "
                   f"{tally.get('not resolved', []) or 'none'}.")
        if np.isfinite(list(mdf["psi_mean"])).all():
            psis = []
            for _, r in mdf.iterrows():
                e = evidence.estimate(evidence.psi(r["model"]), r["model"], scale=1.0) \
                    if evidence is not None and evidence.has(r["model"]) else None
                psis.append(f"{int(r['depth'])}: {_fmt(r['psi_mean'], e) if e is None else e.text('{:.3f}')}")
            steps = []
            for (_, a), (_, b) in zip(mdf.iloc[:-1].iterrows(), mdf.iloc[1:].iterrows()):
                point, est = M.psi_change(a["model"], b["model"], a["psi_mean"], b["psi_mean"])
                v = _verdict(est, expect="positive").replace("supported", "falls").replace("contradicted", "rises")
                steps.append(f"{int(a['depth'])} → {int(b['depth'])}: {est.text('{:+.3f}') if est else f'{point:+.3f}'} ({v})")
            out.append(f"{dataset}: Ψ (share of the penultimate features holding 90 % of an instance's L1 mass; smaller = more "
                       f"concentrated; mean over test instances) by depth " + ", ".join(psis)
                       + "; change Ψ(shallow) − Ψ(deep): " + "; ".join(steps) + ".")
    # Strategies against frequency at k, per model; random as the mean over its map seeds.
    for other in ("random", "weight_l1", "contribution", "glm"):
        if not {"frequency", other} <= strategies:
            continue
        parts = []
        for _, mr in models.iterrows():
            point, est = M.diff(mr["model"], ("frequency", k, "none"), (other, k, "none"))
            if np.isfinite(point):
                v = _verdict(est, expect="positive").replace("supported", "frequency better") \
                    .replace("contradicted", f"{other} better")
                parts.append(f"{mr['model']} {_fmt(point, est)} ({v})")
        if parts:
            out.append(f"frequency − {other} at k = {k} (decomposed, points): " + "; ".join(parts) + ".")
    # The same comparison after retraining the head alone on that map (a refit: e.g. glm's sparse head).
    for other in ("weight_l1", "contribution", "glm"):
        parts = []
        for _, mr in models.iterrows():
            m = mr["model"]
            if not (len(_row(trials, m, "frequency", k, "head")) and len(_row(trials, m, other, k, "head"))):
                continue
            point, est = M.diff(m, ("frequency", k, "head"), (other, k, "head"))
            v = _verdict(est, expect="positive").replace("supported", "frequency better") \
                .replace("contradicted", f"{other} better")
            parts.append(f"{m} {_fmt(point, est)} ({v})")
        if parts:
            out.append(f"frequency − {other} at k = {k}, head retrained on each map (points): " + "; ".join(parts) + ".")
    if {"frequency", "random"} <= strategies:
        piv = acc.pivot_table(index=["model", "k"], columns="strategy", values="acc_decomposed")
        n_sup = n_all = 0
        for (model, kk), _ in piv.iterrows():
            point, est = M.diff(model, ("frequency", int(kk), "none"), ("random", int(kk), "none"))
            n_all += 1
            n_sup += _verdict(est, expect="positive") == "supported"
        out.append(f"frequency beats the random maps (mean over seeds), by an interval that excludes 0, at {n_sup} of "
                   f"{n_all} (model, k) points; mean margin {(piv['frequency'] - piv['random']).mean():.1f} points.")
    # Retraining gains at k (frequency): paired on the same images.
    for mode in ("head", "finetune"):
        parts = []
        for _, mr in models.iterrows():
            m = mr["model"]
            if not len(_row(trials, m, "frequency", k, mode)):
                continue
            gain, est_g = M.diff(m, ("frequency", k, mode), ("frequency", k, "none"))
            left, est_l = M.diff(m, (None, k, "none"), ("frequency", k, mode))
            parts.append(f"{m} gain {_fmt(gain, est_g)}, left to the full head {_fmt(left, est_l)}")
        if parts:
            out.append(f"{MODE_LABELS[mode]} (frequency, k = {k}, points): " + "; ".join(parts) + ".")
    if evidence is not None:
        parts = []
        for _, mr in models.iterrows():
            m = mr["model"]
            fq = evidence.essential(m, "frequency")
            if fq is None:
                continue
            sel = evidence.estimate(fq["selected_noise"].to_numpy(), m)
            oth = evidence.estimate(fq["others_noise"].to_numpy(), m)
            parts.append(f"{m} selected noised {sel.text()} %, others noised {oth.text()} %")
        if parts:
            out.append("the paper's essentiality test, a labelled extra (N(0, 1) noise in the k selected features "
                       "against in the other m − k; unit-variance noise is also a shift, and the sets differ in size: "
                       "the matched ablations are the test), frequency, k = 5, mean over noise seeds: "
                       + "; ".join(parts) + ".")
    return out


__all__ = ["Claim", "NEAR_FULL", "claims_frame", "claims_table", "findings", "trend", "accuracy_at"]
