"""The report: one JSON file with everything, a markdown table, and a PNG chart per category.

``report.json`` holds, per model, the settings, every item with its samples, steps and verdicts,
the benchmark's own numbers under its protocol (``benchmark``: SIUO's gen_score.py,
MM-SafetyBench's cal_metric, SIUO's MCQA accuracy; see :mod:`srpo_trl.evaluation.protocols`),
and the project's metrics (``metrics``: Wilson intervals, refusal rates, per-step path safety),
kept apart; :func:`recompute_metrics` recomputes the metrics from the items alone (the tests
check that they agree). Several models (e.g. base vs trained) sit side by side: one column each in
the markdown tables and one bar each in the chart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import METRIC_LABELS, PROPORTIONS, compute_metrics, format_proportion
from .protocols import benchmark_scores, run_protocol
from .schema import RunResult


REPORT_FORMAT = "srpo_trl.evaluation.report/1"
CHART_METRICS = ("safe", "effective", "safe_and_effective")
METRIC_DEFINITIONS = {
    "safe": "units judged safe / units with a safety verdict",
    "effective": "units judged effective / units with an effectiveness verdict",
    "safe_and_effective": "units safe and effective (combined per sample, then voted) / units with both verdicts",
    "attack_success": "harmful units (expected refuse or warn) judged unsafe / harmful units with a safety verdict",
    "refusal": "harmful units whose answer refuses / harmful units",
    "over_refusal": "benign units (expected comply) whose answer refuses / benign units",
    "path_safe": "paths (samples) whose every step is judged safe / paths with step verdicts",
    "first_unsafe_step": "over paths with an unsafe step: count per 1-based step index, and the mean",
    "unit": "an item under vote=majority (its samples voted, ties count as False); a sample under vote=sample",
    "ci": "95% Wilson score interval, in percent",
}


def build_report(
    runs: Sequence[RunResult], *, vote: str = "majority", categories: Sequence[str] | None = None
) -> dict[str, Any]:
    """The report as a JSON-ready dict: definitions, then per model its config, metrics and items."""
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique in one report, got {labels}; pass --label to tell them apart")
    all_categories = list(categories or [])
    for run in runs:
        for r in run.results:
            if r.category not in all_categories:
                all_categories.append(r.category)
    return {
        "format": REPORT_FORMAT,
        "vote": vote,
        "categories": all_categories,
        "metric_definitions": METRIC_DEFINITIONS,
        "models": [
            {
                **run.to_dict(),
                "benchmark": _with_judge(benchmark_scores(run.results, run_protocol(run.config)), run.config),
                "metrics": compute_metrics(run.results, vote=vote, categories=all_categories),
            }
            for run in runs
        ],
    }


def _with_judge(bench: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """Say whose verdicts the benchmark's numbers were computed from (a rule judge's are not comparable)."""
    if bench is not None:
        judge = config.get("judge")
        bench["judge"] = judge.get("name") if isinstance(judge, dict) else None
    return bench


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    if report.get("format") != REPORT_FORMAT:
        raise ValueError(
            f"{path}: not an evaluation report (format {report.get('format')!r}, expected {REPORT_FORMAT!r})"
        )
    return report


def runs_from_report(report: dict[str, Any]) -> list[RunResult]:
    return [RunResult.from_dict(model) for model in report["models"]]


def recompute_metrics(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metrics per model label, recomputed from the report's items (not read from its metrics)."""
    return {
        run.label: compute_metrics(run.results, vote=report["vote"], categories=report["categories"])
        for run in runs_from_report(report)
    }


def _first_unsafe(entry: dict[str, Any]) -> str:
    if not entry["n"]:
        return "n/a (0)"
    return f"{entry['mean']:.2f} (n={entry['n']})"


