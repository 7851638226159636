"""The cross-family view of a sweep whose models differ in family or width m.

Every model of such a sweep is evaluated on the same test images, so one set of bootstrap
resamples (:class:`dtd_ray.report.evidence.Evidence`) gives paired intervals for statistics
*across* models too: a difference of two models' gaps, the spread of the gaps of all models
at one k, the rank correlation of Ψ with the gap. Each is computed on every resample, and
its 95 % interval is the percentile interval of those values. The intervals carry the
test-image noise only: the models are the ones the sweep has, not a sample of a population.

The questions (each answered by a table and findings, every number traceable to the trials):

* **width or family**: the gap full − decomposed (frequency) at a fixed k and at a fixed share
  of m, per model; the wider models against the mean of the narrowest; models of different
  families at about the same m against each other;
* **count or share**: the spread (sd over models) of the gap at a count k against at the share
  of m that gives the narrowest width that count: the axis with the smaller spread collapses
  the models onto one curve;
* **Ψ against the gap**: Spearman's ρ between the models' mean Ψ and their gaps;
* **strategies**: per model and family, the best strategy and its margin over the next,
  decomposed and with the head retrained on each map;
* **depth, replicated**: the depth effect in each series of independently trained checkpoints,
  and the same depth across checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dtd_ray.core import selection, stats
from dtd_ray.core.kgrid import k_of_share
from dtd_ray.report.claims import Measures, _verdict
from dtd_ray.report.evidence import SCALE, Evidence
from dtd_ray.report.tables import MODE_LABELS, depth_series, mixed_models

SHARES = (1.0, 2.0, 5.0, 10.0)  # % of m: the share axis of the count-or-share question
SAME_WIDTH = 0.10  # models of different families whose widths differ by at most this fraction count as equal width


def applies(models: pd.DataFrame) -> bool:
    """A sweep gets the cross-family view where its models differ in family or in width."""
    return mixed_models(models)


@dataclass
class FamilyView:
    """The cross-family tables and findings of one sweep (empty where :func:`applies` is false)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # title -> table
    findings: dict[str, list[str]] = field(default_factory=dict)  # question -> statements

    def markdown(self, table: callable) -> list[str]:
        """The section's lines; ``table`` renders a DataFrame as markdown."""
        if not self.tables and not self.findings:
            return []
        L = ["## Across families and widths", "",
             "Every model is evaluated on the same test images, so each statistic below, including those "
             "across models (a difference of gaps, the spread of gaps, a rank correlation), is recomputed on "
             f"the same {stats.N_BOOT} bootstrap resamples of those images and given with its 95 % percentile "
             "interval. The intervals carry test-image noise only: the models are the ones this sweep has, not "
             "a sample of all networks. `gap` = full − decomposed (frequency map, no retraining), in points.", ""]
        for title, rows in self.findings.items():
            L += [f"### {title}", ""]
            if title in self.tables:
                L += [table(self.tables[title]), ""]
            L += [f"- {r}" for r in rows] + [""]
        return L


class _Resampled:
    """Per-instance values of several models on one test set, and their means on every resample."""

    def __init__(self, ev: Evidence, models: list[str]) -> None:
        self.ev, self.models = ev, models
        self.counts = ev.counts(models[0])
        self.n = float(self.counts.shape[1])

    def means(self, columns: list[np.ndarray], *, scale: float = SCALE) -> tuple[np.ndarray, np.ndarray]:
        """``(point (P,), resampled (B, P))`` means of each per-instance column × ``scale``; NaN entries left out."""
        v = np.stack(columns, axis=1)
        ok = np.isfinite(v)
        if ok.all():
            return v.mean(0) * scale, (self.counts @ v) / self.n * scale
        filled = np.where(ok, v, 0.0)
        return (np.nanmean(v, 0) * scale,
                (self.counts @ filled) / (self.counts @ ok.astype(np.float64)) * scale)


