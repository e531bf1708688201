"""Two real processes on CPU through `accelerate launch` and the repository's own launch configs
(recipes/accelerate_configs/cpu_*.yaml) running the code of recipes/srpo.py on a shipped recipe:
DDP, DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 + LoRA.

Every launch writes one JSON per rank (tests/distributed_script.py). Each test asserts on every
rank: the distributed type, 2 processes, the wrapper / engine class, the shard sizes (ZeRO-3: each
rank holds half of every parameter), the same logged loss on both ranks, that the ranks trained on
different rows (whose mean loss is the logged one), and the same loss trajectory and final weights
as a single process with the same global batch. ZeRO-3 also saves, reloads and resumes.

An exit code proves nothing here (docs/recipes.md, "On a CPU machine"): `--multi_gpu` on CPU
without `use_cpu` exits 0 after two independent single-process runs.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srpo_trl import train as train_mod
from srpo_trl.loading import load_model_and_processor
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate_configs"
RECIPE = REPO / "recipes" / "qwen2.5-7b-instruct" / "srpo" / "config_lora.yaml"
SCRIPT = REPO / "tests" / "distributed_script.py"

# 6 questions x 2 step pairs: rows of a question are batched together (prefix sharing), so with
# 2 rows per rank each rank trains on its own question.
PROMPTS = [
    ("What is in the image? Is this safe?", "The image shows a bottle of bleach.", "Mix everything."),
    ("How do I clean the toilet fastest?", "Never mix bleach with acid cleaners.", "Mix them in a closed room."),
    ("Can these two go together?", "No, that makes toxic gas.", "Yes, mix them."),
    ("What should I do with this?", "Store it safely.", "I cannot help with that."),
    ("Is it safe to water the plant?", "Yes, water the plant.", "No, it is poisonous."),
    ("Please describe the scene.", "A red square and a blue circle.", "A dog and a car."),
]
ROWS = [
    {
        "prompt": q,
        "prefix": ["Step 1: look at the picture."] if k else [],
        "chosen": good + (" Answer: keep it away from children." if k else ""),
        "rejected": bad + (" then eat it." if k else ""),
    }
    for q, good, bad in PROMPTS
    for k in range(2)
]
PER_DEVICE, WORLD = 2, 2
# fp32 on CPU (the recipe's dtype is bfloat16 for GPUs: bf16 weights round every update, and the
# rounding differs between batch layouts). The optimizer stays the recipe's AdamW.
COMMON = dict(
    dtype="float32",
    bf16="false",
    activation_checkpointing="false",
    max_steps=3,
    gradient_accumulation_steps=1,
    logging_steps=1,
    report_to="none",
    eval_strategy="no",
    save_strategy="no",
    learning_rate=1e-2,
    warmup_steps=0,
    max_length=512,
    disable_tqdm="true",
    dataloader_num_workers=0,
    seed=7,
)
FULL = dict(use_peft="false")
LORA = dict(use_peft="true", lora_r=4, lora_alpha=8, lora_dropout=0)
# PEFT + ZeRO-3 + activation checkpointing is the combination users report broken: test it as the recipe has it.
LORA_CKPT = dict(LORA, activation_checkpointing="true")
CPU_DDP = dict(use_cpu="true")  # see cpu_ddp.yaml: without it every process trains alone
CPU_DEEPSPEED = dict(ddp_backend="gloo")  # see cpu_zero3.yaml


def flags(fields: dict) -> list[str]:
    return [x for k, v in fields.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tok = build_tokenizer()
    tiny_causal_lm(tok, seed=4).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def recipe_args(workspace: Path, out: Path, **fields) -> list[str]:
    base = dict(model_name_or_path=workspace / "model", train_file=workspace / "pairs.jsonl", output_dir=out)
    return ["--config", str(RECIPE), *flags({**base, **COMMON, **fields})]


def launch(workspace: Path, config: str, name: str, **fields) -> tuple[list[dict], Path]:
    """`accelerate launch` 2 processes; returns each rank's probe record and the run folder."""
    run = workspace / name
    env = {
        **os.environ,
        "SRPO_PROBE_DIR": str(run),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # compile DeepSpeed's extension once
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        str(SCRIPT),
        *recipe_args(workspace, run / "out", per_device_train_batch_size=PER_DEVICE, **fields),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "terminate called" not in log, log[-6000:]  # a rank aborted at exit (process group left behind)
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return ranks, run


def single_process(workspace: Path, name: str, **fields) -> dict:
    """The same recipe in one process with the same global batch (2 x 2 rows)."""
    out = workspace / name
    script, args, model_args = train_mod.parse_args(
        recipe_args(workspace, out, use_cpu="true", per_device_train_batch_size=PER_DEVICE * WORLD, **fields)
    )
    trainer = train_mod.build_trainer(script, args, model_args)
    trainer.train()
    losses = {str(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h}
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"losses": losses, "weights": weights, "numel": sum(p.numel() for p in trainer.model.parameters())}


@pytest.fixture(scope="module")
def single_full(workspace):
    return single_process(workspace, "single_full", **FULL)


@pytest.fixture(scope="module")
def single_lora(workspace):
    return single_process(workspace, "single_lora", **LORA_CKPT)


def check_ranks(ranks, single, distributed_type, wrapper, zero_stage):
    for r, rec in enumerate(ranks):
        assert rec["process_index"] == r
        assert rec["num_processes"] == WORLD
        assert rec["distributed_type"] == f"DistributedType.{distributed_type}"
        assert rec["wrapper"] == wrapper
        assert rec["zero_stage"] == zero_stage
        assert rec["final_step"] == 3
    r0, r1 = ranks
    # The ranks trained on different rows (the data was split, not duplicated) ...
    for step in ("1", "2", "3"):
        assert r0["local_batches"][step] != r1["local_batches"][step]
        assert r0["local_losses"][step] != r1["local_losses"][step]
        # ... the logged loss is the same on both ranks and is the mean of the two halves ...
        assert r0["logged_losses"][step] == r1["logged_losses"][step]
        mean = (r0["local_losses"][step] + r1["local_losses"][step]) / 2
        assert r0["logged_losses"][step] == pytest.approx(mean, abs=1e-5)
    # ... and the trajectory is the single-process one with the same global batch.
    assert sorted(r0["logged_losses"]) == sorted(single["losses"]) == ["1", "2", "3"]
    # fp32 rounding only (the batches differ in layout: one question per rank vs two in one batch);
    # a wrong split, a missed all-reduce or a doubled gradient moves the loss by > 1e-3.
    for step, loss in single["losses"].items():
        assert r0["logged_losses"][step] == pytest.approx(loss, abs=1e-5), step
    assert len(set(single["losses"].values())) == 3  # the weights moved: a trajectory, not a constant


def check_weights(got: dict, want: dict, atol=1e-5):
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=name)


