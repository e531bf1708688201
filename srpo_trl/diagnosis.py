"""Why a loss or a gradient stopped being finite: the likely cause and what to do.

:class:`~srpo_trl.guards.NonFiniteGuard` calls :func:`explain` at the moment it finds a non-finite
loss or gradient norm, with what the step's micro-batches left behind: each row's log-prob terms,
kept by `SRPOTrainer._compute_loss` (see :func:`remember`). The checks run in this order, each
ruling out the ones before it:

1. weights that already hold NaN / inf before the step (loaded so, or edited outside the optimizer);
2. log-probs that came out of the forward pass non-finite, named by row: float16 overflow (its
   largest value is 65504), the reference model, or in float32 weights grown by too large updates;
3. a loss term that is non-finite although the log-probs it is computed from are finite (the
   sigmoid term's `beta * margin`, or a weight, overflowing);
4. a finite loss whose gradient enters the network too large for the compute dtype: the gradient
   with respect to each row's log-probs, replayed from the kept terms in float64, bounds what
   reaches that row's logits (below); a setting that scales it (beta, srpo_lambda, nll_weight) is
   named when that bound passes 1e-4 of the dtype's largest value (the backward pass multiplies it
   by sums over the vocabulary of the LM head's weights, thousands for real vocabularies);
5. otherwise the loss was finite and the gradient overflowed in the backward pass through the
   network: float16's range, or too large updates (learning rate).

The bound of step 4: a token's log-prob moves with its logits as d log p / d logits = onehot - p,
whose size is at most 2 (1 - p) <= 2 |log p|, and also at most 2; so a row whose log-probs sum to
S passes at most 2 min(1, |S|) times the gradient at its log-probs on to its logits. This is also
why a continuation the model predicts almost surely (a memorized row, mean log-prob near 0) is not a
cause: the odds-ratio term's gradient grows as 1 / |mean log-prob| there, but what reaches the
network shrinks as fast (and `log1mexp` feeds each of its branches an input safe for it, so the
gradient at the log-probs stays finite: tests/test_loss_stability.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rows import tokenizer_of


SHOWN = 3  # rows and parameters named in a message
REACH = 1e-4  # step 4: a gradient past this fraction of the dtype's largest value enters the network too large

# Which sequence each per-row term comes from, as a message names it.
SEQUENCES = {
    "chosen_mean": "chosen continuation",
    "chosen_sum": "chosen continuation",
    "rejected_mean": "rejected continuation",
    "rejected_sum": "rejected continuation",
    "reference_mean": "reference path",
    "ref_chosen": "chosen continuation under the reference model",
    "ref_rejected": "rejected continuation under the reference model",
}


@dataclass
class MicroBatch:
    """What one micro-batch's loss was computed from, kept until the optimizer step."""

    terms: dict[str, torch.Tensor]  # per row, detached, in the dtype the loss saw
    counts: dict[str, torch.Tensor]  # per row: scored tokens of the chosen, rejected and reference sequence
    tokens: dict[str, torch.Tensor]  # the batch's tensors that say which tokens each sequence scores


@dataclass
class Diagnosis:
    cause: str
    advice: str

    def __str__(self) -> str:
        return f"Likely cause: {self.cause}. What to do: {self.advice}"


def remember(terms: dict[str, torch.Tensor], counts: tuple[torch.Tensor, ...], inputs: dict) -> MicroBatch:
    """Keep a micro-batch's per-row terms and token counts (a few numbers per row) and references to its
    token tensors."""
    keys = ("shift_labels", "score_seq", "score_pos") if "score_seq" in inputs else ("input_ids", "loss_mask")
    return MicroBatch(
        terms={k: v.detach() for k, v in terms.items()},
        counts=dict(zip(("chosen", "rejected", "reference"), (c.detach() for c in counts))),
        tokens={k: inputs[k] for k in keys},
    )


