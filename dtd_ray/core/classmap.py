"""The class map: a ranked class → features map, the strategies' names and the k2 rules.

Every selection strategy (:mod:`dtd_ray.core.selection`, :mod:`dtd_ray.core.glm`) returns a
:class:`ClassMap`; this module is what they share, so neither imports the other for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

STRATEGIES = ("frequency", "weight_l1", "contribution", "random", "glm")  # every valid name, in report order
DEFAULT_STRATEGIES = ("frequency", "weight_l1", "contribution", "random")  # glm is opt-in (it fits a path)
K1_INDEPENDENT = ("weight_l1", "contribution", "random", "glm")
K1_NOT_APPLICABLE = -1
SEED_NOT_APPLICABLE = -1  # the ``map_seed`` of every map that no seed draws (all but ``random``)
# The "strategy" of a retraining control trial: no selection, every class keeps all m features,
# so its head is the full head trained with the decomposed heads' recipe (never a map of the grid).
FULL = "full"


def full_map(*, num_classes: int, feature_dim: int) -> np.ndarray:
    """The control's map: every class keeps every feature, ``idx[y] = 0 … m−1`` (C, m)."""
    return np.tile(np.arange(int(feature_dim), dtype=np.int64), (int(num_classes), 1))


@dataclasses.dataclass(frozen=True)
class ClassMap:
    """A ranked class → features map.

    ``idx[y]`` are class ``y``'s features, best first (C, K); ``score[y]`` the strategy's
    score of each (C, K) float64; ``count[y]`` the frequency counts where the strategy
    is ``frequency`` (else ``None``). ``k1`` is the top-``k1`` of the frequency
    strategy, :data:`K1_NOT_APPLICABLE` for the others (and for imported maps).
    ``nested`` says whether every prefix is itself a map of the strategy (true for
    every strategy here; false for imported maps, whose order is the file's).
    """

    strategy: str
    k1: int
    idx: np.ndarray
    score: np.ndarray
    count: np.ndarray | None = None
    nested: bool = True  # False for an imported map: its order is the file's, only the full map is meaningful
    seed: int = SEED_NOT_APPLICABLE  # the seed that drew a random map (one map per seed; the report averages them)

    @property
    def num_classes(self) -> int:
        return int(self.idx.shape[0])

    @property
    def k2(self) -> int:
        return int(self.idx.shape[1])

    def top(self, k2: int) -> "ClassMap":
        """The ``k2``-map: the first ``k2`` ranks of every class."""
        if not self.nested and k2 != self.k2:
            raise ValueError(f"{self.strategy} is not a ranking: only its full k2={self.k2} map is defined")
        check_k2(k2=k2, k1=self.k1, limit=self.k2, what=f"this {self.strategy} map")
        return dataclasses.replace(
            self,
            idx=self.idx[:, :k2],
            score=self.score[:, :k2],
            count=None if self.count is None else self.count[:, :k2],
        )


def check_k2(*, k2: int, k1: int, limit: int, what: str) -> None:
    """Raise ``ValueError`` unless ``1 ≤ k2 ≤ limit`` and (for frequency) ``k2 ≤ k1``."""
    if k2 < 1:
        raise ValueError(f"k2={k2} is not ≥ 1")
    if k1 != K1_NOT_APPLICABLE and k2 > k1:
        raise ValueError(f"k2={k2} > k1={k1}: a class's top-k2 frequent features must come from its top-k1 lists")
    if k2 > limit:
        raise ValueError(f"k2={k2} exceeds the {limit} ranked features of {what}")


def rank_rows(keys: Sequence[np.ndarray], *, k: int) -> np.ndarray:
    """Per row, the column indices of the ``k`` best entries in rank order.

    ``keys`` are (C, m) arrays, most significant first, each ranked descending; the
    column index ascending is the final key. Implemented with ``np.lexsort``, whose
    last key is primary and which is stable (so equal keys keep ascending index).
    """
    keys = [np.asarray(a) for a in keys]
    C, m = keys[0].shape
    if not 1 <= k <= m:
        raise ValueError(f"k={k} is outside [1, {m}] (the feature dimension)")
    # negate for descending order; lexsort's stability leaves ties in ascending column order
    order = np.lexsort([-a for a in reversed(keys)], axis=-1)
    return order[:, :k].astype(np.int64)
