"""Streamed (`IterableDataset`) training and evaluation with prefix sharing (issue 16).

accelerate dispatches batches of an IterableDataset by default: the main process loads a batch and
every tensor of it is cut to the batch size, which breaks packed batches (their tensors are
per-question, per-position or per-token). SRPOTrainer makes each process load and pack its own
batches; results equal the map-style ones, in one process and in two (accelerate launch, CPU DDP).
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import srpo_args
from iterable_rows import rows_dataset

from srpo_trl import SRPOTrainer
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


REPO = Path(__file__).resolve().parents[1]


def _trainer(tmp_path, train, evaluation, **config):
    tok = build_tokenizer()
    args = srpo_args(
        tmp_path,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        seed=3,
        **config,
    )
    return SRPOTrainer(
        model=tiny_causal_lm(tok, seed=8),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tok,
    )


@pytest.mark.parametrize("dispatch", [None, True], ids=["default", "dispatch_requested"])
def test_streamed_eval_and_training_equal_map_style(tmp_path, caplog, dispatch):
    data = rows_dataset()
    config = {"accelerator_config": {"dispatch_batches": dispatch}} if dispatch is not None else {}
    with caplog.at_level(logging.WARNING, logger="srpo_trl"):
        streamed = _trainer(tmp_path / "s", data, data.to_iterable_dataset(), **config)
    assert streamed.prefix_sharing and streamed.accelerator.dataloader_config.dispatch_batches is False
    assert ("dispatch_batches=True is turned off" in caplog.text) is bool(dispatch)
    mapped = _trainer(tmp_path / "m", data, data)
    got, want = streamed.evaluate(), mapped.evaluate()
    for key in ("eval_loss", "eval_logps/chosen", "eval_rewards/margins", "eval_entropy", "eval_accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key

    stream_train = _trainer(tmp_path / "t", data.to_iterable_dataset(), data.to_iterable_dataset(), **config)
    stream_train.train()
    map_train = _trainer(tmp_path / "u", data, None, group_by_question=False, train_sampling_strategy="sequential")
    map_train.train()  # rows in order, as the stream gives them: same batches, same updates
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (stream_train, map_train)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)


def _single_process_reference(tmp_path):
    """What two processes of 2 rows must reproduce: one process with the global batch of 4."""
    data = rows_dataset()
    tok = build_tokenizer()
    args = srpo_args(
        tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=2, max_steps=2, learning_rate=1e-2, seed=3
    )
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok, seed=8),
        args=args,
        train_dataset=data.to_iterable_dataset(),
        eval_dataset=data,
        processing_class=tok,
    )
    trainer.train()
    return trainer.evaluate(), [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard", "dispatch"])
def test_two_processes_stream_train_and_eval(tmp_path, mode):
    run = tmp_path / mode
    env = {
        **os.environ,
        "SRPO_PROBE_DIR": str(run),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes" / "accelerate_configs" / "cpu_ddp.yaml"),
        str(REPO / "tests" / "iterable_script.py"),
        mode,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
    after, losses = _single_process_reference(tmp_path / "single")
    for r, rec in enumerate(ranks):
        assert rec["process_index"] == r and rec["num_processes"] == 2
        assert rec["distributed_type"] == "DistributedType.MULTI_CPU"  # DDP on CPU (use_cpu)
        assert rec["prefix_sharing"] and rec["dispatch_batches"] is False
        assert rec["wrapper"] == "DistributedDataParallel"
        assert [len(batch) for batch in rec["train_rows"]] == [2, 2]
        # Each process trained on its own 2 rows of the global batch of 4: the single-process trajectory.
        assert rec["losses"] == pytest.approx(losses, abs=1e-5)
        # Every row evaluated once across the two processes: the single-process metrics.
        for key in ("eval_loss", "eval_logps/chosen", "eval_mean_logps/rejected", "eval_accuracy"):
            assert rec["eval_after"][key] == pytest.approx(after[key], abs=1e-5), key
    assert ranks[0]["train_rows"] != ranks[1]["train_rows"]  # the stream was split, not duplicated
