"""Pair expansion: the one rule for which (favorable, unfavorable) continuation pairs a branch point gives.

Used by ``StepPairDataset.from_exploration`` (which builds the pairs) and by exploration's summary
(which counts them), so that the count printed after ``srpo-trl explore`` is the number trained on.
Standard library only.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter


__all__ = ["point_pairs", "count_pairs"]


def point_pairs(
    point: dict,
    max_pairs_per_point: int | None = None,
    rng: random.Random | None = None,
    report: Counter | None = None,
) -> list[tuple[str, str]]:
    """Every (favorable, unfavorable) pair of distinct continuation texts at ``point``.

    Empty texts and continuations whose ``verified`` is not a boolean (the verifier could not decide)
    are left out; a text judged both ways is dropped from both sides. With ``max_pairs_per_point``,
    a sample of that many pairs is kept (``rng``-seeded, in their original order). ``report`` counts
    what was left out (``continuations_empty``, ``continuations_unverified``, ``continuations_conflicting``,
    ``pairs_capped``).
    """
    report = report if report is not None else Counter()
    verdicts: dict[str, set] = {}
    for cont in point.get("continuations") or []:
        text = cont.get("text")
        if not isinstance(text, str) or not text.strip():
            report["continuations_empty"] += 1
            continue
        if not isinstance(cont.get("verified"), bool):
            report["continuations_unverified"] += 1
            continue
        verdicts.setdefault(text, set()).add(cont["verified"])
    report["continuations_conflicting"] += sum(1 for v in verdicts.values() if len(v) > 1)
    good = [t for t, v in verdicts.items() if v == {True}]
    bad = [t for t, v in verdicts.items() if v == {False}]
    pairs = list(itertools.product(good, bad))
    if max_pairs_per_point is not None and len(pairs) > max_pairs_per_point:
        report["pairs_capped"] += len(pairs) - max_pairs_per_point
        keep = sorted((rng or random.Random(0)).sample(range(len(pairs)), max_pairs_per_point))
        pairs = [pairs[i] for i in keep]
    return pairs


def count_pairs(point: dict, max_pairs_per_point: int | None = None) -> int:
    """How many pairs :func:`point_pairs` gives at ``point`` (without sampling them)."""
    verdicts: dict[str, set] = {}
    for cont in point.get("continuations") or []:
        text = cont.get("text")
        if isinstance(text, str) and text.strip() and isinstance(cont.get("verified"), bool):
            verdicts.setdefault(text, set()).add(cont["verified"])
    n = sum(1 for v in verdicts.values() if v == {True}) * sum(1 for v in verdicts.values() if v == {False})
    return min(n, max_pairs_per_point) if max_pairs_per_point is not None else n
