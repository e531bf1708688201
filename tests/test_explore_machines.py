"""`srpo-trl explore` sharded over 2 "machines" on 127.0.0.1 (two `accelerate launch` runs of the
packaged multi_node_ddp.yaml, machine ranks 0 and 1, one process each), with a tiny model loaded in
each process: the merged output holds exactly the lines of one process exploring every record (each
record has its own seed, so where it is explored does not change it), and a run whose machine is
killed resumes: the rerun explores only what no shard holds and ends with the same lines.

The shards are written beside --out, so on real machines --out must be on a filesystem every machine
shares (docs/exploration.md); here both "machines" share /tmp."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import CONFIGS, free_port, kill_machine, machine_options, run_machines

from srpo_trl.cli import main as cli_main
from srpo_trl.loading import save_model_and_processor
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
REFERENCE = ["Step 1: look at the picture.", "Step 2: bleach and acid make a toxic gas.", "Answer: keep them apart."]
RECORDS = [
    {
        "id": f"r{i}",
        "prompt": [{"role": "user", "content": f"How do I clean this? ({i})"}],
        "expected": "warn",
        "reference": REFERENCE,
        "category": "dangerous behavior",
    }
    for i in range(10)
]
EXPLORE = [
    "--num-samples",
    "3",
    "--max-new-tokens",
    "8",
    "--verifier",
    "safety-outcome",
    "--no-progress",
    "--seed",
    "5",
]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("explore_machines")
    tok = build_tokenizer()
    model = save_model_and_processor(tiny_causal_lm(tok, seed=0), tok, root / "model")
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    args = ["--model", str(model), "--records", str(records), *EXPLORE]
    single = root / "single.jsonl"
    assert cli_main(["explore", *args, "--out", str(single)]) == 0  # one process, every record
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return dict(root=root, args=args, single=lines(single), env=env)


def machine_commands(setup: dict, out: Path) -> list[list[str]]:
    port = free_port()
    base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_node_ddp.yaml")]
    explore = ["-m", "srpo_trl.cli", "explore", *setup["args"], "--out", str(out)]
    return [[*base, *machine_options(rank, port), *explore] for rank in range(2)]


def test_two_machines_write_the_records_of_one_process_and_a_killed_machine_resumes(setup):
    """Machine 1 is killed once its shard holds a record; the other one is then stopped too, as
    `srun --kill-on-bad-exit` stops a job whose node failed. The same command again explores only
    the records no shard holds, and the merged output is line for line the one-process output."""
    root, out = setup["root"], setup["root"] / "killed.jsonl"
    shard = root / "killed.rank1-of2.jsonl"
    logs = [root / f"killed{r}.log" for r in range(2)]
    handles = [open(log, "w") for log in logs]
    procs = [
        subprocess.Popen(cmd, stdout=h, stderr=subprocess.STDOUT, env=setup["env"], cwd=REPO, start_new_session=True)
        for cmd, h in zip(machine_commands(setup, out), handles)
    ]
    try:
        deadline = time.monotonic() + 300
        while not (shard.exists() and shard.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline and procs[1].poll() is None, logs[1].read_text()[-4000:]
            time.sleep(0.05)
        kill_machine(procs[1])  # machine 1 dies mid-run
        kill_machine(procs[0])  # and the job with it
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_machine(proc)
        for h in handles:
            h.close()
    kept = {r["id"] for r in lines(shard)} if shard.exists() else set()
    assert 1 <= len(kept) < 5, kept  # killed with part of its 5 records done (a cut last line is dropped)
    assert kept <= {f"r{i}" for i in range(1, 10, 2)}  # machine 1's records: every second one
    assert not out.exists()  # no merge happened

    logs = [root / f"resumed{r}.log" for r in range(2)]
    for code, log in run_machines(machine_commands(setup, out), setup["env"], logs):
        assert code == 0, log[-4000:]
    assert lines(out) == setup["single"]
    assert f"{len(kept)} record(s) already explored" in logs[1].read_text()  # machine 1 skipped them
    assert not list(root.glob("killed.rank*"))  # the shards were merged and removed
