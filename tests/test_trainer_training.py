"""SRPOTrainer trains: overfitting, the DPO swap-in, PEFT, the sigmoid mode's reference, eval,
and checkpoint resume."""

import copy

import pytest
import torch
from datasets import Dataset
from helpers import ROWS, hand_ids, plain_logps, srpo_args
from peft import LoraConfig
from transformers import TrainerCallback

from srpo_trl import SRPOConfig, SRPOTrainer, StepPairDataset
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def pair_means(model, tok, rows):
    """(chosen mean log-prob, rejected mean log-prob, reference NLL) per row, from plain forwards."""
    out = []
    for row in rows:
        (c_ids, c0), (r_ids, r0), (f_ids, f0) = hand_ids(tok, row)
        out.append(
            (
                plain_logps(model, c_ids, c0).mean().item(),
                plain_logps(model, r_ids, r0).mean().item(),
                -plain_logps(model, f_ids, f0).mean().item(),
            )
        )
    return out


def test_overfit_one_batch_prefers_every_chosen_and_changes_every_parameter(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=5)
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = pair_means(model, tok, ROWS)
    args = srpo_args(tmp_path, per_device_train_batch_size=3, max_steps=40, learning_rate=5e-3, srpo_lambda=1.0)
    trainer = SRPOTrainer(model=model, args=args, train_dataset=StepPairDataset.from_list(ROWS), processing_class=tok)
    trainer.train()

    after = pair_means(model, tok, ROWS)
    for (c, d, _), (_, _, nll_before), (_, _, nll_after) in zip(after, before, after):
        assert c > d, "the favorable continuation must be preferred after overfitting"
        assert nll_after < nll_before
    for name, param in model.named_parameters():
        assert not torch.equal(param, before_params[name]), f"{name} did not change"
    logged = [h for h in trainer.state.log_history if "loss/reference" in h]
    assert logged[-1]["accuracy"] == 1.0 and logged[-1]["margin"] > logged[0]["margin"]


def _dpo_style_script(tmp_path, tok, dataset):
    """TRL's documented DPO usage with the two class names replaced."""
    model = tiny_causal_lm(tok, seed=6)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    training_args = SRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
    )
    trainer = SRPOTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tok)
    trainer.train()
    changed = sum(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    return trainer, changed, sum(1 for _ in model.parameters())


@pytest.mark.parametrize("form", ["standard", "conversational", "implicit_prompt"])
def test_swap_in_for_dpo_trainer(tmp_path, tok, form):
    if form == "standard":
        data = {"prompt": ["The sky is", "Water is"], "chosen": [" blue.", " wet."], "rejected": [" green.", " dry."]}
    elif form == "conversational":
        data = {
            "prompt": [
                [{"role": "user", "content": "What color is the sky?"}],
                [{"role": "user", "content": "Is water wet?"}],
            ],
            "chosen": [[{"role": "assistant", "content": "It is blue."}], [{"role": "assistant", "content": "Yes."}]],
            "rejected": [
                [{"role": "assistant", "content": "It is green."}],
                [{"role": "assistant", "content": "No."}],
            ],
        }
    else:
        user = [{"role": "user", "content": "What color is the sky?"}]
        data = {
            "chosen": [user + [{"role": "assistant", "content": "It is blue."}]] * 2,
            "rejected": [user + [{"role": "assistant", "content": "It is green."}]] * 2,
        }
    trainer, changed, total = _dpo_style_script(tmp_path, tok, Dataset.from_dict(data))
    assert changed == total
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("loss/reference" in h and "loss/align" in h for h in logs)
    # SRPO objective, not DPO's: the total is the reference NLL plus 0.3 * the alignment term.
    first = logs[0]
    assert first["loss"] == pytest.approx(first["loss/reference"] + 0.3 * first["loss/align"], rel=1e-3)


def test_dpo_config_is_accepted_and_converted(tmp_path, tok):
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1)
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok), args=args, train_dataset=StepPairDataset.from_list(ROWS), processing_class=tok
    )
    assert isinstance(trainer.args, SRPOConfig) and trainer.args.align_loss == "odds_ratio"