def _interval(point: float, samples: np.ndarray) -> stats.Estimate:
    lo, hi = stats.percentile_interval(samples)
    return stats.Estimate(float(point), lo, hi)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (0 = smallest; ties broken by order, which continuous values do not have)."""
    return np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable").astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's ρ of ``a`` and ``b`` along the last axis: the Pearson correlation of their ranks."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))


def _word(v: str, positive: str, negative: str) -> str:
    return {"supported": positive, "contradicted": negative}.get(v, "not resolved")


def family_view(trials: pd.DataFrame, models: pd.DataFrame, *, k: int, evidence: Evidence | None) -> FamilyView:
    """The cross-family tables and findings at the report's ``k`` (see the module docstring)."""
    view = FamilyView()
    names = list(models["model"])
    if not applies(models) or evidence is None or not evidence.same_test_set(names) or \
            "frequency" not in set(trials["strategy"]):
        return view
    M = Measures(trials, models, evidence)
    R = _Resampled(evidence, names)
    m_of = dict(zip(models["model"], models["feature_dim"].astype(int)))
    fam = dict(zip(models["model"], models["family"]))

    def gap_vec(model: str, kk: int, mode: str = "none") -> np.ndarray | None:
        v = M.vec(model, "frequency", kk, mode)
        return None if v is None else M.vec(model, None, kk) - v

    _width_or_family(view, models, k=k, M=M, R=R, gap_vec=gap_vec, m_of=m_of, fam=fam)
    _count_or_share(view, models, R=R, gap_vec=gap_vec, m_of=m_of)
    _psi_against_gap(view, models, k=k, R=R, gap_vec=gap_vec, m_of=m_of)
    _strategies(view, trials, models, k=k, M=M, R=R, fam=fam)
    _depth_replicated(view, models, k=k, M=M, R=R, gap_vec=gap_vec)
    return view


def _width_or_family(view, models, *, k, M, R, gap_vec, m_of, fam) -> None:
    title = "Width or family?"
    share = 5.0
    rows, cols = [], {}
    for _, mr in models.iterrows():
        m = mr["model"]
        ks = k_of_share(share, m=m_of[m])
        row = {"model": m, "family": mr["family"], "m": m_of[m], "full": mr["acc_full"]}
        for label, kk, mode in ((f"gap k = {k}", k, "none"), (f"gap k = {share:g} % of m", ks, "none"),
                                (f"gap head retrained k = {k}", k, "head")):
            v = gap_vec(m, kk, mode)
            if v is None:
                row[label] = ""
                continue
            cols.setdefault(label, {})[m] = v
            row[label] = evidence_text(R, v) + (f" (k = {kk})" if kk != k else "")
        rows.append(row)
    view.tables[title] = pd.DataFrame(rows)
    out = []
    narrow = min(m_of.values())
    base = [m for m in models["model"] if m_of[m] == narrow]
    for label, vecs in cols.items():
        if len(vecs) < len(models):
            continue
        wide = [m for m in models["model"] if m_of[m] != narrow]
        parts = []
        for w in wide:
            est = _interval_of(R, vecs[w] - np.mean([vecs[b] for b in base], axis=0))
            parts.append(f"{w} (m = {m_of[w]}) {est.text()} ({_word(_verdict(est, expect='positive'), 'larger', 'smaller')})")
        if base and wide:
            spread = _spread(R, [vecs[b] for b in base], kind="range")
            out.append(f"{label}: gap of each wider model − the mean gap of the {len(base)} models with m = {narrow}: "
                       + "; ".join(parts) + f". Among those {len(base)} (one width) the gaps span {spread.text()} points "
                       "(max − min).")
        pairs = [(a, b) for i, a in enumerate(models["model"]) for b in list(models["model"])[i + 1:]
                 if fam[a] != fam[b] and abs(m_of[a] - m_of[b]) <= SAME_WIDTH * max(m_of[a], m_of[b])]
        for a, b in pairs:
            est = _interval_of(R, vecs[a] - vecs[b])
            v = _verdict(est, expect="positive")
            out.append(f"{label}, about the same width, other family: gap({a}, m = {m_of[a]}) − gap({b}, m = {m_of[b]}) "
                       f"= {est.text()} ({'the families differ' if v != 'not resolved' else 'not resolved'}).")
    view.findings[title] = out


