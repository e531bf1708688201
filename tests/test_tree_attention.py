"""Tree attention ("srpo_tree" through transformers' AttentionInterface): the block mask built from
subtree ends is the tree mask, and the packed forward through it gives the unpacked log-probs,
losses and gradients for text, Qwen2.5-VL and LLaVA-NeXT (issue 11).

On CPU PyTorch has no FlexAttention backward: with gradients the attention function evaluates the
BlockMask's own mask function densely; without, it runs the FlexAttention kernel (uncompiled). The
CUDA kernel with gradients is checked by tests/gpu/."""

import logging
import random

import numpy as np
import pytest
import torch
from helpers import srpo_args
from test_device_guard import _build
from test_prefix_sharing import question_rows

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.attention import TREE_ATTENTION, choose_tree_attention, compile_count, flex_attention_fn
from srpo_trl.packing import (
    allowed_matrix,
    bucket_length,
    image_groups,
    layer_allowed,
    pack_question,
    tree_block_mask,
    tree_block_masks,
)
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


def _random_rows(rng, count, trunk_len=150):
    rows = []
    for _ in range(count):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 200))]
        trunk = [rng.randrange(4) for _ in range(trunk_len)]
        seqs = []
        for _ in range(rng.randint(1, 12)):
            k = rng.randint(0, trunk_len)
            seqs.append((trunk[:k] + [rng.randrange(4) for _ in range(rng.randint(1, 60))], k))
        rows.append(pack_question(prompt, seqs))
    return rows


def _ends(rows, length):
    return torch.tensor([r.end + [-1] * (length - len(r.end)) for r in rows])


def _depths(rows, length):
    return torch.tensor([r.depth + [0] * (length - len(r.depth)) for r in rows])


def _image_groups(rng, rows, length):
    """Image blocks inside each row's prompt (a chain at the start of the layout), as token_type_ids."""
    types = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        for _ in range(rng.randint(0, 2)):
            start = rng.randrange(r.prompt_length)
            types[i, start : min(start + rng.randint(1, 150), r.prompt_length)] = 1
    return image_groups(types)


# (sliding window, image blocks): the tree alone, a window shorter than a block (and than the rows),
# a window with image blocks (Gemma3's sliding layers), image blocks alone (its full layers)
MASK_KINDS = [(None, False), (100, False), (37, True), (None, True)]


@pytest.mark.parametrize("window,images", MASK_KINDS, ids=["tree", "window", "window_images", "images"])
@pytest.mark.parametrize("seed", range(3))
def test_block_mask_tiles_agree_with_the_dense_tree_mask(seed, window, images):
    rng = random.Random(seed)
    rows = _random_rows(rng, 3)
    length = max(len(r.tokens) for r in rows) + rng.randint(0, 130)
    depth = _depths(rows, length)
    groups = _image_groups(rng, rows, length) if images else None
    tree = torch.from_numpy(np.stack([allowed_matrix(r.end, length) for r in rows]))
    dense = layer_allowed(tree, depth, window, groups)
    if window is not None:
        assert not torch.equal(dense, layer_allowed(tree, depth, None, groups))  # the window cuts something
    partial, full = tree_block_masks(_ends(rows, length), 128, depth, window, groups)
    blocks = partial.shape[1]
    padded = torch.zeros(3, blocks * 128, blocks * 128, dtype=torch.bool)
    padded[:, :length, :length] = dense
    tiles = padded.view(3, blocks, 128, blocks, 128).transpose(2, 3)  # [B, q tile, k tile, 128, 128]
    inside = torch.zeros(blocks * 128, dtype=torch.bool)
    inside[:length] = True
    inside_tiles = inside.view(blocks, 128)[:, None, :, None] & inside.view(blocks, 128)[None, :, None, :]
    assert not (partial & full).any()
    assert (tiles.any(-1).any(-1) <= (partial | full)).all()  # no allowed pair in a skipped tile
    assert (tiles | ~inside_tiles).all(-1).all(-1)[full].all()  # full tiles: every pair allowed
    if window is None:
        assert full.any() or length < 256  # the prompt's keys fill whole tiles below the diagonal
    else:  # a window only ever skips more tiles than the tree alone, and never keeps a tile full that is not
        tree_partial, tree_full = tree_block_masks(_ends(rows, length), 128, None, None, groups)
        assert ((partial | full) <= (tree_partial | tree_full)).all() and (full <= tree_full).all()


