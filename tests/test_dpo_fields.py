"""Every DPOConfig field is honoured, refused with a message, or documented as not applicable
(srpo_trl/dpo_fields.py, docs/trainer.md), and the refusals SRPOTrainer shares with DPOTrainer
carry DPOTrainer's own words (so code and tests written against DPOTrainer's errors still match)."""

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import ROWS, srpo_args
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer

from srpo_trl import SRPOTrainer, StepPairDataset, dpo_fields
from srpo_trl.tiny import build_tokenizer, make_image, tiny_causal_lm, tiny_qwen2_5_vl
from srpo_trl.trainer import DPO_KEEP_END_VLM, DPO_PRECOMPUTE_ITERABLE, DPO_VISION_WITH_TEXT_MODEL


DOCS = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"
TRAINER_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
DPO_OWN = [f.name for f in dataclasses.fields(DPOConfig) if f.name not in TRAINER_FIELDS]

# A value other than DPO's default for every refused field.
REFUSED_VALUES = {
    "loss_type": "ipo",
    "loss_weights": [2.0],
    "ld_alpha": 0.5,
    "use_weighting": True,
    "f_divergence_type": "js_divergence",
    "f_alpha_divergence_coef": 0.3,
    "label_smoothing": 0.1,
    "discopop_tau": 0.1,
}


def test_every_dpo_config_field_is_classified_once():
    """A field a new TRL adds to DPOConfig fails here until it is classified (not silently accepted)."""
    tables = {"honoured": dpo_fields.HONOURED, "refused": dpo_fields.REFUSED, "n/a": dpo_fields.NOT_APPLICABLE}
    for f in dataclasses.fields(DPOConfig):
        if f.name in TRAINER_FIELDS:  # transformers.Trainer's own; SRPOTrainer runs Trainer unchanged
            continue
        homes = [kind for kind, table in tables.items() if f.name in table]
        assert len(homes) == 1, f"DPOConfig.{f.name} is classified as {homes}; add it to srpo_trl/dpo_fields.py"
    stale = {name for table in tables.values() for name in table} - set(DPO_OWN)
    assert not stale, f"classified but not DPOConfig fields (removed by TRL?): {stale}"
    assert set(REFUSED_VALUES) == set(dpo_fields.REFUSED)


def _docs_table() -> dict[str, str]:
    text = DOCS.read_text()
    section = text.split("## Every DPOConfig field", 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[2] for m in re.finditer(r"^\| `(\w+)` \| ([^|]+?) \|", section, flags=re.M)}


def test_docs_list_every_dpo_field_with_its_status():
    table = _docs_table()
    assert set(table) == set(DPO_OWN)
    for name, status in table.items():
        expected = (
            "honoured"
            if name in dpo_fields.HONOURED
            else "not applicable"
            if name in dpo_fields.NOT_APPLICABLE
            else f"refused unless `{dpo_fields.dpo_defaults()[name]!r}`"
        )
        assert status == expected, name


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_refused_field_raises_naming_it(tmp_path, name):
    with pytest.raises(ValueError, match=re.escape(f"`{name}=")) as info:
        srpo_args(tmp_path, **{name: REFUSED_VALUES[name]})
    assert "Leave it at DPO's default" in str(info.value)


def test_a_dpo_config_with_a_refused_setting_is_refused_by_the_trainer(tmp_path):
    tok = build_tokenizer()
    args = DPOConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", label_smoothing=0.1)
    with pytest.raises(ValueError, match="`label_smoothing=0.1`"):
        SRPOTrainer(
            model=tiny_causal_lm(tok), args=args, train_dataset=StepPairDataset.from_list(ROWS), processing_class=tok
        )


def test_defaults_and_one_weight_are_accepted(tmp_path):
    assert srpo_args(tmp_path, loss_type=["sigmoid"], loss_weights=[1.0]).loss_weights == [1.0]


