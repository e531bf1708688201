"""Subsets of a benchmark: a seeded sample stratified by category (and image variant).

``--limit N`` keeps N items drawn so that every stratum (category, variant) keeps its share:
each stratum gets ``floor(N * size / total)`` items, the items left over go to the strata with
the largest remainders (ties: the larger stratum, then the first in file order), and the items of
each stratum are drawn with ``random.Random(seed)`` from a fixed order. The sample is returned in
file order, so the same N and seed give the same items on every machine. With N >= the number of
items every item is kept. MM-SafetyBench's own tiny version is ``--subset tiny`` (see loaders).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from srpo_trl.evaluation.schema import EvalItem


def stratum(item: EvalItem) -> tuple[str, str]:
    return item.category, str(item.meta.get("variant") or "")


def allocate(sizes: dict[tuple, int], n: int) -> dict[tuple, int]:
    """How many items each stratum keeps (largest remainder; see the module doc)."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    order = list(sizes)
    quota = {k: n * sizes[k] // total for k in order}
    remainder = {k: n * sizes[k] - quota[k] * total for k in order}
    left = n - sum(quota.values())
    for k in sorted(order, key=lambda k: (-remainder[k], -sizes[k], order.index(k)))[:left]:
        quota[k] += 1
    return quota


def stratified_sample(items: Sequence[EvalItem], n: int, seed: int = 0) -> list[EvalItem]:
    """``n`` items, stratified by (category, variant), seeded; in the items' own order."""
    if n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    groups: dict[tuple, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(stratum(item), []).append(index)
    quota = allocate({k: len(v) for k, v in groups.items()}, n)
    rng = random.Random(seed)
    keep: set[int] = set()
    for key, indices in groups.items():
        keep.update(rng.sample(indices, quota[key]))
    return [item for index, item in enumerate(items) if index in keep]
