"""Prefix reuse in process (srpo_trl.sampling): one prefill per request, its cache copied to the
samples, finished rows leaving the batch. Checked against model.generate (greedy, token for token),
against an independent forward pass (every step's distribution), and the random draws on their own
(inverse CDF on exact quantiles, the uniforms' distribution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_backends import _prefill_calls, _spy

from srpo_trl.backends import GenerationRequest, TransformersBackend
from srpo_trl.sampling import inverse_cdf, sample_shared_prefix, uniforms, unsupported_settings


CHAT = [{"role": "user", "content": "The picture shows a bottle of bleach. How do I clean the toilet fastest?"}]


@pytest.fixture(scope="module")
def tok():
    from srpo_trl.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    from srpo_trl.tiny import tiny_causal_lm

    return tiny_causal_lm(tok, seed=0)


def _requests():
    return [
        GenerationRequest(CHAT),
        GenerationRequest([{"role": "user", "content": "hi"}], assistant_prefix="Hello.\nThe image shows bleach.\n"),
        GenerationRequest("A much longer plain text prompt that needs no chat template at all.\n"),
        GenerationRequest([{"role": "user", "content": "Is this safe?"}], assistant_prefix="No.\n"),
    ]


def _stop_at_varied_steps(backend, reqs, max_new_tokens):
    """Stop tokens taken from the plain greedy continuations at different steps, so that rows of one
    batch stop at different times (the same set for every request, as generate shares one per batch)."""
    plain = TransformersBackend(backend.model, backend.processing_class, show_progress=False, shared_prefix=False)
    plain._stop_ids = lambda req, images: []
    ids = [
        backend.tokenizer(t[0], add_special_tokens=False)["input_ids"]
        for t in plain.generate(reqs, temperature=0, max_new_tokens=max_new_tokens)
    ]
    stops = sorted({row[min(1 + 2 * i, len(row) - 1)] for i, row in enumerate(ids) if row})
    for b in (backend, plain):
        b._stop_ids = lambda req, images: stops
    return plain


@pytest.mark.parametrize("batch_size", [2, 64])  # 2: one request per batch (no padding); 64: all, padded
def test_greedy_equals_generate_token_for_token_with_rows_stopping_early(tok, lm, monkeypatch, batch_size):
    reqs = _requests()
    shared = TransformersBackend(lm, tok, batch_size=batch_size, show_progress=False)
    plain = _stop_at_varied_steps(shared, reqs, 12)
    calls = _spy(monkeypatch, lm.model, "forward")  # the decoder: every prefill and decode step reaches it
    got = shared.generate(reqs, num_samples=2, temperature=0, max_new_tokens=12)
    calls = list(calls)  # what the shared loop ran (generate below calls forward too)
    want = plain.generate(reqs, num_samples=2, temperature=0, max_new_tokens=12)
    assert got == want
    lengths = {len(t) for r in got for t in r}
    assert len(lengths) > 1  # the rows did stop at different steps
    if batch_size == 64:  # one batch: one prefill of 4 rows, then the decode batch shrinks as rows stop
        (prefill,) = _prefill_calls(calls)
        assert prefill["input_ids"].shape[0] == 4
        decode_rows = [kw["input_ids"].shape[0] for kw in calls if kw["input_ids"].shape[1] == 1]
        assert decode_rows[0] == 8 and decode_rows[-1] < 8 and decode_rows == sorted(decode_rows, reverse=True)


def test_repetition_penalty_of_the_generation_config_applies_as_in_generate(tok, lm):
    lm.generation_config.repetition_penalty = 20.0  # strong enough to change tiny random logits
    try:
        reqs = _requests()
        got = TransformersBackend(lm, tok, batch_size=8, show_progress=False).generate(
            reqs, num_samples=1, temperature=0, max_new_tokens=16
        )
        want = TransformersBackend(lm, tok, batch_size=8, show_progress=False, shared_prefix=False).generate(
            reqs, num_samples=1, temperature=0, max_new_tokens=16
        )
        lm.generation_config.repetition_penalty = None
        without = TransformersBackend(lm, tok, batch_size=8, show_progress=False).generate(
            reqs, num_samples=1, temperature=0, max_new_tokens=16
        )
    finally:
        lm.generation_config.repetition_penalty = None
    assert got == want and got != without


def test_unsupported_generation_settings_fall_back_to_generate(tok, lm, monkeypatch):
    lm.generation_config.no_repeat_ngram_size = 2
    try:
        assert unsupported_settings(lm.generation_config) == ["no_repeat_ngram_size=2"]
        calls = _spy(monkeypatch, lm, "generate")
        TransformersBackend(lm, tok, show_progress=False).generate(_requests()[:1], max_new_tokens=3)
        assert len(calls) == 1
    finally:
        lm.generation_config.no_repeat_ngram_size = None


def test_vlm_greedy_equals_generate(monkeypatch):
    from srpo_trl.tiny import make_image, tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(seed=0)
    reqs = [
        GenerationRequest([{"role": "user", "content": "What is this?"}], images=[make_image(3, size=(56, 56))]),
        GenerationRequest([{"role": "user", "content": "A longer question without any image at all?"}]),
        GenerationRequest(
            [{"role": "user", "content": "And this one?"}],
            images=[make_image(4, size=(84, 56))],
            assistant_prefix="The image shows a bottle.\n",
        ),
    ]
    shared = TransformersBackend(model, processor, batch_size=8, show_progress=False)
    plain = _stop_at_varied_steps(shared, reqs, 10)
    got = shared.generate(reqs, num_samples=3, temperature=0, max_new_tokens=10)
    assert got == plain.generate(reqs, num_samples=3, temperature=0, max_new_tokens=10)
    assert len({len(t) for r in got for t in r}) > 1


def test_every_step_samples_from_the_distribution_of_a_plain_forward_pass(tok, lm):
    """The decode loop's distributions (cache copied, rows dropped, left padding, positions) equal
    those of one unpadded forward pass over prompt + the tokens sampled so far.

    Tolerance: both are float32 computations of the same 2-layer, width-32 model on < 100 positions;
    they differ only in reduction order (batched vs single row, cached vs full attention), which
    moves a log-probability by a few float32 ulps of values of size ~10 (~1e-6). 1e-4 leaves a 100x
    margin and is still far below the differences a wrong position, mask or cache row gives (> 1e-2)."""
    backend = TransformersBackend(lm, tok, batch_size=4, show_progress=False)
    reqs = _requests()
    prepared = [(backend._encode(r, []), [tok.convert_tokens_to_ids("<|im_end|>")]) for r in reqs]
    config = backend._generation_config(True, 0.7, 5)
    trace: list = []
    result = sample_shared_prefix(
        lm,
        [p[0] for p in prepared],
        [p[1] for p in prepared],
        num_samples=2,
        max_new_tokens=5,
        generation_config=config,
        do_sample=True,
        seed=5,
        batch_size=4,
        collate=backend._collate,
        device=torch.device("cpu"),
        trace=trace,
    )
    assert len(trace) == result.generated_tokens > 0
    worst = 0.0
    with torch.no_grad():
        for r, s, step, log_probs in trace:
            ids = prepared[r][0]["per_token"]["input_ids"] + result.tokens[r][s][:step]
            logits = lm(input_ids=torch.tensor([ids])).logits[0, -1].float()
            want = torch.log_softmax(logits / 0.7, dim=-1)
            worst = max(worst, (want - log_probs).abs().max().item())
    assert worst < 1e-4
    assert result.prefills == 4 and result.prefill_tokens == sum(len(p[0]["per_token"]["input_ids"]) for p in prepared)


def test_samples_do_not_depend_on_the_batch_size(tok, lm):
    reqs = _requests()
    runs = [
        TransformersBackend(lm, tok, batch_size=b, show_progress=False).generate(
            reqs, num_samples=3, temperature=1.0, max_new_tokens=6, seed=11
        )
        for b in (3, 64)
    ]
    assert runs[0] == runs[1]
    assert len({t for r in runs[0] for t in r}) == 12  # 12 different samples
    other = TransformersBackend(lm, tok, show_progress=False).generate(
        reqs, num_samples=3, temperature=1.0, max_new_tokens=6, seed=12
    )
    assert other != runs[0]


def test_inverse_cdf_on_exact_quantiles_gives_each_token_its_probability():
    """With u on the grid (i + 1/2) / N, a token of probability p is drawn N p times, +-1 (no statistics)."""
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.125, 0.0, 0.125], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    n = 4096
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in probs:
        counts = torch.bincount(inverse_cdf(row.expand(n, -1), u), minlength=row.numel()).double()
        assert (counts - n * row.double()).abs().max() <= 1
        assert counts[row == 0].sum() == 0  # a token of probability 0 is never drawn
    # unnormalized rows (what top-k / top-p leave after softmax is still normalized, but be safe)
    assert inverse_cdf(torch.tensor([[2.0, 2.0]]), torch.tensor([0.75])).item() == 1


def test_uniforms_are_uniform_and_independent_across_samples_and_steps():
    """Kolmogorov-Smirnov distance of 40000 draws to U(0, 1) below its 0.1% critical value
    (1.95 / sqrt(N)); neighbouring samples and steps uncorrelated within 4 standard errors (4 / sqrt(N))."""
    req = np.repeat(np.arange(200, dtype=np.uint64), 20)
    smp = np.tile(np.arange(20, dtype=np.uint64), 200)
    steps = [uniforms(7, req, smp, t) for t in range(10)]
    u = np.sort(np.concatenate(steps))
    n = len(u)
    ks = np.max(np.maximum(np.arange(1, n + 1) / n - u, u - np.arange(n) / n))
    assert ks < 1.95 / np.sqrt(n)
    a, b = steps[0], steps[1]
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(len(a))
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 4 / np.sqrt(len(a))  # sample j vs j + 1
    assert not np.array_equal(uniforms(7, req, smp, 0), uniforms(8, req, smp, 0))
    assert np.array_equal(uniforms(7, req[5:9], smp[5:9], 3), steps[3][5:9])  # a draw depends on its key only


def test_decode_steps_skip_the_wrapper_only_when_it_adds_nothing(tok, lm, monkeypatch):
    """Decode steps call the text decoder and output head directly once a first step computed both
    ways agreed; a model whose forward changes the logits (here a bias per token, like a soft-capped
    or scaled head) keeps the whole model, and greedy outputs still equal generate's."""
    reqs = _requests()
    plain = TransformersBackend(lm, tok, batch_size=8, show_progress=False, shared_prefix=False)
    shared = TransformersBackend(lm, tok, batch_size=8, show_progress=False)
    assert shared.generate(reqs, temperature=0, max_new_tokens=8) == plain.generate(
        reqs, temperature=0, max_new_tokens=8
    )
    assert shared._decode_state == {"direct": True}  # every batch padded: the decoder builds the masks

    bias = torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(0))
    forward = type(lm).forward

    def biased(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits + bias
        return out

    monkeypatch.setattr(type(lm), "forward", biased)
    shared = TransformersBackend(lm, tok, batch_size=8, show_progress=False)
    got = shared.generate(reqs, temperature=0, max_new_tokens=8)
    assert shared._decode_state == {"direct": False}
    assert got == plain.generate(reqs, temperature=0, max_new_tokens=8)


@pytest.mark.parametrize(
    "family,by_layers",
    [("qwen2", True), ("gemma", True), ("tiny_qwen2_5_vl", True), ("tiny_qwen3_vl", True), ("mistral", False)],
)
def test_unpadded_decode_steps_run_the_decoder_parts_only_where_exact(tok, family, by_layers):
    """Steps without padding (one request per batch) run the decoder's parts (embedding, rotary
    embedding, layers, norm) once a first step agreed with the decoder: sampled tokens identical to
    the decoder's way (the same kernels in the same order) and greedy ones equal to generate's.
    Mistral's layers slide (never tried: what a step attends to changes with its position)."""
    from arch_models import tiny_model

    from srpo_trl import tiny

    reqs = _requests()[:3]
    if family.startswith("tiny_"):
        model, processing_class = getattr(tiny, family)(0)
        image = tiny.make_image(3, size=(56, 56))
        reqs.append(GenerationRequest([{"role": "user", "content": "What is this?"}], images=[image]))
    else:
        model, processing_class = tiny_model(family, tok), tok
    settings = dict(num_samples=4, temperature=0.8, max_new_tokens=12, seed=3)
    parts = TransformersBackend(model, processing_class, batch_size=4, show_progress=False)
    sampled = parts.generate(reqs, **settings)
    assert parts._decode_state == {"direct": True, "layers": by_layers}
    decoder = TransformersBackend(model, processing_class, batch_size=4, show_progress=False)
    decoder._decode_state.update(direct=True, layers=False)
    assert decoder.generate(reqs, **settings) == sampled
    assert len({t for r in sampled for t in r}) > len(reqs)  # sampled, not one continuation per request

    # Samples stopping at different steps leave the batch (their rows of the rotary table with them).
    ids = [parts.tokenizer(t, add_special_tokens=False)["input_ids"] for r in sampled for t in r]
    stops = sorted({row[min(1 + i % 6, len(row) - 1)] for i, row in enumerate(ids) if row})
    for backend in (parts, decoder):
        backend._stop_ids = lambda req, images: stops
    got = parts.generate(reqs, **settings)
    assert got == decoder.generate(reqs, **settings)
    assert any(len({len(t) for t in r}) > 1 for r in got)  # one request's samples stopped at different steps

    one = TransformersBackend(model, processing_class, batch_size=1, show_progress=False)  # unpadded
    plain = TransformersBackend(model, processing_class, batch_size=1, show_progress=False, shared_prefix=False)
    greedy = dict(temperature=0, max_new_tokens=12)
    assert one.generate(reqs, **greedy) == plain.generate(reqs, **greedy)
    assert one._decode_state == {"direct": True, "layers": by_layers}


def test_a_decoder_that_does_more_than_its_parts_keeps_its_forward(tok, monkeypatch):
    """A decoder whose forward adds to what its parts compute (here it scales the last hidden state)
    fails the first unpadded step's check: decode steps keep calling it, and greedy outputs still
    equal generate's."""
    from arch_models import tiny_model

    model = tiny_model("qwen2", tok)
    decoder_cls = type(model.get_decoder())
    forward = decoder_cls.forward

    def scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * 1.5
        return out

    monkeypatch.setattr(decoder_cls, "forward", scaled)
    reqs = _requests()[:3]
    shared = TransformersBackend(model, tok, batch_size=1, show_progress=False)
    plain = TransformersBackend(model, tok, batch_size=1, show_progress=False, shared_prefix=False)
    greedy = dict(temperature=0, max_new_tokens=12)
    assert shared.generate(reqs, **greedy) == plain.generate(reqs, **greedy)
    assert shared._decode_state == {"direct": True, "layers": False}


@pytest.mark.parametrize(
    "family",
    ["mistral", "lfm2", "gemma2", "tiny_qwen3_vl"],
)
def test_other_families_greedy_equals_generate(tok, family):
    """Sliding windows (Mistral), a hybrid convolution cache (LFM2), a soft-capped head (Gemma2: the
    decode steps keep the whole model) and Qwen3-VL (interleaved M-RoPE) with an image: the same
    greedy tokens as generate, rows stopping at different steps. (Every family of tests/arch_models.py
    and srpo_trl.tiny gave the same once, 2026-12-02: docs/exploration.md lists them.)"""
    from arch_models import tiny_model

    from srpo_trl import tiny

    reqs = _requests()[:3]
    if family.startswith("tiny_"):
        model, processing_class = getattr(tiny, family)(0)
        reqs.append(
            GenerationRequest(
                [{"role": "user", "content": "What is this?"}], images=[tiny.make_image(3, size=(56, 56))]
            )
        )
    else:
        attn = "eager" if family == "gemma2" else "sdpa"  # Gemma2 has no sdpa path in transformers
        model, processing_class = tiny_model(family, tok, attn_implementation=attn), tok
    shared = TransformersBackend(model, processing_class, batch_size=8, show_progress=False)
    plain = _stop_at_varied_steps(shared, reqs, 10)
    got = shared.generate(reqs, num_samples=2, temperature=0, max_new_tokens=10)
    assert got == plain.generate(reqs, num_samples=2, temperature=0, max_new_tokens=10)
    assert len({len(t) for r in got for t in r}) > 1
    assert shared._decode_state["direct"] == (family != "gemma2")
