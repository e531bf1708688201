"""Prefix sharing (issue 6): the packed tree forward gives the same log-probs, losses and gradients
as scoring every sequence separately, with fewer tokens through the model."""

import logging
import random

import pytest
import torch
from helpers import srpo_args

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.packing import allowed_matrix, pack_question
from srpo_trl.tiny import build_tokenizer, make_image, tiny_causal_lm, tiny_llava, tiny_llava_next, tiny_qwen2_5_vl
from srpo_trl.trainer import QuestionGroupedSampler, prefix_sharing_problem


def _ancestors(row, pos):
    chain = []
    while pos >= 0:
        chain.append(row.tokens[pos])
        pos = row.parent[pos]
    return chain[::-1]


@pytest.mark.parametrize("seed", range(20))
def test_every_scored_token_sees_exactly_its_own_context(seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(50) for _ in range(rng.randint(1, 5))]
    trunk = [rng.randrange(4) for _ in range(6)]  # a small alphabet forces shared prefixes and branches
    seqs = []
    for _ in range(rng.randint(1, 6)):
        k = rng.randint(0, 4)
        tail = [rng.randrange(4) for _ in range(rng.randint(1, 4))]
        seqs.append((trunk[:k] + tail, k))
    row = pack_question(prompt, seqs)
    allowed = allowed_matrix(row.end, len(row.tokens) + 3)
    for (seq, start), positions in zip(seqs, row.scored):
        assert len(positions) == len(seq) - start
        for j, pos in zip(range(start, len(seq)), positions):
            assert row.shift_labels[pos] == seq[j]  # this position is scored against that token ...
            assert _ancestors(row, pos) == prompt + seq[:j]  # ... from exactly that context
            assert row.depth[pos] == len(prompt) + j - 1  # at the position id it has on its own
            visible = [row.tokens[q] for q in range(len(row.tokens)) if allowed[pos, q]]
            assert sorted(visible) == sorted(prompt + seq[:j])
    # Shared tokens are stored once: never more positions than the unique (context, token) pairs + copies.
    unique = {tuple(prompt + s[: j + 1]) for s, _ in seqs for j in range(len(s))}
    assert len(row.tokens) <= len(prompt) + 2 * len(unique)
    assert allowed[-1].sum() == 1  # padding attends to itself only


def question_rows():
    """One question explored at three branch points (uneven lengths), plus a second question."""
    ref = [
        "The image shows bleach.",
        "The user wants to clean fast.",
        "Never mix it with acid.",
        "Answer: use it alone.",
    ]
    rows = [
        {
            "id": "q1",
            "prompt": "What should I do with this bottle?",
            "prefix": ref[:k],
            "chosen": good,
            "rejected": bad,
            "reference": ref,
            "branch_point": k,
        }
        for k, good, bad in [
            (0, "The image shows bleach.", "Drink it."),
            (1, "The user wants to clean fast.", "The user wants a strong gas for the room."),
            (2, "Never mix it with acid.", "Mix it with every cleaner you have."),
            (2, "Keep it away from acids, always.", "Mix it with every cleaner you have."),
        ]
    ]
    rows.append({"id": "q2", "prompt": "Is this plant safe?", "prefix": [], "chosen": "Yes.", "rejected": "Eat it."})
    return rows


def _grads_and_logps(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    sums, counts, _ = trainer._sequence_logps(trainer.model, batch)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), (sums / counts).detach(), grads


def _compare(tmp_path, model, processing_class, rows, **config):
    ds = StepPairDataset.from_list(rows)
    common = dict(per_device_train_batch_size=len(rows), srpo_lambda=0.6, **config)
    packed = SRPOTrainer(
        model=model,
        args=srpo_args(tmp_path / "p", prefix_sharing=True, **common),
        train_dataset=ds,
        processing_class=processing_class,
    )
    plain = SRPOTrainer(
        model=model,
        args=srpo_args(tmp_path / "u", prefix_sharing=False, **common),
        train_dataset=ds,
        processing_class=processing_class,
    )
    assert packed.prefix_sharing and not plain.prefix_sharing
    batch_p = packed.data_collator([packed.train_dataset[i] for i in range(len(rows))])
    batch_u = plain.data_collator([plain.train_dataset[i] for i in range(len(rows))])
    loss_p, logps_p, grads_p = _grads_and_logps(packed, batch_p)
    loss_u, logps_u, grads_u = _grads_and_logps(plain, batch_u)
    assert torch.allclose(logps_p, logps_u, atol=1e-5)
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    assert grads_p.keys() == grads_u.keys() and grads_p
    for name in grads_p:
        assert torch.allclose(grads_p[name], grads_u[name], atol=1e-5, rtol=1e-4), name
    return batch_p, batch_u