FLEX_CASES = [(seed, None, False) for seed in range(3)] + [(0, *kind) for kind in MASK_KINDS[1:]]


@pytest.mark.parametrize(
    "seed,window,images", FLEX_CASES, ids=["tree0", "tree1", "tree2", "window", "window_images", "images"]
)
def test_flex_attention_with_the_tree_block_mask_equals_dense_sdpa(seed, window, images):
    rng = random.Random(seed)
    rows = _random_rows(rng, 2, trunk_len=150 if window is None and not images else 60)  # uncompiled: L x L
    length = max(len(r.tokens) for r in rows) + 5
    depth = _depths(rows, length)
    groups = _image_groups(rng, rows, length) if images else None
    tree = torch.from_numpy(np.stack([allowed_matrix(r.end, length) for r in rows]))
    dense = layer_allowed(tree, depth, window, groups)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, length, 16, generator=gen) for _ in range(3))
    block_mask = tree_block_mask(_ends(rows, length), depth=depth, window=window, groups=groups)
    out = flex_attention_fn(q.device, compile=False)(q, k, v, block_mask=block_mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    assert torch.allclose(out, ref, atol=1e-5)


def test_layer_allowed_by_hand():
    """One chain of 6 tokens (a prompt whose tokens 1-3 are an image) and a branch: window 3 on depths."""
    row = pack_question([10, 11, 12, 13, 14, 15], [([20, 21], 0), ([30], 0)])
    length = len(row.tokens)
    tree = torch.from_numpy(allowed_matrix(row.end, length))[None]
    depth = torch.tensor([row.depth])
    types = torch.tensor([[0, 1, 1, 1] + [0] * (length - 4)])
    allowed = layer_allowed(tree, depth, 3, image_groups(types))[0]
    q = row.tokens.index(21)  # depth 7: sees depths 5, 6, 7 along its own path
    assert [row.tokens[k] for k in allowed[q].nonzero().flatten().tolist()] == [15, 20, 21]
    assert [row.tokens[k] for k in allowed[1].nonzero().flatten().tolist()] == [10, 11, 12, 13]  # whole image
    full = layer_allowed(tree, depth, None, None)[0]
    assert [row.tokens[k] for k in full[q].nonzero().flatten().tolist()] == [10, 11, 12, 13, 14, 15, 20, 21]


def _pair(tmp_path, monkeypatch, kind, **config):
    """A tree-attention trainer and an unpacked one on the same model and rows."""
    model, processing_class, rows = _build(kind)
    ds = StepPairDataset.from_list(rows)
    common = dict(per_device_train_batch_size=len(rows), srpo_lambda=0.6, **config)
    plain = SRPOTrainer(
        model=model,
        args=srpo_args(tmp_path / "u", prefix_sharing=False, **common),
        train_dataset=ds,
        processing_class=processing_class,
    )
    monkeypatch.setenv("SRPO_TRL_TREE_ATTENTION", "flex")
    tree = SRPOTrainer(
        model=model, args=srpo_args(tmp_path / "p", **common), train_dataset=ds, processing_class=processing_class
    )
    batch_t = tree.data_collator([tree.train_dataset[i] for i in range(len(rows))])
    batch_u = plain.data_collator([plain.train_dataset[i] for i in range(len(rows))])
    return model, tree, plain, batch_t, batch_u


def _loss_logps_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    sums, counts, _ = trainer._sequence_logps(trainer.model, batch)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), (sums / counts).detach(), grads


