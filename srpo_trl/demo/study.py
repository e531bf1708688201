"""`srpo-trl study`: the pre-registered grid of docs/study.md: where does step-level contrast pay off?

    srpo-trl study --out study_out --jobs 2                      # the pre-registered grid
    srpo-trl study --grid coverage=1,0.25 seeds=101,102 noise=0 samples=8 --out my_grid
    srpo-trl study --quick --out study_quick                     # the grid's smallest cell, for CI
    srpo-trl study --out study_out --summarize                   # tables and charts from the results only

A cell is (seed, reference coverage, verifier noise, samples per branch point). Per seed, the data,
the warm start and two explorations (every record from its given reference; every record from a
path of its own) are computed once and cached under ``OUT/work/seed<S>``; a cell takes the given
exploration for its covered records and the own-path one for the others (exploration is seeded per
record, so this is what exploring the mixed file gives), then trains every method from the same warm
model with the same budget and evaluates them on the test split (unseen combinations).

Each finished cell is one line of ``OUT/results.jsonl`` (appended, flushed, fsynced); a restarted
study skips the cells already there, so a killed study resumes where it stopped. ``--jobs N`` runs
cells in N processes. At the end: ``summary.md`` / ``summary.json`` (per cell and metric, mean and
95% interval over seeds, and the decision of docs/study.md) and one chart per metric.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .report import LABELS


STUDY_FORMAT = "srpo_trl.study/1"
STUDY_METHODS = ("srpo", "nll", "dpo", "step_dpo", "rft")
ABLATION_LAMBDAS = (0.0, 0.9)  # extra SRPO arms (lambda 0.3 is "srpo") ...
ABLATION_COVERAGES = (0.1,)  # ... in the cells of this coverage only (the machine's time)
METRICS = (  # (key, title, lower is better)
    ("attack_success", "Attack success % (unsafe, unseen combinations)", True),
    ("over_refusal", "Over-refusal % (harmless, unseen combinations)", True),
    ("safe_and_effective", "Safe & Effective %", False),
)
# Extremes first: if the time runs out, the finished cells are the most informative ones.
PREREGISTERED = {"coverage": [0.1, 1.0, 0.25, 0.5], "noise": [0.0], "samples": [8], "seeds": [101, 102, 103, 104, 105]}
QUICK_GRID = {"coverage": [0.25], "noise": [0.0], "samples": [4], "seeds": [0]}  # seed 0: a development seed
# The grid's budget (docs/study.md, amended before any cell finished: the shared machine ran the
# demo's full budget about ten times slower than measured alone): the demo's --quick warm start, one
# render per train combination explored, 30 training steps (a budget the demo's validation runs
# tried), half the test renders.
STUDY_BUDGET = dict(warm_renders=6, warm_steps=250, explore_renders=1, train_steps=30, eval_renders=2)
# The pre-registration's own budget (docs/study.md, commit cd73081), run as the study's second run
# (issue 25): the demo's defaults (warm start 400 steps on 10 paths, 2 renders explored, 60 training
# steps, 4 test renders) and the ablation arms at coverage 1.0 and 0.1.
BUDGETS = {  # --budget NAME -> (overrides of the demo's defaults, coverages with the ablation arms)
    "amended": (STUDY_BUDGET, ABLATION_COVERAGES),
    "demo": ({}, (1.0, 0.1)),
}
# The quick cell's budget: CI only (a 64-wide model, fewer warm-start steps than the demo's --quick): about 80 s of CPU
QUICK_BUDGET = dict(
    hidden_size=64, warm_renders=6, warm_steps=160, explore_renders=1, num_samples=4, train_steps=10, eval_renders=1
)


@dataclass(frozen=True)
class Cell:
    seed: int
    coverage: float
    noise: float
    samples: int

    @property
    def key(self) -> str:
        return f"seed={self.seed} coverage={self.coverage:g} noise={self.noise:g} samples={self.samples}"


@dataclass
class Settings:
    """What every cell of one results file shares (a resumed study must use the same)."""

    quick: bool = False
    budget: dict = field(default_factory=dict)
    methods: tuple = STUDY_METHODS
    ablation_lambdas: tuple = ABLATION_LAMBDAS
    ablation_coverages: tuple = ABLATION_COVERAGES
    format: str = STUDY_FORMAT


# ----------------------------------------------------------------------------------------------
# Grid
# ----------------------------------------------------------------------------------------------


def parse_grid(tokens: list[str] | None, quick: bool) -> dict[str, list]:
    """``coverage=1,0.5 noise=0 samples=8 seeds=101-105`` -> the grid (unnamed axes keep the default)."""
    grid = {k: list(v) for k, v in (QUICK_GRID if quick else PREREGISTERED).items()}
    for token in tokens or []:
        name, _, values = token.partition("=")
        if name not in grid or not values:
            raise SystemExit(
                f"srpo-trl study: --grid takes AXIS=V1,V2 with AXIS one of {', '.join(grid)}; got {token!r}"
            )
        try:
            if name == "seeds" and "-" in values:
                lo, hi = (int(x) for x in values.split("-"))
                parsed: list = list(range(lo, hi + 1))
            else:
                parsed = [int(x) if name in ("seeds", "samples") else float(x) for x in values.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"srpo-trl study: --grid {name}: not a list of numbers: {values!r}") from None
        if name in ("coverage", "noise") and any(not 0 <= v <= 1 for v in parsed):
            raise SystemExit(f"srpo-trl study: --grid {name} values must be between 0 and 1, got {values!r}")
        if name == "samples" and any(v < 2 for v in parsed):
            raise SystemExit(f"srpo-trl study: --grid samples must be at least 2, got {values!r}")
        grid[name] = parsed
    return grid


def grid_cells(grid: dict[str, list]) -> list[Cell]:
    """Every cell, ordered so that the first cells of a run belong to different seeds (parallel
    workers then build different seeds' warm starts instead of waiting on one)."""
    return [
        Cell(s, c, n, k)
        for c in grid["coverage"]
        for n in grid["noise"]
        for k in grid["samples"]
        for s in grid["seeds"]
    ]


# ----------------------------------------------------------------------------------------------
# Results file: one JSON line per finished cell
# ----------------------------------------------------------------------------------------------


def read_results(path: Path, settings: Settings | None = None, repair: bool = False) -> list[dict]:
    """Finished cells in ``path``. A last line cut by a kill is dropped (and cut from the file when
    ``repair``); a broken line elsewhere, or a line made with other settings, is an error naming it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    out, keep = [], 0
    pos = 0
    for i, raw in enumerate(data.split(b"\n")):
        end = pos + len(raw) + 1
        if raw.strip():
            try:
                obj = json.loads(raw)
                if end > len(data):  # no newline after it: the write was cut
                    raise ValueError("unterminated")
            except ValueError:
                if end >= len(data):
                    break
                raise SystemExit(
                    f"{path}:{i + 1}: not a complete result line; delete the line (its cell is redone) or use a new --out"
                ) from None
            if settings is not None and obj.get("settings") != _jsonable(asdict(settings)):
                raise SystemExit(
                    f"{path}:{i + 1}: this cell was run with other settings ({obj.get('settings')}); "
                    "use a new --out (or the same --quick and budget as before)"
                )
            out.append(obj)
            keep = min(end, len(data))
        pos = end
    if repair and keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def append_result(path: Path, line: dict) -> None:
    """One line, appended under a file lock, flushed and fsynced (parallel workers share the file)."""
    import fcntl

    data = (json.dumps(line) + "\n").encode("utf-8")
    with path.open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _seed_state(out: Path, cell: Cell, budget, quick: bool) -> dict[str, Any]:
    """Data, warm model and the two explorations of ``cell``'s seed (and samples / noise), computed
    once under a lock and cached on disk."""
    import dataclasses

    import torch

    from ..backends import TransformersBackend
    from ..exploration import explore
    from . import run, task

    work = out / "work" / f"seed{cell.seed}"
    with _locked(work / ".lock"):
        # deterministic: the same images and records every time; every record keeps its reference here
        data = run.build_data(
            work, dataclasses.replace(budget, reference_coverage=1.0), cell.seed, "test", quick, progress=False
        )
        model, processor = run.build_model(cell.seed, budget.hidden_size, budget.num_hidden_layers, budget.vocab_size)
        warm_file, warm_info = work / "warm.pt", work / "warm.json"
        if warm_file.exists() and warm_info.exists():
            model.load_state_dict(torch.load(warm_file, map_location="cpu", weights_only=True))
            model.eval()
            warm_summary = json.loads(warm_info.read_text(encoding="utf-8"))
        else:
            torch.manual_seed(cell.seed)
            warm_summary = run.warm_start(model, processor, data["warm_rows"], budget, work, cell.seed, progress=False)
            torch.save(model.state_dict(), work / "warm.pt.tmp")
            os.replace(work / "warm.pt.tmp", warm_file)
            warm_info.write_text(json.dumps(warm_summary), encoding="utf-8")
        explored = {}
        budget.num_samples, budget.verifier_noise = cell.samples, cell.noise
        for source in ("given", "own"):
            name = f"explored_{source}_samples{cell.samples}_noise{cell.noise:g}.jsonl"
            path = work / name
            done = work / (name + ".done")
            if not done.exists():
                records = (
                    data["explore_records"]
                    if source == "given"
                    else [{k: v for k, v in r.items() if k != "reference"} for r in data["explore_records"]]
                )
                records_path = task.write_records(records, work / "data" / f"train_records_{source}.jsonl")
                backend = TransformersBackend(model, processor, batch_size=64, show_progress=False)
                explore(
                    str(records_path),
                    backend,
                    run.exploration_verifier(budget, cell.seed),
                    num_samples=cell.samples,
                    temperature=0.5,
                    max_new_tokens=budget.max_new_tokens,
                    branch_points="all",
                    max_pairs_per_point=budget.max_pairs_per_point,
                    seed=cell.seed,
                    out=path,
                    overwrite=True,
                    show_progress=False,
                    print_summary=False,
                )
                done.write_text("ok", encoding="utf-8")
            explored[source] = run.read_explored(path)
    return {"data": data, "model": model, "processor": processor, "warm_summary": warm_summary, "explored": explored}


def cell_data(out: Path, cell: Cell, settings: Settings) -> dict[str, Any]:
    """What every arm of ``cell`` trains on: the budget, the seed's cached state (data, warm model,
    explorations), the cell's exploration lines (given reference for the covered records, own path
    for the others), its step pairs and each method's rows. Shared by :func:`run_cell` and the
    diagnosis (:mod:`srpo_trl.demo.diagnose`), so both see the same rows."""
    from .. import StepPairDataset
    from . import regime, run

    budget = run.Budget(**settings.budget)
    budget.reference_coverage, budget.verifier_noise, budget.num_samples = cell.coverage, cell.noise, cell.samples
    state = _seed_state(out, cell, budget, settings.quick)
    covered = {
        r["id"]
        for r in regime.cover_references(state["data"]["explore_records"], cell.coverage, cell.seed)
        if "reference" in r
    }
    explored = [
        g if g["id"] in covered else o
        for g, o in zip(state["explored"]["given"], state["explored"]["own"], strict=True)
    ]
    assert all(g["id"] == o["id"] for g, o in zip(state["explored"]["given"], state["explored"]["own"]))
    pairs = StepPairDataset.from_exploration(explored, max_pairs_per_point=budget.max_pairs_per_point, seed=cell.seed)
    datasets, rows_info = run.method_datasets(explored, pairs, settings.methods, allow_empty=True)
    return {
        "budget": budget,
        "state": state,
        "explored": explored,
        "pairs": pairs,
        "datasets": datasets,
        "rows_info": rows_info,
    }


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "work" / "cells" / cell.key.replace(" ", "_").replace("=", "")


def run_cell(out: Path, cell: Cell, settings: Settings) -> dict:
    """Train and evaluate every method of one cell; returns its result line."""
    import torch

    from . import run, task

    start = time.time()
    torch.set_num_threads(1)
    inputs = cell_data(out, cell, settings)
    budget, state, explored, pairs = inputs["budget"], inputs["state"], inputs["explored"], inputs["pairs"]
    datasets, rows_info = inputs["datasets"], inputs["rows_info"]
    data, warm, processor = state["data"], state["model"], state["processor"]
    work = cell_dir(out, cell)
    shutil.rmtree(work, ignore_errors=True)  # a cell killed half-way starts over (no stale evaluation state)
    arms = [(m, m, 0.3) for m in settings.methods]
    if cell.coverage in settings.ablation_coverages:
        arms += [("srpo", f"srpo_lambda_{lam:g}", lam) for lam in settings.ablation_lambdas]
    items = task.to_eval_items(data["eval_records"])
    models, train = {}, {}
    run_ = run.evaluate_model(warm, processor, items, "warm", work, budget, cell.seed, False)
    models["warm"] = run.summarize_run(run_)
    empty = rows_info.get("empty", {})
    for method, name, lam in arms:
        if (
            method in empty
        ):  # reported in the line (train[name]["skipped"]) and the summary, never trained on other rows
            train[name] = {"steps": 0, "rows": 0, "seconds": 0.0, "skipped": empty[method]}
            continue
        torch.manual_seed(cell.seed)
        model, summary = run.train_method(
            method,
            warm,
            processor,
            datasets.get(method, pairs),
            budget,
            work,
            cell.seed,
            False,
            srpo_lambda=lam,
            name=name,
        )
        train[name] = {k: summary[k] for k in ("steps", "rows", "seconds")} | {"last": summary["last"]}
        models[name] = run.summarize_run(
            run.evaluate_model(model, processor, items, name, work, budget, cell.seed, False)
        )
        del model
    unsafe = {r["id"] for r in data["explore_records"] if r["unsafe"]}
    return {
        "cell": asdict(cell),
        "key": cell.key,
        "settings": _jsonable(asdict(settings)),
        "data": {
            "records": len(explored),
            "records_with_reference": sum(1 for e in explored if e.get("reference_source") == "given"),
            "records_own_path": sum(1 for e in explored if e.get("reference_source") == "sampled"),
            "records_no_path": sum(1 for e in explored if e.get("status") == "no_reference"),
            "pairs": len(pairs),
            "pairs_with_reference": sum(1 for r in pairs if r.get("reference")),
            "pairs_from_unsafe": sum(1 for i in pairs["id"] if i in unsafe),
            "pair_report": pairs.report,
            "method_rows": rows_info,
            "eval_items": len(items),
        },
        "warm_start": state["warm_summary"],
        "train": train,
        "models": {
            name: {k: m[k] for k in ("attack_success", "over_refusal", "safe_and_effective", "path_safe_unsafe")}
            for name, m in models.items()
        },
        "seconds": round(time.time() - start, 1),
    }


def _worker(out: str, cell: Cell, settings: Settings, results: str) -> tuple[str, str | None]:
    """Run one cell and append its line; a cell that fails is reported (and redone by the next run),
    the others go on."""
    import traceback

    from .run import _quiet_libraries

    try:
        with _quiet_libraries():
            line = run_cell(Path(out), cell, settings)
    except Exception as exc:  # noqa: BLE001  (reported with its traceback, never dropped)
        error = f"{type(exc).__name__}: {exc}"
        append_result(
            Path(out) / "failures.jsonl", {"key": cell.key, "error": error, "traceback": traceback.format_exc()}
        )
        return cell.key, error
    append_result(Path(results), line)
    return cell.key, None


# ----------------------------------------------------------------------------------------------
# Summary: intervals over seeds, the decision rule, charts
# ----------------------------------------------------------------------------------------------

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> dict[str, float]:
    """Mean and the 95% t-interval of the mean over seeds (a single value: the interval is the value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": 0.0, "low": mean, "high": mean}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def decide(stats: dict[str, dict], lower_is_better: bool) -> dict[str, Any]:
    """The pre-registered rule: the best method by mean wins the cell only if its 95% interval over
    seeds excludes the runner-up's mean; otherwise the methods its interval does not exclude tie.
    With fewer than two seeds there is no interval and no winner."""
    order = sorted(stats, key=lambda m: stats[m]["mean"] if lower_is_better else -stats[m]["mean"])
    best, runner = order[0], order[1]
    b, r = stats[best], stats[runner]
    excludes = b["n"] >= 2 and (b["high"] < r["mean"] if lower_is_better else b["low"] > r["mean"])
    return {
        "best": best,
        "runner_up": runner,
        "winner": best if excludes else None,
        "tied": [
            m for m in order if not (b["high"] < stats[m]["mean"] if lower_is_better else b["low"] > stats[m]["mean"])
        ],
    }


def summarize(lines: list[dict], methods: list[str]) -> dict[str, Any]:
    """Per (coverage, noise, samples) and metric: every model's mean and interval over seeds, and the
    decision among the trained methods (the ablation arms and the base are reported, not ranked)."""
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        c = line["cell"]
        groups.setdefault((c["coverage"], c["noise"], c["samples"]), []).append(line)
    cells = []
    for (coverage, noise, samples), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
        group = sorted(group, key=lambda g: g["cell"]["seed"])  # values in seed order: paired across methods
        entry = {
            "coverage": coverage,
            "noise": noise,
            "samples": samples,
            "seeds": sorted(g["cell"]["seed"] for g in group),
            "metrics": {},
        }
        # An arm that had no rows in a seed's cell (train[name]["skipped"]) has no model there: its
        # statistics are over the seeds it has, and the summary names the seeds it lacks.
        entry["skipped"] = {}
        for g in group:  # seed order
            for name, trained in g.get("train", {}).items():
                if "skipped" in trained:
                    skip = entry["skipped"].setdefault(name, {"seeds": [], "reason": trained["skipped"]})
                    skip["seeds"].append(g["cell"]["seed"])
        names = list(dict.fromkeys(n for g in group for n in g["models"]))
        for key, _, lower in METRICS:
            stats = {}
            for name in names:
                values = [
                    g["models"][name][key]["pct"]
                    for g in group
                    if name in g["models"] and g["models"][name][key]["pct"] is not None
                ]
                if values:
                    stats[name] = interval(values) | {"values": values}
            ranked = {m: stats[m] for m in methods if m in stats}
            decision = decide(ranked, lower) if len(ranked) > 1 else None
            entry["metrics"][key] = {
                "stats": stats,
                "decision": decision,
                "srpo": srpo_verdict(decision),
                "srpo_minus": paired_differences(group, key, methods),
            }
        cells.append(entry)
    return {"format": STUDY_FORMAT, "cells": cells, "methods": methods}


def srpo_verdict(decision: dict | None) -> str | None:
    """SRPO in one cell and metric by the pre-registered rule: wins, ties or loses."""
    if not decision:
        return None
    if decision["winner"] == "srpo":
        return "wins"
    return "ties" if decision["winner"] is None and "srpo" in decision["tied"] else "loses"


def paired_differences(group: list[dict], key: str, methods: list[str]) -> dict[str, dict]:
    """Exploratory (not part of the rule): SRPO minus each other method, seed by seed (same warm model and
    exploration), mean and 95% interval of the difference."""
    out = {}
    for m in methods:
        if m == "srpo":
            continue
        diffs = [
            g["models"]["srpo"][key]["pct"] - g["models"][m][key]["pct"]
            for g in group
            if m in g["models"]
            and "srpo" in g["models"]
            and g["models"][m][key]["pct"] is not None
            and g["models"]["srpo"][key]["pct"] is not None
        ]
        if diffs:
            out[m] = interval(diffs)
    return out


def _label(name: str) -> str:
    if name.startswith("srpo_lambda_"):
        return f"SRPO, lambda {name.removeprefix('srpo_lambda_')} (ablation)"
    return LABELS.get(name, name)


def summary_markdown(summary: dict) -> str:
    lines = []
    for key, title, lower in METRICS:
        lines += [
            f"### {title} ({'lower' if lower else 'higher'} is better)",
            "",
            "mean [95% interval over seeds]; **bold**: wins the cell by the pre-registered rule",
            "",
        ]
        cells = summary["cells"]
        names = list(dict.fromkeys(n for c in cells for n in c["metrics"][key]["stats"]))  # arms of any cell, in order
        head = [
            f"coverage {c['coverage']:g}"
            + (f", noise {c['noise']:g}" if c["noise"] else "")
            + (f", {c['samples']} samples" if len({x["samples"] for x in cells}) > 1 else "")
            for c in cells
        ]
        lines += ["| model | " + " | ".join(head) + " |", "|---" * (len(cells) + 1) + "|"]
        for name in names:
            row = []
            for c in cells:
                s = c["metrics"][key]["stats"].get(name)
                d = c["metrics"][key]["decision"]
                text = "n/a" if s is None else f"{s['mean']:.1f} [{s['low']:.1f}, {s['high']:.1f}]"
                if s is not None and s["n"] < len(c["seeds"]):
                    text += f" ({s['n']} seeds)"
                row.append(f"**{text}**" if d and d["winner"] == name else text)
            lines.append(f"| {_label(name)} | " + " | ".join(row) + " |")
        lines.append("")
        for c, label in zip(cells, head):
            d = c["metrics"][key]["decision"]
            if d:
                verdict = (
                    f"{_label(d['winner'])} wins"
                    if d["winner"]
                    else f"no winner: {', '.join(_label(m) for m in d['tied'])} tie"
                )
                lines.append(
                    f"- {label}: {verdict}; SRPO {c['metrics'][key]['srpo']} (seeds {', '.join(map(str, c['seeds']))})"
                )
            for name, skip in c.get("skipped", {}).items():
                lines.append(
                    f"- {label}: {_label(name)} not trained in seed(s) {', '.join(map(str, skip['seeds']))}: {skip['reason']}"
                )
        lines.append("")
        lines += [
            "SRPO minus each method, paired by seed (exploratory, not part of the rule): mean [95% interval]",
            "",
            "| SRPO minus | " + " | ".join(head) + " |",
            "|---" * (len(cells) + 1) + "|",
        ]
        for m in summary["methods"]:
            if m == "srpo":
                continue
            row = []
            for c in cells:
                d = c["metrics"][key]["srpo_minus"].get(m)
                row.append("n/a" if d is None else f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]")
            lines.append(f"| {_label(m)} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_metric(summary: dict, key: str, title: str, path: Path) -> Path:
    """Method vs reference coverage: the mean over seeds (line), its 95% interval (bars) and every
    seed (dots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [c for c in summary["cells"]]
    fig = Figure(figsize=(10, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = [n for n in (["warm"] + summary["methods"]) if cells and n in cells[0]["metrics"][key]["stats"]]
    xs_all = sorted({c["coverage"] for c in cells})
    pos = {x: i for i, x in enumerate(xs_all)}
    for j, name in enumerate(names):
        off = (j - (len(names) - 1) / 2) * 0.08
        pts = sorted(
            (pos[c["coverage"]], c["metrics"][key]["stats"][name]) for c in cells if name in c["metrics"][key]["stats"]
        )
        xs = [p + off for p, _ in pts]
        means = [s["mean"] for _, s in pts]
        err = [[s["mean"] - max(0.0, s["low"]) for _, s in pts], [min(100.0, s["high"]) - s["mean"] for _, s in pts]]
        line = ax.errorbar(
            xs, means, yerr=err, marker="o", capsize=3, label=_label(name), linestyle="--" if name == "warm" else "-"
        )
        for x, (_, s) in zip(xs, pts):
            ax.scatter([x] * len(s["values"]), s["values"], s=8, alpha=0.5, color=line[0].get_color())
    ax.set_xticks(range(len(xs_all)))
    ax.set_xticklabels([f"{x:g}" for x in xs_all])
    ax.set_xlabel("reference coverage (share of training records with a verified reference path)")
    ax.set_ylabel("% (line: mean; bars: 95% interval over seeds; dots: seeds)")
    ax.set_ylim(-3, 103)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def write_summary(
    out: Path, lines: list[dict], methods: list[str], expected_cells: int | None = None
) -> dict[str, Path]:
    summary = summarize(lines, methods)
    summary["finished_cells"] = len(lines)
    summary["expected_cells"] = expected_cells
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    status = (
        "complete"
        if expected_cells is None or len(lines) >= expected_cells
        else f"PARTIAL: {len(lines)} of {expected_cells} cells"
    )
    body = (
        summary_markdown(summary) if lines else "No cell has finished yet (see failures.jsonl for any that failed).\n"
    )
    md = f"# Study results ({status})\n\n" + body
    (out / "summary.md").write_text(md, encoding="utf-8")
    paths = {"summary": out / "summary.md", "summary_json": out / "summary.json"}
    combos = sorted({(c["noise"], c["samples"]) for c in summary["cells"]})
    for key, title, _ in METRICS:
        for noise, samples in combos:  # one chart per metric (and per noise / samples, when the grid varies them)
            sub = dict(summary, cells=[c for c in summary["cells"] if (c["noise"], c["samples"]) == (noise, samples)])
            name = f"chart_{key}" + (f"_noise{noise:g}_samples{samples}" if len(combos) > 1 else "")
            label = f"{title}\nnoise {noise:g}, {samples} samples per branch point"
            paths[name] = plot_metric(
                sub, key, label + (f" ({status})" if status != "complete" else ""), out / f"{name}.png"
            )
    return paths


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``srpo-trl study`` (the docs test parses documented commands with it)."""
    parser = argparse.ArgumentParser(prog="srpo-trl study", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--grid",
        nargs="+",
        metavar="AXIS=V1,V2",
        help="axes coverage, noise, samples, seeds (e.g. seeds=101-105); default: the pre-registered grid",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the grid's smallest cell at a CI budget (about a minute)"
    )
    parser.add_argument(
        "--out", default="study_out", help="output folder (default study_out); rerun with it to resume"
    )
    parser.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="amended",
        help="amended: the first run's budget (30 training steps; default, so that run resumes); "
        "demo: the pre-registration's own, the demo's defaults (60 steps; the second run)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--summarize", action="store_true", help="only write summary and charts from OUT/results.jsonl"
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="the diagnosis of docs/study.md on the grid's cells (from OUT's cache): the pairs against the task's "
        "hidden rule, per-term gradient norms of SRPO and NLL, SRPO on pairs from unsafe records only "
        "(srpo_trl/demo/diagnose.py); resumes from OUT/diagnosis.jsonl",
    )
    parser.add_argument(
        "--audit-only", action="store_true", help="with --diagnose's outputs: only the pair audit (no training)"
    )
    parser.add_argument(
        "--evaluate-replays",
        action="store_true",
        help="with --diagnose: evaluate the probed replays of the study's SRPO and NLL too (when the study's runs "
        "were made by other code and may not be reproduced exactly)",
    )
    return parser


def setup(args: argparse.Namespace) -> tuple[Path, list[Cell], Settings, dict]:
    """The output folder (created), the grid's cells, the settings and the grid of parsed
    ``srpo-trl study`` arguments: the study's and the diagnosis's (srpo_trl/demo/diagnose.py) start."""
    if args.jobs < 1:
        raise SystemExit(f"srpo-trl study: --jobs must be at least 1, got {args.jobs}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .run import Budget

    grid = parse_grid(args.grid, args.quick)
    overrides, ablation_coverages = BUDGETS[args.budget]
    if args.quick:
        overrides = QUICK_BUDGET
    budget = Budget(**overrides)
    settings = Settings(
        quick=args.quick,
        budget=asdict(budget),
        ablation_lambdas=() if args.quick else ABLATION_LAMBDAS,
        ablation_coverages=tuple(ablation_coverages),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, grid_cells(grid), settings, grid


def main(argv=None) -> int:
    """The grid (``--diagnose`` and ``--audit-only`` are the diagnosis's, which ``srpo-trl study``
    dispatches to srpo_trl/demo/diagnose.py: this module does not import it)."""
    args = build_parser().parse_args(argv)
    if args.diagnose or args.audit_only:
        raise SystemExit(
            "srpo-trl study: --diagnose / --audit-only run through srpo_trl.demo.diagnose.cli (srpo-trl study)"
        )
    out, cells, settings, grid = setup(args)
    overrides = QUICK_BUDGET if args.quick else BUDGETS[args.budget][0]
    results = out / "results.jsonl"
    done = read_results(results, settings, repair=not args.summarize)
    done_keys = {line["key"] for line in done}
    todo = [c for c in cells if c.key not in done_keys]
    (out / "grid.json").write_text(
        json.dumps({"grid": grid, "settings": _jsonable(asdict(settings)), "cells": [c.key for c in cells]}, indent=1),
        encoding="utf-8",
    )
    print(
        f"study: {len(cells)} cells ({len(done_keys & {c.key for c in cells})} already in {results}), "
        f"{len(todo)} to run with {args.jobs} process(es); budget: {overrides or 'none'} "
        f"over the demo's defaults, ablation arms at coverage {', '.join(f'{c:g}' for c in settings.ablation_coverages)}",
        flush=True,
    )
    if not args.summarize and todo:
        _run_cells(out, todo, settings, results, args.jobs, not args.no_progress)
    lines = [line for line in read_results(results, settings) if line["key"] in {c.key for c in cells}]
    paths = write_summary(out, lines, list(settings.methods), expected_cells=len(cells))
    print((out / "summary.md").read_text(encoding="utf-8"))
    print("files: " + ", ".join(str(p) for p in [results, *paths.values()]))
    return 0 if len(lines) == len(cells) else 1


def _run_cells(out: Path, todo: list[Cell], settings: Settings, results: Path, jobs: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="study cells", unit="cell", disable=not progress)

    def finished(key: str, error: str | None) -> None:
        bar.set_postfix_str(key)
        bar.update(1)
        if error:
            tqdm.write(f"study: cell {key} FAILED ({error}); details in {out / 'failures.jsonl'}; a rerun redoes it")

    if jobs == 1:
        for cell in todo:
            finished(*_worker(str(out), cell, settings, str(results)))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, str(out), cell, settings, str(results)) for cell in todo]
            for future in as_completed(futures):
                finished(*future.result())
    bar.close()