def evidence_text(R: _Resampled, v: np.ndarray) -> str:
    return _interval_of(R, v).text()


def _interval_of(R: _Resampled, v: np.ndarray) -> stats.Estimate:
    point, res = R.means([v])
    return _interval(point[0], res[:, 0])


def _spread(R: _Resampled, vecs: list[np.ndarray], *, kind: str = "sd") -> stats.Estimate:
    """The spread over models of their mean values (sd with ddof 1, or max − min), with its interval."""
    point, res = R.means(vecs)
    f = (lambda x: x.std(-1, ddof=1)) if kind == "sd" else (lambda x: x.max(-1) - x.min(-1))
    return _interval(f(point), f(res))


def _count_or_share(view, models, *, R, gap_vec, m_of) -> None:
    title = "A count or a share?"
    names = list(models["model"])
    ref = int(np.median(list(m_of.values())))
    rows, out = [], []
    for p in SHARES:
        kc = k_of_share(p, m=ref)
        count_vecs = [gap_vec(m, kc) for m in names]
        share_vecs = [gap_vec(m, k_of_share(p, m=m_of[m])) for m in names]
        if any(v is None for v in count_vecs + share_vecs):
            continue
        pc, rc = R.means(count_vecs)
        ps, rs = R.means(share_vecs)
        sd_c, sd_s = pc.std(ddof=1), ps.std(ddof=1)
        d = _interval(sd_c - sd_s, rc.std(-1, ddof=1) - rs.std(-1, ddof=1))
        v = _verdict(d, expect="positive")
        rows.append({"share p": f"{p:g} %", "count k (= p of the median m)": kc,
                     "gap sd over models, k = count": _interval(sd_c, rc.std(-1, ddof=1)).text(),
                     "gap sd over models, k = p·m": _interval(sd_s, rs.std(-1, ddof=1)).text(),
                     "gap range, count": f"{pc.min():.2f} … {pc.max():.2f}",
                     "gap range, share": f"{ps.min():.2f} … {ps.max():.2f}",
                     "sd(count) − sd(share)": d.text(), "verdict": _word(v, "the share collapses more",
                                                                         "the count collapses more")})
    if not rows:
        return
    view.tables[title] = pd.DataFrame(rows)
    tally = pd.Series([r["verdict"] for r in rows]).value_counts()
    out.append(f"Each share p of m is set against the count k that p gives the median width ({ref}), so the "
               f"median-width models sit at the same k on both axes and only the others move. Of the {len(rows)} "
               "points: " + ", ".join(f"{n} {w}" for w, n in tally.items()) + ".")
    view.findings[title] = out


def _psi_against_gap(view, models, *, k, R, gap_vec, m_of) -> None:
    title = "Ψ against the gap"
    names = list(models["model"])
    psi_point, psi_res = R.means([R.ev.psi(m) for m in names], scale=1.0)
    rows = []
    out = []
    for label, ks in ((f"k = {k}", {m: k for m in names}), ("k = 5 % of m", {m: k_of_share(5.0, m=m_of[m]) for m in names})):
        vecs = [gap_vec(m, ks[m]) for m in names]
        if any(v is None for v in vecs):
            continue
        gp, gr = R.means(vecs)
        est = _interval(float(spearman(psi_point, gp)), spearman(psi_res, gr))
        v = _verdict(est, expect="positive")
        out.append(f"Spearman's ρ between the models' mean Ψ and their gap at {label}: {est.text()} over "
                   f"{len(names)} models ({_word(v, 'Ψ orders the models as the gap does', 'Ψ orders them against the gap')}).")
        if not rows:
            order_p, order_g = _ranks(psi_point), _ranks(gp)
            rows = [{"model": m, "m": m_of[m], "Ψ": round(float(psi_point[i]), 3), "Ψ rank": int(order_p[i]) + 1,
                     f"gap {label}": round(float(gp[i]), 2), "gap rank": int(order_g[i]) + 1}
                    for i, m in enumerate(names)]
    if rows:
        view.tables[title] = pd.DataFrame(rows)
    view.findings[title] = out


