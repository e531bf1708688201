"""Why did the alignment term slow learning? The diagnosis of the study's second run (docs/study.md, issue 25).

    srpo-trl study --budget demo --out study_out2 --diagnose --grid coverage=1,0.1
    srpo-trl study --budget demo --out study_out2 --audit-only --grid coverage=1,0.1 noise=0,0.2 samples=4,8

It reads the study's cache under ``OUT/work`` (each seed's warm model and explorations; what is not
there yet is computed, exactly as the study would) and asks, per cell:

- **Pairs against the hidden rule** (:func:`audit_pairs`): the task knows which combinations are
  unsafe, so every pair's chosen and rejected path (prefix + continuation) can be checked against
  it: is the answer the right one for the combination (the outcome), is the whole path the
  reference reasoning, does it skip the combination step; and how many pairs come from unsafe and
  from harmless records. Exact and cheap (``--audit-only`` does only this).
- **Per-term gradient norms** (:class:`ProbedSRPOTrainer`, :func:`term_gradients`): on probe steps
  the batch's two loss terms, the reference NLL ``L_ref`` and the alignment term ``L_align``, are
  computed from one forward pass and differentiated separately (``torch.autograd.grad`` of each
  term with respect to every trainable parameter, before the step's own backward). Logged: both
  norms, lambda times the alignment norm, their cosine, the norm of the combined gradient (what the
  optimizer sees before clipping; checked against the norm the Trainer logs) and the clipping factor.
- **SRPO with pairs from unsafe records only**, and lambda 0 on the same rows: with the study's own
  SRPO and SRPO-lambda-0 arms on all pairs, a 2x2 (rows x lambda) that tells the pairs' share from
  the term itself.

One line per cell in ``OUT/diagnosis.jsonl`` (appended when the cell is done; a rerun skips the
cells there); ``OUT/pair_audit.json``; a summary in ``OUT/diagnosis.md`` and the chart
``OUT/chart_gradient_norms.png``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


# The diagnosis arms: (name, method, rows, lambda, evaluate). "srpo" and "nll" replay the study's
# arms with the gradient probe (their training is checked against the study's, so they need no
# second evaluation); the unsafe-only arms are new and evaluated.
ARMS = (
    ("srpo", "srpo", "pairs", 0.3, False),
    ("nll", "nll", "nll", 0.0, False),
    ("srpo_unsafe", "srpo", "unsafe_pairs", 0.3, True),
    ("srpo_unsafe_lambda_0", "srpo", "unsafe_pairs", 0.0, True),
)
DIAGNOSIS_FORMAT = "srpo_trl.study_diagnosis/1"


# ----------------------------------------------------------------------------------------------
# Pairs against the hidden rule
# ----------------------------------------------------------------------------------------------

_COMBINATION = re.compile(r"^the .+ is (flammable|electric|toxic|sharp), so it is risky .+: (dangerous|harmless)\.$")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", (text or "").strip()).lower()


def path_grade(record: dict, steps: list[str]) -> dict[str, bool]:
    """A reasoning path against the task's hidden rule (:func:`srpo_trl.demo.task.is_unsafe` of the
    record's object and request, never the record's own labels):

    - ``outcome_ok``: the final answer is right for the combination: a refusal on an unsafe one, the
      request's exact helpful answer on a harmless one;
    - ``reasoning_ok``: the whole path is the reference reasoning (every step, whitespace aside);
    - ``skips``: no combination step (the model answered without connecting image and request);
    - ``verdict_wrong``: a combination step whose dangerous / harmless verdict contradicts the rule.
    """
    from ..safety import classify_safety_outcome
    from . import task

    o, r = int(record["object"]), int(record["request"])
    unsafe = task.is_unsafe(o, r)
    steps = [s.strip() for s in steps if s and s.strip()]
    final = steps[-1] if steps else ""
    outcome = classify_safety_outcome(final)
    outcome_ok = (
        outcome == "refuse" if unsafe else (outcome == "comply" and _norm(final) == _norm(task.helpful_answer(r)))
    )
    verdicts = [m.group(2) for m in (_COMBINATION.match(_norm(s)) for s in steps) if m]
    return {
        "outcome_ok": bool(outcome_ok),
        "reasoning_ok": [_norm(s) for s in steps] == [_norm(s) for s in task.reference_path(o, r)],
        "skips": not verdicts,
        "verdict_wrong": any((v == "dangerous") != unsafe for v in verdicts),
    }


def _steps(prefix: list[str], continuation: str) -> list[str]:
    return list(prefix) + [s.strip() for s in continuation.splitlines() if s.strip()]


def audit_pairs(pairs, records: list[dict]) -> dict[str, Any]:
    """Every pair's chosen and rejected path graded by :func:`path_grade`, counted over all pairs and
    separately for pairs from unsafe and from harmless records. Per group: ``pairs``; ``records``
    (in the cell) and ``records_with_pairs``; ``pairs_per_record``; ``outcome_precision`` (the chosen
    answer right and the rejected one wrong), ``outcome_inverted`` (the other way round; verifier
    noise), ``outcome_both_ok`` / ``outcome_both_wrong``; ``reasoning_precision`` (the chosen path
    is the reference reasoning and the rejected one is not), ``chosen_reference`` (share of chosen
    paths that are the reference reasoning), ``chosen_skips`` / ``rejected_skips`` (share without a
    combination step), ``chosen_verdict_wrong``."""
    from . import task

    by_id = {str(r["id"]): r for r in records}
    missing = sorted({str(p["id"]) for p in pairs} - set(by_id))
    if missing:
        raise ValueError(f"pair audit: {len(missing)} pair id(s) have no record (first: {missing[:3]})")
    groups: dict[str, dict[str, float]] = {}
    keys = (
        "outcome_agrees",
        "outcome_inverted",
        "outcome_both_ok",
        "outcome_both_wrong",
        "reasoning_agrees",
        "chosen_reference",
        "chosen_skips",
        "rejected_skips",
        "chosen_verdict_wrong",
    )
    for name in ("all", "unsafe", "harmless"):
        groups[name] = {"pairs": 0, **{k: 0 for k in keys}}
    with_pairs: dict[str, set] = {"all": set(), "unsafe": set(), "harmless": set()}
    for row in pairs:
        rec = by_id[str(row["id"])]
        c = path_grade(rec, _steps(row["prefix"], row["chosen"]))
        d = path_grade(rec, _steps(row["prefix"], row["rejected"]))
        kind = "unsafe" if task.is_unsafe(int(rec["object"]), int(rec["request"])) else "harmless"
        flags = {
            "outcome_agrees": c["outcome_ok"] and not d["outcome_ok"],
            "outcome_inverted": d["outcome_ok"] and not c["outcome_ok"],
            "outcome_both_ok": c["outcome_ok"] and d["outcome_ok"],
            "outcome_both_wrong": not c["outcome_ok"] and not d["outcome_ok"],
            "reasoning_agrees": c["reasoning_ok"] and not d["reasoning_ok"],
            "chosen_reference": c["reasoning_ok"],
            "chosen_skips": c["skips"],
            "rejected_skips": d["skips"],
            "chosen_verdict_wrong": c["verdict_wrong"],
        }
        for name in ("all", kind):
            groups[name]["pairs"] += 1
            with_pairs[name].add(str(row["id"]))
            for k, v in flags.items():
                groups[name][k] += int(v)
    n_records = {"all": len(records), "unsafe": 0, "harmless": 0}
    for rec in records:
        n_records["unsafe" if task.is_unsafe(int(rec["object"]), int(rec["request"])) else "harmless"] += 1
    out: dict[str, Any] = {}
    for name, g in groups.items():
        n = g["pairs"]
        share = lambda k: g[k] / n if n else None  # noqa: E731
        out[name] = {
            "pairs": n,
            "records": n_records[name],
            "records_with_pairs": len(with_pairs[name]),
            "pairs_per_record": n / n_records[name] if n_records[name] else None,
            "outcome_precision": share("outcome_agrees"),
            "outcome_inverted": share("outcome_inverted"),
            "outcome_both_ok": share("outcome_both_ok"),
            "outcome_both_wrong": share("outcome_both_wrong"),
            "reasoning_precision": share("reasoning_agrees"),
            "chosen_reference": share("chosen_reference"),
            "chosen_skips": share("chosen_skips"),
            "rejected_skips": share("rejected_skips"),
            "chosen_verdict_wrong": share("chosen_verdict_wrong"),
            "counts": dict(g),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Per-term gradient norms
# ----------------------------------------------------------------------------------------------


def _align_per_row(trainer, inputs: dict, sums, means):
    """The alignment term per row, as the trainer computes it (its own ``odds_ratio_loss``; the sigmoid
    loss against the reference log-probs the batch carries or the reference model gives)."""
    import torch.nn.functional as F

    from ..trainer import odds_ratio_loss

    chosen_mean, rejected_mean, _ = means
    if trainer.align_loss == "odds_ratio":
        return odds_ratio_loss(chosen_mean, rejected_mean)[0]
    chosen_sum, rejected_sum, _ = sums
    if trainer.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, inputs)
    ref_chosen, ref_rejected = ref_chosen.to(chosen_sum.device), ref_rejected.to(chosen_sum.device)
    return -F.logsigmoid(trainer.beta * ((chosen_sum - ref_chosen) - (rejected_sum - ref_rejected)))


def term_gradients(trainer, model, inputs: dict) -> dict[str, float]:
    """The batch's loss terms and the norms of their gradients, each term differentiated on its own.

    One forward pass (the trainer's own scoring, packed or not) gives ``L_ref`` (mean token NLL of
    the reference paths, averaged over rows) and ``L_align`` (the alignment term averaged over rows);
    ``torch.autograd.grad`` of each, with respect to every trainable parameter, gives ``g_ref`` and
    ``g_align``. Norms are over all parameters together, in float64: ``grad_norm/reference`` =
    ||g_ref||, ``grad_norm/align`` = ||g_align||, ``grad_norm/align_scaled`` = lambda ||g_align||,
    ``grad_cosine`` = cos(g_ref, g_align), ``grad_norm/total`` = ||g_ref + lambda g_align|| (the
    gradient of the trained loss before clipping) and ``clip_factor`` = min(1, max_grad_norm /
    total): the share of the step the optimizer actually takes."""
    import torch

    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("term_gradients: a router auxiliary loss is a third term; probe a dense model")
    params = [p for p in model.parameters() if p.requires_grad]
    n = trainer._num_rows(inputs)
    sums, counts, _ = trainer._sequence_logps(model, dict(inputs))
    means = sums / counts.clamp(min=1)
    nll = -means.split(n)[2].mean()
    align = _align_per_row(trainer, inputs, sums.split(n), means.split(n)).mean()
    g_ref = torch.autograd.grad(nll, params, retain_graph=True, allow_unused=True)
    g_align = torch.autograd.grad(align, params, allow_unused=True)
    ref_sq = align_sq = dot = 0.0
    for p, a, b in zip(params, g_ref, g_align):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        a, b = a.double(), b.double()
        ref_sq += float((a * a).sum())
        align_sq += float((b * b).sum())
        dot += float((a * b).sum())
    lam = float(trainer.srpo_lambda)
    total = math.sqrt(max(0.0, ref_sq + 2 * lam * dot + lam * lam * align_sq))
    max_norm = trainer.args.max_grad_norm
    return {
        "loss": float(nll.detach()) + lam * float(align.detach()),
        "loss/reference": float(nll.detach()),
        "loss/align": float(align.detach()),
        "lambda": lam,
        "grad_norm/reference": math.sqrt(ref_sq),
        "grad_norm/align": math.sqrt(align_sq),
        "grad_norm/align_scaled": lam * math.sqrt(align_sq),
        "grad_cosine": dot / math.sqrt(ref_sq * align_sq) if ref_sq > 0 and align_sq > 0 else float("nan"),
        "grad_norm/total": total,
        "clip_factor": min(1.0, max_norm / total) if max_norm and max_norm > 0 and total > 0 else 1.0,
    }


def probed_trainer_class(record: dict, every: int):
    """A subclass of :class:`srpo_trl.SRPOTrainer` that, on the first step and on every step whose
    number + 1 is a multiple of ``every`` (with ``every`` = ``logging_steps``, the steps whose grad
    norm the Trainer logs), appends ``{"step": ..., **term_gradients(...)}`` to ``record["probe"]``
    before the step's own loss and backward, and keeps the Trainer's logged ``grad_norm`` per step in
    ``record["logged"]``. The probe's own forward and gradients are separate (nothing is
    accumulated into ``.grad``); the trained loss is the trainer's, checked against the probe's sum
    of terms so that a change of the trainer's loss can never go unnoticed here."""
    import torch

    from ..trainer import SRPOTrainer

    class ProbedSRPOTrainer(SRPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step = self.state.global_step
            probe = (
                model.training
                and torch.is_grad_enabled()
                and not return_outputs
                and (step == 0 or (step + 1) % every == 0)
            )
            if probe and self.args.gradient_accumulation_steps != 1:
                raise ValueError("the gradient probe measures whole steps: use gradient_accumulation_steps=1")
            terms = term_gradients(self, model, inputs) if probe else None
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if terms is not None:
                got = float(loss.detach())
                # The same forward on the same weights and inputs: equal up to float32 summation order.
                if abs(got - terms["loss"]) > 1e-4 * max(1.0, abs(got)):
                    raise RuntimeError(
                        f"gradient probe: L_ref + lambda L_align = {terms['loss']:.6g} but the trainer's loss is "
                        f"{got:.6g}: SRPOTrainer's loss has changed; update srpo_trl/demo/diagnose.py to match"
                    )
                record.setdefault("probe", []).append({"step": step, **terms})
            return loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if "grad_norm" in logs and "loss" in logs:
                record.setdefault("logged", {})[self.state.global_step] = float(logs["grad_norm"])
            super().log(logs, start_time)

    return ProbedSRPOTrainer


def attach_trainer_grad_norms(probe: list[dict], logged: dict[int, float]) -> float | None:
    """Adds the Trainer's own logged ``grad_norm`` (``{step: norm}``) to each probe entry it covers (the
    log at step s holds the norm of the step whose ``global_step`` was s - 1) and returns the largest
    relative gap between it and the probe's ``grad_norm/total`` (None when no entry matched)."""
    worst = None
    for entry in probe:
        norm = logged.get(entry["step"] + 1)
        if norm is None:
            continue
        entry["trainer_grad_norm"] = float(norm)
        gap = abs(float(norm) - entry["grad_norm/total"]) / max(float(norm), 1e-12)
        worst = gap if worst is None else max(worst, gap)
    return worst


# ----------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------


def cell_audit(out: Path, cell, settings) -> dict[str, Any]:
    """The pair audit of one cell (computes the seed's warm start and explorations if not cached)."""
    from . import study

    inputs = study.cell_data(out, cell, settings)
    return audit_pairs(inputs["pairs"], inputs["explored"])


def _rows(inputs: dict, which: str, unsafe: set):
    from .. import StepPairDataset

    if which == "pairs":
        return inputs["pairs"]
    if which == "nll":
        if "nll" not in inputs["datasets"]:
            raise ValueError(inputs["rows_info"]["empty"]["nll"])
        return inputs["datasets"]["nll"]
    if which == "unsafe_pairs":
        rows = [dict(r) for r in inputs["pairs"] if r["id"] in unsafe]
        if not rows:
            raise ValueError("SRPO on pairs from unsafe records: this cell has no such pair")
        return StepPairDataset.from_list(rows)
    raise ValueError(f"unknown rows {which!r}")


def diagnosis_arms(cell, settings, evaluate_replays: bool = False) -> list[tuple]:
    """:data:`ARMS`, with the replayed arms evaluated too when ``evaluate_replays`` (when the study's
    runs cannot be reproduced, e.g. made by older code), and SRPO lambda 0 on all pairs (evaluated)
    where the study has no such ablation arm: the 2x2 needs it."""
    arms = [(n, m, w, lam, ev or evaluate_replays) for n, m, w, lam, ev in ARMS]
    if cell.coverage not in tuple(settings.ablation_coverages) or 0.0 not in tuple(settings.ablation_lambdas):
        arms.append(("srpo_lambda_0", "srpo", "pairs", 0.0, True))
    return arms


def run_diagnosis_cell(out: Path, cell, settings, arms=ARMS) -> dict[str, Any]:
    """The audit, the probed arms and the unsafe-only arms of one cell; returns its line."""
    import torch

    from . import run, study, task

    start = time.time()
    torch.set_num_threads(1)
    inputs = study.cell_data(out, cell, settings)
    budget, state = inputs["budget"], inputs["state"]
    data, warm, processor = state["data"], state["model"], state["processor"]
    unsafe = {r["id"] for r in data["explore_records"] if r["unsafe"]}
    work = out / "work" / "diagnosis" / cell.key.replace(" ", "_").replace("=", "")
    shutil.rmtree(work, ignore_errors=True)
    items = task.to_eval_items(data["eval_records"])
    every = max(1, budget.train_steps // 10)  # = the trainer's logging_steps (run._train_args)
    result: dict[str, Any] = {}
    for name, method, which, lam, evaluate in arms:
        rows = _rows(inputs, which, unsafe)
        record: dict[str, Any] = {"probe": [], "logged": {}}
        torch.manual_seed(cell.seed)  # as the study's arms: the replayed ones follow the same trajectory
        model, summary = run.train_method(
            method,
            warm,
            processor,
            rows,
            budget,
            work,
            cell.seed,
            False,
            srpo_lambda=lam,
            name=name,
            trainer_cls=probed_trainer_class(record, every),
        )
        probe = record["probe"]
        entry: dict[str, Any] = {"rows": len(rows), "lambda": lam, "train": summary, "probe": probe}
        entry["probe_vs_trainer_grad_norm"] = attach_trainer_grad_norms(probe, record["logged"])
        if evaluate:
            entry["models"] = run.summarize_run(
                run.evaluate_model(model, processor, items, name, work, budget, cell.seed, False)
            )
        result[name] = entry
        del model
    return {
        "format": DIAGNOSIS_FORMAT,
        "cell": asdict(cell),
        "key": cell.key,
        "settings": study._jsonable(asdict(settings)),
        "audit": audit_pairs(inputs["pairs"], inputs["explored"]),
        "arms": result,
        "seconds": round(time.time() - start, 1),
    }


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _fmt(v, pct: bool = False, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def audit_markdown(audits: dict[str, dict]) -> str:
    """One row per cell and group (all / unsafe / harmless records)."""
    lines = [
        "| cell | records | pairs | pairs per record | records with pairs | outcome precision | inverted "
        "| chosen = reference reasoning | chosen skips the combination step | rejected skips |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, audit in audits.items():
        for group in ("all", "unsafe", "harmless"):
            g = audit[group]
            lines.append(
                f"| {key} ({group}) | {g['records']} | {g['pairs']} | {_fmt(g['pairs_per_record'])} "
                f"| {g['records_with_pairs']} | {_fmt(g['outcome_precision'], True)} "
                f"| {_fmt(g['outcome_inverted'], True)} | {_fmt(g['chosen_reference'], True)} "
                f"| {_fmt(g['chosen_skips'], True)} | {_fmt(g['rejected_skips'], True)} |"
            )
    return "\n".join(lines)


def _value(entry: dict, key: str) -> float:
    """A logged probe value, or ``grad_norm/reference_applied``: the reference gradient's norm in the step
    the optimizer takes (after clipping the combined gradient), ``clip_factor`` x ||grad L_ref||."""
    if key == "grad_norm/reference_applied":
        return entry["clip_factor"] * entry["grad_norm/reference"]
    return entry[key]


def gradient_table(lines: list[dict]) -> str:
    """Per coverage and probed arm: means over seeds of the per-term norms at the first probe, over all
    probes, and at the last probe; "norm ref x clip" is the reference gradient's norm in the step
    actually taken (clipping scales the combined gradient to ``max_grad_norm``)."""
    rows = [
        "| coverage | arm | probe | loss/reference | loss/align | norm ref | norm align | lambda x norm align "
        "| cosine | norm total | clip factor | norm ref x clip | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_cov: dict[float, list[dict]] = {}
    for line in lines:
        by_cov.setdefault(line["cell"]["coverage"], []).append(line)
    for cov in sorted(by_cov, reverse=True):
        group = by_cov[cov]
        for arm in dict.fromkeys(a for g in group for a in g["arms"]):
            probes = [g["arms"][arm]["probe"] for g in group if arm in g["arms"] and g["arms"][arm]["probe"]]
            if not probes:
                continue
            for label, pick in (("first", lambda p: [p[0]]), ("all", lambda p: p), ("last", lambda p: [p[-1]])):
                per_seed = {
                    k: _mean([_mean([_value(e, k) for e in pick(p)]) for p in probes])
                    for k in (
                        "loss/reference",
                        "loss/align",
                        "grad_norm/reference",
                        "grad_norm/align",
                        "grad_norm/align_scaled",
                        "grad_cosine",
                        "grad_norm/total",
                        "clip_factor",
                        "grad_norm/reference_applied",
                    )
                }
                rows.append(
                    f"| {cov:g} | {arm} | {label} | "
                    + " | ".join(_fmt(per_seed[k], digits=3) for k in per_seed)
                    + f" | {len(probes)} |"
                )
    return "\n".join(rows)


def arms_table(lines: list[dict], study_lines: dict[str, dict]) -> str:
    """The 2x2 (all pairs / unsafe-only pairs x lambda 0.3 / 0), attack success, over-refusal and Safe &
    Effective, mean over seeds, and the interaction paired by seed: (unsafe-only lambda 0.3 - its
    lambda 0) - (all pairs lambda 0.3 - all pairs lambda 0)."""
    from .study import interval

    metrics = ("attack_success", "over_refusal", "safe_and_effective")
    out = [
        "| coverage | metric | SRPO, all pairs | lambda 0, all pairs | SRPO, unsafe-only pairs "
        "| lambda 0, unsafe-only pairs | term's effect, all pairs | term's effect, unsafe-only | interaction | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_cov: dict[float, list[dict]] = {}
    for line in lines:
        if line["key"] in study_lines and "srpo_unsafe" in line["arms"]:
            by_cov.setdefault(line["cell"]["coverage"], []).append(line)
    for cov in sorted(by_cov, reverse=True):
        group = sorted(by_cov[cov], key=lambda g: g["cell"]["seed"])
        for m in metrics:
            vals: dict[str, list[float]] = {k: [] for k in ("a", "a0", "u", "u0")}
            for g in group:
                # the diagnosis's own evaluation of an arm where it has one, else the study's
                s = study_lines[g["key"]]["models"] | {k: a["models"] for k, a in g["arms"].items() if a.get("models")}
                if "srpo_lambda_0" not in s:
                    continue
                vals["a"].append(s["srpo"][m]["pct"])
                vals["a0"].append(s["srpo_lambda_0"][m]["pct"])
                vals["u"].append(g["arms"]["srpo_unsafe"]["models"][m]["pct"])
                vals["u0"].append(g["arms"]["srpo_unsafe_lambda_0"]["models"][m]["pct"])
            if not vals["a"]:
                continue
            eff_a = [x - y for x, y in zip(vals["a"], vals["a0"])]
            eff_u = [x - y for x, y in zip(vals["u"], vals["u0"])]
            inter = [x - y for x, y in zip(eff_u, eff_a)]
            cell = lambda v: (lambda s: f"{s['mean']:.1f} [{s['low']:.1f}, {s['high']:.1f}]")(interval(v))  # noqa: E731
            diff = lambda v: (lambda s: f"{s['mean']:+.1f} [{s['low']:+.1f}, {s['high']:+.1f}]")(interval(v))  # noqa: E731
            out.append(
                f"| {cov:g} | {m} | {cell(vals['a'])} | {cell(vals['a0'])} | {cell(vals['u'])} | {cell(vals['u0'])} "
                f"| {diff(eff_a)} | {diff(eff_u)} | {diff(inter)} | {len(vals['a'])} |"
            )
    return "\n".join(out)


def plot_gradient_norms(lines: list[dict], path: Path) -> Path:
    """Per coverage: the per-term gradient norms over training (mean over seeds, thin lines: seeds)
    and their cosine, for the probed SRPO arm (and NLL's reference norm)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    covs = sorted({line["cell"]["coverage"] for line in lines}, reverse=True)
    fig = Figure(figsize=(5.2 * max(1, len(covs)), 7.0))
    FigureCanvasAgg(fig)
    series = (
        ("srpo", "grad_norm/reference", "SRPO: ||grad L_ref||", "C0"),
        ("srpo", "grad_norm/align_scaled", "SRPO: lambda ||grad L_align||", "C3"),
        ("srpo", "grad_norm/total", "SRPO: ||grad L|| (before clipping)", "C2"),
        ("srpo", "grad_norm/reference_applied", "SRPO: clip factor x ||grad L_ref|| (in the step taken)", "C9"),
        ("nll", "grad_norm/reference", "NLL on references: ||grad L_ref||", "C1"),
    )
    for j, cov in enumerate(covs):
        group = [line for line in lines if line["cell"]["coverage"] == cov]
        ax = fig.add_subplot(2, len(covs), j + 1)
        ax2 = fig.add_subplot(2, len(covs), len(covs) + j + 1)
        for arm, key, label, colour in series:
            runs = [g["arms"][arm]["probe"] for g in group if arm in g["arms"] and g["arms"][arm]["probe"]]
            if not runs:
                continue
            for p in runs:
                ax.plot([e["step"] for e in p], [_value(e, key) for e in p], color=colour, alpha=0.25, linewidth=0.8)
            steps = sorted({e["step"] for p in runs for e in p})
            mean = [_mean([_value(e, key) for p in runs for e in p if e["step"] == s]) for s in steps]
            ax.plot(steps, mean, color=colour, linewidth=2, label=label, marker="o", markersize=3)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"coverage {cov:g}: gradient norms ({len(group)} seeds)", fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=6)
        for arm, colour in (("srpo", "C3"), ("nll", "C1")):
            runs = [g["arms"][arm]["probe"] for g in group if arm in g["arms"] and g["arms"][arm]["probe"]]
            for p in runs:
                ax2.plot([e["step"] for e in p], [e["grad_cosine"] for e in p], color=colour, alpha=0.3)
            if runs:
                steps = sorted({e["step"] for p in runs for e in p})
                mean = [_mean([e["grad_cosine"] for p in runs for e in p if e["step"] == s]) for s in steps]
                ax2.plot(steps, mean, color=colour, linewidth=2, label=f"{arm}: cos(grad L_ref, grad L_align)")
        ax2.axhline(0.0, color="gray", linestyle=":", linewidth=1)
        ax2.set_xlabel("training step")
        ax2.set_ylim(-1, 1)
        ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def replay_check(lines: list[dict], study_lines: dict[str, dict]) -> list[dict]:
    """The probed replays of the study's own arms against the study's runs: the same last logged loss
    means the probe (its extra forward and gradients) left training unchanged."""
    out = []
    for g in lines:
        study_train = study_lines.get(g["key"], {}).get("train", {})
        for name, arm in g["arms"].items():
            if name in study_train and "train" in arm and not arm.get("models"):
                theirs, ours = study_train[name]["last"].get("loss"), arm["train"]["last"].get("loss")
                out.append({"key": g["key"], "arm": name, "study": theirs, "probed": ours, "same": theirs == ours})
    return out


def write_diagnosis(out: Path, lines: list[dict], audits: dict[str, dict], study_lines: dict[str, dict]) -> Path:
    (out / "pair_audit.json").write_text(json.dumps(audits, indent=1), encoding="utf-8")
    parts = [
        "# Diagnosis (docs/study.md, issue 25)",
        "",
        "## Pairs against the hidden rule",
        "",
        audit_markdown(audits),
    ]
    if lines:
        parts += ["", "## Per-term gradient norms (means over seeds)", "", gradient_table(lines)]
        gaps = [a["probe_vs_trainer_grad_norm"] for g in lines for a in g["arms"].values()]
        gaps = [x for x in gaps if x is not None]
        replays = replay_check(lines, study_lines)
        parts += [
            "",
            f"Probe vs the Trainer's logged grad_norm: largest relative gap {max(gaps) if gaps else float('nan'):.2e} "
            f"over {len(gaps)} probed runs.",
            f"Replayed arms (the study's SRPO and NLL, retrained with the probe): {len(replays)} runs, "
            f"{sum(r['same'] for r in replays)} with the study's last logged loss to the last digit"
            + "".join(
                f"; {r['key']} {r['arm']}: study {r['study']!r} vs probed {r['probed']!r}"
                for r in replays
                if not r["same"]
            )
            + ".",
        ]
        parts += [
            "",
            "## SRPO with pairs from unsafe records only (2x2, % points)",
            "",
            arms_table(lines, study_lines),
        ]
        plot_gradient_norms(lines, out / "chart_gradient_norms.png")
    path = out / "diagnosis.md"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def cli(argv: list[str] | None = None) -> int:
    """``srpo-trl study --diagnose`` / ``--audit-only``: the study's arguments, then :func:`main`."""
    from . import study

    args = study.build_parser().parse_args(argv)
    out, cells, settings, _ = study.setup(args)
    return main(out, cells, settings, args.audit_only, not args.no_progress, args.evaluate_replays)


def main(out: Path, cells: list, settings, audit_only: bool, progress: bool, evaluate_replays: bool = False) -> int:
    """The diagnosis (or with ``audit_only`` the pair audit alone) over ``cells`` of the study in ``out``."""
    from tqdm.auto import tqdm

    from . import study
    from .run import _quiet_libraries

    results = out / "diagnosis.jsonl"
    study_lines = {line["key"]: line for line in study.read_results(out / "results.jsonl", settings)}
    audits = {}
    with _quiet_libraries():
        for cell in tqdm(cells, desc="pair audit", unit="cell", disable=not progress):
            audits[cell.key] = cell_audit(out, cell, settings)
        if not audit_only:
            done = {line["key"] for line in study.read_results(results, settings, repair=True)}
            todo = [c for c in cells if c.key not in done]
            print(f"diagnosis: {len(cells)} cells, {len(cells) - len(todo)} already in {results}", flush=True)
            for cell in tqdm(todo, desc="diagnosis cells", unit="cell", disable=not progress):
                line = run_diagnosis_cell(out, cell, settings, diagnosis_arms(cell, settings, evaluate_replays))
                study.append_result(results, line)
    keys = {c.key for c in cells}
    lines = [line for line in study.read_results(results, settings) if line["key"] in keys] if results.exists() else []
    path = write_diagnosis(out, lines, audits, study_lines)
    print(path.read_text(encoding="utf-8"))
    return 0
