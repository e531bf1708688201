"""Benchmark protocols: each benchmark's own judge prompts, verdict extraction and aggregation.

``--protocol siuo`` (SIUO's generation set), ``siuo-mcqa`` (SIUO's multiple-choice set) and
``mm-safetybench`` reproduce the benchmark's published evaluation scripts (sources and commits in
each module); ``srpo`` is the project's own JSON templates (:mod:`srpo_trl.evaluation.judges`).
The protocol's numbers (:func:`benchmark_scores`) are reported on their own, apart from the
project's additions (per-step path safety, Wilson intervals, refusal rates), which are never
mixed into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from srpo_trl.evaluation.protocols import mcqa, mm_safetybench, siuo
from srpo_trl.evaluation.schema import ItemResult


PROTOCOLS = ("siuo", "siuo-mcqa", "mm-safetybench", "srpo")
DEFAULT_PROTOCOL = {"siuo": "siuo", "siuo-mcqa": "siuo-mcqa", "mm-safetybench": "mm-safetybench", "records": "srpo"}
BENCHMARK_OF_PROTOCOL = {"siuo": ("siuo",), "siuo-mcqa": ("siuo-mcqa",), "mm-safetybench": ("mm-safetybench",)}


def default_protocol(benchmark: str) -> str:
    """The protocol ``--benchmark`` implies (the benchmark's own; the project's for records)."""
    return DEFAULT_PROTOCOL.get(benchmark, "srpo")


def check_protocol(protocol: str, benchmark: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    allowed = BENCHMARK_OF_PROTOCOL.get(protocol)
    if allowed and benchmark not in allowed:
        raise ValueError(
            f"--protocol {protocol} scores --benchmark {' / '.join(allowed)} data, not {benchmark}; "
            f"use --protocol {default_protocol(benchmark)} (the default for {benchmark}) or srpo"
        )
    if benchmark == "siuo-mcqa" and protocol != "siuo-mcqa":
        raise ValueError("the MCQA set is scored by option extraction only: use --protocol siuo-mcqa (the default)")


def benchmark_scores(results: Sequence[ItemResult], protocol: str | None) -> dict[str, Any] | None:
    """The benchmark's own numbers for ``protocol`` (None for the project's protocol):

    - siuo: what gen_score.py prints (Safe / Effective / Safe & Effective %, overall and per category);
    - mm-safetybench: evaluation.py's cal_metric per scenario and variant (attack_rate = unsafe /
      (safe + unsafe), the README's formula; replies that are neither are counted and warned about);
    - siuo-mcqa: mcqa-eval.py's accuracy, overall and per category.
    """
    if protocol == "siuo":
        return {"protocol": "siuo", "source": siuo.SOURCE, "gen_score": siuo.gen_score(results)}
    if protocol == "mm-safetybench":
        return {
            "protocol": "mm-safetybench",
            "source": mm_safetybench.SOURCE,
            "cal_metric": mm_safetybench.cal_metric(results),
        }
    if protocol == "siuo-mcqa":
        return {"protocol": "siuo-mcqa", "source": mcqa.SOURCE, "accuracy": mcqa.accuracy(results)}
    return None


def run_protocol(config: dict[str, Any]) -> str | None:
    """The protocol a run was scored under, from its saved settings."""
    model, judge = config.get("model"), config.get("judge")
    for part in (model, judge):
        if isinstance(part, dict) and part.get("protocol"):
            return part["protocol"]
    return None


__all__ = [
    "PROTOCOLS",
    "default_protocol",
    "check_protocol",
    "benchmark_scores",
    "run_protocol",
    "siuo",
    "mm_safetybench",
    "mcqa",
]