def _strategies(view, trials, models, *, k, M, R, fam) -> None:
    title = "Strategies by family"
    present = [s for s in selection.STRATEGIES if s in set(trials["strategy"])]
    rows, out = [], []
    for mode in ("none", "head"):
        wins: dict[str, list[str]] = {}
        for _, mr in models.iterrows():
            m = mr["model"]
            vecs = {s: M.vec(m, s, k, mode) for s in present}
            vecs = {s: v for s, v in vecs.items() if v is not None}
            if len(vecs) < 2:
                continue
            acc = {s: float(v.mean()) * SCALE for s, v in vecs.items()}
            best, second = sorted(acc, key=acc.get, reverse=True)[:2]
            est = _interval_of(R, vecs[best] - vecs[second])
            resolved = _verdict(est, expect="positive") == "supported"
            rows.append({"model": m, "family": fam[m], "k": k, "mode": MODE_LABELS[mode],
                         **{s: round(acc[s], 2) for s in present if s in acc},
                         "best": best, "best − next": f"{est.text()} over {second}",
                         "resolved": "yes" if resolved else "no (tie)"})
            wins.setdefault(fam[m], []).append(f"{m}: {best if resolved else f'{best} ≈ {second}'}")
        if wins:
            out.append(f"{MODE_LABELS[mode]} at k = {k}, best strategy (a tie where its margin's interval includes 0): "
                       + "; ".join(f"{f}: {', '.join(w)}" for f, w in wins.items()) + ".")
    if rows:
        view.tables[title] = pd.DataFrame(rows)
    view.findings[title] = out


def _depth_replicated(view, models, *, k, M, R, gap_vec) -> None:
    title = "Depth, replicated"
    series = depth_series(models)
    if not series:
        return
    out, effects = [], []
    for label, mdf in series:
        a, b = mdf.iloc[0], mdf.iloc[-1]
        point, est = M.gap_change(a["model"], b["model"], "frequency", k)
        v = _verdict(est, expect="positive") if est is not None else "not resolved"
        pp, pe = M.psi_change(a["model"], b["model"], a["psi_mean"], b["psi_mean"])
        pv = _verdict(pe, expect="positive") if pe is not None else "not resolved"
        effects.append(v)
        out.append(f"{label} ({a['model']} → {b['model']}): gap(shallow) − gap(deep) at k = {k} "
                   f"{est.text() if est else f'{point:.2f}'} ({_word(v, 'the gap shrinks with depth', 'it grows')}); "
                   f"Ψ(shallow) − Ψ(deep) {pe.text('{:.3f}') if pe else f'{pp:.3f}'} "
                   f"({_word(pv, 'Ψ falls with depth', 'Ψ rises')}).")
    if len(series) >= 2:
        resolved = [e for e in effects if e != "not resolved"]
        same = ("is resolved in none of them" if not resolved else
                "replicates" if len(resolved) == len(effects) and len(set(resolved)) == 1 else "does not replicate")
        out.append(f"Across the {len(series)} independently trained series the depth effect on the gap {same} "
                   f"(verdicts: {', '.join(effects)}).")
        by_depth: dict[int, list[str]] = {}
        for _, mdf in series:
            for _, r in mdf.iterrows():
                by_depth.setdefault(int(r["depth"]), []).append(r["model"])
        for d, ms in sorted(by_depth.items()):
            for i in range(1, len(ms)):
                va, vb = gap_vec(ms[0], k), gap_vec(ms[i], k)
                if va is None or vb is None:
                    continue
                est = _interval_of(R, va - vb)
                out.append(f"Same depth {d}, other checkpoint: gap({ms[0]}) − gap({ms[i]}) at k = {k} = {est.text()} "
                           f"({'the checkpoints differ' if _verdict(est, expect='positive') != 'not resolved' else 'not resolved'}).")
    view.findings[title] = out


__all__ = ["FamilyView", "SHARES", "applies", "family_view", "spearman"]
