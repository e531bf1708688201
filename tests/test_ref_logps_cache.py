"""Step-DPO mode: reference log-probs precomputed with the packed forward, for vision datasets too
(TRL refuses those), cached on disk and reused by a later run without running the reference."""

import logging

import pytest
import torch
from helpers import ROWS, srpo_args

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.tiny import build_tokenizer, make_image, tiny_causal_lm, tiny_qwen2_5_vl


def vision_rows():
    rows = []
    for i, row in enumerate(ROWS):
        rows.append({**row, "prompt": [{"role": "user", "content": row["prompt"]}], "images": [make_image(i)]})
    return rows


def _count_calls(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_precomputed_reference_is_cached_and_reused(tmp_path, kind, caplog):
    if kind == "text":
        tok = build_tokenizer()
        model, ref, processing, rows = tiny_causal_lm(tok, seed=1), tiny_causal_lm(tok, seed=2), tok, ROWS
        other_ref = tiny_causal_lm(tok, seed=3)
    else:
        model, processing = tiny_qwen2_5_vl(seed=1)
        ref, other_ref = tiny_qwen2_5_vl(seed=2)[0], tiny_qwen2_5_vl(seed=3)[0]
        rows = vision_rows()
    cache = tmp_path / "cache"
    common = dict(per_device_train_batch_size=3, align_loss="sigmoid", ref_logps_cache_dir=str(cache), max_steps=1)

    live = SRPOTrainer(
        model=model,
        ref_model=ref,
        args=srpo_args(tmp_path / "live", **common),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=processing,
    )
    batch = live.data_collator([live.train_dataset[i] for i in range(3)])
    expected = live.compute_ref_log_probs(live.ref_model, batch)

    calls = _count_calls(ref)
    first = SRPOTrainer(
        model=model,
        ref_model=ref,
        args=srpo_args(tmp_path / "a", precompute_ref_log_probs=True, **common),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=processing,
    )
    assert calls, "the first run computes the reference log-probs"
    assert torch.allclose(torch.tensor(first.train_dataset["ref_chosen_logps"]), expected[0].float(), atol=1e-5)
    assert torch.allclose(torch.tensor(first.train_dataset["ref_rejected_logps"]), expected[1].float(), atol=1e-5)
    assert len(list(cache.glob("train-*.json"))) == 1

    calls.clear()
    with caplog.at_level(logging.WARNING):
        second = SRPOTrainer(
            model=model,
            ref_model=ref,
            args=srpo_args(tmp_path / "b", precompute_ref_log_probs=True, **common),
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=processing,
        )
    assert not calls and "Reusing reference log-probs" in caplog.text
    assert second.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]
    second.train()  # trains on the cached values
    assert second.state.global_step == 1

    # Other rows or another reference model: another key, computed afresh.
    other = SRPOTrainer(
        model=model,
        ref_model=other_ref,
        args=srpo_args(tmp_path / "c", precompute_ref_log_probs=True, **common),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=processing,
    )
    assert len(list(cache.glob("train-*.json"))) == 2
    assert other.train_dataset["ref_chosen_logps"] != first.train_dataset["ref_chosen_logps"]


def test_cache_can_be_disabled(tmp_path):
    tok = build_tokenizer()
    cache = tmp_path / "cache"
    SRPOTrainer(
        model=tiny_causal_lm(tok),
        ref_model=tiny_causal_lm(tok, seed=3),
        args=srpo_args(tmp_path, align_loss="sigmoid", precompute_ref_log_probs=True, ref_logps_cache_dir=""),
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    assert not cache.exists()
