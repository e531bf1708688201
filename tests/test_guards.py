"""srpo_trl/guards.py through SRPOTrainer and `srpo-trl train`: divergence stops (or skips) with the step
named and nothing non-finite saved; the logged loss is never a silent 0 for NaN; resume checks the data
and loss settings against the checkpoint; a training set with no rows raises in the Python API."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from helpers import ROWS, make_trainer
from transformers import TrainerCallback

from srpo_trl.guards import RUN_SETTINGS_FILE, ResumeMismatch, TrainingDiverged
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def _poison(model):
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")


def test_learning_rate_1000_stops_naming_the_step_and_keeps_finite_weights(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=0)
    trainer = make_trainer(tmp_path, model, tok, ROWS, learning_rate=1000.0, max_steps=6)
    with pytest.raises(
        TrainingDiverged,
        match=r"at step 2 \(of 6\).*gradient norm is nan.*Likely cause: .*too large updates; the loss went from "
        r"6.44 at step 1 to .*What to do: lower learning_rate \(now 1000\)",
    ):
        trainer.train()
    assert _finite(model)  # the diverging step was not applied
    assert [h["step"] for h in trainer.state.log_history] == [1]  # nothing logged for the diverged step


def test_skip_mode_skips_every_nonfinite_step_and_counts_them(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=0)
    trainer = make_trainer(tmp_path, model, tok, ROWS, learning_rate=1000.0, max_steps=5, nonfinite="skip")
    after_step_1 = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 1:
                after_step_1.update({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer._nonfinite_guard.skipped_steps == [2, 3, 4, 5]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h.get("nonfinite_skipped") for h in logs] == [None, 1, 2, 3, 4]
    # skipped means skipped: no update at all (not even AdamW's momentum or weight decay)
    assert all(torch.equal(p, after_step_1[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nan_loss_is_never_logged_as_zero(tmp_path, tok, mode):
    model = tiny_causal_lm(tok, seed=0)
    _poison(model)  # NaN from the first forward on
    trainer = make_trainer(tmp_path, model, tok, ROWS, max_steps=2, nonfinite=mode)
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    if mode == "stop":
        assert "at step 1" in str(info.value) and "reference term nan" in str(info.value)
        assert "Likely cause: the weights already held NaN or inf before this step" in str(info.value)
        assert trainer.state.log_history == []
    else:  # every step skipped; the weights were NaN all along, so the end-of-training check refuses them
        assert "hold NaN or inf" in str(info.value) and "at the end of training" in str(info.value)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 2 and all(x != x for x in losses)  # NaN, not 0.0


def test_nonfinite_weights_are_never_saved_as_a_checkpoint(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=0)

    class Corrupt(TrainerCallback):  # weights that went bad without a NaN gradient
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                _poison(model)

    trainer = make_trainer(tmp_path, model, tok, ROWS, max_steps=3, save_strategy="steps", save_steps=1)
    trainer.add_callback(Corrupt())
    with pytest.raises(TrainingDiverged, match="after step 2.*before saving the checkpoint"):
        trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()


def test_cli_learning_rate_1000_fails_and_saves_no_model(tmp_path, capsys):
    from test_recipes import TEXT_LORA, flags, run_train

    tok = build_tokenizer()
    model_dir = tmp_path / "model"
    tiny_causal_lm(tok, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    rc = run_train(
        "--config",
        TEXT_LORA,
        *flags(),
        "--use_peft",
        "false",
        "--model_name_or_path",
        model_dir,
        "--train_file",
        data,
        "--output_dir",
        out,
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "3",
        "--learning_rate",
        "1000",
        "--max_length",
        "512",
    )
    err = capsys.readouterr().err
    assert rc == 3 and re.search(r"Training diverged at step [23] \(of 4\): the gradient norm is nan", err), err
    assert not (out / "model.safetensors").exists()


# ---- resume -----------------------------------------------------------------------------------------


def _checkpointed(tmp_path, tok):
    trainer = make_trainer(
        tmp_path, tiny_causal_lm(tok, seed=0), tok, ROWS, max_steps=1, save_strategy="steps", save_steps=1
    )
    trainer.train()
    settings = json.loads((tmp_path / "checkpoint-1" / RUN_SETTINGS_FILE).read_text())
    assert settings["loss"]["srpo_lambda"] == 0.3 and settings["dataset"]
    return settings


def test_resume_with_the_same_settings_is_quiet(tmp_path, tok, caplog):
    _checkpointed(tmp_path, tok)
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok, seed=0), tok, ROWS, max_steps=2, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="srpo_trl"):
        trainer.train(resume_from_checkpoint=True)
    assert "other settings" not in caplog.text and trainer.state.global_step == 2


def test_resume_with_other_loss_settings_or_data_warns_naming_them(tmp_path, tok, caplog):
    _checkpointed(tmp_path, tok)
    trainer = make_trainer(
        tmp_path,
        tiny_causal_lm(tok, seed=0),
        tok,
        ROWS[:2],
        max_steps=2,
        srpo_lambda=0.5,
        align_loss="odds_ratio",
        save_strategy="no",
    )
    with caplog.at_level(logging.WARNING, logger="srpo_trl"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "srpo_lambda: 0.3 in the checkpoint, 0.5 now" in caplog.text
    assert "training data differ" in caplog.text and trainer.state.global_step == 2


def test_resume_mismatch_error_refuses_before_any_step(tmp_path, tok):
    _checkpointed(tmp_path, tok)
    trainer = make_trainer(
        tmp_path,
        tiny_causal_lm(tok, seed=0),
        tok,
        ROWS,
        max_steps=2,
        step_separator=" ",
        resume_mismatch="error",
        save_strategy="no",
    )
    with pytest.raises(ResumeMismatch, match="step_separator: '\\\\n' in the checkpoint, ' ' now"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_every_row_over_long_raises_in_the_python_api(tmp_path, tok):
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok, seed=0), tok, ROWS, max_steps=2, max_length=4)
    assert len(trainer.train_dataset) == 0
    with pytest.raises(ValueError, match="no rows: every row was dropped \\(3 dropped\\).*max_length=4"):
        trainer.train()
