"""The demo's data regime as parameters: how many training records carry a verified reference path,
how noisy the exploration verifier is, and the rows of the baselines built from the same data.

- :func:`cover_references`: exactly ``round(coverage * n)`` records (a seeded choice) keep their
  reference path; the others lose it. Exploration still runs on every record: a record without a
  reference samples its own path and keeps the first one the verifier passes as the path to branch
  from (``reference_source: "sampled"``, see :mod:`srpo_trl.exploration`).
- :func:`anchor_rows`: a sampled path is the model's own, not a verified reference, so its pair
  rows get ``reference: None`` and the trainer anchors them on ``prefix + chosen`` (docs/method.md:
  ``r = p + y+``).
- :class:`NoisyVerifier`: flips a seeded share of a verifier's verdicts (the same path of the same
  record always gets the same verdict).
- :func:`rft_rows`: rejection-sampling fine-tuning: NLL on every verifier-passed path (prefix +
  passed continuation) and on the references the records carry, de-duplicated.
- :func:`reference_rows`: NLL on references: the pair rows that carry a reference.
"""

from __future__ import annotations

import random
import zlib
from typing import Any, Callable


def _check_rate(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return value


def cover_references(records: list[dict], coverage: float, seed: int) -> list[dict]:
    """Copies of ``records`` where exactly ``round(coverage * len(records))`` (a seeded choice) keep
    their ``reference``; the others have none (the key removed)."""
    coverage = _check_rate("reference coverage", coverage)
    keep = set(random.Random(f"coverage:{seed}").sample(range(len(records)), round(coverage * len(records))))
    out = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if i not in keep:
            rec.pop("reference", None)
        out.append(rec)
    return out


class NoisyVerifier:
    """A verifier whose verdict is flipped on a seeded share ``rate`` of the paths it sees.

    Whether a path is flipped depends only on (seed, record id, path text): the same path of the
    same record always gets the same verdict, so noise never makes one text both favorable and
    unfavorable (which exploration would drop as conflicting)."""

    def __init__(self, verifier: Callable, rate: float, seed: int):
        from ..verifiers import as_verifier

        self.base = as_verifier(verifier)
        self.rate = _check_rate("verifier noise", rate)
        self.seed = int(seed)
        self.required_fields = tuple(getattr(self.base, "required_fields", ()))
        self.__name__ = f"{getattr(self.base, '__name__', 'verifier')}+noise{self.rate:g}"

    def flips(self, record: dict, path_text: str) -> bool:
        key = f"{self.seed}\0{record.get('id')}\0{path_text}".encode("utf-8")
        return zlib.crc32(key) / 2**32 < self.rate

    def __call__(self, record: dict, path_text: str):
        from ..verifiers import Verdict

        verdict = self.base(record, path_text)
        if verdict.error or not self.flips(record, path_text):
            return verdict
        return Verdict(not verdict.passed, verdict.label, f"{verdict.reason} [flipped by verifier noise]")


def anchor_rows(explored: list[dict]) -> list[dict]:
    """Exploration lines whose reference was sampled (not given) lose it, so their pair rows are
    anchored on ``prefix + chosen``; the sampled path is kept as ``sampled_reference``."""
    out = []
    for line in explored:
        if line.get("reference_source") != "given" and line.get("reference") is not None:
            line = dict(line, sampled_reference=line["reference"], reference=None)
        out.append(line)
    return out


def _path_rows(record: dict, path: list[str], other_answer: Callable[[dict, list[str]], str]) -> dict:
    return {
        "id": str(record["id"]),
        "prompt": record["prompt"],
        "images": record.get("images") or [],
        "prefix": path[:-1],
        "chosen": path[-1],
        "rejected": other_answer(record, path),
        "reference": path,
    }


def rft_rows(
    explored: list[dict], other_answer: Callable[[dict, list[str]], str]
) -> tuple[list[dict], dict[str, int]]:
    """Rejection-sampling fine-tuning rows: per exploration line, its given reference (if any) and every
    distinct path ``prefix + continuation`` the verifier passed, as a reference path (a row with
    ``srpo_lambda=0`` trains only its NLL; ``rejected`` = ``other_answer(record, path)`` is scored but
    carries no loss). Returns the rows and counts (paths passed, duplicates, records without any)."""
    rows, counts = [], {"references": 0, "passed_paths": 0, "duplicates": 0, "records_without_rows": 0}
    for line in explored:
        seen: set[tuple[str, ...]] = set()
        paths: list[list[str]] = []
        if line.get("reference_source") == "given" and line.get("reference"):
            paths.append(list(line["reference"]))
            counts["references"] += 1
        for point in line.get("points") or []:
            for cont in point.get("continuations") or []:
                if cont.get("verified") is not True:
                    continue
                steps = [s.strip() for s in cont["text"].splitlines() if s.strip()]
                if steps:
                    paths.append(list(point.get("prefix") or []) + steps)
                    counts["passed_paths"] += 1
        for path in paths:
            if tuple(path) in seen:
                counts["duplicates"] += 1
                continue
            seen.add(tuple(path))
            rows.append(_path_rows(line, path, other_answer))
        if not seen:
            counts["records_without_rows"] += 1
    return rows, counts


def reference_rows(pairs: Any) -> list[dict]:
    """The pair rows that carry a reference path (NLL on references trains these with lambda 0)."""
    return [dict(row) for row in pairs if row.get("reference")]
