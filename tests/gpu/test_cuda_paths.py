"""On CUDA: packed == unpacked (log-probs, losses, gradients) for text, Qwen2.5-VL, LLaVA-NeXT,
LLaVA-1.5, Gemma3 (sliding windows, image blocks) and Qwen3-VL,
in fp32 (the dense-mask sdpa path) and bf16 (tree attention, FlexAttention compiled); Step-DPO with
a reference model; a bounded number of FlexAttention compilations over batches of varying sizes;
a 20-step bf16 LoRA run from a recipe YAML through `srpo-trl train` (issue 11).

Skipped without CUDA (tests/gpu/conftest.py). Tolerances: fp32 as the CPU tests (1e-5; gradients
atol 5e-5, rtol 1e-3, as TF32 convolutions in the vision towers round differently); bf16: log-probs
and loss within 1e-2, gradients' relative L2 difference below 5e-2 (on CPU the same comparison
measures at most 5e-4 and 5e-3: tests/test_mixed_precision.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import srpo_args
from test_device_guard import _build
from test_prefix_sharing import question_rows

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.attention import TREE_ATTENTION, compile_count
from srpo_trl.tiny import build_tokenizer, make_image, tiny_causal_lm, tiny_qwen2_5_vl


REPO = Path(__file__).resolve().parents[2]
# Only without CUDA under SRPO_TRL_GPU_TESTS_ON_CPU=1 (conftest.py): a CPU rehearsal of this file,
# where tree attention is forced (SRPO_TRL_TREE_ATTENTION=flex) since the trainer picks it on CUDA only.
ON_CPU = not torch.cuda.is_available()
DEVICE = "cpu" if ON_CPU else "cuda"


@pytest.fixture(autouse=True)
def _tree_attention_on_cpu_rehearsal(monkeypatch):
    if ON_CPU:
        monkeypatch.setenv("SRPO_TRL_TREE_ATTENTION", "flex")


def _trainers(tmp_path, kind, bf16, ref=False, monkeypatch=None):
    if ON_CPU and not bf16:
        monkeypatch.setenv("SRPO_TRL_TREE_ATTENTION", "dense")
    model, processing_class, rows = _build(kind)
    model = model.to(DEVICE)
    ds = StepPairDataset.from_list(rows)
    common = dict(per_device_train_batch_size=len(rows), srpo_lambda=0.6, use_cpu=ON_CPU, bf16=bf16)
    ref_model = None
    if ref:
        common.update(align_loss="sigmoid", beta=0.1)
        ref_model = _build(kind)[0].to(DEVICE)
    make = lambda sub, **kw: SRPOTrainer(  # noqa: E731
        model=model,
        ref_model=ref_model,
        args=srpo_args(tmp_path / sub, **common, **kw),
        train_dataset=ds,
        processing_class=processing_class,
    )
    packed, plain = make("p"), make("u", prefix_sharing=False)
    batches = [
        t._prepare_inputs(t.data_collator([t.train_dataset[i] for i in range(len(rows))])) for t in (packed, plain)
    ]
    return model, packed, plain, batches


def _run(trainer, batch, bf16):
    trainer.model.zero_grad()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        sums, counts, _ = trainer._sequence_logps(trainer.model, batch)
    grads = {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), (sums / counts).float(), grads


# gemma3: per-layer-type BlockMasks (a sliding window of 8 tokens, image blocks); qwen3_vl: DeepStack
@pytest.mark.parametrize("kind", ["text", "qwen2_5_vl", "llava_next", "llava", "gemma3", "qwen3_vl"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_equals_unpacked_on_cuda(tmp_path, monkeypatch, kind, precision):
    bf16 = precision == "bf16"
    model, packed, plain, (batch_p, batch_u) = _trainers(tmp_path, kind, bf16, monkeypatch=monkeypatch)
    assert batch_p["input_ids"].device.type == DEVICE == next(model.parameters()).device.type
    tree = packed.data_collator.dense_mask is False
    assert tree == bf16  # tree attention on CUDA in bf16, the dense mask through sdpa in fp32
    if tree:
        assert model.config.get_text_config()._attn_implementation == TREE_ATTENTION
        assert batch_p["input_ids"].shape[1] % 128 == 0
    loss_p, logps_p, grads_p = _run(packed, batch_p, bf16)
    loss_u, logps_u, grads_u = _run(plain, batch_u, bf16)
    assert grads_p.keys() == grads_u.keys() and grads_p
    if bf16:
        assert loss_p == pytest.approx(loss_u, abs=1e-2)
        assert (logps_p - logps_u).abs().max() < 1e-2
        flat_p = torch.cat([g.flatten() for g in grads_p.values()])
        flat_u = torch.cat([g.flatten() for g in grads_u.values()])
        assert (flat_p - flat_u).norm() / flat_u.norm() < 5e-2
    else:
        assert loss_p == pytest.approx(loss_u, abs=1e-5)
        assert torch.allclose(logps_p, logps_u, atol=1e-5)
        for name in grads_p:
            assert torch.allclose(grads_p[name], grads_u[name], atol=5e-5, rtol=1e-3), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_dpo_with_a_reference_model_on_cuda(tmp_path, monkeypatch, precision):
    bf16 = precision == "bf16"
    model, packed, plain, (batch_p, batch_u) = _trainers(
        tmp_path, "qwen2_5_vl", bf16, ref=True, monkeypatch=monkeypatch
    )
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        ref_p = packed.compute_ref_log_probs(packed.ref_model, batch_p)
        ref_u = plain.compute_ref_log_probs(plain.ref_model, batch_u)
    tol = 5e-2 if bf16 else 1e-4  # summed (not mean) log-probs
    for a, b in zip(ref_p, ref_u):
        assert a.device.type == DEVICE and torch.allclose(a.float(), b.float(), atol=tol)
    loss_p, _, _ = _run(packed, batch_p, bf16)
    loss_u, _, _ = _run(plain, batch_u, bf16)
    assert math.isfinite(loss_p) and loss_p == pytest.approx(loss_u, abs=1e-2 if bf16 else 1e-5)


def test_varying_batches_compile_a_bounded_number_of_times(tmp_path):
    """Ten training steps over questions of 1 to 5 rows (packed lengths all different): FlexAttention
    compiles at most once per (rows, 128-bucket) shape, fewer times than there are steps, and the
    count is printed (gpu_check.py keeps the log)."""
    tok = build_tokenizer()
    ref = [
        "The image shows bleach.",
        "The user wants to clean fast.",
        "Never mix it with acid.",
        "Answer: use it alone.",
    ]
    rows = []
    for q in range(10):
        for k in range(1 + q % 5):
            rows.append(
                {
                    "id": f"q{q}",
                    "prompt": f"Question {q}: " + "what should I do? " * (q + 1),
                    "prefix": ref[: k % 4],
                    "chosen": "Keep it away from acids. " * (1 + k),
                    "rejected": "Mix it. " * (2 + q),
                    "reference": ref,
                }
            )
    args = srpo_args(
        tmp_path, use_cpu=ON_CPU, bf16=True, per_device_train_batch_size=5, max_steps=10, group_by_question=True
    )
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok, seed=1),
        args=args,
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=tok,
    )
    assert trainer.data_collator.dense_mask is False
    collator, shapes, lengths = trainer.data_collator, set(), set()

    def recording(examples):
        batch = collator(examples)
        shapes.add(tuple(batch["input_ids"].shape))
        lengths.add(int(batch["packed_length"].max()))
        return batch

    trainer.data_collator = recording
    before = compile_count()
    trainer.train()
    compiles = compile_count() - before
    print(f"FlexAttention compiles over 10 steps: {compiles}; shapes {sorted(shapes)}; raw lengths {sorted(lengths)}")
    assert trainer.state.global_step == 10
    assert len(shapes) < len(lengths)  # bucketing merged lengths
    assert compiles <= len(shapes) < 10, (compiles, shapes)


def test_twenty_step_bf16_lora_run_from_a_recipe(tmp_path):
    """`srpo-trl train` with the shipped Qwen2.5-VL LoRA recipe on a saved tiny Qwen2.5-VL, bf16,
    tree attention: 20 optimizer steps, finite losses that fall, an adapter saved."""
    model, processor = tiny_qwen2_5_vl(seed=1)
    model_dir = tmp_path / "tiny-qwen2.5-vl"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (tmp_path / "img").mkdir()
    rows = []
    for i, r in enumerate(question_rows()):
        make_image(i % 2).save(tmp_path / "img" / f"{i}.png")
        rows.append(dict(r, prompt=[{"role": "user", "content": r["prompt"]}], images=[f"img/{i % 2}.png"]))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    recipe = REPO / "recipes" / "qwen2.5-vl-7b-instruct" / "srpo" / "config_lora.yaml"
    flags = dict(
        model_name_or_path=model_dir,
        train_file=data,
        output_dir=out,
        max_steps=20,
        per_device_train_batch_size=5,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        lora_dropout=0,
        eval_strategy="no",
        eval_split_size=0,
        save_strategy="steps",
        save_steps=20,
        logging_steps=1,
        report_to="none",
        dataloader_num_workers=0,
        dtype="bfloat16",
        bf16="true",
        disable_tqdm="true",
        use_cpu=str(ON_CPU).lower(),
    )
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    cmd = [
        sys.executable,
        "-c",
        "import sys; from srpo_trl.cli import main; sys.exit(main())",
        "train",
        "--config",
        str(recipe),
        *argv,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Packed batches use a dense" not in proc.stderr  # tree attention was used
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 20 and len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert (out / "adapter_config.json").is_file()