def explain(trainer, batches: list[MicroBatch], loss_finite: bool) -> Diagnosis:
    """The likely cause of a non-finite loss (`loss_finite=False`) or of a non-finite gradient norm after
    a finite loss, from the weights, the kept micro-batches and the run's settings."""
    args = trainer.args
    bad_weights, (largest, largest_name) = _scan_weights(trainer.model)
    lower_lr = (
        f"lower learning_rate (now {args.learning_rate:g}) or max_grad_norm (now {args.max_grad_norm:g}), "
        "or resume from an earlier checkpoint"
    )
    # 1. weights already broken
    if bad_weights:
        shown = ", ".join(bad_weights[:SHOWN]) + (" ..." if len(bad_weights) > SHOWN else "")
        return Diagnosis(
            f"the weights already held NaN or inf before this step ({len(bad_weights)} parameter tensor(s): {shown}); "
            "steps with a non-finite gradient are never applied, so they were loaded that way, changed outside "
            "the optimizer, or overflowed by the previous update",
            f"start from finite weights (check the model you load and any code that edits it); if an update "
            f"overflowed them, {lower_lr}",
        )
    float16 = _float16(trainer)
    grown = [f"the largest weight is now {largest:.4g} ({largest_name})"] if largest_name else []
    jump = _loss_jump(trainer, batches)

    # 2. log-probs that came out of the forward pass non-finite
    broken = [
        (m, i, key, value)
        for m, b in enumerate(batches)
        for key, values in b.terms.items()
        for i, value in enumerate(values.float().tolist())
        if not math.isfinite(value)
    ]
    if broken:
        rows = _rows(trainer, batches, [(m, i) for m, i, _, _ in broken])
        what = "; ".join(list(dict.fromkeys(f"{SEQUENCES[key]} {value}" for _, _, key, value in broken))[:SHOWN])
        if all(key.startswith("ref_") for _, _, key, _ in broken):
            return Diagnosis(
                f"the reference model's forward pass gave non-finite log-probs for {rows} ({what}); the policy's "
                "are finite",
                "check the reference model (`ref_model`, the PEFT base, or the precomputed ref_chosen_logps / "
                "ref_rejected_logps columns): its weights, and its precision (float16 overflows above 65504)",
            )
        if float16:
            return Diagnosis(
                f"float16 overflow in the forward pass: the log-probs of {rows} came out non-finite ({what}); "
                "float16 holds values up to 65504",
                _float16_advice(trainer, float16, lower_lr),
            )
        return Diagnosis(
            f"the forward pass overflowed in {_dtype_name(trainer)}: the log-probs of {rows} came out non-finite "
            f"({what}); too large updates" + "".join(f"; {e}" for e in (*jump, *grown)),
            lower_lr,
        )

    # 3. a term that is non-finite although its log-probs are finite
    losses = []
    for m, batch in enumerate(batches):
        with torch.no_grad():
            loss, align, _ = trainer._loss_from_terms(batch.terms)
        problem = _term_problem(trainer, batches, m, loss, align)
        if problem is not None:
            return problem
        losses.append(loss.item())
    if not loss_finite:  # the guard saw a non-finite loss, gathered from every process
        return Diagnosis(
            "the loss was non-finite on another process (every row of this one is finite); that process's error "
            "names its rows and the cause",
            "read the other processes' errors",
        )

    # 4. a finite loss whose gradient enters the network too large for the compute dtype
    dtype = torch.float16 if float16 else torch.float32
    steep = max((_steepest(trainer, b, m) for m, b in enumerate(batches)), default=None, key=lambda s: s[0])
    if steep is not None and steep[0] > REACH * torch.finfo(dtype).max:
        reach, term, m, i = steep
        settings = " and ".join(_scaling_settings(trainer, term))
        return Diagnosis(
            f"the {term}'s gradient is too large for {_name(dtype)}: what it sends into the "
            f"logits of {_rows(trainer, batches, [(m, i)])} reaches {reach:.3g} per token (the loss, "
            f"{sum(losses) / len(losses):.4g}, is finite); it is scaled by {settings}",
            f"lower {settings.replace(' and ', ' or ')}"
            + ("; or train in bf16 or float32 rather than float16" if float16 else ""),
        )

    # 4. the loss was finite: the gradient overflowed in the backward pass through the network
    finite = "the loss" + (f" ({sum(losses) / len(losses):.4g})" if losses else "") + " was finite"
    if float16:
        return Diagnosis(
            f"float16 overflow in the backward pass: {finite}, its gradient was not (float16 holds values up to "
            "65504)",
            _float16_advice(trainer, float16, lower_lr),
        )
    return Diagnosis(
        f"the gradient overflowed in the backward pass in {_dtype_name(trainer)} while {finite}: too large updates"
        + "".join(f"; {e}" for e in (*jump, *grown)),
        lower_lr,
    )


