"""Prefix sharing only where it is exact (issue 16): the architecture allow-list.

Every model type on the allow-list is checked here: the packed tree forward's log-probs equal an
independent per-sequence forward. Hybrid models (Mamba, convolution), sliding-window layers that a
sequence may outgrow, and chunked attention fall back to unpacked scoring with one warning naming
the reason, and the log-probs SRPO uses are then the independent ones.
"""

import logging

import pytest
import torch
import transformers
from arch_models import FAMILIES, tiny_model
from helpers import srpo_args
from test_prefix_sharing import question_rows

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.architectures import TEXT_TYPES, VLM_TYPES, architecture_problem
from srpo_trl.collator import DataCollatorForStepPairs
from srpo_trl.tiny import build_tokenizer, make_image, tiny_qwen2_vl


MAX_LENGTH = 256  # the tiny sliding-window families use a window of 256


def _attn(model_type):
    return "eager" if model_type in ("gemma2", "gpt_oss") else "sdpa"  # no sdpa kernel for softcapping / sinks


def independent_sums(model, unpacked_batch):
    """Summed log-probs of each of the 3B sequences, each from its own plain forward, in float64."""
    sums = []
    for ids, mask, loss_mask in zip(
        unpacked_batch["input_ids"], unpacked_batch["attention_mask"], unpacked_batch["loss_mask"]
    ):
        n = int(mask.sum())
        with torch.no_grad():
            logits = model(input_ids=ids[None, :n]).logits[0].double()
        logp = logits.log_softmax(-1)[:-1].gather(1, ids[1:n, None]).squeeze(1)
        sums.append((logp * loss_mask[1:n]).sum())
    return torch.stack(sums)


def _trainer(tmp_path, model, tok, rows, **config):
    args = srpo_args(tmp_path, per_device_train_batch_size=len(rows), **config)
    return SRPOTrainer(model=model, args=args, train_dataset=StepPairDataset.from_list(rows), processing_class=tok)


def _batches(trainer, tok, n, max_length):
    examples = [trainer.train_dataset[i] for i in range(n)]
    unpacked = DataCollatorForStepPairs(tok, max_length=max_length)(examples)
    return trainer.data_collator(examples), unpacked


def test_every_allowed_text_type_has_a_tiny_model_here():
    assert TEXT_TYPES <= set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(TEXT_TYPES))
def test_allowed_text_type_packed_equals_independent(tmp_path, model_type):
    tok = build_tokenizer()
    model = tiny_model(model_type, tok, seed=1, attn_implementation=_attn(model_type))
    rows = question_rows()
    trainer = _trainer(tmp_path, model, tok, rows, max_length=MAX_LENGTH)
    assert trainer.prefix_sharing, model_type
    packed, unpacked = _batches(trainer, tok, len(rows), MAX_LENGTH)
    assert packed["packed_length"].sum() < unpacked["attention_mask"].sum()  # really shared
    with torch.no_grad():
        sums, counts, _ = trainer._sequence_logps(model, packed)
    expected = independent_sums(model, unpacked)
    assert torch.allclose(sums.double(), expected, atol=2e-4, rtol=1e-5), (sums, expected)
    assert torch.equal(counts, unpacked["loss_mask"][:, 1:].sum(1).to(counts.dtype))


def test_qwen2_vl_packed_equals_unpacked(tmp_path):
    """Qwen2-VL (Qwen2.5-VL, LLaVA-NeXT and LLaVA-1.5: tests/test_prefix_sharing.py)."""
    assert {"qwen2_vl", "qwen2_5_vl", "llava_next", "llava"} == VLM_TYPES
    model, processor = tiny_qwen2_vl(seed=5)
    rows = question_rows()
    for r in rows:
        r["prompt"] = [{"role": "user", "content": r["prompt"]}]
        r["images"] = [make_image(0)] if r["id"] == "q1" else [make_image(3, size=(56, 28))]
    packed_trainer = _trainer(tmp_path / "p", model, processor, rows)
    plain = _trainer(tmp_path / "u", model, processor, rows, prefix_sharing=False)
    assert packed_trainer.prefix_sharing and not plain.prefix_sharing
    examples = [packed_trainer.train_dataset[i] for i in range(len(rows))]
    with torch.no_grad():
        got, _, _ = packed_trainer._sequence_logps(model, packed_trainer.data_collator(examples))
        want, _, _ = plain._sequence_logps(model, plain.data_collator(examples))
    assert torch.allclose(got, want, atol=1e-4)


