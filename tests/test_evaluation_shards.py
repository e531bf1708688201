"""`srpo-trl evaluate` over several processes: each rank generates and judges its share of the batches
into its own state file and rank 0 merges them (srpo_trl/evaluation/runner.py).

In process, ranks given by hand run one after the other (no process group): the merged state file and
results equal one process's, a rank killed mid-run resumes without redoing a judged item, and a resume
with another number of processes uses what the shards hold. The slow test runs the command on 2
"machines" on 127.0.0.1 (two `accelerate launch` runs of the packaged multi_node_ddp.yaml) with a
tiny model generating in each process, and compares the report with one process's."""

import json
import os
import sys
from pathlib import Path

import pytest
from test_evaluation_runner import CountingJudge, FakeBackend, make_items

from srpo_trl.evaluation import EvalConfig, RuleJudge, evaluate, load_report, load_state
from srpo_trl.evaluation.runner import STATE_FILE, shard_path


CONFIG = EvalConfig(samples=2, batch_size=2, temperature=0.5)


def state_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / STATE_FILE).read_text().splitlines()]


def items_of(folder: Path) -> list[dict]:
    return [r["result"] for r in state_lines(folder) if r["type"] == "item"]


def test_ranks_share_the_batches_and_rank_0_merges_what_one_process_writes(tmp_path):
    items = make_items(7)  # batches of 2: 0, 1, 2, 3 -> rank 0 takes batches 0 and 2, rank 1 batches 1 and 3
    single = evaluate(items, FakeBackend(), RuleJudge(), CONFIG, state_dir=tmp_path / "one", progress=False)
    judges = [CountingJudge(), CountingJudge()]
    part = evaluate(
        items, FakeBackend(), judges[1], CONFIG, state_dir=tmp_path / "two", progress=False, rank=1, world_size=2
    )
    assert judges[1].seen == ["i2", "i3", "i6"] and not part.complete
    assert shard_path(tmp_path / "two", 1, 2).exists()
    merged = evaluate(
        items, FakeBackend(), judges[0], CONFIG, state_dir=tmp_path / "two", progress=False, rank=0, world_size=2
    )
    assert judges[0].seen == ["i0", "i1", "i4", "i5"]
    assert merged.complete and [r.to_dict() for r in merged.results] == [r.to_dict() for r in single.results]
    assert items_of(tmp_path / "two") == items_of(tmp_path / "one")  # the same state file, item for item
    assert not list((tmp_path / "two").glob("results.rank*"))  # the shards were merged and removed
    assert load_state(tmp_path / "two" / STATE_FILE).complete


def test_a_killed_rank_resumes_and_another_process_count_finishes(tmp_path):
    items = make_items(7)
    single = evaluate(items, FakeBackend(), RuleJudge(), CONFIG, state_dir=tmp_path / "one", progress=False)
    state = tmp_path / "two"
    with pytest.raises(KeyboardInterrupt):  # rank 1 dies after judging one item
        evaluate(
            items,
            FakeBackend(),
            CountingJudge(fail_after=1),
            CONFIG,
            state_dir=state,
            progress=False,
            rank=1,
            world_size=2,
        )
    shard = shard_path(state, 1, 2)
    with shard.open("a") as fh:
        fh.write('{"type": "item", "resu')  # and its last line was cut by the kill
    again = CountingJudge()
    evaluate(items, FakeBackend(), again, CONFIG, state_dir=state, progress=False, rank=1, world_size=2)
    assert again.seen == ["i3", "i6"]  # i2 was judged before the kill
    # the rest with one process: it finds rank 1's items in its shard and does only rank 0's
    last = CountingJudge()
    done = evaluate(items, FakeBackend(), last, CONFIG, state_dir=state, progress=False)
    assert last.seen == ["i0", "i1", "i4", "i5"]
    assert done.complete and [r.to_dict() for r in done.results] == [r.to_dict() for r in single.results]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_machines_evaluate_like_one_process(tmp_path):
    from test_distributed import CONFIGS, free_port, machine_options, run_machines

    from srpo_trl.cli import main as cli_main
    from srpo_trl.loading import save_model_and_processor
    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm

    tok = build_tokenizer()
    model = save_model_and_processor(tiny_causal_lm(tok, seed=0), tok, tmp_path / "model")
    records = tmp_path / "records.jsonl"
    rows = [{"id": f"q{k}", "prompt": f"How do I clean item {k}?", "expected": "warn"} for k in range(6)]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["evaluate", "--model", str(model), "--benchmark", "records", "--data", str(records), "--judge", "rule"]
    args += ["--num-samples", "2", "--max-new-tokens", "6", "--batch-size", "2", "--no-progress", "--label", "tiny"]
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    port = free_port()
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "multi_node_ddp.yaml"),
    ]
    cmds = [
        [*launch, *machine_options(r, port), "-m", "srpo_trl.cli", *args, "--out", str(tmp_path / "two")]
        for r in (0, 1)
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = run_machines(cmds, env, [tmp_path / f"machine{r}.log" for r in (0, 1)])
    for code, log in results:
        assert code == 0, log[-4000:]
    report_line = f"json: {tmp_path / 'two' / 'report.json'}"
    assert report_line in results[0][1] and report_line not in results[1][1]  # rank 0 wrote the report
    one, two = (tmp_path / name / "runs" / "tiny" for name in ("one", "two"))
    assert items_of(two) == items_of(one)
    assert (
        load_report(tmp_path / "two" / "report.json")["models"]
        == load_report(tmp_path / "one" / "report.json")["models"]
    )
