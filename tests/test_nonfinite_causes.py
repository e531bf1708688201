"""A non-finite loss or gradient is reported with its likely cause (srpo_trl/diagnosis.py), each cause
provoked here in a real training step: weights already non-finite, float16 overflow in the forward
and in the backward pass, a term whose gradient is too large for the dtype (named with the setting
that scales it), the reference model, a loss term or weighted sum overflowing from finite log-probs;
and, calling the guard directly, another process's rows and a float16 GradScaler overflow (left to
the scaler). Too large updates (learning_rate 1000) is
tests/test_guards.py::test_learning_rate_1000_stops_naming_the_step_and_keeps_finite_weights."""

from __future__ import annotations

import pytest
import torch
from helpers import ROWS, make_trainer, srpo_args

from srpo_trl import SRPOTrainer, StepPairDataset, diagnosis, guards
from srpo_trl.guards import TrainingDiverged
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _diverges(trainer) -> str:
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    return str(info.value)


def _wide_mlp(tok, scale: float):
    """A model whose first MLP's hidden activations reach ~1e-2 * scale^2: past float16's 65504 at scale
    3000, while its weights (~60) and everything float32 holds stay finite."""
    model = tiny_causal_lm(tok, seed=0)
    with torch.no_grad():
        for w in (model.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.up_proj.weight):
            w.mul_(scale)
    return model


def test_weights_already_nonfinite_are_named_not_the_learning_rate(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    message = _diverges(make_trainer(tmp_path, model, tok, ROWS, max_steps=2))
    assert "at step 1" in message
    assert "Likely cause: the weights already held NaN or inf before this step" in message
    assert "model.layers.1.mlp.up_proj.weight" in message and "start from finite weights" in message


def test_float16_overflow_in_the_forward_pass_names_the_rows(tmp_path, tok):
    model = _wide_mlp(tok, 3000.0).half()
    trainer = make_trainer(tmp_path, model, tok, ROWS, max_steps=1)  # packed: rows found through score_seq
    message = _diverges(trainer)
    assert "the loss is [nan]" in message
    assert "Likely cause: float16 overflow in the forward pass" in message
    # each row named by the start of its chosen continuation (the batch order is the sampler's)
    assert all(f"(chosen '{row['chosen'][:12]}" in message for row in ROWS)
    assert "train in bf16 (bf16=True, on an accelerator that has it) or float32 rather than float16" in message


def _amplify_backward(model, factor: float):
    """A layer whose backward pass multiplies the gradient by `factor` (as a norm over near-zero activations
    can), leaving the forward pass and the gradient at the logits as they are."""
    model.model.layers[0].register_full_backward_hook(
        lambda m, grad_in, grad_out: tuple(None if g is None else g * factor for g in grad_in)
    )
    return model


def test_float16_overflow_in_the_backward_pass_with_a_finite_loss(tmp_path, tok):
    model = _amplify_backward(tiny_causal_lm(tok, seed=0).half(), 1e6)
    message = _diverges(make_trainer(tmp_path, model, tok, ROWS, max_steps=1))
    assert "the gradient norm is" in message and "the loss is" not in message
    assert "Likely cause: float16 overflow in the backward pass: the loss (6.4" in message
    assert "rather than float16 weights" in message
    # the same in float32 trains: float16's range is the cause
    model = _amplify_backward(tiny_causal_lm(tok, seed=0), 1e6)
    trainer = make_trainer(tmp_path / "fp32", model, tok, ROWS, max_steps=1)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["grad_norm"]))


def test_a_term_whose_gradient_is_too_large_for_float16_is_named_with_its_weight(tmp_path, tok):
    """nll_weight 1e5 sends ~1e4 per token into the logits: past what float16 can carry through the network."""
    model = tiny_causal_lm(tok, seed=0).half()
    message = _diverges(make_trainer(tmp_path, model, tok, ROWS, max_steps=1, nll_weight=1e5))
    assert "the gradient norm is" in message and "the loss is" not in message
    assert "Likely cause: the reference NLL term's gradient is too large for float16" in message
    assert "is finite); it is scaled by nll_weight (now 100000)" in message and "lower nll_weight" in message


