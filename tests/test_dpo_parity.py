"""Swap-in parity with TRL's DPOTrainer (issue 16): the DPO usage patterns run through both trainers,
on our own tiny models, asserting the same behaviour.

- every dataset format DPO accepts is rendered as DPOTrainer renders it: same prompt; SRPO's
  reference path (the fallback `prefix + chosen`, closed) is DPO's chosen completion, and SRPO's
  continuations are DPO's completions without their end of turn (SRPO never closes a step);
- DPO's metric names exist in both align modes and mean what they mean in DPO;
- the reference model is built the same way from a model path (sigmoid mode), also with
  `precompute_ref_log_probs` and `sync_ref_model`;
- streamed evaluation sets work in both.
"""

import json
from pathlib import Path

import pytest
import torch
import trl
from datasets import Dataset
from helpers import plain_logps, srpo_args
from trl import DPOConfig, DPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback

from srpo_trl import SRPOTrainer
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


TEMPLATES = Path(trl.__file__).parent / "chat_templates"  # real model templates shipped with TRL


def _tokenizer(template: str | None = None):
    tok = build_tokenizer()
    if template:
        tok.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    return tok


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text, **extra):
    return [{"role": "assistant", "content": text, **extra}]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]

# name: (chat template, rows) in each format TRL's DPO accepts
FORMATS = {
    "standard": (None, [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]),
    "standard_implicit_prompt": (None, [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]),
    "conversational": (
        None,
        [
            {
                "prompt": _user("What color is the sky?"),
                "chosen": _assistant("It is blue."),
                "rejected": _assistant("It is green."),
            }
        ],
    ),
    "conversational_implicit_prompt": (
        None,
        [
            {
                "chosen": _user("What color is the sky?") + _assistant("It is blue."),
                "rejected": _user("What color is the sky?") + _assistant("It is green."),
            }
        ],
    ),
    "tools": (
        "qwen3",
        [
            {
                "prompt": _user("Weather in Paris?"),
                "chosen": [{"role": "assistant", "content": "", "tool_calls": CALL}],
                "rejected": _assistant("It is sunny."),
                "tools": json.dumps(TOOLS),
            }
        ],
    ),
    "chat_template_kwargs": (
        "qwen3",
        [
            {
                "prompt": _user("Is it safe?"),
                "chosen": _assistant("Yes."),
                "rejected": _assistant("No."),
                "chat_template_kwargs": {"enable_thinking": False},
            },
            {
                "prompt": _user("Is it far?"),
                "chosen": _assistant("Yes."),
                "rejected": _assistant("No."),
                "chat_template_kwargs": {"enable_thinking": True},
            },
        ],
    ),
    "reasoning_content": (
        "qwen3",
        [
            {
                "prompt": _user("Is it safe?"),
                "chosen": _assistant("Yes.", reasoning_content="It is water."),
                "rejected": _assistant("No.", reasoning_content="It is acid."),
            }
        ],
    ),
    "harmony_thinking": (
        "gptoss",
        [
            {
                "prompt": _user("Describe it."),
                "chosen": _assistant("Beautiful.", thinking="The user wants one word."),
                "rejected": _assistant("Ugly.", thinking="Be rude."),
            }
        ],
    ),
}


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """One DPOTrainer and one SRPOTrainer whose own dataset preparation renders every format."""
    root = tmp_path_factory.mktemp("parity")
    tok = build_tokenizer()
    seed_rows = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    dpo_args = DPOConfig(str(root / "d"), use_cpu=True, bf16=False, report_to="none", max_length=None)
    dpo = DPOTrainer(
        model=tiny_causal_lm(tok),
        ref_model=tiny_causal_lm(tok),
        args=dpo_args,
        train_dataset=seed_rows,
        processing_class=tok,
    )
    srpo = SRPOTrainer(
        model=tiny_causal_lm(tok), args=srpo_args(root / "s"), train_dataset=seed_rows, processing_class=tok
    )
    return dpo, srpo


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_dpo_format_renders_as_dpo_renders_it(trainers, name):
    dpo, srpo = trainers
    template, rows = FORMATS[name]
    tok = _tokenizer(template)
    dataset = Dataset.from_list(rows)
    dpo_rows = dpo._prepare_dataset(dataset, tok, dpo.args, name)
    srpo_rows = srpo._prepare_dataset(dataset, tok, srpo.args, name)
    assert len(dpo_rows) == len(srpo_rows) == len(rows)

    def text(ids):
        return tok.decode(ids, skip_special_tokens=False)

    for d, s in zip(dpo_rows, srpo_rows):
        assert text(s["prompt_ids"]) == text(d["prompt_ids"])
        assert text(s["reference_ids"]) == text(d["chosen_ids"])  # DPO's chosen, closed, is SRPO's reference path
        assert text(d["chosen_ids"]).startswith(text(s["chosen_ids"])) and len(s["chosen_ids"]) < len(d["chosen_ids"])
        end = text(d["chosen_ids"])[len(text(s["chosen_ids"])) :]
        assert end in (tok.eos_token, "<|im_end|>\n", "<|return|>")  # only the end of turn is left out
        assert text(s["rejected_ids"]) + end == text(d["rejected_ids"])
        assert s["prefix_ids"] == []
    if name == "harmony_thinking":  # the analysis channel is trained on, not dropped
        assert "The user wants one word." in text(srpo_rows[0]["chosen_ids"])
    if name == "tools":
        assert "get_weather" in text(srpo_rows[0]["prompt_ids"]) and "<tool_call>" in text(srpo_rows[0]["chosen_ids"])
    if name == "chat_template_kwargs":  # per-row kwargs: the two rows' prompts differ as the template makes them
        assert text(srpo_rows[0]["prompt_ids"]).endswith("<think>\n\n</think>\n\n")
        assert not text(srpo_rows[1]["prompt_ids"]).endswith("</think>\n\n")


