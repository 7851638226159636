"""The Ray layer: the only package (with ``jobs/``) that imports Ray.

``session`` (start Ray quietly in an entry point), ``cluster`` (the one cluster probe),
``datasets`` (a source as a Ray Dataset), ``extract`` (the Ray Data extraction pipeline and
its exactly-once commit), ``reduce`` (reduce on Ray Data), ``decompose`` (the decompose stage
with its Ray steps), ``trainables`` (Ray Tune trainables), ``sweep/`` (the main job).
"""