def _sigmoid_trainer(tmp_path, tok, ref_model, **config):
    args = srpo_args(tmp_path, per_device_train_batch_size=3, max_steps=1, align_loss="sigmoid", **config)
    return SRPOTrainer(
        model=tiny_causal_lm(tok, seed=3),
        ref_model=ref_model,
        args=args,
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )


def test_a_term_whose_gradient_is_too_large_for_float32_is_named_with_its_settings(tmp_path, tok):
    """beta 1e38: the sigmoid term stays finite (small margins) but its gradient is ~1e37 per token."""
    message = _diverges(_sigmoid_trainer(tmp_path, tok, tiny_causal_lm(tok, seed=4), beta=1e38))
    assert "the gradient norm is nan" in message
    assert "Likely cause: the alignment term's gradient is too large for float32" in message
    assert "scaled by beta (now 1e+38) and srpo_lambda (now 0.3)" in message and "lower beta" in message


def test_a_broken_reference_model_is_named(tmp_path, tok):
    ref_model = _wide_mlp(tok, 3000.0).half()  # overflows in its forward pass; the policy does not
    message = _diverges(_sigmoid_trainer(tmp_path, tok, ref_model))
    assert "Likely cause: the reference model's forward pass gave non-finite log-probs" in message
    assert "under the reference model nan" in message and "the policy's are finite" in message


def test_a_sigmoid_term_that_overflows_from_finite_logprobs_is_named(tmp_path, tok):
    """A peaked reference model gives margins of tens of nats; times beta 1e38 that is past float32."""
    ref_model = tiny_causal_lm(tok, seed=4)
    with torch.no_grad():
        ref_model.lm_head.weight.mul_(50)
    message = _diverges(_sigmoid_trainer(tmp_path, tok, ref_model, beta=1e38, prefix_sharing=False))
    assert "the loss is [inf]" in message
    assert "Likely cause: the alignment term (sigmoid) is inf" in message
    assert "(chosen 'Yes.')" in message  # unpacked: rows found through loss_mask
    assert "although the log-probs it is computed from are finite: beta (now 1e+38)" in message
    assert "What to do: lower beta" in message


def test_a_weight_that_overflows_the_loss_is_named(tmp_path, tok):
    model = tiny_causal_lm(tok, seed=0)
    message = _diverges(make_trainer(tmp_path, model, tok, ROWS, max_steps=1, srpo_lambda=1e39))
    assert "the loss is [inf]" in message
    assert "Likely cause: the weighted sum nll_weight * L_ref + srpo_lambda * L_align is inf" in message
    assert "lower srpo_lambda (now 1e+39)" in message


def _remembered(tmp_path, tok):
    """A trainer with its guard installed and one training micro-batch remembered (finite)."""
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok, seed=0), tok, ROWS, max_steps=1)
    guard = guards.install(trainer)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trainer.compute_loss(trainer.model, batch)
    return trainer, guard


def test_a_nonfinite_loss_from_another_process_says_so(tmp_path, tok):
    trainer, guard = _remembered(tmp_path, tok)
    assert len(guard._micro_batches) == 1
    why = diagnosis.explain(trainer, guard._micro_batches, loss_finite=False)
    assert why.cause.startswith("the loss was non-finite on another process (every row of this one is finite)")


def test_a_float16_grad_scaler_overflow_is_left_to_the_scaler(tmp_path, tok):
    """fp16 mixed precision (CUDA): the GradScaler skips a step whose scaled gradient overflowed and halves its
    scale; that is how it finds its scale, not a divergence. Once the scale is down to 1 the guard stops."""
    trainer, guard = _remembered(tmp_path, tok)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert guard.check_grad_norm(trainer, torch.tensor(float("inf"))).isinf()  # returned, not raised
    trainer.args.fp16 = True  # what the scaler implies (CPU accelerate refuses fp16, so it is set here)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[0]]))
    with pytest.raises(TrainingDiverged) as info:
        guard.check_grad_norm(trainer, torch.tensor(float("inf")))
    assert "the gradient norm is inf" in str(info.value)
    assert "float16 overflow in the backward pass" in str(info.value)
    assert "the GradScaler's scale is down to 1" in str(info.value)