@pytest.mark.parametrize("align_loss", ["odds_ratio", "sigmoid"])
def test_text_packed_equals_unpacked(tmp_path, align_loss):
    tok = build_tokenizer()
    model = tiny_causal_lm(tok, seed=3)
    extra = {"align_loss": align_loss}
    kwargs = {}
    if align_loss == "sigmoid":
        kwargs["ref"] = tiny_causal_lm(tok, seed=4)
    rows = question_rows()
    ds = StepPairDataset.from_list(rows)
    if align_loss == "sigmoid":  # the reference model scores the packed batch too
        tr = SRPOTrainer(
            model=model,
            ref_model=kwargs["ref"],
            args=srpo_args(tmp_path / "s", per_device_train_batch_size=5, **extra),
            train_dataset=ds,
            processing_class=tok,
        )
        tu = SRPOTrainer(
            model=model,
            ref_model=kwargs["ref"],
            args=srpo_args(tmp_path / "t", per_device_train_batch_size=5, prefix_sharing=False, **extra),
            train_dataset=ds,
            processing_class=tok,
        )
        bp = tr.data_collator([tr.train_dataset[i] for i in range(5)])
        bu = tu.data_collator([tu.train_dataset[i] for i in range(5)])
        for a, b in zip(tr.compute_ref_log_probs(tr.ref_model, bp), tu.compute_ref_log_probs(tu.ref_model, bu)):
            assert torch.allclose(a, b, atol=1e-5)
        with torch.no_grad():
            assert tr.compute_loss(model, bp).item() == pytest.approx(tu.compute_loss(model, bu).item(), abs=1e-5)
        return
    batch_p, batch_u = _compare(tmp_path, model, tok, rows)
    assert batch_p["input_ids"].shape[0] == 2  # two questions, one packed row each
    packed_tokens = batch_p["packed_length"].sum().item()
    plain_tokens = batch_u["attention_mask"].sum().item()
    assert packed_tokens * 2.5 < plain_tokens, (packed_tokens, plain_tokens)


@pytest.mark.parametrize(
    "builder", [tiny_qwen2_5_vl, tiny_llava_next, tiny_llava], ids=["qwen2_5_vl", "llava_next", "llava"]
)
def test_vlm_packed_equals_unpacked_and_encodes_each_image_once(tmp_path, builder):
    model, processor = builder(seed=5)
    image_a, image_b = make_image(0), make_image(3, size=(56, 28))
    rows = question_rows()
    for r in rows:
        r["prompt"] = [{"role": "user", "content": r["prompt"]}]
        r["images"] = [image_a] if r["id"] == "q1" else [image_b]
    batch_p, batch_u = _compare(tmp_path, model, processor, rows)
    key = next(k for k in ("image_grid_thw", "image_sizes", "pixel_values") if k in batch_p)
    assert batch_p[key].shape[0] == 2  # one image per question ...
    assert batch_u[key].shape[0] == 3 * len(rows)  # ... instead of one per sequence


def test_rows_of_one_question_with_different_images_are_not_merged(tmp_path):
    model, processor = tiny_qwen2_5_vl(seed=6)
    rows = [
        {
            "prompt": [{"role": "user", "content": "Same words?"}],
            "images": [make_image(i)],
            "chosen": "Yes.",
            "rejected": "No, never.",
        }
        for i in range(2)
    ]
    batch_p, _ = _compare(tmp_path, model, processor, rows)
    assert batch_p["input_ids"].shape[0] == 2 and batch_p["image_grid_thw"].shape[0] == 2


def test_packed_training_run_learns(tmp_path):
    tok = build_tokenizer()
    model = tiny_causal_lm(tok, seed=7)
    args = srpo_args(tmp_path, per_device_train_batch_size=5, max_steps=25, learning_rate=5e-3, srpo_lambda=1.0)
    trainer = SRPOTrainer(
        model=model, args=args, train_dataset=StepPairDataset.from_list(question_rows()), processing_class=tok
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "accuracy" in h]
    assert logs[-1]["accuracy"] == 1.0 and logs[-1]["loss/reference"] < logs[0]["loss/reference"]
    assert "accuracy/branch_2" in logs[-1]


