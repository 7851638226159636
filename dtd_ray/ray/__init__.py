"""The Ray layer: the only package (with ``jobs/``) that imports Ray.

``session`` (start Ray quietly in an entry point), ``cluster`` (the one cluster probe),
``datasets`` (a source as a Ray Dataset), ``extract`` (the Ray Data extraction pipeline and
its exactly-once commit), ``reduce_on_ray`` (reduce on Ray Data), ``decompose_on_ray`` (the
decompose stage with its Ray steps), ``train_on_ray`` (backbone training as a Ray task),
``trainables`` (Ray Tune trainables), ``sweep/`` (the main job), ``commands`` (the jobs that
start Ray, for :mod:`dtd_ray.cli`), ``pipeline_stats`` (per-stage stats of an executed pipeline),
``procstats`` (CPU seconds per process kind) and ``benchmark`` (what ``jobs/bench_extract.py``
measures).
"""