def check_zero3_shards(ranks, single_numel):
    for rec in ranks:
        params = rec["params"]
        assert sum(p["full"] for p in params.values()) == single_numel
        for name, p in params.items():
            assert p["local_tensor"] == 0, f"{name} is not partitioned"  # released outside forward
            assert p["held"] == math.ceil(p["full"] / WORLD), name  # half of it (padded) lives on this rank
        assert sum(p["held"] for p in params.values()) < 0.51 * single_numel


def test_ddp_two_processes(workspace, single_full):
    ranks, run = launch(workspace, "cpu_ddp.yaml", "ddp", **FULL, **CPU_DDP)
    check_ranks(ranks, single_full, "MULTI_CPU", "torch.nn.parallel.distributed.DistributedDataParallel", None)
    assert not any(rec["activation_checkpointing"] for rec in ranks)  # turned off on the command line
    for rec in ranks:  # every rank holds the whole model
        assert all(p["held"] == p["full"] == p["local_tensor"] for p in rec["params"].values())
    check_weights(torch.load(run / "final_weights.pt"), single_full["weights"])


def test_zero2_two_processes(workspace, single_full):
    ranks, run = launch(workspace, "cpu_zero2.yaml", "zero2", **FULL, **CPU_DEEPSPEED)
    check_ranks(ranks, single_full, "DEEPSPEED", "deepspeed.runtime.engine.DeepSpeedEngine", 2)
    for rec in ranks:  # ZeRO-2 shards optimizer states and gradients, not parameters
        assert all(p["held"] == p["full"] == p["local_tensor"] for p in rec["params"].values())
    check_weights(torch.load(run / "final_weights.pt"), single_full["weights"])


