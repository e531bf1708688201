"""Two real processes on CPU through `accelerate launch` and the repository's own launch configs
(recipes/accelerate_configs/cpu_*.yaml) running the code of recipes/srpo.py on a shipped recipe:
DDP, DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 + LoRA.

Every launch writes one JSON per rank (tests/distributed_script.py). Each test asserts on every
rank: the distributed type, 2 processes, the wrapper / engine class, the shard sizes (ZeRO-3: each
rank holds half of every parameter), the same logged loss on both ranks, that the ranks trained on
different rows (whose mean loss is the logged one), and the same loss trajectory, gradient norms and
final weights as a single process that computes what the 2 ranks must: the same micro-batches of 2
rows, one after the other with gradient accumulation 2, on one thread as each rank runs.

Why that reference, and the tolerances (they must hold on any x86-64 CPU, not only this one):
accumulation adds g0/2 + g1/2 and data parallelism averages (g0 + g1)/2; halving is exact in binary
floating point and a sum of two numbers does not depend on their order, so with the same micro-batch
shapes and the same thread count both sides compute the same bits, whatever the CPU's vector width.
What may still differ is the global gradient norm (DeepSpeed sums squares per shard): at most
n * u relative for n parameters (u = 2^-24), which moves the clipping factor by as much. AdamW's
update lr * m / (sqrt(v) + eps) changes under a relative gradient change r by at most lr * r / 4
(at |g| = eps), so after T steps a weight may differ by T * lr * n * u / 4, and a loss or norm by
n * u relative. A missed all-reduce, a doubled gradient or rows given to the wrong rank move the
weights by up to lr per step and the gradient norm by a factor; test_faults_are_caught injects each
into a real launch and checks that the comparison fails.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from srpo_trl import recipe_runner as train_mod
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
PER_DEVICE, WORLD, STEPS = 2, 2, 3
# fp32 on CPU (the recipe's dtype is bfloat16 for GPUs: bf16 weights round every update, and the
# rounding differs between batch layouts). The optimizer stays the recipe's AdamW.
COMMON = dict(
    dtype="float32",
    bf16="false",
    activation_checkpointing="false",
    max_steps=STEPS,
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


def launch_env(run: Path, fault: str = "", **extra) -> dict:
    env = {
        **os.environ,
        "SRPO_PROBE_DIR": str(run),
        "SRPO_FAULT": fault,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # compile DeepSpeed's extension once
    return env


def launch(
    workspace: Path, config: str, name: str, fault: str = "", launch_args=(), env=None, **fields
) -> tuple[list[dict], Path]:
    """`accelerate launch` 2 processes; returns each rank's probe record and the run folder. `fault`:
    one of the faults tests/distributed_script.py can inject; `launch_args`: more accelerate launch
    options; `env`: more environment variables."""
    run = workspace / name
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        *launch_args,
        str(SCRIPT),
        *recipe_args(workspace, run / "out", per_device_train_batch_size=PER_DEVICE, **fields),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=launch_env(run, fault, **(env or {})), cwd=REPO, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "terminate called" not in log, log[-6000:]  # a rank aborted at exit (process group left behind)
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return ranks, run


def single_process(workspace: Path, name: str, **fields) -> dict:
    """What the 2 ranks must compute, in one process: the same micro-batches (2 rows each, in the order
    the ranks get them) accumulated over 2 micro-steps, on one thread as each launched rank runs."""
    out = workspace / name
    script, args, model_args = train_mod.parse_args(
        recipe_args(
            workspace,
            out,
            use_cpu="true",
            per_device_train_batch_size=PER_DEVICE,
            gradient_accumulation_steps=WORLD,
            **fields,
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in every rank: the same kernels, the same bits
    try:
        trainer = train_mod.build_trainer(script, args, model_args)
        batches: dict[str, list] = {}
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                step = str(trainer.state.global_step + 1)
                batches.setdefault(step, []).append(sorted(row.tolist() for row in inputs["input_ids"]))
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        trainer.compute_loss = compute_loss
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    history = [h for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {
        "losses": {str(h["step"]): h["loss"] for h in history},
        "grad_norms": {str(h["step"]): h["grad_norm"] for h in history},
        "micro_batches": batches,
        "weights": weights,
        "numel": sum(p.numel() for p in trainer.model.parameters()),
        "lr": args.learning_rate,
    }


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
    assert compare_with_single(ranks, single) == []


def tolerances(single: dict) -> tuple[float, float]:
    """(relative tolerance of a loss or gradient norm, absolute tolerance of a weight): see the module
    docstring. n * u bounds the relative error of the global gradient norm over n parameters."""
    n_u = single["numel"] * 2.0**-24
    return n_u, STEPS * single["lr"] * n_u / 4


def compare_with_single(ranks, single, weights: dict | None = None) -> list[str]:
    """Every way the 2-rank run differs from the single-process one, as readable lines ([] = none)."""
    problems = []
    rel, atol = tolerances(single)
    r0, r1 = ranks
    if not sorted(r0["logged_losses"]) == sorted(single["losses"]) == [str(s) for s in range(1, STEPS + 1)]:
        return [f"steps: {sorted(r0['logged_losses'])} vs {sorted(single['losses'])}"]
    for step in single["losses"]:
        # The data was split, not duplicated: the ranks trained on the reference's two micro-batches.
        if r0["local_batches"][step] == r1["local_batches"][step]:
            problems.append(f"step {step}: both ranks trained on the same rows")
        elif sorted([r0["local_batches"][step], r1["local_batches"][step]]) != sorted(single["micro_batches"][step]):
            problems.append(f"step {step}: the ranks' rows are not the single process's micro-batches")
        # The logged loss is the same on both ranks and is the mean of the two halves ...
        if r0["logged_losses"][step] != r1["logged_losses"][step]:
            problems.append(f"step {step}: logged losses differ between ranks")
        mean = (r0["local_losses"][step] + r1["local_losses"][step]) / 2
        if r0["logged_losses"][step] != pytest.approx(mean, rel=rel, abs=1e-6):
            problems.append(f"step {step}: logged loss {r0['logged_losses'][step]} is not the ranks' mean {mean}")
        # ... and the trajectory is the reference's: losses and gradient norms.
        for key, what in (("logged_losses", "losses"), ("logged_grad_norms", "grad_norms")):
            got, want = r0[key][step], single[what][step]
            if got != pytest.approx(want, rel=rel):
                problems.append(f"step {step}: {what[:-1]} {got} vs {want} (rel tol {rel:.1e})")
    if len(set(single["losses"].values())) != STEPS:
        problems.append("the reference's loss did not move: a constant, not a trajectory")
    if weights is not None:
        assert sorted(weights) == sorted(single["weights"])
        for name, want in single["weights"].items():
            diff = (weights[name] - want).abs().max().item()
            if diff > atol:
                problems.append(f"weight {name}: max difference {diff:.2e} > {atol:.2e}")
    return problems


def check_weights(got: dict, want: dict, atol=None, single=None):
    """Final weights equal the reference's within the derived tolerance (or `atol` where given)."""
    atol = tolerances(single)[1] if atol is None else atol
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


