"""The prefix-sharing benchmark's data (benchmarks/step_pairs.py) has the proportions it claims, and
every configuration gets the same pairs. No timing here: measurements never go into tests."""

import importlib.util
from pathlib import Path

import pytest

from srpo_trl.collator import DataCollatorForStepPairs
from srpo_trl.rows import encode_prompt_text, encode_text_segments, normalize_row, render_prompt, tokenizer_of


_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_pairs.py"
_spec = importlib.util.spec_from_file_location("bench_step_pairs", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module", params=["vlm", "text"])
def data(request):
    kind = request.param
    processing_class = bench.build_processing_class(kind)
    rows = bench.build_rows(kind, processing_class, num_questions=4)
    return kind, processing_class, rows


def test_proportions(data):
    kind, processing_class, rows = data
    p = bench.describe_rows(rows, processing_class)
    assert p["questions"] == 4 and p["rows"] == 4 + 8 + 5 + 7  # QUESTION_SIZES[:4]
    assert min(p["branch_points"]) >= 4 and max(p["branch_points"]) <= 8
    lo, hi, mean = p["step_tokens"]
    assert 30 <= lo and hi <= 60 and 40 <= mean <= 50
    if kind == "vlm":
        assert p["image_tokens_per_prompt"] == 256
    else:
        assert p["image_tokens_per_prompt"] is None
        prompt_tokens = len(encode_prompt_text(normalize_row(rows[0], 0), processing_class))
        assert 100 <= prompt_tokens <= 160


def test_batches_hold_whole_questions(data):
    _, _, rows = data
    for batch in bench.batches(rows, 12):
        ids = [r["id"] for r in batch]
        assert len(set(ids)) == 2
        for q in set(ids):  # every row of the question is in this batch
            assert ids.count(q) == sum(1 for r in rows if r["id"] == q)


def test_every_configuration_gets_the_same_pairs(data):
    """DPO's rows are SRPO's rows with the prefix folded into the prompt, token for token; the NLL
    pass scores exactly SRPO's reference paths."""
    kind, processing_class, rows = data
    tokenizer = tokenizer_of(processing_class)
    dpo = bench.dpo_rows(rows, processing_class)
    paths = bench.reference_paths(rows, processing_class)
    assert len(dpo) == len(rows) and set(paths) == {r["id"] for r in rows}

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for i, (row, d) in enumerate(zip(rows, dpo)):
        canon = normalize_row(row, i)
        seg = encode_text_segments(canon, processing_class)
        prompt = ids(render_prompt(processing_class, row["prompt"], canon["images"]))
        assert ids(d["prompt"]) == prompt + seg["prefix_ids"]
        assert ids(d["chosen"]) == seg["chosen_ids"] and ids(d["rejected"]) == seg["rejected_ids"]
        assert d.get("images", []) == canon["images"] and d["question"] == row["id"]
        assert paths[row["id"]]["reference_ids"] == seg["reference_ids"]


def test_sharing_stats_count_unique_tokens(data):
    kind, processing_class, rows = data
    stats = bench.sharing_stats(rows, processing_class, 12)
    assert len(stats["total_tokens"]) == 2
    for unique, total in zip(stats["unique_tokens"], stats["total_tokens"]):
        assert 0.05 * total < unique < 0.25 * total
    # The packed collation holds every unique token, plus one copy per extra child at a branch point.
    batch = bench.batches(rows, 12)[0]
    packed = DataCollatorForStepPairs(processing_class=processing_class, prefix_sharing=True)([dict(r) for r in batch])
    laid_out = int(packed["packed_length"].sum())
    assert stats["unique_tokens"][0] <= laid_out <= stats["unique_tokens"][0] + 3 * len(batch)


@pytest.mark.parametrize("kind", ["vlm", "text"])
def test_preset_has_the_real_decoder_shape(kind):
    """The qwen2_5_vl_7b preset is Qwen2.5-VL-7B's text decoder with fewer layers (built on the meta
    device here: no memory, no time)."""
    model = bench.build_model(kind, 0, 0, 2, preset="qwen2_5_vl_7b", device="meta")
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (3584, 28, 4)
    assert (text.intermediate_size, text.vocab_size, text.num_hidden_layers) == (18944, 152064, 2)
    if kind == "vlm":
        assert model.config.vision_config.out_hidden_size == 3584 and model.config.vision_config.depth == 2
        assert sum(text.rope_parameters["mrope_section"]) == 3584 // 28 // 2


def test_model_flops_match_torch_flop_counter():
    """The benchmark's model-FLOP count of a forward against torch's FlopCounterMode (an independent
    count of the matmuls actually run). Eager attention multiplies the full L x L; the benchmark
    counts the causal half (the useful pairs): that difference is taken off. A pass with gradients
    is counted as 3x its forward, the usual convention for MFU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from trl.trainer.utils import add_fused_lm_head

    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm

    tok = build_tokenizer()
    model = tiny_causal_lm(tok, seed=0, hidden_size=64, num_hidden_layers=2)
    model.set_attn_implementation("eager")  # attention as matmuls the counter sees (CPU sdpa is not counted)
    add_fused_lm_head(model)
    counters = {"tokens": 0, "real_tokens": 0, "images": 0, "flops": 0}
    bench._count_tokens(model, counters, {})
    length = 40
    ids = torch.randint(10, 400, (2, length), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(length) < 25, -100)
    config = model.config
    full_minus_causal = (
        2 * 4 * config.num_hidden_layers * config.hidden_size * (length * length - length * (length + 1) // 2)
    )
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    forward = counters["flops"]
    assert forward == pytest.approx(counter.get_total_flops() - full_minus_causal, rel=0.03)
    model(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True
    ).log_probs.sum().backward()
    assert counters["flops"] - forward == 3 * forward


def test_profile_summary_groups_self_times_that_add_up():
    """`--profile`'s summary: ops sorted by self time, groups that partition the total."""
    import torch

    q = k = v = torch.randn(1, 2, 64, 16)
    a = torch.randn(128, 128)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            (a @ a).sum()
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
    summary = bench.profile_summary(prof, cuda=False, top=5)
    assert summary["sorted_by"] == "self_cpu_ms" and len(summary["top_ops"]) == 5
    times = [op["self_cpu_ms"] for op in summary["top_ops"]]
    assert times == sorted(times, reverse=True)
    expected_total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    assert summary["total_ms"] == pytest.approx(expected_total)
    assert sum(summary["group_share"].values()) == pytest.approx(1.0)
    assert summary["group_share"]["matmul"] > 0 and summary["group_share"]["attention"] > 0
    names = {op["name"] for op in summary["top_ops"]}
    assert "aten::mm" in names or "aten::matmul" in names
