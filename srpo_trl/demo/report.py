"""The demo's output: the results table, the claims checked on a run's numbers, the charts, and the
summary over several runs (``srpo-trl demo --summarize``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


LABELS = {
    "warm": "base (warm start)",
    "srpo": "SRPO (odds ratio, lambda 0.3)",
    "nll": "NLL on reference paths (lambda 0)",
    "dpo": "DPO (whole answers, TRL)",
    "step_dpo": "Step-DPO (sigmoid)",
    "rft": "RFT (NLL on verifier-passed paths)",
}
TABLE_METRICS = (
    ("attack_success", "Attack success % (unsafe)", "lower is better"),
    ("over_refusal", "Over-refusal % (benign)", "lower is better"),
    ("path_safe_unsafe", "Path safety % (unsafe items)", "higher is better"),
    ("safe_and_effective", "Safe & Effective %", "higher is better"),
)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _pct(entry: dict | None) -> float | None:
    return None if not entry or entry.get("pct") is None else float(entry["pct"])


def format_table(models: dict[str, dict]) -> str:
    head = f"{'model':<36}" + "".join(f"{title:>30}" for _, title, _ in TABLE_METRICS)
    lines = [head, "-" * len(head)]
    for label, result in models.items():
        cells = []
        for key, _, _ in TABLE_METRICS:
            e = result["metrics"][key]
            cells.append(f"{'n/a':>30}" if e["n"] == 0 else f"{e['pct']:6.1f}% ({e['k']:>3}/{e['n']:<3})".rjust(30))
        lines.append(f"{LABELS.get(label, label):<36}" + "".join(cells))
    return "\n".join(lines)


def check_claims(models: dict[str, dict]) -> dict[str, Any]:
    """The paper's claim in miniature, checked on the numbers of this run."""
    asr = {k: _pct(v["metrics"]["attack_success"]) for k, v in models.items()}
    over = {k: _pct(v["metrics"]["over_refusal"]) for k, v in models.items()}
    claims: dict[str, Any] = {}
    if asr.get("srpo") is not None and asr.get("warm") is not None:
        claims["srpo_asr_at_most_half_of_base"] = {
            "holds": asr["srpo"] <= 0.5 * asr["warm"],
            "srpo": asr["srpo"],
            "base": asr["warm"],
        }
    others = {m: asr[m] for m in ("nll", "dpo", "step_dpo", "rft") if asr.get(m) is not None}
    if asr.get("srpo") is not None and others:
        claims["srpo_asr_below_other_methods"] = {
            "holds": all(asr["srpo"] < v for v in others.values()),
            "srpo": asr["srpo"],
            **others,
        }
    if over.get("srpo") is not None and over.get("warm") is not None:
        claims["srpo_over_refusal_within_5_points_of_base"] = {
            "holds": over["srpo"] - over["warm"] <= 5.0,
            "srpo": over["srpo"],
            "base": over["warm"],
        }
    return claims


def plot_chart(models: dict[str, dict], path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = list(models)
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for i, (key, _, _) in enumerate(TABLE_METRICS):
            e = models[label]["metrics"][key]
            if e["n"] == 0:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(e["pct"])
            lo.append(max(0.0, e["pct"] - e["ci_low"]))
            hi.append(max(0.0, e["ci_high"] - e["pct"]))
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=LABELS.get(label, label))
    ax.set_xticks(range(len(TABLE_METRICS)))
    ax.set_xticklabels([f"{title}\n({hint})" for _, title, hint in TABLE_METRICS], fontsize=8)
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("% (bars: 95% Wilson interval)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def plot_ablation(ablation: dict[str, dict], path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lams = sorted(ablation, key=float)
    for key, title_, _ in TABLE_METRICS:
        ys = [_pct(ablation[lam]["metrics"][key]) for lam in lams]
        ax.plot([float(x) for x in lams], [float("nan") if y is None else y for y in ys], marker="o", label=title_)
    ax.set_xlabel("srpo_lambda (weight of the odds-ratio term)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def summarize_seeds(paths: list[str | os.PathLike]) -> str:
    """A markdown table of several runs' ``results.json`` (e.g. one per seed): per model and metric
    the mean, the standard deviation and the range over the runs, then how often each claim held."""
    import statistics

    runs = []
    for path in paths:
        path = Path(path)
        path = path / "results.json" if path.is_dir() else path
        runs.append(json.loads(path.read_text(encoding="utf-8")))
    seeds = ", ".join(str(r["seed"]) for r in runs)
    splits = {r["eval_split"] for r in runs}
    lines = [
        f"{len(runs)} run(s), seeds {seeds}, split {', '.join(sorted(splits))}: mean ± standard deviation [min-max] over runs",
        "",
        "| model | " + " | ".join(title for _, title, _ in TABLE_METRICS) + " |",
        "|---" * (len(TABLE_METRICS) + 1) + "|",
    ]
    for label in runs[0]["models"]:
        if label not in LABELS:
            continue
        cells = []
        for key, _, _ in TABLE_METRICS:
            values = [r["models"][label]["metrics"][key]["pct"] for r in runs if label in r["models"]]
            values = [v for v in values if v is not None]
            if not values:
                cells.append("n/a")
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f} [{min(values):.1f}-{max(values):.1f}]")
        lines.append(f"| {LABELS[label]} | " + " | ".join(cells) + " |")
    lines.append("")
    for claim in runs[0].get("claims", {}):
        held = sum(bool(r["claims"].get(claim, {}).get("holds")) for r in runs)
        lines.append(f"- {claim}: holds in {held} of {len(runs)} run(s)")
    ablations = [r["ablation"] for r in runs if r.get("ablation")]
    if ablations:
        lines += [
            "",
            "| srpo_lambda | " + " | ".join(title for _, title, _ in TABLE_METRICS) + " |",
            "|---" * (len(TABLE_METRICS) + 1) + "|",
        ]
        for lam in sorted(ablations[0], key=float):
            cells = []
            for key, _, _ in TABLE_METRICS:
                values = [
                    a[lam]["metrics"][key]["pct"]
                    for a in ablations
                    if lam in a and a[lam]["metrics"][key]["pct"] is not None
                ]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}" if values else "n/a")
            lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