@pytest.mark.parametrize("kind", ["text", "qwen2_5_vl", "llava_next", "llava"])
def test_tree_attention_packed_equals_unpacked(tmp_path, monkeypatch, kind):
    model, tree, plain, batch_t, batch_u = _pair(tmp_path, monkeypatch, kind)
    text_config = model.config.get_text_config()
    assert tree.prefix_sharing and tree.data_collator.dense_mask is False
    assert text_config._attn_implementation == TREE_ATTENTION
    if text_config is not model.config:  # the vision tower keeps its own attention
        assert model.config.vision_config._attn_implementation == "sdpa"
    assert "tree_mask" not in batch_t and batch_t["input_ids"].shape[1] % 128 == 0  # bucketed
    loss_t, logps_t, grads_t = _loss_logps_grads(tree, batch_t)
    loss_u, logps_u, grads_u = _loss_logps_grads(plain, batch_u)  # srpo_tree without a BlockMask: sdpa
    assert loss_t == pytest.approx(loss_u, abs=1e-5)
    assert torch.allclose(logps_t, logps_u, atol=1e-5)
    assert grads_t.keys() == grads_u.keys() and grads_t
    for name in grads_t:
        assert torch.allclose(grads_t[name], grads_u[name], atol=1e-5, rtol=1e-4), name
    with torch.no_grad():  # the FlexAttention kernel itself
        sums, counts, _ = tree._sequence_logps(model, batch_t)
    assert torch.allclose(sums / counts, logps_u, atol=1e-5)


def _text_model(family, tok):
    """Tiny Llama / Mistral causal LMs (Qwen2's tiny settings) for the attention-interface check;
    Mistral's sliding window (8) is shorter than the rows."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from srpo_trl.tiny import _text_kwargs

    if family == "llama":
        config = LlamaConfig(**_text_kwargs(tok, 32, 2), attn_implementation="sdpa")
        return _seeded(LlamaForCausalLM, config)
    config = MistralConfig(**_text_kwargs(tok, 32, 2), sliding_window=8, attn_implementation="sdpa")
    return _seeded(MistralForCausalLM, config)


def _seeded(model_cls, config):
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "llama", "mistral", "gemma3"])
def test_tree_attention_on_other_families(tmp_path, monkeypatch, family):
    """Qwen2-VL's decoder, Llama, Mistral (one sliding-window BlockMask) and Gemma3 (a BlockMask per
    layer type, with bidirectional image blocks) take srpo_tree through the same interface."""
    from test_device_guard import _vision_rows

    from srpo_trl import tiny

    rows = question_rows()
    if family in ("qwen2_vl", "gemma3"):
        model, processing_class = getattr(tiny, f"tiny_{family}")(seed=5)
        rows = _vision_rows()
    else:
        processing_class = build_tokenizer()
        model = _text_model(family, processing_class)
    ds = StepPairDataset.from_list(rows)
    common = dict(per_device_train_batch_size=len(rows), srpo_lambda=0.6)
    plain = SRPOTrainer(
        model=model,
        args=srpo_args(tmp_path / "u", prefix_sharing=False, **common),
        train_dataset=ds,
        processing_class=processing_class,
    )
    monkeypatch.setenv("SRPO_TRL_TREE_ATTENTION", "flex")
    tree = SRPOTrainer(
        model=model, args=srpo_args(tmp_path / "p", **common), train_dataset=ds, processing_class=processing_class
    )
    assert model.config.get_text_config()._attn_implementation == TREE_ATTENTION
    batch_t = tree.data_collator([tree.train_dataset[i] for i in range(len(rows))])
    batch_u = plain.data_collator([plain.train_dataset[i] for i in range(len(rows))])
    loss_t, logps_t, grads_t = _loss_logps_grads(tree, batch_t)
    loss_u, logps_u, grads_u = _loss_logps_grads(plain, batch_u)
    assert loss_t == pytest.approx(loss_u, abs=1e-5) and torch.allclose(logps_t, logps_u, atol=1e-5)
    for name in grads_u:
        assert torch.allclose(grads_t[name], grads_u[name], atol=1e-5, rtol=1e-4), name
    with torch.no_grad():
        sums, counts, _ = tree._sequence_logps(model, batch_t)
    assert torch.allclose(sums / counts, logps_u, atol=1e-5)


def test_reference_model_is_switched_to_tree_attention_too(tmp_path, monkeypatch):
    """Step-DPO with a separate reference model: the trainer set up the policy only; the reference
    gets the tree BlockMask too and must take it (sdpa would raise on a BlockMask)."""
    tok = build_tokenizer()
    rows = question_rows()
    ds = StepPairDataset.from_list(rows)
    ref = tiny_causal_lm(tok, seed=4)
    common = dict(per_device_train_batch_size=5, align_loss="sigmoid")
    plain = SRPOTrainer(
        model=tiny_causal_lm(tok, seed=3),
        ref_model=ref,
        args=srpo_args(tmp_path / "u", prefix_sharing=False, **common),
        train_dataset=ds,
        processing_class=tok,
    )
    monkeypatch.setenv("SRPO_TRL_TREE_ATTENTION", "flex")
    tree = SRPOTrainer(
        model=tiny_causal_lm(tok, seed=3),
        ref_model=ref,
        args=srpo_args(tmp_path / "p", **common),
        train_dataset=ds,
        processing_class=tok,
    )
    assert ref.config._attn_implementation == "sdpa"  # not set up by the trainer ...
    batch_t = tree.data_collator([tree.train_dataset[i] for i in range(5)])
    batch_u = plain.data_collator([plain.train_dataset[i] for i in range(5)])
    for a, b in zip(
        tree.compute_ref_log_probs(tree.ref_model, batch_t), plain.compute_ref_log_probs(plain.ref_model, batch_u)
    ):
        assert torch.allclose(a, b, atol=1e-4)
    assert ref.config._attn_implementation == TREE_ATTENTION  # ... switched at its first tree forward


def test_srpo_tree_without_a_block_mask_is_sdpa():
    """Unpacked forwards, evaluation and generation on a switched model are sdpa's, padding included."""
    tok = build_tokenizer()
    sdpa, tree = tiny_causal_lm(tok, seed=2), tiny_causal_lm(tok, seed=2)
    from srpo_trl.attention import use_tree_attention

    use_tree_attention(tree)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask).logits
        b = tree(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-6)