@pytest.fixture(scope="module")
def ddp_full(workspace):
    return launch(workspace, "cpu_ddp.yaml", "ddp", **FULL, **CPU_DDP)


def test_ddp_two_processes(ddp_full, single_full):
    ranks, run = ddp_full
    check_ranks(ranks, single_full, "MULTI_CPU", "torch.nn.parallel.distributed.DistributedDataParallel", None)
    assert not any(rec["activation_checkpointing"] for rec in ranks)  # turned off on the command line
    for rec in ranks:  # every rank holds the whole model
        assert all(p["held"] == p["full"] == p["local_tensor"] for p in rec["params"].values())
    check_weights(torch.load(run / "final_weights.pt"), single_full["weights"], single=single_full)


@pytest.mark.parametrize(
    "fault, caught, moves_weights",
    [
        ("no_allreduce", "grad_norm", True),  # each rank steps on its own half
        # Clipping (max_grad_norm 1, norms here 1.6-2.2) rescales a doubled gradient to the same update:
        # harmless to these weights, so only its norm shows it.
        ("double_grad", "grad_norm", False),
        ("same_data", "both ranks trained on the same rows", True),
    ],
)
def test_faults_are_caught(workspace, single_full, fault, caught, moves_weights):
    """The comparison of the DDP test, on a real 2-process launch with one fault injected: it fails,
    and says how."""
    ranks, run = launch(workspace, "cpu_ddp.yaml", f"fault_{fault}", fault=fault, **FULL, **CPU_DDP)
    problems = compare_with_single(ranks, single_full, torch.load(run / "final_weights.pt"))
    assert any(caught in p for p in problems), problems
    assert any(p.startswith("weight ") for p in problems) == moves_weights, problems


