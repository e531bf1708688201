"""What a resume reads back from disk: a checkpoint's srpo_run.json (written whole or not at all; a
missing or damaged one refused under resume_mismatch="error"), `--resume_from_checkpoint true`
meaning the latest checkpoint, and every torch.load in the package refusing pickled code."""

from __future__ import annotations

import ast
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROWS, make_trainer

from srpo_trl import guards
from srpo_trl.guards import RUN_SETTINGS_FILE, ResumeMismatch
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


PACKAGE = Path(__file__).resolve().parents[1] / "srpo_trl"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tok):
    """An output_dir holding checkpoint-1 (with its srpo_run.json), trained once for the module."""
    out = tmp_path_factory.mktemp("run")
    trainer = make_trainer(
        out, tiny_causal_lm(tok, seed=0), tok, ROWS, max_steps=1, save_strategy="steps", save_steps=1
    )
    trainer.train()
    assert (out / "checkpoint-1" / RUN_SETTINGS_FILE).is_file()
    return out


def _resume(tmp_path, checkpointed, tok, settings_file: str | None, max_steps=2, **config):
    """Resume a copy of the checkpoint whose srpo_run.json is removed (None) or replaced."""
    out = tmp_path / "run"
    shutil.copytree(checkpointed, out)
    path = out / "checkpoint-1" / RUN_SETTINGS_FILE
    if settings_file is None:
        path.unlink()
    else:
        path.write_text(settings_file)
    trainer = make_trainer(
        out, tiny_causal_lm(tok, seed=0), tok, ROWS, max_steps=max_steps, save_strategy="no", **config
    )
    return trainer, path


@pytest.mark.parametrize("settings_file", [None, '{"dataset": "abc", "loss": {"srpo_la'], ids=["missing", "torn"])
def test_resume_mismatch_error_refuses_a_checkpoint_whose_settings_are_unknown(
    tmp_path, checkpointed, tok, settings_file
):
    # A kill between the checkpoint save and srpo_run.json leaves no file: before, "error" only
    # warned and trained on; a torn file raised a bare JSONDecodeError naming no file.
    trainer, path = _resume(tmp_path, checkpointed, tok, settings_file, resume_mismatch="error")
    with pytest.raises(ResumeMismatch) as info:
        trainer.train(resume_from_checkpoint=True)
    message = str(info.value)
    assert "checkpoint-1" in message and RUN_SETTINGS_FILE in message
    assert ("has no" in message) if settings_file is None else (str(path) in message and "cannot be read" in message)
    assert "earlier checkpoint" in message and "resume_mismatch='warn'" in message  # the ways out
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("settings_file", [None, "{not json"], ids=["missing", "torn"])
def test_resume_mismatch_warn_resumes_unchecked_naming_the_file(tmp_path, checkpointed, tok, settings_file, caplog):
    trainer, path = _resume(tmp_path, checkpointed, tok, settings_file, max_steps=1)  # resumed, no step to add
    with caplog.at_level(logging.WARNING, logger="srpo_trl"):
        trainer.train(resume_from_checkpoint=True)
    assert "Resuming unchecked" in caplog.text and (str(path) if settings_file else RUN_SETTINGS_FILE) in caplog.text
    assert trainer.state.global_step == 1  # the checkpoint's step: it was resumed


def test_run_settings_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that stops half way (here: a value json cannot encode, mid-file) leaves no srpo_run.json
    (before: a torn file that a resume could not read)."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    monkeypatch.setattr(guards, "run_settings", lambda trainer: {"dataset": "abc", "loss": {"beta": object()}})
    callback = guards.RunSettingsCallback(trainer=None)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3)
    with pytest.raises(TypeError):
        callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert sorted(p.name for p in folder.iterdir()) == []  # neither a torn file nor a temporary one
    monkeypatch.setattr(guards, "run_settings", lambda trainer: {"dataset": "abc", "loss": {"beta": 0.1}})
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert json.loads((folder / RUN_SETTINGS_FILE).read_text()) == {"dataset": "abc", "loss": {"beta": 0.1}}


def test_resume_from_checkpoint_true_on_the_command_line_means_the_latest(tmp_path, tok):
    """`--resume_from_checkpoint true` (how the command line and YAML spell it) resumes the latest
    checkpoint in output_dir, as Trainer.train(resume_from_checkpoint=True) does (before: a folder
    named "true" was looked for)."""
    from srpo_trl.cli import main as cli_main

    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_causal_lm(tok, seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["train", "--model_name_or_path", str(model_dir), "--train_file", str(data), "--output_dir", str(out)]
    argv += ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]
    argv += [
        "--per_device_train_batch_size",
        "3",
        "--max_length",
        "512",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
    ]
    assert cli_main([*argv, "--max_steps", "1"]) == 0
    assert cli_main([*argv, "--max_steps", "2", "--resume_from_checkpoint", "true"]) == 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # step 1 came back from checkpoint-1's history (a fresh run would have logged it again, not resumed)
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]


def test_resume_target_reads_booleans_as_the_trainer_does():
    from srpo_trl.recipe_runner import resume_target

    assert [resume_target(v) for v in ("true", "True", " TRUE ", True)] == [True] * 4
    assert [resume_target(v) for v in ("false", "", None, False)] == [None] * 4
    assert resume_target("out/checkpoint-3") == "out/checkpoint-3" and resume_target("./true") == "./true"


def _torch_loads(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "torch":
                yield node


def test_every_torch_load_in_the_package_refuses_pickled_code():
    """torch >= 2.4 is allowed, where torch.load still unpickles arbitrary objects unless told
    weights_only=True (the default only from 2.6): a file in a shared work folder could run code."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in _torch_loads(ast.parse(path.read_text(encoding="utf-8"))):
            safe = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            calls.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", safe))
    assert any(where.startswith("srpo_trl/demo/study.py") for where, _ in calls)  # the scan sees the call
    assert [where for where, safe in calls if not safe] == []


def test_weights_only_refuses_a_pickle_that_runs_code(tmp_path):
    """What weights_only=True buys, on this torch: a warm-start file whose pickle calls a function is
    refused, the function never runs."""
    import pickle

    import torch

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"weight": torch.zeros(2), "x": Payload()}, tmp_path / "warm.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "warm.pt", map_location="cpu", weights_only=True)
    assert not marker.exists()
    assert torch.load(tmp_path / "warm.pt", map_location="cpu", weights_only=False)["weight"].shape == (2,)
    assert marker.exists()  # without it, loading ran the code