# ---- the pieces -------------------------------------------------------------------------------------


def _term_problem(trainer, batches: list[MicroBatch], m: int, loss: torch.Tensor, align: torch.Tensor):
    """A Diagnosis for a non-finite loss term (or weighted sum) computed from finite log-probs, else None."""
    nll = -batches[m].terms["reference_mean"]
    for term, values in (("alignment term", align), ("reference NLL term", nll)):
        bad = [i for i, v in enumerate(values.float().tolist()) if not math.isfinite(v)]
        if not bad:
            continue
        shown = ", ".join(f"{values[i].item():.3g}" for i in bad[:SHOWN])
        rows = _rows(trainer, batches, [(m, i) for i in bad])
        sigmoid = term == "alignment term" and trainer.align_loss == "sigmoid"
        return Diagnosis(
            f"the {term}{' (sigmoid)' if sigmoid else ''} is {shown} for {rows} although the log-probs it is "
            "computed from are finite"
            + (
                f": beta (now {trainer.beta:g}) times the log-ratio margin overflows {_name(align.dtype)}"
                if sigmoid
                else ""
            ),
            f"lower beta (now {trainer.beta:g})"
            if sigmoid
            else "report it: every term is finite for finite log-probs",
        )
    if not math.isfinite(loss.item()):
        return Diagnosis(
            f"the weighted sum nll_weight * L_ref + srpo_lambda * L_align is {loss.item()} although both terms are "
            f"finite (L_ref {nll.mean().item():.4g}, L_align {align.mean().item():.4g}): a weight overflows "
            f"{_name(loss.dtype)}",
            f"lower srpo_lambda (now {trainer.srpo_lambda:g}) or nll_weight (now {trainer.nll_weight:g})",
        )
    return None


def _steepest(trainer, batch: MicroBatch, m: int) -> tuple[float, str, int, int]:
    """(bound on the gradient reaching one logit, term, micro-batch, row) for the row where it is largest: the
    gradient of the loss with respect to the row's log-prob terms (float64 replay), per token for a mean,
    times 2 min(1, |summed log-prob|) (module docstring, step 4)."""
    leaves = {k: v.double().requires_grad_(True) for k, v in batch.terms.items() if not k.startswith("ref_")}
    constants = {k: v.double() for k, v in batch.terms.items() if k.startswith("ref_")}
    with torch.enable_grad():
        loss, _, _ = trainer._loss_from_terms({**leaves, **constants})
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    found = (0.0, "alignment term", m, 0)
    for key, grad in zip(leaves, grads):
        if grad is None:  # a term kept out of the loss (weight 0)
            continue
        sequence, kind = key.split("_")  # chosen / rejected / reference, mean / sum
        count = batch.counts[sequence].double().clamp(min=1)
        per_token = grad.abs() / count if kind == "mean" else grad.abs()
        summed = batch.terms[key].double().abs() * (count if kind == "mean" else 1)
        reach = per_token * 2 * summed.clamp(max=1)
        reach = torch.where(torch.isfinite(reach), reach, torch.full_like(reach, math.inf))
        i = int(reach.argmax())
        if reach[i].item() > found[0]:
            found = (reach[i].item(), "reference NLL term" if sequence == "reference" else "alignment term", m, i)
    return found


