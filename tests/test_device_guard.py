"""Every tensor SRPO creates is made on the device of the tensors it meets (issue 11, bug 1).

CI has no GPU; `device_guard.tensors_made_elsewhere()` makes the same class of bug fail on CPU (see
its docstring). Each test runs real SRPO code under the guard and checks that it both passes and
computes the same numbers as without the guard."""

import inspect

import pytest
import torch
from device_guard import DeviceMismatch, tensors_made_elsewhere
from helpers import srpo_args
from test_prefix_sharing import question_rows

from srpo_trl import SRPOTrainer, StepPairDataset, packing
from srpo_trl.tiny import (
    build_tokenizer,
    make_image,
    tiny_causal_lm,
    tiny_gemma3,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
)
from srpo_trl.wandb_samples import score_pairs


# The additive_mask that crashed every GPU user on step one (issue 11), compiled as if it still
# lived in srpo_trl/packing.py: the guard only redirects factories called from the package.
_OLD_ADDITIVE_MASK = """
def additive_mask(allowed, dtype):
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
"""


def _old_additive_mask():
    namespace = {"torch": torch}
    exec(compile(_OLD_ADDITIVE_MASK, inspect.getsourcefile(packing), "exec"), namespace)
    return namespace["additive_mask"]


def _vision_rows():
    rows = question_rows()
    for r in rows:
        r["prompt"] = [{"role": "user", "content": r["prompt"]}]
        r["images"] = [make_image(0)] if r["id"] == "q1" else [make_image(3, size=(56, 28))]
    return rows


def _build(kind):
    if kind == "text":
        tok = build_tokenizer()
        return tiny_causal_lm(tok, seed=3), tok, question_rows()
    builders = {"qwen2_5_vl": tiny_qwen2_5_vl, "llava_next": tiny_llava_next, "llava": tiny_llava}
    builders.update(gemma3=tiny_gemma3, qwen3_vl=tiny_qwen3_vl)  # sliding windows + image blocks; DeepStack
    builder = builders[kind]
    model, processor = builder(seed=5)
    return model, processor, _vision_rows()


def _trainer(tmp_path, model, processing_class, rows, **config):
    args = srpo_args(tmp_path, per_device_train_batch_size=len(rows), **config)
    return SRPOTrainer(
        model=model, args=args, train_dataset=StepPairDataset.from_list(rows), processing_class=processing_class
    )


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_guard_fails_on_the_old_additive_mask_and_passes_the_fixed_one(tmp_path, monkeypatch):
    model, tok, rows = _build("text")
    trainer = _trainer(tmp_path, model, tok, rows)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with tensors_made_elsewhere():
        trainer.compute_loss(trainer.model, batch)  # fixed: passes
    monkeypatch.setattr("srpo_trl.packing.additive_mask", _old_additive_mask())  # packed_attention_mask calls it
    with pytest.raises(DeviceMismatch, match="created without the device"):
        with tensors_made_elsewhere():
            trainer.compute_loss(trainer.model, batch)


def test_guard_catches_a_factory_without_device_only_where_it_meets_data():
    allowed = torch.tensor([[[True, False], [True, True]]])
    with tensors_made_elsewhere():
        assert packing.additive_mask(allowed, torch.float32).device == allowed.device
        with pytest.raises(DeviceMismatch):
            _old_additive_mask()(allowed, torch.float32) + torch.ones(1, 1, 2, 2)


@pytest.mark.parametrize("kind", ["text", "qwen2_5_vl", "llava_next", "llava"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_compute_loss_creates_tensors_on_the_data_device(tmp_path, kind, packed):
    model, processing_class, rows = _build(kind)
    trainer = _trainer(tmp_path, model, processing_class, rows, prefix_sharing=packed)
    assert trainer.prefix_sharing == packed
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    expected_loss, expected_grads = _loss_and_grads(trainer, batch)
    with tensors_made_elsewhere():
        loss, grads = _loss_and_grads(trainer, batch)
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        assert torch.allclose(grads[name], expected_grads[name], atol=1e-6), name


def test_tree_attention_path_creates_tensors_on_the_data_device(tmp_path, monkeypatch):
    """The block mask from subtree ends and the srpo_tree attention function, under the guard."""
    monkeypatch.setenv("SRPO_TRL_TREE_ATTENTION", "flex")
    model, tok, rows = _build("text")
    trainer = _trainer(tmp_path, model, tok, rows)
    assert trainer.data_collator.dense_mask is False
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    expected, _ = _loss_and_grads(trainer, batch)
    # With gradients on CPU the attention evaluates the BlockMask's mask function densely (no CPU
    # FlexAttention backward); the FlexAttention kernel itself compiles internally, which torch
    # refuses under a Python dispatch mode, so it is not run under the guard.
    with tensors_made_elsewhere():
        loss, _ = _loss_and_grads(trainer, batch)
    assert loss == pytest.approx(expected, abs=1e-6)


def test_training_step_with_reference_model_and_precompute(tmp_path):
    """A training step of Step-DPO with a reference model (its packed no-grad forward), and the
    reference log-prob precomputation, all under the guard."""
    tok = build_tokenizer()
    rows = question_rows()
    with tensors_made_elsewhere():
        trainer = SRPOTrainer(
            model=tiny_causal_lm(tok, seed=1),
            ref_model=tiny_causal_lm(tok, seed=2),
            args=srpo_args(tmp_path / "a", per_device_train_batch_size=5, max_steps=1, align_loss="sigmoid"),
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=tok,
        )
        trainer.train()
        precomputed = SRPOTrainer(
            model=tiny_causal_lm(tok, seed=1),
            ref_model=tiny_causal_lm(tok, seed=2),
            args=srpo_args(
                tmp_path / "b",
                per_device_train_batch_size=5,
                max_steps=1,
                align_loss="sigmoid",
                precompute_ref_log_probs=True,
                ref_logps_cache_dir="",
            ),
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=tok,
        )
        precomputed.train()
    assert trainer.state.global_step == 1 and precomputed.state.global_step == 1
    assert "ref_chosen_logps" in precomputed.train_dataset.column_names


def test_evaluation_scoring_creates_tensors_on_the_data_device():
    model, processor, rows = _build("qwen2_5_vl")
    expected = score_pairs(model, processor, rows[:2])
    with tensors_made_elsewhere():
        got = score_pairs(model, processor, rows[:2])
    assert [r["logp_chosen"] for r in got] == pytest.approx([r["logp_chosen"] for r in expected], abs=1e-6)
