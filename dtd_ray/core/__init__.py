"""The method itself, as small pure functions over numpy arrays and torch tensors (never Ray, never I/O).

``kgrid`` (the k grammar), ``counting`` (per-instance top-k ranking, per-class frequency
tables for a k1 grid), ``selection`` (frequency, weight_l1, contribution, random maps),
``heads`` (the decomposed head, its evaluation over a whole grid, the class-map validator),
``analysis`` (channel usage, essentiality, Ψ).
"""
