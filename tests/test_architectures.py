"""Prefix sharing only where it is exact (issues 16, 20): the architecture allow-list.

Every model type on the allow-list passes `check_prefix_sharing` (a 2-layer random model: packed
log-probs and gradients equal unpacked ones, sliding windows shorter than the sequences), and the
text types also equal an independent per-sequence forward in float64. Hybrid models (Mamba,
convolution), chunked attention and unknown config classes fall back to unpacked scoring with one
warning naming the reason (for unknown classes: how to run the check), and the log-probs SRPO uses
are then the independent ones.
"""

import logging

import pytest
import torch
import transformers
from arch_models import FAMILIES, WINDOW, tiny_model
from helpers import srpo_args
from test_prefix_sharing import question_rows

from srpo_trl import SRPOTrainer, StepPairDataset, allow_prefix_sharing, check_prefix_sharing, tiny
from srpo_trl.architectures import TEXT_TYPES, VLM_TYPES, architecture_problem, attention_windows
from srpo_trl.collator import DataCollatorForStepPairs
from srpo_trl.tiny import build_tokenizer, make_image, tiny_qwen2_vl


# Small configs and processors of the vision-language types (the check needs a processor for them).
VLM_BUILDERS = {
    "gemma3": tiny.tiny_gemma3,
    "llava": tiny.tiny_llava,
    "llava_next": tiny.tiny_llava_next,
    "qwen2_5_vl": tiny.tiny_qwen2_5_vl,
    "qwen2_vl": tiny.tiny_qwen2_vl,
    "qwen3_vl": tiny.tiny_qwen3_vl,
    "qwen3_vl_moe": tiny.tiny_qwen3_vl_moe,
}


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


def _batches(trainer, tok, n, max_length=None):
    examples = [trainer.train_dataset[i] for i in range(n)]
    unpacked = DataCollatorForStepPairs(tok, max_length=max_length)(examples)
    return trainer.data_collator(examples), unpacked


@pytest.fixture
def restore_allow_list():
    from srpo_trl import architectures

    before = set(architectures._ALLOWED_CLASSES)
    yield
    architectures._ALLOWED_CLASSES.clear()
    architectures._ALLOWED_CLASSES.update(before)


# ---- the allow-list checks itself -------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TEXT_TYPES | VLM_TYPES))
def test_every_allowed_type_passes_the_check(model_type):
    """`check_prefix_sharing` on every allowed type: text types from their config class alone,
    vision-language types from a small config and processor (a type without one fails here)."""
    if model_type in VLM_TYPES:
        model, processor = VLM_BUILDERS[model_type](seed=0)
        report = check_prefix_sharing(model.config, processor)
    else:
        report = check_prefix_sharing(transformers.CONFIG_MAPPING[model_type])
    assert report.passed, str(report)
    assert report.max_logp_diff <= 1e-5 and report.packed_tokens * 3 < report.unpacked_tokens
    windows = [w for w in report.windows.values() if w]
    assert all(report.longest_sequence > 4 * w for w in windows), report  # the windows cut the contexts


@pytest.mark.parametrize(
    "config,windows",
    [
        (
            transformers.Qwen2Config(use_sliding_window=True, sliding_window=4096, max_window_layers=1),
            {"full_attention": None, "sliding_attention": 8},
        ),
        # no layer_types: every layer slides (Mixtral with a window: test_allowed_text_type_packed_equals_independent)
        (transformers.Qwen3MoeConfig(use_sliding_window=True, sliding_window=4096), {"": 8}),
    ],
    ids=["qwen2_sliding_layers", "qwen3_moe_window"],
)
def test_sliding_window_variants_pass_the_check(config, windows):
    report = check_prefix_sharing(config)
    assert report.passed, str(report)
    assert report.windows == windows