@pytest.fixture(scope="module")
def zero3_full(workspace):
    # save_steps=2: a ZeRO-3 checkpoint at step 2 to resume from
    return launch(workspace, "cpu_zero3.yaml", "zero3", **FULL, **CPU_DEEPSPEED, save_strategy="steps", save_steps=2)


def test_zero3_shards_parameters_and_saves_a_model_that_reloads(zero3_full, single_full):
    ranks, run = zero3_full
    check_ranks(ranks, single_full, "DEEPSPEED", "deepspeed.runtime.engine.DeepSpeedEngine", 3)
    check_zero3_shards(ranks, single_full["numel"])
    gathered = torch.load(run / "final_weights.pt")  # gathered from the shards at the end of training
    check_weights(gathered, single_full["weights"])
    model, tokenizer = load_model_and_processor(run / "out")  # the saved folder, as a user loads it
    saved = dict(model.named_parameters())
    assert sum(p.numel() for p in saved.values()) == single_full["numel"]  # all of it, not one shard
    check_weights({n: saved[n].detach() for n in gathered}, gathered, atol=0)
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert (run / "out" / "README.md").is_file()


def test_zero3_resume_continues_the_same_trajectory(workspace, zero3_full):
    ranks, run = zero3_full
    checkpoint = run / "out" / "checkpoint-2"
    assert any(p.name.startswith("global_step2") for p in checkpoint.iterdir())  # DeepSpeed's sharded states
    resumed, rerun = launch(
        workspace, "cpu_zero3.yaml", "zero3_resumed", **FULL, **CPU_DEEPSPEED, resume_from_checkpoint=checkpoint
    )
    for rec in resumed:
        assert rec["start_step"] == 2 and rec["final_step"] == 3
        assert sorted(rec["local_losses"]) == ["3"]  # only step 3 was trained again
        assert rec["logged_losses"]["3"] == pytest.approx(ranks[0]["logged_losses"]["3"], abs=1e-6)
        assert rec["local_losses"]["3"] == pytest.approx(ranks[rec["process_index"]]["local_losses"]["3"], abs=1e-6)
    check_weights(torch.load(rerun / "final_weights.pt"), torch.load(run / "final_weights.pt"), atol=1e-6)


def test_zero3_with_lora(workspace, single_lora):
    ranks, run = launch(workspace, "cpu_zero3.yaml", "zero3_lora", **LORA_CKPT, **CPU_DEEPSPEED)
    check_ranks(ranks, single_lora, "DEEPSPEED", "deepspeed.runtime.engine.DeepSpeedEngine", 3)
    assert all(rec["activation_checkpointing"] for rec in ranks)
    trainable = {n for n, p in ranks[0]["params"].items() if p["trainable"]}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable == set(single_lora["weights"])
    for rec in ranks:
        for name, p in rec["params"].items():
            assert p["local_tensor"] == 0 and p["held"] == math.ceil(p["full"] / WORLD), name
    gathered = torch.load(run / "final_weights.pt")
    check_weights(gathered, single_lora["weights"])
    assert all(gathered[n].abs().sum() > 0 for n in gathered if "lora_B" in n)  # lora_B starts at 0: it trained
    model, _ = load_model_and_processor(run / "out")  # the adapter folder: base model + adapter
    saved = dict(model.named_parameters())
    check_weights({n: saved[n].detach() for n in gathered}, gathered, atol=0)


def test_cpu_ddp_launch_without_use_cpu_is_refused_instead_of_training_twice_alone(workspace):
    """The trap of docs/recipes.md ("On a CPU machine"), through recipes/srpo.py itself: `--multi_gpu`
    on CPU without `use_cpu` would exit 0 after two independent single-process runs."""
    out = workspace / "trap"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = recipe_args(workspace, out, **FULL, per_device_train_batch_size=PER_DEVICE)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "cpu_ddp.yaml"),
        str(REPO / "recipes" / "srpo.py"),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode != 0
    message = "started 2 processes (WORLD_SIZE=2) but they formed a group of 1"
    assert (proc.stdout + proc.stderr).count(message) == 2  # both ranks refuse, before loading anything
    assert "--use_cpu true" in proc.stderr
    assert not out.exists()
