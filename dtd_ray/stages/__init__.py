"""Stages that read and write storage around the core, without Ray.

``reduce`` (a records partition to frequency tables, batch by batch), ``decompose`` (the
decompose stage: reduce, select, evaluate every (strategy, k1, k2), analyses; its two Ray
steps arrive as hooks from :mod:`dtd_ray.ray.decompose_on_ray`), ``decompose_summary`` (what it
prints), ``localise`` (the localisation measurement on pasted canvases: runs each model, writes
``localisation/``), ``units`` (a sweep unit's backbone, dataset and last-block maps).
"""