def _scaling_settings(trainer, term: str) -> list[str]:
    """The settings that scale a term's gradient, with their values."""
    if term == "reference NLL term":
        return [f"nll_weight (now {trainer.nll_weight:g})"]
    if trainer.align_loss == "sigmoid":
        return [f"beta (now {trainer.beta:g})", f"srpo_lambda (now {trainer.srpo_lambda:g})"]
    return [f"srpo_lambda (now {trainer.srpo_lambda:g})"]


def _float16_advice(trainer, float16: str, lower_lr: str) -> str:
    if float16 == "weights":
        return (
            "train in bf16 (bf16=True, on an accelerator that has it) or float32 rather than float16 weights; or "
            "keep float32 weights with fp16=True (mixed precision), whose loss scaling absorbs such overflows"
        )
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    scale = f" (the GradScaler's scale is down to {scaler.get_scale():g})" if scaler is not None else ""
    return f"train in bf16 (bf16=True) if the accelerator has it{scale}; otherwise {lower_lr}"


def _float16(trainer) -> str:
    """'weights' (float16 parameters), 'mixed' (fp16 mixed precision) or '' (neither)."""
    if any(p.dtype == torch.float16 for p in trainer.model.parameters()):
        return "weights"
    return "mixed" if trainer.args.fp16 else ""


def _dtype_name(trainer) -> str:
    if trainer.args.bf16:
        return "bf16 mixed precision"
    return _name(next(trainer.model.parameters()).dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _scan_weights(model) -> tuple[list[str], tuple[float, str | None]]:
    """Names of parameters holding NaN / inf, and the largest |weight| among the others (this rank's shard
    under ZeRO-3)."""
    bad, largest = [], (0.0, None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            held = getattr(p, "ds_tensor", p)
            if not held.numel():
                continue
            top = held.detach().abs().max().item()  # NaN if any element is NaN
            if not math.isfinite(top):
                bad.append(name)
            elif top > largest[0]:
                largest = (top, name)
    return bad, largest


def _loss_jump(trainer, batches: list[MicroBatch]) -> list[str]:
    """['the loss went from A at step k to B'] when this step's loss is 10x the last logged one, else []."""
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h and math.isfinite(h["loss"])]
    if not logged or not batches:
        return []
    step, before = logged[-1]
    with torch.no_grad():
        now = sum(trainer._loss_from_terms(b.terms)[0].item() for b in batches) / len(batches)
    if math.isfinite(now) and abs(now) > 10 * max(abs(before), 1e-3):
        return [f"the loss went from {before:.4g} at step {step} to {now:.4g}"]
    return []


def _rows(trainer, batches: list[MicroBatch], where: list[tuple[int, int]]) -> str:
    """ "row 2 (chosen 'No, never mix...'), row 0 (...) of the batch on this process": each row by its
    position in the micro-batch and the start of its chosen continuation's scored tokens."""
    unique = list(dict.fromkeys(where))
    names = []
    for m, i in unique[:SHOWN]:
        label = f"row {i}" if len(batches) == 1 else f"micro-batch {m + 1} row {i}"
        names.append(f"{label} (chosen {_chosen_start(trainer, batches[m], i)!r})")
    more = f" and {len(unique) - SHOWN} more" if len(unique) > SHOWN else ""
    return ", ".join(names) + more + " of the batch on this process"


def _chosen_start(trainer, batch: MicroBatch, row: int, tokens: int = 8, chars: int = 40) -> str:
    """The first scored tokens of a row's chosen continuation, decoded."""
    t = batch.tokens
    if "score_seq" in t:
        ids = t["shift_labels"].reshape(-1)[t["score_pos"][t["score_seq"] == row]]
    else:
        ids = t["input_ids"][row][t["loss_mask"][row].bool()]
    text = tokenizer_of(trainer.processing_class).decode(ids[:tokens].tolist())
    return text[:chars] + ("..." if len(text) > chars or len(ids) > tokens else "")
