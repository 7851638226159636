"""Per-stage stats of an executed extraction pipeline: each operator's output blocks with the
times of the tasks that made them (what ``jobs/bench_extract.py`` turns into per-stage rates).

:func:`dtd_ray.ray.extract.run_extract` hands a :class:`PartitionStats` to its ``on_stats``
callback after each committed partition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dtd_ray.data.transforms import prepare_batch

# Which stage of build_pipeline an operator runs, by the function it maps (Ray Data names an operator
# after it: "MapBatches(prepare_batch)"; one it fused from several, "A->B"); the model stage, which also
# writes the records, by its class (partition_stats' model_stage).
_STAGE_OF = {prepare_batch.__name__: "prepare"}


@dataclass(frozen=True)
class BlockTiming:
    """One output block of an operator: its rows and the times of the task that made it (``start_s``
    and ``end_s`` on the clock of ``time.perf_counter``, which the processes of one machine share)."""

    rows: int
    task: int | None
    start_s: float | None
    end_s: float | None
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class OperatorStats:
    """One operator of an executed pipeline: Ray Data's ``name``, its ``stage`` in
    :func:`build_pipeline` ("read", "prepare" or "model"; joined with "+" where Ray fused
    operators of several) and its output blocks."""

    name: str
    stage: str
    blocks: tuple[BlockTiming, ...]

    @property
    def rows_out(self) -> int:
        return sum(b.rows for b in self.blocks)

    @property
    def first_out_s(self) -> float | None:
        """When its first output block was done (``None`` without timings)."""
        ends = [b.end_s for b in self.blocks if b.end_s is not None]
        return min(ends) if ends else None

    def rows_done_by(self, t: float) -> int:
        """Rows of the blocks done by time ``t``."""
        return sum(b.rows for b in self.blocks if b.end_s is not None and b.end_s <= t)


@dataclass(frozen=True)
class PartitionStats:
    """What one partition's pipeline did: its operators in pipeline order, when it was built
    (``started_s``) and when its last row had been read (``ended_s``, before the commit), both on
    ``time.perf_counter``'s clock, and Ray Data's own summary (``text``, as ``Dataset.stats()``)."""

    model: str
    split: str
    operators: tuple[OperatorStats, ...]
    started_s: float
    ended_s: float
    text: str


def _operator_blocks(ds) -> list[tuple[str, tuple[BlockTiming, ...]]]:
    """``(operator name, its blocks)`` of an executed Dataset, upstream first.

    The one private access to Ray Data: per-block task times (when each block was done) are only in
    ``Dataset._raw_stats()``; the public ``stats()`` is text and ``get_stats_summary()`` has per-operator
    totals, from which neither the model's first output nor the rows decoded by then can be read."""
    out: list[tuple[str, tuple[BlockTiming, ...]]] = []

    def timing(b) -> BlockTiming:
        e = getattr(b, "exec_stats", None)  # None for a block no task made
        return BlockTiming(rows=int(b.num_rows or 0), task=getattr(e, "task_idx", None),
                           start_s=getattr(e, "start_time_s", None), end_s=getattr(e, "end_time_s", None),
                           wall_s=getattr(e, "wall_time_s", None) or 0.0, cpu_s=getattr(e, "cpu_time_s", None) or 0.0)

    def walk(stats) -> None:
        for parent in getattr(stats, "parents", None) or []:
            walk(parent)
        out.extend((name, tuple(timing(b) for b in blocks)) for name, blocks in stats.metadata.items())

    walk(ds._raw_stats())
    return out


def partition_stats(ds, *, model: str, split: str, model_stage: type, started_s: float,
                    ended_s: float) -> PartitionStats:
    """:class:`PartitionStats` of an executed pipeline (plain values: it holds nothing of ``ds``)."""
    stage_of = {**_STAGE_OF, model_stage.__name__: "model"}
    ops = []
    for name, blocks in _operator_blocks(ds):
        parts = [re.sub(r"^\w+\((.+)\)$", r"\1", p) for p in name.split("->")]
        stage = "+".join(dict.fromkeys(stage_of.get(p, "read") for p in parts))
        ops.append(OperatorStats(name=name, stage=stage, blocks=blocks))
    return PartitionStats(model=model, split=split, operators=tuple(ops), started_s=started_s, ended_s=ended_s,
                          text=ds.stats())