# model type, config overrides, max_length, words the warning must contain
FALLBACKS = [
    ("nemotron_h", {}, MAX_LENGTH, "mamba"),
    ("lfm2", {}, MAX_LENGTH, "conv"),
    ("gemma2", {}, None, "sliding-window"),
    ("gemma3_text", {}, 512, "sliding-window"),
    ("mistral", {}, None, "sliding-window"),
]


@pytest.mark.parametrize("model_type,overrides,max_length,reason", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_unverified_or_inexact_models_fall_back_with_one_warning(
    tmp_path, caplog, model_type, overrides, max_length, reason
):
    tok = build_tokenizer()
    model = tiny_model(model_type, tok, seed=2, attn_implementation=_attn(model_type), **overrides)
    rows = question_rows()
    with caplog.at_level(logging.WARNING, logger="srpo_trl"):
        trainer = _trainer(tmp_path, model, tok, rows, max_length=max_length)
        packed_view, unpacked = _batches(trainer, tok, len(rows), max_length)
        with torch.no_grad():
            sums, _, _ = trainer._sequence_logps(model, packed_view)
            trainer.compute_loss(model, packed_view)
    assert trainer.prefix_sharing is False and "score_seq" not in packed_view
    warnings = [r.getMessage() for r in caplog.records if "Prefix sharing is off" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0] and model_type in warnings[0], warnings
    assert torch.allclose(sums.double(), independent_sums(model, unpacked), atol=2e-4)


def test_the_fallback_guards_a_real_error(tmp_path):
    """Forced packing on a Mamba hybrid, or past a sliding window, gives wrong log-probs: the checks
    above are what keeps them out."""
    tok = build_tokenizer()
    rows = question_rows()
    for model_type, overrides in [("nemotron_h", {}), ("gemma2", {"sliding_window": 8})]:
        model = tiny_model(model_type, tok, seed=2, attn_implementation=_attn(model_type), **overrides)
        assert architecture_problem(model.config, MAX_LENGTH) is not None
        trainer = _trainer(tmp_path / model_type, model, tok, rows, max_length=MAX_LENGTH)
        examples = [trainer.train_dataset[i] for i in range(len(rows))]
        forced = DataCollatorForStepPairs(tok, max_length=MAX_LENGTH, prefix_sharing=True)(examples)
        unpacked = DataCollatorForStepPairs(tok, max_length=MAX_LENGTH)(examples)
        with torch.no_grad():
            wrong, _, _ = trainer._packed_sequence_logps(model, forced)
        assert (wrong.double() - independent_sums(model, unpacked)).abs().max() > 1e-2, model_type


@pytest.mark.parametrize(
    "config,reason",
    [
        (
            transformers.Qwen3NextConfig(layer_types=["linear_attention", "full_attention"], num_hidden_layers=2),
            "linear_attention",
        ),
        (
            transformers.Llama4TextConfig(num_hidden_layers=2, layer_types=["chunked_attention", "full_attention"]),
            "chunked_attention",
        ),
        (transformers.FalconH1Config(num_hidden_layers=2), "hybrid"),
        (transformers.Gemma2Config(sliding_window=128), "max_length <= 128"),
    ],
    ids=["qwen3_next", "llama4", "falcon_h1", "gemma2_window"],
)
def test_config_level_reasons(config, reason):
    assert reason in architecture_problem(config, 1024)


def test_sliding_window_within_max_length_is_allowed():
    config = transformers.Gemma2Config(sliding_window=128)
    assert architecture_problem(config, 128) is None
    assert "not verified" in architecture_problem(transformers.PhiConfig(), None)


# ---- MoE: the router's load-balancing loss, as DPOTrainer adds it --------------------------------


def _moe_setup(tmp_path, model_type, prefix_sharing, **config):
    tok = build_tokenizer()
    model = tiny_model(model_type, tok, seed=3, attn_implementation=_attn(model_type))
    rows = question_rows()
    trainer = _trainer(tmp_path, model, tok, rows, max_length=MAX_LENGTH, prefix_sharing=prefix_sharing, **config)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return trainer, model, batch


def _independent_aux(model, batch):
    """The load-balancing loss of this batch from the model's own forward (unpacked), or from its
    backbone's router logits over the packed rows' real tokens (packed)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from srpo_trl.packing import additive_mask

    config = model.config
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    with torch.no_grad():
        if "packed_length" not in batch:
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
            ).aux_loss
        out = model.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=additive_mask(batch["tree_mask"], torch.float32),
            output_router_logits=True,
        )
    width = batch["input_ids"].size(1)
    real = (torch.arange(width)[None] < batch["packed_length"][:, None]).long()
    return load_balancing_loss_func(out.router_logits, experts, config.num_experts_per_tok, real)


@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_moe_router_aux_loss_is_added_and_logged(tmp_path, model_type, prefix_sharing):
    trainer, model, batch = _moe_setup(tmp_path / "a", model_type, prefix_sharing, router_aux_loss_coef=0.5)
    assert trainer.prefix_sharing is prefix_sharing and trainer.aux_loss_enabled
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch).item()
    aux = _independent_aux(model, batch).item()
    assert aux > 0
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(aux, rel=1e-5)

    plain, _, plain_batch = _moe_setup(tmp_path / "b", model_type, prefix_sharing, router_aux_loss_coef=0.0)
    assert not plain.aux_loss_enabled
    with torch.no_grad():
        without = plain.compute_loss(model, plain_batch).item()
    assert "aux_loss" not in plain._metrics["train"]
    assert loss == pytest.approx(without + 0.5 * aux, abs=1e-5)


def test_moe_default_coefficient_is_the_architectures_own(tmp_path):
    trainer, _, _ = _moe_setup(tmp_path, "qwen3_moe", True)
    assert trainer.router_aux_loss_coef == trainer.model.config.router_aux_loss_coef == 0.001


# ---- Qwen VL on text-only rows and on mixed text / image batches -----------------------------------


def _vl_rows(images_for):
    rows = question_rows()
    for r in rows:
        r["prompt"] = [{"role": "user", "content": r["prompt"]}]
        if images_for is not None:
            r["images"] = [make_image(0)] if r["id"] in images_for else []
    return rows


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize(
    "images_for,batch", [(None, 5), ({"q1"}, 5), ({"q2"}, 4)], ids=["text_only", "mixed", "mixed_batch_without_images"]
)
def test_qwen_vl_text_rows_with_prefix_sharing(tmp_path, family, images_for, batch):
    """Text-only rows (tokenized without the processor, no `mm_token_type_ids`) and batches mixing rows
    with and without images: the packed forward equals the unpacked one; text-only sequences also
    equal the model's own forward of each sequence."""
    from srpo_trl.tiny import tiny_qwen2_5_vl

    model, processor = (tiny_qwen2_5_vl if family == "qwen2_5_vl" else tiny_qwen2_vl)(seed=1)
    rows = _vl_rows(images_for)
    packed_trainer = _trainer(tmp_path / "p", model, processor, rows)
    plain = _trainer(tmp_path / "u", model, processor, rows, prefix_sharing=False)
    assert packed_trainer.prefix_sharing
    examples = [packed_trainer.train_dataset[i] for i in range(batch)]
    packed_batch = packed_trainer.data_collator(examples)
    unpacked_batch = plain.data_collator(examples)
    assert "score_seq" in packed_batch
    with torch.no_grad():
        got, _, _ = packed_trainer._sequence_logps(model, packed_batch)
        want, _, _ = plain._sequence_logps(model, unpacked_batch)
    assert torch.allclose(got, want, atol=1e-4)
    if images_for is None or batch == 4:  # no image in the batch: each sequence scored alone is the truth
        assert torch.allclose(got.double(), independent_sums(model, unpacked_batch), atol=2e-4)
