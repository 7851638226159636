"""Stages that read and write storage around the core, without Ray.

``reduce`` (a records partition to frequency tables, batch by batch), ``decompose`` (the
decompose stage: reduce, select, evaluate every (strategy, k1, k2), analyses; its two Ray
steps arrive as hooks from :mod:`dtd_ray.ray.decompose`).
"""
