"""bf16 or fp32, chosen from the hardware (issue 27): `SRPOConfig()` and `srpo-trl train` run on a
CPU-only machine without the `use_cpu=True, bf16=False` incantation, and use bf16 where the
accelerator has it. A GPU is simulated by patching transformers' own test of bf16 support (the
one `TrainingArguments` makes before it refuses bf16), so both branches run on this CPU machine."""

import logging
from pathlib import Path

import pytest
from trl import DPOConfig

from srpo_trl import SRPOConfig, recipe_runner
from srpo_trl import config as config_mod
from srpo_trl.trainer import _as_srpo_config


REPO = Path(__file__).resolve().parents[1]
TEXT_LORA = REPO / "recipes" / "qwen2.5-7b-instruct" / "srpo" / "config_lora.yaml"
QUIET = dict(report_to="none", activation_checkpointing=False)


@pytest.fixture
def announced(monkeypatch):
    """A fresh 'already said' memory: the automatic choice is logged once per process."""
    monkeypatch.setattr(config_mod, "_ANNOUNCED", set())
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)


@pytest.fixture
def bf16_gpu(monkeypatch):
    """This machine as transformers would see one with a bf16 GPU (the device stays the CPU)."""
    from transformers import training_args

    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)


def precision_logs(caplog):
    return [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]


def test_unset_bf16_means_fp32_on_a_cpu_machine_said_once(tmp_path, announced, caplog):
    caplog.set_level(logging.WARNING)
    args = SRPOConfig(output_dir=str(tmp_path), **QUIET)  # TRL's DPOConfig() raises here
    assert args.bf16 is False and args.mixed_precision == "no"
    assert SRPOConfig(output_dir=str(tmp_path), **QUIET).bf16 is False
    (message,) = precision_logs(caplog)  # once, not per config
    assert "fp32" in message and "no GPU with bf16" in message


def test_unset_bf16_means_bf16_where_the_accelerator_has_it(tmp_path, announced, bf16_gpu, caplog):
    caplog.set_level(logging.WARNING)
    args = SRPOConfig(output_dir=str(tmp_path), **QUIET)
    assert args.bf16 is True and args.mixed_precision == "bf16"
    (message,) = precision_logs(caplog)
    assert "uses bf16" in message
    # what the user sets explicitly is kept, and fp16 excludes bf16
    assert SRPOConfig(output_dir=str(tmp_path), bf16=False, **QUIET).bf16 is False
    assert SRPOConfig(output_dir=str(tmp_path), use_cpu=True, **QUIET).bf16 is False  # the CPU: fp32
    assert len(precision_logs(caplog)) == 2  # the fp32 choice is said once too


def test_fp16_leaves_bf16_off_without_a_message(tmp_path, announced, bf16_gpu, caplog):
    caplog.set_level(logging.WARNING)
    args = SRPOConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True, **QUIET)
    assert (args.bf16, args.fp16) == (False, True) and not precision_logs(caplog)


def test_explicit_bf16_without_bf16_hardware_is_refused_saying_what_to_do(tmp_path, announced):
    with pytest.raises(ValueError, match=r"no GPU with bf16 support\. Leave bf16 unset .*use_cpu=True"):
        SRPOConfig(output_dir=str(tmp_path), bf16=True, **QUIET)
    # bf16 autocast on the CPU, asked for explicitly, is what transformers allows
    args = SRPOConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, **QUIET)
    assert args.bf16 is True and args.mixed_precision == "bf16"


def test_a_dpo_config_converts_with_its_precision(tmp_path, announced):
    dpo = DPOConfig(output_dir=str(tmp_path), bf16=False, **QUIET)
    assert _as_srpo_config(dpo).bf16 is False


def test_ref_logps_cache_dir_default_is_the_documented_path(tmp_path, monkeypatch, announced):
    monkeypatch.setenv("SRPO_TRL_CACHE", str(tmp_path / "cache"))
    assert SRPOConfig(output_dir=str(tmp_path), **QUIET).ref_logps_cache_dir == str(tmp_path / "cache" / "ref_logps")
    monkeypatch.delenv("SRPO_TRL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "srpo_trl" / "ref_logps"
    assert SRPOConfig(output_dir=str(tmp_path), **QUIET).ref_logps_cache_dir == str(expected)
    assert SRPOConfig(output_dir=str(tmp_path), ref_logps_cache_dir="", **QUIET).ref_logps_cache_dir == ""
    doc = (REPO / "docs" / "trainer.md").read_text()
    assert "| `ref_logps_cache_dir` | `$SRPO_TRL_CACHE/ref_logps`, else `~/.cache/srpo_trl/ref_logps` |" in doc


# ---- srpo-trl train: a GPU recipe on a CPU machine ----------------------------------------------------


def test_recipe_bf16_becomes_fp32_on_a_cpu_machine_with_one_warning(announced, caplog):
    caplog.set_level(logging.WARNING)
    script, args, model = recipe_runner.parse_args(["--config", str(TEXT_LORA)])
    assert args.bf16 is False and model.dtype == "float32"
    (message,) = precision_logs(caplog)  # the recipe's switch; SRPOConfig then has nothing to choose
    assert "bf16: true and dtype: bfloat16" in message and "fp32" in message
    # what the user says on the command line is kept
    script, args, model = recipe_runner.parse_args(["--config", str(TEXT_LORA), "--dtype", "bfloat16"])
    assert args.bf16 is False and model.dtype == "bfloat16"
    script, args, model = recipe_runner.parse_args(["--config", str(TEXT_LORA), "--use_cpu", "true", "--bf16", "true"])
    assert args.bf16 is True and model.dtype == "float32"  # bf16 autocast on the CPU, fp32 weights


def test_recipe_keeps_bf16_where_the_accelerator_has_it(announced, bf16_gpu, caplog):
    caplog.set_level(logging.WARNING)
    script, args, model = recipe_runner.parse_args(["--config", str(TEXT_LORA)])
    assert args.bf16 is True and model.dtype == "bfloat16" and not precision_logs(caplog)


@pytest.mark.parametrize("flag", [["--bf16", "true"], ["--bf16"], ["--bf16=True"]])
def test_explicit_bf16_flag_on_a_cpu_machine_exits_2_with_a_message(announced, flag, capsys):
    assert recipe_runner.main(["--config", str(TEXT_LORA), *flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("srpo-trl train: --bf16 true, but this machine has no GPU with bf16 support")
    assert "--use_cpu true" in err and "Traceback" not in err