def test_peft_lora_trains_only_the_adapter(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=7)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = srpo_args(tmp_path, per_device_train_batch_size=3, max_steps=5, learning_rate=1e-2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SRPOTrainer(
        model=model, args=args, train_dataset=StepPairDataset.from_list(ROWS), processing_class=tok, peft_config=lora
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(param, lora_before[name]), f"{name} did not train"
        elif "lora_" not in name:
            original = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base[original]), f"{name} (frozen base) changed"


def test_sigmoid_with_peft_uses_the_base_model_as_reference(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=8)
    plain_copy = copy.deepcopy(model)
    args = srpo_args(tmp_path, per_device_train_batch_size=3, max_steps=3, learning_rate=1e-2, align_loss="sigmoid")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SRPOTrainer(
        model=model, args=args, train_dataset=StepPairDataset.from_list(ROWS), processing_class=tok, peft_config=lora
    )
    assert trainer.ref_model is None
    trainer.train()  # the adapter moves away from the base model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    for i, row in enumerate(ROWS):
        (c_ids, c0), (r_ids, r0), _ = hand_ids(tok, row)
        assert ref_chosen[i].item() == pytest.approx(plain_logps(plain_copy, c_ids, c0).sum().item(), abs=1e-4)
        assert ref_rejected[i].item() == pytest.approx(plain_logps(plain_copy, r_ids, r0).sum().item(), abs=1e-4)


def test_sigmoid_needs_a_reference_it_can_find(tmp_path, tok):
    args = srpo_args(tmp_path, align_loss="sigmoid")
    with pytest.raises(ValueError, match="needs a reference model"):
        SRPOTrainer(
            model=tiny_causal_lm(tok), args=args, train_dataset=StepPairDataset.from_list(ROWS), processing_class=tok
        )


def test_precomputed_reference_log_probs_equal_the_live_ones(tmp_path, tok):
    model, ref_model = tiny_causal_lm(tok, seed=9), tiny_causal_lm(tok, seed=10)
    common = dict(per_device_train_batch_size=3, align_loss="sigmoid", max_steps=1)
    live = SRPOTrainer(
        model=model,
        ref_model=ref_model,
        args=srpo_args(tmp_path / "live", **common),
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    pre = SRPOTrainer(
        model=model,
        ref_model=ref_model,
        args=srpo_args(tmp_path / "pre", precompute_ref_log_probs=True, **common),
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(pre.train_dataset.column_names)
    for i, row in enumerate(ROWS):
        (c_ids, c0), _, _ = hand_ids(tok, row)
        assert pre.train_dataset[i]["ref_chosen_logps"] == pytest.approx(
            plain_logps(ref_model, c_ids, c0).sum().item(), abs=1e-4
        )
    batch_live = live.data_collator([live.train_dataset[i] for i in range(3)])
    batch_pre = pre.data_collator([pre.train_dataset[i] for i in range(3)])
    assert "ref_chosen_logps" in batch_pre and "ref_chosen_logps" not in batch_live
    with torch.no_grad():
        assert pre.compute_loss(model, batch_pre).item() == pytest.approx(
            live.compute_loss(model, batch_live).item(), abs=1e-5
        )


def test_eval_loop_logs_srpo_metrics(tmp_path, tok):
    args = srpo_args(
        tmp_path,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=2,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=2,
    )
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok),
        args=args,
        train_dataset=StepPairDataset.from_list(ROWS),
        eval_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    trainer.train()
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_loss/reference", "eval_loss/align", "eval_accuracy", "eval_margin"):
        assert key in metrics
    assert metrics["eval_loss"] == pytest.approx(
        metrics["eval_loss/reference"] + 0.3 * metrics["eval_loss/align"], rel=0.05
    )


class _StopAt(TrainerCallback):
    """Simulates a run killed right after a checkpoint: training stops at `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_from_checkpoint_continues_the_same_trajectory(tmp_path, tok):
    rows = ROWS * 4  # 12 rows, 6 steps of 2
    common = dict(
        per_device_train_batch_size=2, max_steps=6, learning_rate=3e-3, seed=3, save_strategy="steps", save_steps=3
    )

    def run(out, seed, callbacks=None, resume=None):
        trainer = SRPOTrainer(
            model=tiny_causal_lm(tok, seed=seed),
            args=srpo_args(out, **common),
            callbacks=callbacks,
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=tok,
        )
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    full = run(tmp_path / "full", seed=11)
    interrupted = run(tmp_path / "cut", seed=11, callbacks=[_StopAt(3)])
    assert max(interrupted) == 3 and (tmp_path / "cut" / "checkpoint-3").is_dir()
    # A fresh process would start from other weights: the checkpoint must restore everything.
    resumed = run(tmp_path / "cut", seed=99, resume=str(tmp_path / "cut" / "checkpoint-3"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come back from the checkpoint's history
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([full[s] for s in (4, 5, 6)], abs=1e-6)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tok):
    """Two micro-batches of one row accumulate to the same update as one batch of two rows."""
    rows = ROWS[:2]
    finals = []
    for bs, ga in ((2, 1), (1, 2)):
        model = tiny_causal_lm(tok, seed=12)
        args = srpo_args(
            tmp_path / f"{bs}-{ga}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            learning_rate=1e-2,
            group_by_question=False,
            prefix_sharing=False,
            optim="sgd",  # Adam's first step is lr * sign(grad): a near-zero gradient's rounding flips it
        )
        trainer = SRPOTrainer(
            model=model, args=args, train_dataset=StepPairDataset.from_list(rows), processing_class=tok
        )
        trainer.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in finals[0]:
        assert torch.allclose(finals[0][name], finals[1][name], atol=1e-6), name


def test_checkpoint_has_an_srpo_model_card(tmp_path, tok):
    args = srpo_args(tmp_path, per_device_train_batch_size=3, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok), args=args, train_dataset=StepPairDataset.from_list(ROWS), processing_class=tok
    )
    trainer.train()
    card = (tmp_path / "README.md").read_text()
    assert "SRPO" in card and "2509.12060" in card and "srpo" in card


def test_sigmoid_mode_logs_dpo_rewards(tmp_path, tok):
    args = srpo_args(tmp_path, per_device_train_batch_size=3, max_steps=2, align_loss="sigmoid")
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok, seed=1),
        ref_model=tiny_causal_lm(tok, seed=2),
        args=args,
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "loss/reference",
        "loss/align",
    ):
        assert key in log
    assert log["rewards/margins"] == pytest.approx(log["rewards/chosen"] - log["rewards/rejected"], abs=1e-4)


def test_conversational_continuation_continues_the_assistant_turn(tmp_path, tok):
    row = {
        "prompt": [{"role": "user", "content": "Is this safe?"}],
        "prefix": ["It is a plant."],
        "chosen": "It is safe to water.",
        "rejected": "Eat it.",
        "reference": ["It is a plant.", "Answer: water it."],
    }
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok),
        args=srpo_args(tmp_path, prefix_sharing=False),
        train_dataset=StepPairDataset.from_list([row]),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    opened = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    chosen_text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    reference_text = tok.decode(batch["input_ids"][2][batch["attention_mask"][2].bool()])
    assert chosen_text == opened + "It is a plant.\nIt is safe to water."  # no new turn, not closed
    assert reference_text == opened + "It is a plant.\nAnswer: water it.<|im_end|>\n"  # the reference closes the turn


def test_odds_ratio_drops_a_given_reference_model(tmp_path, tok, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        trainer = SRPOTrainer(
            model=tiny_causal_lm(tok),
            ref_model=tiny_causal_lm(tok, seed=1),
            args=srpo_args(tmp_path),
            train_dataset=StepPairDataset.from_list(ROWS),
            processing_class=tok,
        )
    assert trainer.ref_model is None and "reference-free" in caplog.text