# ---- honoured fields that no other test exercises ------------------------------------------------


def _trainer(tmp_path, tok, model=None, rows=ROWS, **config):
    return SRPOTrainer(
        model=model or tiny_causal_lm(tok),
        args=srpo_args(tmp_path, per_device_train_batch_size=len(rows), **config),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=tok,
    )


def test_pad_token_is_used_and_checked_against_the_vocabulary(tmp_path):
    tok = build_tokenizer()
    pad = "<|im_end|>"
    assert tok.pad_token != pad
    trainer = _trainer(tmp_path, tok, pad_token=pad, prefix_sharing=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    assert len(padded) and (padded == tok.convert_tokens_to_ids(pad)).all()
    assert trainer.model.config.pad_token_id == tok.convert_tokens_to_ids(pad)
    with pytest.raises(ValueError, match="`pad_token` \\('<nope>'\\) is not found in the vocabulary"):
        _trainer(tmp_path, build_tokenizer(), pad_token="<nope>")


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_pad_to_multiple_of(tmp_path, prefix_sharing):
    tok = build_tokenizer()
    trainer = _trainer(tmp_path, tok, pad_to_multiple_of=16, prefix_sharing=prefix_sharing)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 16 == 0


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout(tmp_path, disable):
    tok = build_tokenizer()
    model = tiny_causal_lm(tok)
    model.model.probe = torch.nn.Dropout(0.5)  # tiny Qwen2 has no dropout module of its own
    _trainer(tmp_path, tok, model=model, disable_dropout=disable)
    assert model.model.probe.p == (0.0 if disable else 0.5)


def test_dataset_num_proc_reaches_the_encoding_map(tmp_path, monkeypatch):
    seen = []
    original = Dataset.map

    def spy(self, *args, **kwargs):
        if str(kwargs.get("desc", "")).startswith("Encoding"):
            seen.append(kwargs.get("num_proc"))
            kwargs["num_proc"] = None  # no worker processes in the test
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "map", spy)
    _trainer(tmp_path, build_tokenizer(), dataset_num_proc=3)
    assert seen == [3]


def test_activation_offloading_wraps_the_training_step(tmp_path, monkeypatch):
    """DPOTrainer builds the offloading context and enters it around each training step; TRL's manager
    needs an accelerator, so on CPU a recording stand-in takes its place."""
    from trl.trainer import dpo_trainer

    entered = []

    class Recording:  # entered once per step, like TRL's manager (reusable, unlike @contextmanager)
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    def manager(model):
        assert isinstance(model, torch.nn.Module)
        return Recording()

    monkeypatch.setattr(dpo_trainer, "get_act_offloading_ctx_manager", manager)
    tok = build_tokenizer()
    assert not isinstance(_trainer(tmp_path, tok).maybe_activation_offload_context, Recording)
    _trainer(tmp_path, tok, activation_offloading=True, max_steps=2).train()
    assert len(entered) == 2  # once per training step


def test_precompute_ref_batch_size(tmp_path, monkeypatch):
    sizes = []
    original = SRPOTrainer._precompute_ref_logps

    def spy(self, dataset, name, batch_size):
        sizes.append(batch_size)
        return original(self, dataset, name, batch_size)

    monkeypatch.setattr(SRPOTrainer, "_precompute_ref_logps", spy)
    tok = build_tokenizer()
    _trainer(
        tmp_path,
        tok,
        align_loss="sigmoid",
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=2,
        ref_logps_cache_dir="",
    )
    assert sizes == [2]


def test_padding_free_is_not_applicable_and_dpo_says_so(tmp_path, caplog):
    tok = build_tokenizer()
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, tok, padding_free=True)
    assert "padding_free=True" in caplog.text  # DPOTrainer's own warning: not silent
    assert trainer.prefix_sharing  # SRPO's padding-free path


# ---- refusals shared with DPOTrainer carry DPOTrainer's words -------------------------------------