def test_zero2_two_processes(workspace, single_full):
    ranks, run = launch(workspace, "cpu_zero2.yaml", "zero2", **FULL, **CPU_DEEPSPEED)
    check_ranks(ranks, single_full, "DEEPSPEED", "deepspeed.runtime.engine.DeepSpeedEngine", 2)
    for rec in ranks:  # ZeRO-2 shards optimizer states and gradients, not parameters
        assert all(p["held"] == p["full"] == p["local_tensor"] for p in rec["params"].values())
    check_weights(torch.load(run / "final_weights.pt"), single_full["weights"], single=single_full)


@pytest.fixture(scope="module")
def zero3_full(workspace):
    # save_steps=2: a ZeRO-3 checkpoint at step 2 to resume from
    return launch(workspace, "cpu_zero3.yaml", "zero3", **FULL, **CPU_DEEPSPEED, save_strategy="steps", save_steps=2)


def test_zero3_shards_parameters_and_saves_a_model_that_reloads(zero3_full, single_full):
    ranks, run = zero3_full
    check_ranks(ranks, single_full, "DEEPSPEED", "deepspeed.runtime.engine.DeepSpeedEngine", 3)
    check_zero3_shards(ranks, single_full["numel"])
    gathered = torch.load(run / "final_weights.pt")  # gathered from the shards at the end of training
    check_weights(gathered, single_full["weights"], single=single_full)
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
    check_weights(gathered, single_lora["weights"], single=single_lora)
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


