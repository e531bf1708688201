"""What SRPO does with each field of TRL's `DPOConfig`: honoured, refused, or not applicable.

`SRPOConfig` subclasses `DPOConfig`, so it accepts every DPO field; the package's rule is "refuse,
never ignore". Every field `DPOConfig` declares on top of `transformers.TrainingArguments` is
classified here (the `TrainingArguments` fields are `Trainer`'s own, which SRPOTrainer runs
unchanged):

* `HONOURED`: the field does in SRPO what it does in DPO (the value says where);
* `REFUSED`: a DPO loss setting SRPO does not compute; any value but DPO's default is refused
  at construction with a message saying what to use instead (:func:`refuse_unsupported`);
* `NOT_APPLICABLE`: accepted and without effect, for the reason given.

docs/trainer.md ("Every DPOConfig field") has the same table, and tests/test_dpo_fields.py walks
over `dataclasses.fields(DPOConfig)`: a field that a new TRL release adds fails the tests until it
is classified here and in the docs.
"""

from __future__ import annotations

import dataclasses
from typing import Any


HONOURED: dict[str, str] = {
    "model_init_kwargs": "loads a `model` given as a path or hub id, as in DPOTrainer (and `srpo-trl train`)",
    "trust_remote_code": "model, reference model and processor loading",
    "router_aux_loss_coef": "MoE router load-balancing loss, added to the loss as in DPOTrainer",
    "disable_dropout": "dropout off in the policy and the reference model, as in DPOTrainer",
    "dataset_num_proc": "processes that tokenize text step pairs",
    "max_length": "rows that cannot fit are dropped and listed in `trainer.dropped_rows`; continuations are cut",
    "truncation_mode": "'keep_start' (the default) only; 'keep_end' is refused when `max_length` is set",
    "pad_to_multiple_of": "padding of packed and unpacked batches",
    "pad_token": "the padding token (must be in the vocabulary), as in DPOTrainer (deprecated by TRL)",
    "precompute_ref_log_probs": "align_loss='sigmoid'; refused with the reference-free 'odds_ratio'",
    "precompute_ref_batch_size": "batch size of the reference precomputation",
    "beta": "align_loss='sigmoid': DPO's beta; 'odds_ratio': scales the logged rewards/* only",
    "activation_offloading": "DPOTrainer's offloading context around each training step",
    "sync_ref_model": "TR-DPO reference updates (align_loss='sigmoid'); refused with 'odds_ratio'",
    "ref_model_mixup_alpha": "with sync_ref_model, as in DPOTrainer",
    "ref_model_sync_steps": "with sync_ref_model, as in DPOTrainer",
}

# field -> what it does in DPO and why SRPO has no use for it (refused unless left at DPO's default)
REFUSED: dict[str, str] = {
    "loss_type": "chooses among DPOTrainer's losses, while SRPOTrainer computes the SRPO objective; choose its "
    "alignment term with `align_loss` ('odds_ratio' or 'sigmoid')",
    "loss_weights": "weighs DPOTrainer's `loss_type` terms; SRPO has one alignment term, weighted by `srpo_lambda`",
    "ld_alpha": "LD-DPO's length weighting, which SRPOTrainer does not implement",
    "use_weighting": "WPO's weighting, which SRPOTrainer does not implement",
    "f_divergence_type": "f-DPO's divergence, which SRPOTrainer does not implement",
    "f_alpha_divergence_coef": "the alpha of f-DPO's alpha divergence, which SRPOTrainer does not implement",
    "label_smoothing": "used by DPOTrainer's 'robust', 'exo_pair' and 'aot' losses; SRPO's alignment losses have "
    "no label smoothing",
    "discopop_tau": "the temperature of DPOTrainer's 'discopop' loss, which SRPOTrainer does not compute",
}

NOT_APPLICABLE: dict[str, str] = {
    "padding_free": "TRL 1.16's DPOTrainer turns it off with a warning; SRPO's padding-free path is "
    "`prefix_sharing` (packed question trees)",
}


def dpo_defaults() -> dict[str, Any]:
    """DPOConfig's default value of every field it declares (DPO's own, not TrainingArguments')."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults = {}
    for f in dataclasses.fields(DPOConfig):
        if f.name in trainer_fields:
            continue
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _normalized(name: str, value: Any) -> Any:
    if name == "loss_type" and isinstance(value, str):  # DPOConfig turns a string into a one-item list
        return [value]
    if name == "loss_weights" and value is not None and list(value) == [1.0]:
        return None  # one loss weighted 1: what None means
    return list(value) if isinstance(value, tuple) else value


def refuse_unsupported(config) -> None:
    """Raise a ValueError naming every `REFUSED` field set to anything but DPO's default."""
    defaults = dpo_defaults()
    problems = []
    for name, why in REFUSED.items():
        value = getattr(config, name)
        if _normalized(name, value) != _normalized(name, defaults[name]):
            problems.append(f"`{name}={value!r}`: {why}. Leave it at DPO's default ({defaults[name]!r}).")
    if problems:
        raise ValueError("DPOConfig settings SRPO does not use:\n- " + "\n- ".join(problems))
