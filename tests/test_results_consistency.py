"""README and the committed reports say exactly what the committed tables say.

Rebuilds, from each committed ``results/<sweep>/`` folder alone (trials, decompose tables),
the headline table, the claims with their intervals and the findings — with the same
function the report uses — and checks that ``report.md`` and README quote them verbatim.
Needs no shared data: the tables are committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtd_ray.report.build import report_tables
from dtd_ray.report.claims import claims_frame
from dtd_ray.report.tables import markdown_table, read_sweep

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
README = (ROOT / "README.md").read_text()
SWEEPS = sorted(p.parent.name for p in RESULTS.glob("*/report.md") if (p.parent / "trials").is_dir())


def _tables(name: str):
    cfg = json.loads((RESULTS / name / "report_config.json").read_text())["config"]
    return report_tables(read_sweep(str(RESULTS / name)), k=int(cfg["k"]))


@pytest.fixture(scope="module", params=SWEEPS)
def committed(request):
    name = request.param
    return name, (RESULTS / name / "report.md").read_text(), _tables(name)


def test_there_are_committed_reports():
    assert {"cifar10_resnets", "cifar10_zoo", "quickstart"} <= set(SWEEPS)


def test_report_quotes_its_tables(committed):
    name, md, t = committed
    assert markdown_table(t.headline) in md, f"results/{name}/report.md: headline differs from the tables"
    if t.claims:
        assert markdown_table(claims_frame(t.claims)) in md, f"results/{name}/report.md: claims differ"
    for f in t.findings + [f for fs in t.families.findings.values() for f in fs]:
        assert f"- {f}" in md, f"results/{name}/report.md lacks the finding: {f[:80]}…"
    for title, table in t.families.tables.items():
        assert markdown_table(table) in md, f"results/{name}/report.md: the table of {title!r} differs"


def test_readme_quotes_the_committed_results():
    t = _tables("cifar10_resnets")
    assert markdown_table(t.headline) in README, "README's headline table differs from results/cifar10_resnets"
    assert markdown_table(claims_frame(t.claims)) in README, "README's claims table differs from results/cifar10_resnets"


def test_readme_quotes_the_zoo_headline():
    t = _tables("cifar10_zoo")
    assert markdown_table(t.headline) in README, "README's headline table differs from results/cifar10_zoo"
    assert t.families.findings, "results/cifar10_zoo has no cross-family view"