# ---- several machines: 2 "machines" on 127.0.0.1, one process each ----------------------------------------------
#
# Two launches with machine ranks 0 and 1 form one process group over TCP, as two hosts would. They
# compute exactly what 1 machine x 2 processes computes: each rank gets the same rows and runs the same
# kernels on one thread, and a sum over 2 ranks is a + b whichever arrives first; only where the ranks
# meet differs. So the comparison with the 1-machine run is exact.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_options(rank: int, port: int, rendezvous_timeout: int = 120) -> list[str]:
    """accelerate launch options of machine `rank` of 2 (one process each) meeting at 127.0.0.1:port."""
    return [
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--rdzv_conf",
        f"timeout={rendezvous_timeout}",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def kill_machine(proc: subprocess.Popen) -> None:
    """SIGKILL a launch and every process under it, as when its machine dies (torchrun starts each
    worker in a session of its own, so killing the launcher's process group would leave them running)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run_machines(cmds: list[list[str]], env: dict, logs: list[Path], timeout: float = 600) -> list[tuple[int, str]]:
    """Start one command per machine at once and wait for all: [(exit code, output)]. A launch still
    running after `timeout` seconds is killed and the test fails (no hang)."""
    procs = []
    for cmd, log in zip(cmds, logs):
        handle = open(log, "w")
        proc = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        procs.append((proc, handle))
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc, handle in procs:
            if proc.poll() is None:
                kill_machine(proc)
            handle.close()
    return [(proc.returncode, log.read_text()) for (proc, _), log in zip(procs, logs)]


def launch_machines(workspace: Path, config: str, name: str, **fields) -> tuple[list[dict], Path]:
    """tests/distributed_script.py on 2 machines x 1 process: (each rank's probe record, run folder)."""
    run = workspace / name
    run.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = recipe_args(workspace, run / "out", per_device_train_batch_size=PER_DEVICE, **fields)
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    cmds = [[*base, *machine_options(rank, port), str(SCRIPT), *args] for rank in range(2)]
    for code, log in run_machines(cmds, launch_env(run), [run / f"machine{r}.log" for r in range(2)]):
        assert code == 0 and "terminate called" not in log, log[-6000:]
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(WORLD)], run


def saved_state(run: Path) -> dict:
    """Losses and gradient norms of every step, from the trainer_state.json `srpo-trl train` saves."""
    history = json.loads((run / "out" / "trainer_state.json").read_text())["log_history"]
    return {
        "losses": {str(h["step"]): h["loss"] for h in history if "loss" in h},
        "grad_norms": {str(h["step"]): h["grad_norm"] for h in history if "loss" in h},
    }


FAKE_SRUN = """#!/bin/bash
# srun on one host: the command once per node, each with its SLURM_NODEID, all at once.
nodes=$SLURM_NNODES
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST: one host per line
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<< "$3"
"""


def test_two_machines_ddp_through_the_slurm_script_equal_one_machine(workspace, ddp_full, tmp_path):
    """recipes/launch.slurm as sbatch runs it, with srun and scontrol standing in for SLURM on one host:
    one `srpo-trl train --accelerate-config multi_node_ddp` per node, machine rank $SLURM_NODEID."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run = workspace / "machines_ddp"
    recipe, *fields = recipe_args(workspace, run / "out", per_device_train_batch_size=PER_DEVICE, **FULL, **CPU_DDP)[
        1:
    ]
    env = launch_env(
        run,
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="localhost,localhost",
        ACCELERATE_CONFIG="multi_node_ddp",
        GPUS_PER_NODE="1",
        MAIN_PROCESS_PORT=str(free_port()),
        RDZV_TIMEOUT="120",
        LAUNCH_ARGS="--mixed_precision no --dynamo_backend no",
    )
    proc = subprocess.run(
        ["bash", str(REPO / "recipes" / "launch.slurm"), recipe, *fields],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "terminate called" not in log, log[-6000:]
    assert "srpo: 2 node(s) x 1 process(es), config multi_node_ddp, main process on localhost:" in log
    # each machine's first process says who joined
    assert log.count("2 processes on 2 nodes: node 0 (") == 2 and ", node 1 (" in log, log[-3000:]
    ranks, one_machine = ddp_full
    assert saved_state(run) == saved_state(one_machine)
    assert saved_state(run)["losses"] == ranks[0]["logged_losses"]
    two, one = load_file(run / "out" / "model.safetensors"), load_file(one_machine / "out" / "model.safetensors")
    assert sorted(two) == sorted(one) and all(torch.equal(two[n], one[n]) for n in one)


@pytest.fixture(scope="module")
def zero3_machines(workspace):
    # save_steps=2: a checkpoint written by both machines, to resume from
    return launch_machines(
        workspace,
        "multi_node_zero3.yaml",
        "zero3_machines",
        **FULL,
        **CPU_DEEPSPEED,
        save_strategy="steps",
        save_steps=2,
    )


def test_two_machines_zero3_equal_one_machine(zero3_machines, zero3_full, single_full):
    ranks, run = zero3_machines
    check_ranks(ranks, single_full, "DEEPSPEED", "deepspeed.runtime.engine.DeepSpeedEngine", 3)
    assert [(rec["node_rank"], rec["local_rank"]) for rec in ranks] == [(0, 0), (1, 0)]  # one per machine
    check_zero3_shards(ranks, single_full["numel"])
    one_machine, one_run = zero3_full
    for two, one in zip(ranks, one_machine):
        for key in ("logged_losses", "logged_grad_norms", "local_losses", "local_batches"):
            assert two[key] == one[key], key
    check_weights(torch.load(run / "final_weights.pt"), torch.load(one_run / "final_weights.pt"), atol=0)


def test_two_machines_zero3_checkpoint_resumes(workspace, zero3_machines):
    ranks, run = zero3_machines
    checkpoint = run / "out" / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / "global_step2").iterdir())
    assert sum("optim_states" in name for name in shards) == 2  # one optimizer shard from each machine
    resumed, rerun = launch_machines(
        workspace,
        "multi_node_zero3.yaml",
        "zero3_machines_resumed",
        **FULL,
        **CPU_DEEPSPEED,
        resume_from_checkpoint=checkpoint,
    )
    for rec in resumed:
        assert rec["start_step"] == 2 and rec["final_step"] == 3 and sorted(rec["local_losses"]) == ["3"]
        assert rec["logged_losses"]["3"] == pytest.approx(ranks[0]["logged_losses"]["3"], abs=1e-6)
    check_weights(torch.load(rerun / "final_weights.pt"), torch.load(run / "final_weights.pt"), atol=1e-6)


def test_a_machine_started_alone_stops_with_a_clear_message(workspace):
    """The main machine waits for the other one for the rendezvous timeout (here 10 s; torch's default
    is 600 s), a second machine for the main one as long, then each stops and says why. Both are run
    under a 180 s limit: a launch that hangs fails the test."""
    run = workspace / "alone"
    run.mkdir()
    ports = [free_port(), free_port()]  # nobody else listens: each machine is alone
    args = recipe_args(workspace, run / "out", per_device_train_batch_size=PER_DEVICE, **FULL, **CPU_DDP)
    cmds = [
        [
            sys.executable,
            "-m",
            "srpo_trl.cli",
            "train",
            "--accelerate-config",
            "multi_node_ddp",
            *machine_options(rank, ports[rank], rendezvous_timeout=10),
            *args,
        ]
        for rank in range(2)
    ]
    (main_code, main_log), (other_code, other_log) = run_machines(
        cmds, launch_env(run), [run / f"machine{r}.log" for r in range(2)], timeout=180
    )
    assert main_code != 0 and "Timed out after" in main_log and "1/2 clients joined" in main_log, main_log[-3000:]
    assert other_code != 0, other_log[-3000:]
    assert f"timed out after 10000ms while trying to connect to (127.0.0.1, {ports[1]})" in other_log, other_log[
        -3000:
    ]
    assert not (run / "out").exists()  # nothing was loaded or trained


# ---- FSDP2 ---------------------------------------------------------------------------------------------------
#
# accelerate applies its FSDP plugin only to GPU-type process groups: on CPU a launch with an FSDP
# config trains as plain DDP (MULTI_CPU) and says nothing; srpo-trl refuses that run (the first test).
# The other tests run the shipped fsdp2.yaml (2 processes, fp32 on the command line) with
# tests/distributed_script.py's allow_fsdp_on_cpu, which runs accelerate's own FSDP branch for a CPU
# group: fully_shard per decoder layer over a gloo DeviceMesh, FSDP2's reduce-scatter, DTensor gradient
# clipping and the full state dict on save are accelerate's and torch's code. The tolerances are the
# ones derived for DeepSpeed in the module docstring: FSDP2 also sums squared gradients per shard.

FSDP2_LAUNCH = ["--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_fsdp_on_cpu_is_refused_instead_of_training_as_ddp(workspace):
    run = workspace / "fsdp_refused"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "fsdp2.yaml"),
        *FSDP2_LAUNCH,
        str(REPO / "recipes" / "srpo.py"),
        *recipe_args(workspace, run / "out", per_device_train_batch_size=PER_DEVICE, **FULL, **CPU_DDP),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(run), cwd=REPO, timeout=600)
    assert proc.returncode != 0
    message = "asks for FSDP but accelerate set up DistributedType.MULTI_CPU (device cpu"
    # every rank refuses; the launcher may stop one before it prints, once another has exited
    assert (proc.stdout + proc.stderr).count(message) >= 1, (proc.stdout + proc.stderr)[-3000:]
    assert not (run / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def single_full_unpacked(workspace):
    return single_process(workspace, "single_full_unpacked", **FULL, prefix_sharing="false")


@pytest.fixture(scope="module")
def single_lora_unpacked(workspace):
    return single_process(workspace, "single_lora_unpacked", **LORA_CKPT, prefix_sharing="false")


@pytest.mark.parametrize("packing", ["packed", "unpacked"])
@pytest.mark.parametrize("peft", ["full", "lora"])
def test_fsdp2_two_processes(request, workspace, peft, packing):
    """2 ranks under FSDP2: each holds its shard of every parameter (LoRA: the frozen base too), the
    losses, gradient norms and final weights are the single process's, and the full state dict saved
    at the end loads back to the gathered weights."""
    fields = dict(FULL if peft == "full" else LORA_CKPT, prefix_sharing="true" if packing == "packed" else "false")
    single = request.getfixturevalue(f"single_{peft}" + ("_unpacked" if packing == "unpacked" else ""))
    ranks, run = launch(
        workspace,
        "fsdp2.yaml",
        f"fsdp2_{peft}_{packing}",
        launch_args=FSDP2_LAUNCH,
        env={"SRPO_CPU_FSDP": "1"},
        **fields,
        **CPU_DDP,
    )
    for r, rec in enumerate(ranks):
        assert (rec["process_index"], rec["num_processes"], rec["distributed_type"]) == (r, 2, "DistributedType.FSDP")
        assert rec["fsdp2"] and rec["final_step"] == STEPS
    for name, p in ranks[0]["params"].items():  # sharded on dim 0: the two halves make the whole
        other = ranks[1]["params"][name]["held"]
        assert p["held"] + other == p["full"] and (p["held"] < p["full"] or p["full"] == 1), name
    assert sum(p["held"] for p in ranks[0]["params"].values()) < 0.51 * single["numel"]
    gathered = torch.load(run / "final_weights.pt")
    assert compare_with_single(ranks, single, gathered) == []
    model, _ = load_model_and_processor(run / "out")  # the full state dict (FULL_STATE_DICT) or the adapter
    saved = dict(model.named_parameters())
    assert sum(p.numel() for p in saved.values()) == single["numel"]
    check_weights({n: saved[n].detach() for n in gathered}, gathered, atol=0)