def test_the_check_fails_without_windows_or_image_blocks(monkeypatch):
    """The check has teeth: a tree mask that ignores the sliding window (Gemma2), or Gemma3's
    bidirectional image blocks, makes it fail by far more than its tolerance."""
    import srpo_trl.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "attention_windows", lambda config: {"": None})
    report = check_prefix_sharing(transformers.Gemma2Config)
    assert not report.passed and report.max_logp_diff > 1e-3, str(report)
    monkeypatch.undo()
    monkeypatch.setattr(trainer_module, "BIDIRECTIONAL_IMAGE_TYPES", frozenset())
    model, processor = tiny.tiny_gemma3(seed=0)
    report = check_prefix_sharing(model.config, processor)
    assert not report.passed and report.max_logp_diff > 1e-3, str(report)


def test_check_refuses_hybrids_and_vlms_without_a_processor():
    report = check_prefix_sharing(transformers.Qwen3NextConfig)
    assert not report.passed and "linear_attention" in report.reason
    with pytest.raises(ValueError, match="pass its processor"):
        check_prefix_sharing(transformers.Qwen3VLConfig)


def test_unknown_config_class_falls_back_with_one_warning_saying_how_to_check(tmp_path, caplog, restore_allow_list):
    """A Phi model (not on the allow-list) is scored unpacked with one warning that names the check;
    `allow_prefix_sharing` runs the check, and trainers built afterwards pack Phi models."""
    tok = build_tokenizer()
    config = transformers.PhiConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = transformers.PhiForCausalLM(config).eval()
    rows = question_rows()
    with caplog.at_level(logging.WARNING, logger="srpo_trl"):
        trainer = _trainer(tmp_path / "a", model, tok, rows)
    warnings = [r.getMessage() for r in caplog.records if "Prefix sharing is off" in r.getMessage()]
    assert trainer.prefix_sharing is False and len(warnings) == 1, warnings
    assert "'phi' is not verified" in warnings[0] and "srpo_trl.check_prefix_sharing(model.config)" in warnings[0]
    assert "srpo_trl.allow_prefix_sharing(model.config)" in warnings[0]

    report = allow_prefix_sharing(model.config)
    assert report.passed, str(report)
    packed = _trainer(tmp_path / "b", model, tok, rows)
    assert packed.prefix_sharing
    batch, unpacked = _batches(packed, tok, len(rows))
    with torch.no_grad():
        sums, _, _ = packed._sequence_logps(model, batch)
    assert torch.allclose(sums.double(), independent_sums(model, unpacked), atol=2e-4)


def test_remote_code_config_classes_are_not_trusted_by_model_type():
    class CustomQwen2Config(transformers.Qwen2Config):  # as a trust_remote_code model would define it
        pass

    problem = architecture_problem(CustomQwen2Config())
    assert "not transformers' own" in problem and "check_prefix_sharing" in problem


# ---- packed == an independent forward of each sequence (float64) --------------------------------------


def test_every_allowed_text_type_has_a_tiny_model_here():
    assert TEXT_TYPES <= set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(TEXT_TYPES))
def test_allowed_text_type_packed_equals_independent(tmp_path, model_type):
    """No max_length: sequences are several times the sliding window (8) of the windowed families."""
    tok = build_tokenizer()
    model = tiny_model(model_type, tok, seed=1, attn_implementation=_attn(model_type))
    rows = question_rows()
    trainer = _trainer(tmp_path, model, tok, rows)
    assert trainer.prefix_sharing, model_type
    packed, unpacked = _batches(trainer, tok, len(rows))
    assert packed["packed_length"].sum() < unpacked["attention_mask"].sum()  # really shared
    assert unpacked["attention_mask"].sum(1).max() > 3 * WINDOW
    with torch.no_grad():
        sums, counts, _ = trainer._sequence_logps(model, packed)
    expected = independent_sums(model, unpacked)
    assert torch.allclose(sums.double(), expected, atol=2e-4, rtol=1e-5), (sums, expected)
    assert torch.equal(counts, unpacked["loss_mask"][:, 1:].sum(1).to(counts.dtype))