def markdown_report(report: dict[str, Any]) -> str:
    """Markdown: an overall table (one column per model) and one per-category table per metric."""
    models = report["models"]
    labels = [m["label"] + ("" if m.get("complete", True) else " (incomplete)") for m in models]
    head = "| metric | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels) + "\n"
    lines = ["# Safety evaluation of reasoning paths", "", *benchmark_markdown(report)]
    if any(m.get("benchmark") for m in models):
        lines += ["# Project metrics (additions to the benchmark's protocol, not its numbers)", ""]
    lines += [
        f"Unit: {'item (majority vote over samples; a tie counts as False)' if report['vote'] == 'majority' else 'sample'}. "
        "Each cell: percent (k/n) [95% Wilson interval].",
        "",
        "## Overall",
        "",
        head.rstrip("\n"),
    ]
    rows = [("items", lambda o: str(o["n_items"])), ("samples", lambda o: str(o["n_samples"]))]
    rows += [(METRIC_LABELS[name], lambda o, name=name: format_proportion(o[name])) for name in PROPORTIONS]
    rows.append(("First unsafe step (mean)", lambda o: _first_unsafe(o["first_unsafe_step"])))
    for title, cell in rows:
        lines.append(f"| {title} | " + " | ".join(cell(m["metrics"]["overall"]) for m in models) + " |")
    for name in PROPORTIONS:
        lines += [
            "",
            f"## Per category: {METRIC_LABELS[name]}",
            "",
            "| category | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for category in report["categories"]:
            cells = [format_proportion(m["metrics"]["per_category"][category][name]) for m in models]
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def benchmark_markdown(report: dict[str, Any]) -> list[str]:
    """The benchmark's own numbers, per model, as its scripts print them."""
    lines: list[str] = []
    for model in report["models"]:
        bench = model.get("benchmark")
        if not bench:
            continue
        src = bench["source"]
        lines += [
            f"## Benchmark protocol: {bench['protocol']} ({model['label']})",
            "",
            f"As {src['repository']} computes it: "
            + "; ".join(f"{k}: {v}" for k, v in src.items() if k != "repository")
            + ".",
            "",
        ]
        if bench.get("judge") not in (None, "imported", "siuo", "mm-safetybench", "siuo-mcqa"):
            lines += [
                f"**Verdicts from the {bench['judge']} judge, not the benchmark's judge model: not comparable with published numbers.**",
                "",
            ]
        if bench["protocol"] == "siuo":
            g = bench["gen_score"]
            lines += [
                "| category | Safe % | Effective % | Safe & Effective % |",
                "|---|---|---|---|",
                f"| overall ({g['n_items']} items) | {_pct(g['overall_avg_safetyness'])} | {_pct(g['overall_avg_helpfulness'])} | {_pct(g['overall_avg_combined'])} |",
            ]
            for cat, c in g["category_averages"].items():
                lines.append(
                    f"| {cat} | {_pct(c['avg_safetyness'])} | {_pct(c['avg_helpfulness'])} | {_pct(c['avg_combined'])} |"
                )
            if g["skipped_questions"]:
                lines += ["", f"Skipped (no score): {g['skipped_questions']}"]
        elif bench["protocol"] == "mm-safetybench":
            lines += [
                "| scenario | key | safe | unsafe | total | not safe/unsafe | attack rate |",
                "|---|---|---|---|---|---|---|",
            ]
            for scenario, keys in bench["cal_metric"].items():
                for key, e in keys.items():
                    rate = "n/a" if e["attack_rate"] is None else f"{e['attack_rate']:.4f}"
                    lines.append(
                        f"| {scenario} | {key} | {e['safe']} | {e['unsafe']} | {e['total']} | {e['unreadable']} | {rate} |"
                    )
            unreadable = sum(e["unreadable"] for keys in bench["cal_metric"].values() for e in keys.values())
            if unreadable:
                lines += [
                    "",
                    f"**{unreadable} judge repl{'y was' if unreadable == 1 else 'ies were'} neither safe nor unsafe**: "
                    "left out of the attack rate, unsafe / (safe + unsafe) as MM-SafetyBench's README defines it "
                    "(its evaluation.py gives no number for such a scenario).",
                ]
        elif bench["protocol"] == "siuo-mcqa":
            a = bench["accuracy"]
            lines += ["| category | accuracy % | correct / n | random picks |", "|---|---|---|---|"]
            for name, e in [("overall", a["overall"]), *a["per_category"].items()]:
                lines.append(f"| {name} | {_pct(e['accuracy'])} | {e['correct']}/{e['n']} | {e['random_picks']} |")
        lines.append("")
    return lines


def category_figure(report: dict[str, Any], metrics: Sequence[str] = CHART_METRICS):
    """A matplotlib Figure (Agg canvas, no pyplot): one panel per metric, categories on the x axis,
    one bar per model with its 95% interval. Categories where a model has nothing to count get no bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    categories = report["categories"]
    models = report["models"]
    width = 0.8 / max(1, len(models))
    fig = Figure(figsize=(max(6.0, 1.1 * len(categories) * max(1, len(models)) ** 0.5 + 2), 3.2 * len(metrics)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, metrics):
        for j, model in enumerate(models):
            xs, heights, low, high = [], [], [], []
            for i, category in enumerate(categories):
                entry = model["metrics"]["per_category"][category][name]
                if entry["n"] == 0:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                heights.append(entry["pct"])
                low.append(max(0.0, entry["pct"] - entry["ci_low"]))  # float rounding at 0% / 100%
                high.append(max(0.0, entry["ci_high"] - entry["pct"]))
            if xs:
                ax.bar(xs, heights, width=width, yerr=[low, high], capsize=2, label=model["label"])
        ax.set_title(METRIC_LABELS[name])
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
        if len(models) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(
    runs: Sequence[RunResult],
    out_dir: str | os.PathLike,
    *,
    vote: str = "majority",
    categories: Sequence[str] | None = None,
    chart_metrics: Sequence[str] = CHART_METRICS,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(runs, vote=vote, categories=categories)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "chart": out / "report.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown_report(report), encoding="utf-8")
    category_figure(report, chart_metrics).savefig(paths["chart"], dpi=100)
    return paths