def test_choice_of_tree_attention_and_its_one_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("SRPO_TRL_TREE_ATTENTION", raising=False)
    tok = build_tokenizer()
    model = tiny_causal_lm(tok)
    assert choose_tree_attention(model, "cuda", torch.bfloat16).block_mask
    assert choose_tree_attention(model, "cuda", torch.float16).switch_to_tree
    fp32 = choose_tree_attention(model, "cuda", torch.float32)
    assert not fp32.block_mask and "fp32 FlexAttention" in fp32.why
    assert "no FlexAttention backward on cpu" in choose_tree_attention(model, "cpu", torch.bfloat16).why
    model.config._attn_implementation = "eager"
    assert "eager" in choose_tree_attention(model, "cuda", torch.bfloat16).why
    model.config._attn_implementation = "sdpa"
    with caplog.at_level(logging.WARNING):
        trainer = SRPOTrainer(
            model=model,
            args=srpo_args(tmp_path),
            train_dataset=StepPairDataset.from_list(question_rows()),
            processing_class=tok,
        )
    assert trainer.prefix_sharing and trainer.data_collator.dense_mask
    assert caplog.text.count("Packed batches use a dense [L, L] tree mask") == 1
    assert "no FlexAttention backward on cpu" in caplog.text
    monkeypatch.setenv("SRPO_TRL_TREE_ATTENTION", "sideways")
    with pytest.raises(ValueError, match="auto"):
        choose_tree_attention(model, "cuda", torch.bfloat16)


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 127, 128, 129, 1300)] == [128, 128, 128, 256, 1408]


@pytest.mark.slow  # compiles FlexAttention on CPU: about 10 s per shape
def test_varying_packed_lengths_compile_once_per_bucket():
    """Batches of questions of different sizes: the kernel compiles once per (rows, bucket), not
    once per packed length."""
    rng = random.Random(0)
    flex = flex_attention_fn(torch.device("cpu"), compile=True)
    before = compile_count()
    lengths, shapes = set(), set()
    for _ in range(6):
        rows = _random_rows(rng, 2, trunk_len=40)
        raw = max(len(r.tokens) for r in rows)
        length = bucket_length(raw)
        lengths.add(raw)
        shapes.add(length)
        q, k, v = (torch.randn(2, 2, length, 16) for _ in range(3))
        with torch.no_grad():
            out = flex(q, k, v, block_mask=tree_block_mask(_ends(rows, length)))
        dense = torch.from_numpy(np.stack([allowed_matrix(r.end, length) for r in rows]))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
        assert torch.allclose(out, ref, atol=1e-5)
    compiles = compile_count() - before
    assert len(lengths) >= 5 and compiles == len(shapes) < len(lengths), (lengths, shapes, compiles)
