"""The sweep report: markdown tables and PNG plots from a sweep's output folder (no Ray).

Reads what :mod:`dtd_ray.ray.sweep` wrote under its output root::

    sweep_config.json                        the resolved config (models, weights, datasets, k grid)
    trials/<trial_id>.parquet                one row per trial (accuracies in %)
    decompose/analysis/…/<model>.parquet     Ψ and the essentiality test per class at k = 5
    decompose/maps/…/<model>.parquet         the class maps (for the activation maps)

and writes ``report.md`` and ``plots/*.png`` (by default next to them):

- accuracy against k2 per model, one line per strategy (``accuracy_vs_k.png``);
- the gap to the full head against depth at a fixed k (``gap_vs_depth.png``);
- Ψ against depth (``psi_vs_depth.png``);
- retraining recovery (``retraining.png``) and head cost (``head_cost.png``);
- class-specific activation maps (``cam_<model>.png``): for a few test images per
  class, the class's selected channels of the last block (before pooling) summed
  and upsampled over the image, beside the same with the random strategy's channels.

The numbers in the markdown come from the tables; the "what the data says" lines are
computed from them (nothing is written in by hand). When the report goes to another
folder than the sweep's, the small tables it was made from (trials, analysis, maps,
eval, the resolved config) are copied beside it so that folder stands alone.

Modules: ``tables`` (reading a sweep folder; the tables; markdown tables), ``evidence`` (the
per-instance outcomes and their paired resamples), ``localisation_summary`` (the localisation
table, findings and section), ``claims``
(:func:`findings`), ``families`` (the cross-family questions of a sweep whose models differ in
family or width), ``plots`` (the matplotlib figures), ``cam`` (activation maps),
``build`` (:class:`ReportConfig`, :func:`make_report`, the text of report.md), ``atlas``
(the feature atlas: a static web page of each class's filters, their top images and maps).
"""

from dtd_ray.report.build import ReportConfig, make_report
from dtd_ray.report.cam import class_activation_maps
from dtd_ray.stages.units import last_block_maps
from dtd_ray.report.claims import Claim, claims_table, findings, trend
from dtd_ray.report.evidence import Evidence
from dtd_ray.report.tables import SweepOutput, depth_of, headline_table, model_table, read_sweep

__all__ = [
    "Claim",
    "Evidence",
    "ReportConfig",
    "claims_table",
    "SweepOutput",
    "class_activation_maps",
    "depth_of",
    "findings",
    "headline_table",
    "last_block_maps",
    "make_report",
    "model_table",
    "read_sweep",
    "trend",
]
