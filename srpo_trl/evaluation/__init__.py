"""Safety evaluation of reasoning paths (RSBench-style), with SIUO and MM-SafetyBench formats.

Command line (``srpo-trl evaluate``; see docs/evaluation.md)::

    srpo-trl evaluate --model PATH [--adapter PATH] --benchmark siuo --data siuo_gen.json \\
        --images DIR --judge openai-compatible --judge-url http://... --judge-model NAME \\
        --num-samples 3 --out report/
    srpo-trl evaluate --benchmark siuo --responses siuo_gen-mymodel.json --judge openai-compatible ...  # no model
    srpo-trl evaluate --benchmark siuo --import-verdicts *-gpteval-safe-pro.json *-gpteval-effective-pro.json --out report/

``--protocol`` (default: the benchmark's own, see :mod:`srpo_trl.evaluation.protocols`) sets the
judge prompts, verdict reading and counting; the benchmark's numbers are reported apart from the
project's metrics.

Python::

    from srpo_trl.evaluation import EvalConfig, RuleJudge, evaluate, load_benchmark, write_report
    items = load_benchmark("records", "records.jsonl")
    run = evaluate(items, backend, RuleJudge(), EvalConfig(samples=3), label="trained", state_dir="out/runs/trained")
    write_report([run], "out")

Modules: ``protocols`` (each benchmark's own judge prompts and scripts' counting; score-only and
imports), ``subsets`` (stratified ``--limit``), ``loaders`` (benchmarks -> items), ``runner``
(generate + judge, resumable), ``judges`` (rule / judge model), ``metrics`` (pure functions on verdicts), ``report`` (JSON, markdown, PNG),
``callback`` (:class:`SafetyEvalCallback` for ``SRPOTrainer``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .judges import ASPECTS, JudgeError, JudgeTemplates, ModelJudge, RuleJudge
from .loaders import (
    BENCHMARKS,
    MMSB_VARIANTS,
    LoadError,
    load_benchmark,
    load_mm_safetybench,
    load_records,
    load_siuo,
)
from .metrics import METRIC_LABELS, compute_metrics, format_proportion, majority, wilson_interval
from .report import build_report, load_report, markdown_report, recompute_metrics, write_report
from .runner import (
    STATE_FILE,
    EvalConfig,
    EvaluationStateError,
    check_resume,
    evaluate,
    load_state,
    run_settings,
)
from .schema import EvalItem, EvalVerdict, ItemResult, RunResult, Verdict


__all__ = [
    "EvalItem",
    "EvalVerdict",
    "Verdict",
    "ItemResult",
    "RunResult",
    "load_benchmark",
    "load_siuo",
    "load_mm_safetybench",
    "load_records",
    "LoadError",
    "RuleJudge",
    "ModelJudge",
    "JudgeTemplates",
    "JudgeError",
    "compute_metrics",
    "majority",
    "wilson_interval",
    "format_proportion",
    "EvalConfig",
    "evaluate",
    "evaluate_to_dir",
    "load_state",
    "load_runs",
    "EvaluationStateError",
    "build_report",
    "write_report",
    "load_report",
    "markdown_report",
    "recompute_metrics",
    "check_resume",
    "run_settings",
    "ASPECTS",
    "BENCHMARKS",
    "MMSB_VARIANTS",
    "METRIC_LABELS",
    "SafetyEvalCallback",
]

RUNS_DIR = "runs"


def __getattr__(name: str) -> Any:
    if name == "SafetyEvalCallback":  # imports transformers: only when asked for
        from .callback import SafetyEvalCallback

        return SafetyEvalCallback
    raise AttributeError(f"module 'srpo_trl.evaluation' has no attribute {name!r}")


def load_runs(out_dir: str | Path) -> list[RunResult]:
    """Every model evaluated into ``out_dir`` (``out_dir/runs/<label>/results.jsonl``), by label."""
    runs_dir = Path(out_dir) / RUNS_DIR
    return [load_state(path) for path in sorted(runs_dir.glob(f"*/{STATE_FILE}"))]


def evaluate_to_dir(
    items: list[EvalItem],
    backend: Any,
    judge: Any,
    config: EvalConfig,
    out_dir: str | Path,
    *,
    label: str,
    model_info: dict[str, Any] | None = None,
    vote: str = "majority",
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[RunResult, dict[str, Path]]:
    """Evaluate one model into ``out_dir/runs/<label>/`` (resumable), then write the report of every
    model evaluated into ``out_dir`` (side by side). Returns the run and the report paths."""
    run = evaluate(
        items,
        backend,
        judge,
        config,
        label=label,
        state_dir=Path(out_dir) / RUNS_DIR / safe_label(label),
        model_info=model_info,
        progress=progress,
        overwrite=overwrite,
    )
    paths = write_report(load_runs(out_dir), out_dir, vote=vote)
    return run, paths


def safe_label(label: str) -> str:
    """A label usable as a folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9._+=-]+", "_", label).strip("._") or "model"
    return cleaned
