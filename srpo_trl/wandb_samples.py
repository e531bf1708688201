"""Logging callbacks: a Weights & Biases table of sample step pairs at each evaluation.

With `report_to="wandb"`, `srpo-trl train` adds `WandbSamplePairsCallback`: at every evaluation it
scores the first `num_pairs` evaluation rows with the current policy and logs a table
`eval/sample_pairs` with the prompt, the reasoning prefix, the favorable (chosen) and unfavorable
(rejected) continuation, their mean token log-probs (the quantities of `mean_logps/chosen` /
`mean_logps/rejected`), summed log-probs (those of `logps/*`), the margin and whether the favorable
one is preferred. Chat-message continuations are shown as ``role: content`` lines.

Scoring is independent of the trainer's batching (one plain forward per sequence, built with the
same row helpers as training), so the table also cross-checks the trained metrics. Every process
runs the forwards (under DeepSpeed ZeRO-3 the parameters are gathered collectively); only the main
process logs.
"""

from __future__ import annotations

import json
import logging

import torch
from transformers import TrainerCallback

from .contract import conversation_text
from .rows import align_start, encode_prompt_text, encode_text_segments, normalize_row, render_row, tokenizer_of


logger = logging.getLogger(__name__)

TABLE_KEY = "eval/sample_pairs"
COLUMNS = [
    "step",
    "row",
    "branch_point",
    "prompt",
    "prefix",
    "chosen",
    "rejected",
    "logp_chosen",
    "logp_rejected",
    "margin",
    "sum_logp_chosen",
    "sum_logp_rejected",
    "chosen_preferred",
]


def _continuation_logps(model, prompt_inputs: dict, context_ids: list[int], continuation: list[int]):
    """(sum, count) of the log-probs of `continuation` after the prompt and `context_ids`."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    prompt_ids = prompt_inputs["input_ids"][0].tolist()
    ids = prompt_ids + context_ids + continuation
    extra_len = len(ids) - len(prompt_ids)
    inputs = {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
    }
    for key, value in prompt_inputs.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and value.shape == prompt_inputs["input_ids"].shape:  # per-token (mm_token_type_ids, ...)
            value = torch.cat([value, value.new_zeros(1, extra_len)], dim=1)
        inputs[key] = value.to(device)
    logits = model(**inputs, use_cache=False).logits[0].float()
    start = len(ids) - len(continuation)
    logp = logits[start - 1 : len(ids) - 1].log_softmax(-1)
    picked = logp.gather(1, torch.tensor(continuation, device=device)[:, None]).squeeze(1)
    return picked.sum().item(), len(continuation)


def _completion_text(completion) -> str:
    """A continuation as a table cell: text as it is; assistant / tool messages as `role: content`
    lines, with any tool calls (content is often empty then) as JSON."""
    if isinstance(completion, str):
        return completion
    lines = []
    for message in completion:
        line = conversation_text([message])
        if message.get("tool_calls"):
            line += " " + json.dumps(message["tool_calls"], ensure_ascii=False)
        lines.append(line)
    return "\n".join(lines)


@torch.no_grad()
def score_pairs(
    model,
    processing_class,
    rows: list[dict],
    step_separator: str = "\n",
    align_eos: bool = False,
    align_tokens: str = "continuation",
) -> list[dict]:
    """Mean and summed log-probs of each row's chosen and rejected continuation given prompt + prefix, over
    the tokens the alignment term scores (`align_eos`, `align_tokens` as in SRPOConfig)."""
    from .collator import load_images

    was_training = model.training
    model.eval()
    out = []
    try:
        for i, raw in enumerate(rows):
            row = normalize_row(raw, i)
            seg = encode_text_segments(row, processing_class, step_separator, align_eos=align_eos)
            shared = align_start(seg, align_tokens, i)  # leading tokens both share: context with after_shared
            if hasattr(processing_class, "tokenizer"):  # a processor: expanded image tokens + vision tensors
                images = load_images(row["images"], i)
                text = render_row(processing_class, row, images)["prompt"]  # as training renders it
                kwargs = {"images": [images]} if images else {}
                prompt_inputs = dict(
                    processing_class(text=[text], add_special_tokens=False, return_tensors="pt", **kwargs)
                )
            else:
                prompt_inputs = {"input_ids": torch.tensor([encode_prompt_text(row, tokenizer_of(processing_class))])}
            scores = {}
            for side in ("chosen", "rejected"):
                ids = seg[f"{side}_ids"]
                total, count = _continuation_logps(
                    model, prompt_inputs, seg["prefix_ids"] + ids[:shared], ids[shared:]
                )
                scores[f"sum_logp_{side}"] = total
                scores[f"logp_{side}"] = total / max(count, 1)
            out.append(
                {
                    "row": i,
                    "branch_point": raw.get("branch_point", len(row["prefix"])),
                    "prompt": conversation_text(row["prompt"]),
                    "prefix": step_separator.join(row["prefix"]),
                    "chosen": _completion_text(row["chosen"]),
                    "rejected": _completion_text(row["rejected"]),
                    **scores,
                    "margin": scores["logp_chosen"] - scores["logp_rejected"],
                    "chosen_preferred": scores["logp_chosen"] > scores["logp_rejected"],
                }
            )
    finally:
        model.train(was_training)
    return out


class WandbSamplePairsCallback(TrainerCallback):
    """Logs a `wandb.Table` of sample pairs (prompt, prefix, chosen, rejected, log-probs) at each evaluation."""

    def __init__(self, trainer, eval_dataset, num_pairs: int = 8):
        self.trainer = trainer
        dataset = getattr(eval_dataset, "dataset", eval_dataset)
        self.rows = [dict(dataset[i]) for i in range(min(num_pairs, len(dataset)))]
        self.last_rows: list[dict] = []  # what was logged last (also for tests and other loggers)

    def on_evaluate(self, args, state, control, **kwargs):
        if not self.rows:
            return
        trainer = self.trainer
        model = trainer.model  # under ZeRO-3 every rank must run the same forwards
        self.last_rows = score_pairs(
            model, trainer.processing_class, self.rows, args.step_separator, args.align_eos, args.align_tokens
        )
        if not state.is_world_process_zero:
            return
        import wandb

        if wandb.run is None:
            logger.warning("report_to includes wandb but no wandb run is active; the sample-pair table is not logged.")
            return
        table = wandb.Table(columns=COLUMNS)
        for r in self.last_rows:
            table.add_data(state.global_step, *[r[c] for c in COLUMNS[1:]])
        wandb.log({TABLE_KEY: table, "train/global_step": state.global_step})


__all__ = ["WandbSamplePairsCallback", "score_pairs", "TABLE_KEY", "COLUMNS"]