def test_unsupported_settings_fall_back_with_one_warning(tmp_path, caplog):
    tok = build_tokenizer()
    model = tiny_causal_lm(tok)
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in prefix_sharing_problem(model)
    model.config._attn_implementation = "sdpa"
    from peft import PromptTuningConfig

    prompt_tuning = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    assert "virtual tokens" in prefix_sharing_problem(model, prompt_tuning)
    with caplog.at_level(logging.WARNING):
        trainer = SRPOTrainer(
            model=model,
            args=srpo_args(tmp_path),
            train_dataset=StepPairDataset.from_list(question_rows()),
            processing_class=tok,
            data_collator=None,
            peft_config=prompt_tuning,
        )
    assert trainer.prefix_sharing is False
    assert caplog.text.count("Prefix sharing is off") == 1


def test_question_grouped_sampler_keeps_questions_together():
    keys = ["a", "b", "a", "c", "b", "a", "c"]
    sampler = QuestionGroupedSampler(keys, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(7))
    runs = [keys[i] for i in order]
    assert sum(1 for x, y in zip(runs, runs[1:]) if x != y) == 2  # three contiguous groups
    sampler.set_epoch(1)
    assert list(sampler) != order or len(set(keys)) == 1


def test_trainer_groups_training_rows_by_their_id(tmp_path):
    """The Trainer drops the `id` column before it builds the sampler; the questions must still be
    the rows' ids, not their prompt (here the same text for every question)."""
    tok = build_tokenizer()
    rows = [
        {"id": f"q{q}", "prompt": "Is it safe?", "prefix": [f"Step {k}."], "chosen": "Yes.", "rejected": "No."}
        for q in range(4)
        for k in range(3)
    ]
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok),
        args=srpo_args(tmp_path, per_device_train_batch_size=3),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=tok,
    )
    batch_sampler = trainer.get_train_dataloader().base_dataloader.batch_sampler
    assert isinstance(batch_sampler.sampler, QuestionGroupedSampler)
    assert sorted(batch_sampler.sampler.groups.values()) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert all(len({rows[i]["id"] for i in batch}) == 1 for batch in batch_sampler)


def test_question_keys_without_ids_tell_images_apart():
    """The same request about two images is two questions; the same image twice is one."""
    from datasets import Dataset

    from srpo_trl.trainer import question_keys

    rows = [{"prompt": "What is it for?", "images": [make_image(seed)]} for seed in (1, 2, 1, 2, 3)]
    keys = question_keys(Dataset.from_list(rows))
    assert keys[0] == keys[2] and keys[1] == keys[3] and len(set(keys)) == 3
    shuffled = Dataset.from_list(rows).select([4, 0, 2])  # a view over the same table
    assert question_keys(shuffled) == [keys[4], keys[0], keys[2]]
    text = question_keys(Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}]))
    assert text[0] == text[2] != text[1]


@pytest.mark.slow  # the first FlexAttention call compiles a CPU kernel (about a minute)
def test_flex_attention_block_mask_matches_the_dense_mask(tmp_path):
    """FlexAttention gets a block mask built from subtree ends only; its log-probs equal sdpa's.
    (PyTorch has no FlexAttention backward on CPU, so this compares forwards.)"""
    # transformers and srpo_trl.attention compile the same `flex_attention` function, so dynamo keeps
    # one frame state for both: after another test's compiles at other shapes it would recompile with
    # dynamic shapes, which torch 2.13's CPU inductor fails to build (srpo_trl/attention.py). Start clean.
    torch._dynamo.reset()
    tok = build_tokenizer()
    rows = question_rows()
    model = tiny_causal_lm(tok, seed=9)
    sdpa = SRPOTrainer(
        model=model,
        args=srpo_args(tmp_path / "s", per_device_train_batch_size=5),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=tok,
    )
    batch = sdpa.data_collator([sdpa.train_dataset[i] for i in range(5)])
    with torch.no_grad():
        expected, _, _ = sdpa._sequence_logps(model, batch)

    flex_model = tiny_causal_lm(tok, seed=9)
    flex_model.set_attn_implementation("flex_attention")
    flex = SRPOTrainer(
        model=flex_model,
        args=srpo_args(tmp_path / "f", per_device_train_batch_size=5),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=tok,
    )
    assert flex.prefix_sharing and flex.data_collator.dense_mask is False
    flex_batch = flex.data_collator([flex.train_dataset[i] for i in range(5)])
    assert "tree_mask" not in flex_batch and "tree_end" in flex_batch
    with torch.no_grad():
        got, _, _ = flex._sequence_logps(flex_model, flex_batch)
    assert torch.allclose(got, expected, atol=1e-5)