def test_qwen2_vl_packed_equals_unpacked(tmp_path):
    """Qwen2-VL (every VLM type: test_every_allowed_type_passes_the_check)."""
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


# ---- fallbacks ------------------------------------------------------------------------------------

# model type, config overrides, words the warning must contain
FALLBACKS = [("nemotron_h", {}, "mamba"), ("lfm2", {}, "conv")]


@pytest.mark.parametrize("model_type,overrides,reason", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_hybrid_models_fall_back_with_one_warning(tmp_path, caplog, model_type, overrides, reason):
    tok = build_tokenizer()
    model = tiny_model(model_type, tok, seed=2, attn_implementation=_attn(model_type), **overrides)
    rows = question_rows()
    with caplog.at_level(logging.WARNING, logger="srpo_trl"):
        trainer = _trainer(tmp_path, model, tok, rows)
        packed_view, unpacked = _batches(trainer, tok, len(rows))
        with torch.no_grad():
            sums, _, _ = trainer._sequence_logps(model, packed_view)
            trainer.compute_loss(model, packed_view)
    assert trainer.prefix_sharing is False and "score_seq" not in packed_view
    warnings = [r.getMessage() for r in caplog.records if "Prefix sharing is off" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0] and model_type in warnings[0], warnings
    assert torch.allclose(sums.double(), independent_sums(model, unpacked), atol=2e-4)


def test_the_fallback_guards_a_real_error(tmp_path):
    """Forced packing on a Mamba hybrid gives wrong log-probs: the check above keeps it out."""
    tok = build_tokenizer()
    rows = question_rows()
    model = tiny_model("nemotron_h", tok, seed=2)
    assert architecture_problem(model.config) is not None
    trainer = _trainer(tmp_path, model, tok, rows)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    forced = DataCollatorForStepPairs(tok, prefix_sharing=True)(examples)
    unpacked = DataCollatorForStepPairs(tok)(examples)
    with torch.no_grad():
        wrong, _, _ = trainer._packed_sequence_logps(model, forced)
    assert (wrong.double() - independent_sums(model, unpacked)).abs().max() > 1e-2


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
        (transformers.Gemma3TextConfig(use_bidirectional_attention=True), "bidirectional"),
    ],
    ids=["qwen3_next", "llama4", "falcon_h1", "gemma3_bidirectional"],
)
def test_config_level_reasons(config, reason):
    assert reason in architecture_problem(config)


def test_attention_windows_per_layer_type():
    assert attention_windows(transformers.Gemma2Config(sliding_window=128)) == {
        "sliding_attention": 128,
        "full_attention": None,
    }
    assert attention_windows(transformers.MistralConfig(sliding_window=64)) == {"": 64}
    assert attention_windows(transformers.MistralConfig(sliding_window=None)) == {"": None}
    assert attention_windows(transformers.Qwen2Config()) == {"": None}  # all layers full: one mask
    assert architecture_problem(transformers.Gemma2Config(sliding_window=128)) is None  # any max_length


# ---- MoE: the router's load-balancing loss, as DPOTrainer adds it --------------------------------


def _moe_setup(tmp_path, model_type, prefix_sharing, **config):
    tok = build_tokenizer()
    model = tiny_model(model_type, tok, seed=3, attn_implementation=_attn(model_type))
    rows = question_rows()
    trainer = _trainer(tmp_path, model, tok, rows, prefix_sharing=prefix_sharing, **config)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return trainer, model, batch


def _independent_aux(model, batch):
    """The load-balancing loss of this batch from the model's own forward (unpacked), or from its
    backbone's router logits over the packed rows' real tokens (packed)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from srpo_trl.packing import packed_attention_mask

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
            attention_mask=packed_attention_mask(batch, attention_windows(config), torch.float32),
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