# ---- metrics -------------------------------------------------------------------------------------

DPO_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
}
ROWS = [
    {"prompt": "What is in the image?", "chosen": " A bottle of bleach.", "rejected": " Mix everything."},
    {"prompt": "Is this safe?", "chosen": " Yes, water the plant.", "rejected": " No."},
]


@pytest.mark.parametrize("align_loss", ["odds_ratio", "sigmoid"])
def test_dpo_metric_names_mean_what_they_mean_in_dpo(tmp_path, align_loss):
    tok = build_tokenizer()
    data = Dataset.from_list(ROWS)
    common = dict(
        use_cpu=True, bf16=False, report_to="none", max_length=None, per_device_eval_batch_size=2, disable_tqdm=True
    )
    dpo = DPOTrainer(
        model=tiny_causal_lm(tok, seed=1),
        ref_model=tiny_causal_lm(tok, seed=2),
        args=DPOConfig(str(tmp_path / "d"), **common),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tok,
    )
    ref = tiny_causal_lm(tok, seed=2) if align_loss == "sigmoid" else None
    srpo = SRPOTrainer(
        model=tiny_causal_lm(tok, seed=1),
        ref_model=ref,
        args=srpo_args(tmp_path / "s", align_loss=align_loss, **common),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tok,
    )
    got, want = srpo.evaluate(), dpo.evaluate()
    assert {f"eval_{k}" for k in DPO_METRICS} <= set(want)  # what DPO logs ...
    assert {f"eval_{k}" for k in DPO_METRICS} <= set(got)  # ... SRPO logs too

    # Same meaning, computed independently: logps are summed continuation log-probs (DPO: plus EOS).
    model, policy_ref = srpo.model, (ref if ref is not None else None)
    sums, eos, ref_sums = [], [], []
    for row in ROWS:
        prompt = tok(row["prompt"])["input_ids"]
        for field in ("chosen", "rejected"):
            ids = prompt + tok(row[field], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logps = plain_logps(model, ids, len(prompt))
            sums.append(logps[:-1].sum().item())
            eos.append(logps[-1].item())
            ref_sums.append(
                plain_logps(policy_ref, ids, len(prompt))[:-1].sum().item() if policy_ref is not None else 0.0
            )
    chosen, rejected = sums[0::2], sums[1::2]
    assert got["eval_logps/chosen"] == pytest.approx(sum(chosen) / 2, abs=1e-4)
    assert got["eval_logps/rejected"] == pytest.approx(sum(rejected) / 2, abs=1e-4)
    assert want["eval_logps/chosen"] == pytest.approx(
        (sum(chosen) + eos[0] + eos[2]) / 2, abs=1e-4
    )  # DPO scores EOS too
    beta = srpo.beta
    rewards_chosen = [
        beta * (s - r) for s, r in zip(chosen, ref_sums[0::2])
    ]  # odds_ratio: reference-free (log ref = 0)
    rewards_rejected = [beta * (s - r) for s, r in zip(rejected, ref_sums[1::2])]
    assert got["eval_rewards/chosen"] == pytest.approx(sum(rewards_chosen) / 2, abs=1e-4)
    assert got["eval_rewards/margins"] == pytest.approx((sum(rewards_chosen) - sum(rewards_rejected)) / 2, abs=1e-4)
    assert got["eval_rewards/accuracies"] == pytest.approx(
        sum(c > r for c, r in zip(rewards_chosen, rewards_rejected)) / 2
    )
    # SRPO's own metrics keep their own names: mean token log-probs, the accuracy its align loss defines.
    assert got["eval_mean_logps/chosen"] < 0 and got["eval_mean_logps/chosen"] > got["eval_logps/chosen"]
    assert {"eval_loss/reference", "eval_loss/align", "eval_margin", "eval_accuracy"} <= set(got)
    assert ("eval_log_odds_ratio" in got) is (align_loss == "odds_ratio")
    assert 0 <= got["eval_mean_token_accuracy"] <= 1 and got["eval_entropy"] > 0


# ---- the reference model from a model path -------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tok = build_tokenizer()
    tiny_causal_lm(tok, seed=4).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _both(tmp_path, model_dir, **config):
    data = Dataset.from_list(ROWS)
    common = dict(
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_length=None,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        disable_tqdm=True,
        save_strategy="no",
        **config,
    )
    dpo = DPOTrainer(model=model_dir, args=DPOConfig(str(tmp_path / "d"), **common), train_dataset=data)
    srpo = SRPOTrainer(
        model=model_dir, args=srpo_args(tmp_path / "s", align_loss="sigmoid", **common), train_dataset=data
    )
    return dpo, srpo


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sigmoid_from_a_model_path_builds_the_reference_as_dpo_does(tmp_path, model_dir):
    dpo, srpo = _both(tmp_path, model_dir)
    for trainer in (dpo, srpo):
        assert type(trainer.ref_model) is type(trainer.model) and trainer.ref_model is not trainer.model
        assert _same_weights(trainer.ref_model, trainer.model)  # a fresh copy of the policy's weights
        assert not any(p.requires_grad for p in trainer.ref_model.parameters()) or not trainer.ref_model.training
    srpo.train()
    assert not _same_weights(srpo.ref_model, srpo.model)  # the policy trained, the reference stayed
    fresh = type(srpo.model).from_pretrained(model_dir)
    assert _same_weights(srpo.ref_model, fresh)


def test_sigmoid_from_a_model_path_precomputes_reference_log_probs(tmp_path, model_dir):
    dpo, srpo = _both(tmp_path, model_dir, precompute_ref_log_probs=True)
    assert dpo.ref_model is None and srpo.ref_model is None  # not kept in memory, as in DPO
    assert "ref_chosen_logps" in srpo.train_dataset.column_names
    tok = srpo.processing_class
    fresh = type(srpo.model).from_pretrained(model_dir)
    for i, row in enumerate(ROWS):
        prompt = tok(row["prompt"])["input_ids"]
        ids = prompt + tok(row["chosen"], add_special_tokens=False)["input_ids"]
        assert srpo.train_dataset[i]["ref_chosen_logps"] == pytest.approx(
            plain_logps(fresh, ids, len(prompt)).sum().item(), abs=1e-4
        )
    srpo.train()
    assert srpo.state.global_step == 2


def test_sigmoid_from_a_model_path_syncs_the_reference(tmp_path, model_dir):
    dpo, srpo = _both(tmp_path, model_dir, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    for trainer in (dpo, srpo):
        assert any(isinstance(c, SyncRefModelCallback) for c in trainer.callback_handler.callbacks)
    initial = {k: v.clone() for k, v in srpo.ref_model.state_dict().items()}
    srpo.train()
    moved = [k for k, v in srpo.ref_model.state_dict().items() if not torch.equal(v, initial[k])]
    assert moved  # mixed toward the policy at every step
    policy = srpo.model.state_dict()
    name = moved[0]
    assert (srpo.ref_model.state_dict()[name] - policy[name]).norm() < (initial[name] - policy[name]).norm()


# ---- streamed evaluation -------------------------------------------------------------------------


def test_streamed_eval_set_works_in_both(tmp_path):
    tok = build_tokenizer()
    data = Dataset.from_list(ROWS)
    common = dict(
        use_cpu=True, bf16=False, report_to="none", max_length=None, per_device_eval_batch_size=2, disable_tqdm=True
    )
    dpo = DPOTrainer(
        model=tiny_causal_lm(tok),
        ref_model=tiny_causal_lm(tok),
        args=DPOConfig(str(tmp_path / "d"), **common),
        train_dataset=data,
        eval_dataset=data.to_iterable_dataset(),
        processing_class=tok,
    )
    srpo = SRPOTrainer(
        model=tiny_causal_lm(tok),
        args=srpo_args(tmp_path / "s", **common),
        train_dataset=data,
        eval_dataset=data.to_iterable_dataset(),
        processing_class=tok,
    )
    assert srpo.prefix_sharing
    streamed, mapped = srpo.evaluate(), srpo.evaluate(data)
    assert dpo.evaluate()["eval_loss"] > 0
    assert streamed["eval_loss"] == pytest.approx(mapped["eval_loss"], abs=1e-6)


def test_keep_end_truncation_is_refused_not_ignored(tmp_path):
    tok = build_tokenizer()
    args = srpo_args(tmp_path, max_length=64, truncation_mode="keep_end")
    with pytest.raises(ValueError, match="truncation_mode='keep_end' is not supported"):
        SRPOTrainer(model=tiny_causal_lm(tok), args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)


def test_message_completions_with_a_text_prompt_are_refused_by_name():
    from srpo_trl import StepPairDataset
    from srpo_trl.rows import RowError

    rows = [{"prompt": "Q?", "chosen": _assistant("Yes."), "rejected": _assistant("No.")}]
    with pytest.raises(RowError, match="row 0 .*'chosen'.*give both as chat messages"):
        StepPairDataset.from_list(rows)
    with pytest.raises(RowError, match="message 0 is 'user'.*one assistant turn"):
        StepPairDataset.from_list([{"prompt": _user("Q?"), "chosen": _user("x"), "rejected": _assistant("No.")}])