def _vision_rows():
    return [
        {
            "prompt": [{"role": "user", "content": "What is this?"}],
            "images": [make_image(0)],
            "chosen": "A bottle of bleach; keep it from acids.",
            "rejected": "A drink.",
        }
    ]


def _error(build) -> str:
    with pytest.raises(ValueError) as info:
        build()
    return str(info.value)


def test_keep_end_with_images_says_what_dpo_says(tmp_path):
    model, processor = tiny_qwen2_5_vl(seed=0)
    data = Dataset.from_list(_vision_rows())
    with pytest.warns(FutureWarning):  # TRL deprecates keep_end
        dpo_args = DPOConfig(str(tmp_path / "d"), use_cpu=True, bf16=False, report_to="none", max_length=32)
        dpo_args.truncation_mode = "keep_end"
    dpo = _error(lambda: DPOTrainer(model=model, args=dpo_args, train_dataset=data, processing_class=processor))
    srpo = _error(
        lambda: SRPOTrainer(
            model=model,
            args=srpo_args(tmp_path / "s", max_length=32, truncation_mode="keep_end"),
            train_dataset=data,
            processing_class=processor,
        )
    )
    assert DPO_KEEP_END_VLM in dpo and srpo.startswith(DPO_KEEP_END_VLM)
    assert "SRPO keeps the start of every sequence" in srpo
    # A text dataset: DPOTrainer supports keep_end, so SRPO's own refusal does not borrow DPO's sentence.
    tok = build_tokenizer()
    text = _error(lambda: _trainer(tmp_path, tok, max_length=64, truncation_mode="keep_end"))
    assert DPO_KEEP_END_VLM not in text and "truncation_mode='keep_end' is not supported" in text


def test_image_rows_with_a_tokenizer_say_what_dpo_says(tmp_path):
    tok = build_tokenizer()
    data = Dataset.from_list(_vision_rows())
    dpo_args = DPOConfig(str(tmp_path / "d"), use_cpu=True, bf16=False, report_to="none")
    dpo = _error(
        lambda: DPOTrainer(model=tiny_causal_lm(tok), args=dpo_args, train_dataset=data, processing_class=tok)
    )
    srpo = _error(
        lambda: SRPOTrainer(
            model=tiny_causal_lm(tok), args=srpo_args(tmp_path), train_dataset=data, processing_class=tok
        )
    )
    assert DPO_VISION_WITH_TEXT_MODEL in dpo and srpo.startswith(DPO_VISION_WITH_TEXT_MODEL)
    assert re.search("vision-related.*vision-language model", srpo)  # what TRL's own test matches
    assert "pass the model's processor" in srpo


def test_precomputing_on_a_stream_says_what_dpo_says(tmp_path):
    tok = build_tokenizer()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ROWS]
    stream = Dataset.from_list(rows).to_iterable_dataset()
    common = dict(use_cpu=True, bf16=False, report_to="none", max_steps=1, precompute_ref_log_probs=True)
    dpo = _error(
        lambda: DPOTrainer(
            model=tiny_causal_lm(tok),
            ref_model=tiny_causal_lm(tok),
            args=DPOConfig(str(tmp_path / "d"), **common),
            train_dataset=stream,
            processing_class=tok,
        )
    )
    srpo = _error(
        lambda: SRPOTrainer(
            model=tiny_causal_lm(tok),
            ref_model=tiny_causal_lm(tok),
            args=srpo_args(tmp_path / "s", align_loss="sigmoid", ref_logps_cache_dir="", **common),
            train_dataset=stream,
            processing_class=tok,
        )
    )
    assert DPO_PRECOMPUTE_ITERABLE in dpo and srpo.startswith(DPO_PRECOMPUTE_ITERABLE)
    assert re.search("precompute_ref_log_probs.*not supported with IterableDataset", srpo)
    assert "no fixed order" in srpo
