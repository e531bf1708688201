"""The W&B sample-pair table (`srpo_trl.wandb_samples.score_pairs`) scores what training scores and
shows it readably: chat-message continuations as text (tool calls included), and a vision row's
prompt rendered as the trainer renders it, its `chat_template_kwargs` included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trl
from helpers import srpo_args

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.tiny import build_tokenizer, make_image, tiny_causal_lm, tiny_qwen2_5_vl
from srpo_trl.wandb_samples import score_pairs


CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
CHAT_ROW = {
    "prompt": [{"role": "user", "content": "Is it safe to go out in Paris?"}],
    "prefix": ["Paris has a storm warning."],
    "chosen": [{"role": "assistant", "content": "", "tool_calls": CALL}],
    "rejected": [{"role": "assistant", "content": "Yes, go."}],
    "chat_template_kwargs": {"enable_thinking": False},
}


def _plain_sum_logp(model, ids: list[int], n_last: int) -> float:
    """Summed log-prob of the last `n_last` tokens of `ids`: one plain forward, by hand."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = logits[:-1].log_softmax(-1)
    targets = torch.tensor(ids[1:])
    return logp[torch.arange(len(ids) - 1), targets][-n_last:].sum().item()


def test_chat_continuations_are_scored_as_trained_and_shown_as_text(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    model = tiny_causal_lm(tok, seed=4)
    trainer = SRPOTrainer(
        model=model,
        args=srpo_args(tmp_path),
        train_dataset=StepPairDataset.from_list([CHAT_ROW]),
        processing_class=tok,
    )
    prepared = trainer.train_dataset[0]
    (scored,) = score_pairs(model, tok, [CHAT_ROW])

    context = prepared["prompt_ids"] + prepared["prefix_ids"]
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            ids = context + prepared[f"{side}_ids"]
            expected = _plain_sum_logp(model, ids, len(prepared[f"{side}_ids"]))
            assert scored[f"sum_logp_{side}"] == pytest.approx(expected, abs=1e-4)
    assert scored["chosen"] == "assistant:  " + json.dumps(CALL)  # the tool call, not a list's repr
    assert scored["rejected"] == "assistant: Yes, go."
    assert scored["prompt"] == "user: Is it safe to go out in Paris?"


def test_vision_prompt_is_rendered_with_the_rows_chat_template_kwargs(monkeypatch):
    model, processor = tiny_qwen2_5_vl(seed=2)
    # A template that reacts to a per-row argument, as Qwen3-VL's enable_thinking does.
    processor.chat_template = "{% if safety_first is defined and safety_first %}SAFETY FIRST\n{% endif %}" + (
        processor.chat_template
    )
    row = {
        "prompt": [{"role": "user", "content": "What is this?"}],
        "images": [make_image(1)],
        "prefix": [],
        "chosen": " A bottle.",
        "rejected": " Drink it.",
        "chat_template_kwargs": {"safety_first": True},
    }
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    with_kwargs = score_pairs(model, processor, [row])[0]
    without = score_pairs(model, processor, [{**row, "chat_template_kwargs": None}])[0]
    assert processor.tokenizer.decode(seen[0]).startswith("SAFETY FIRST")
    assert not processor.tokenizer.decode(seen[2]).startswith("SAFETY FIRST")
    assert with_kwargs["sum_logp_chosen"] != pytest.approx(without["sum_logp_chosen"], abs=1e-6)
