"""Activation checkpointing on SRPOConfig: TRL's default (on) without transformers 5's deprecation
warning for the old name's default, and the user's value honored under either name."""

from __future__ import annotations

import warnings

import pytest
from trl import DPOConfig

from srpo_trl import SRPOConfig
from srpo_trl.trainer import _as_srpo_config


def _build(cls, tmp_path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = cls(output_dir=str(tmp_path), report_to="none", bf16=False, **kwargs)
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
    return config, deprecations


def test_default_is_trl_default_without_a_deprecation_warning(tmp_path):
    dpo, dpo_warnings = _build(DPOConfig, tmp_path)
    srpo, srpo_warnings = _build(SRPOConfig, tmp_path)
    assert len(dpo_warnings) == 1  # what users of DPOConfig see on every config (TRL 1.16, transformers 5)
    assert srpo_warnings == []
    assert srpo.activation_checkpointing is srpo.gradient_checkpointing is True
    assert dpo.activation_checkpointing is True


@pytest.mark.parametrize("name", ["activation_checkpointing", "gradient_checkpointing"])
def test_either_name_turns_it_off(tmp_path, name):
    config, deprecations = _build(SRPOConfig, tmp_path, **{name: False})
    assert config.activation_checkpointing is config.gradient_checkpointing is False
    assert len(deprecations) == (1 if name == "gradient_checkpointing" else 0)  # the old name still warns


def test_a_dpo_config_converts_with_its_checkpointing(tmp_path):
    dpo, _ = _build(DPOConfig, tmp_path, activation_checkpointing=False)
    converted = _as_srpo_config(dpo)
    assert converted.activation_checkpointing is converted.gradient_checkpointing is False
