"""Launched by tests/test_distributed.py with `accelerate launch`: the code of recipes/srpo.py
(srpo_trl.recipe_runner: parse the recipe, build the trainer, train and save) plus a probe that writes what
each rank saw to $SRPO_PROBE_DIR/rank<N>.json:

- the distributed type, number of processes and this process's index;
- the class of the wrapped model (DistributedDataParallel / DeepSpeedEngine) and the ZeRO stage;
- per parameter: full size and the size this rank holds (ZeRO-3 shards), and the local tensor size;
- the loss and gradient norm of every logged step (all-reduced by the Trainer) and this rank's own
  micro-batch loss;
- at the end, rank 0 writes the trainable parameters gathered from the shards to final_weights.pt.

SRPO_FAULT=<name> injects one of the faults the test's comparison must catch (tests/test_distributed.py
shows that it does): `no_allreduce` (each rank keeps its own gradient), `double_grad` (the averaged
gradient counted twice) or `same_data` (every rank trains on the same rows).

Run by hand (2 processes, CPU):
    SRPO_PROBE_DIR=/tmp/probe accelerate launch --config_file recipes/accelerate_configs/cpu_zero3.yaml \
        tests/distributed_script.py --config RECIPE.yaml --ddp_backend gloo --bf16 false ...
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from srpo_trl.recipe_runner import build_trainer, finish, parse_args, train_and_save


def _gathered(params):
    """Context in which ZeRO-3 parameters hold their full values (a no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def inject_fault(trainer, fault: str) -> None:
    """Break the distributed run the way a real bug would (for the test that the comparison catches it)."""
    if fault == "no_allreduce":  # DDP's gradient all-reduce skipped: each rank steps on its own half
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            with trainer.model_wrapped.no_sync():
                return original(model, inputs, num_items_in_batch)

        trainer.training_step = training_step
    elif fault == "double_grad":  # e.g. a sum over ranks where the mean was due
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            loss = original(model, inputs, num_items_in_batch)
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(2)
            return loss

        trainer.training_step = training_step
    elif fault == "same_data":  # the dataloader not sharded: every rank iterates the same batches
        original = trainer.get_train_dataloader

        def get_train_dataloader():
            prepare = trainer.accelerator.prepare
            trainer.accelerator.prepare = lambda loader, *rest: loader  # no per-rank shard
            try:
                return original()
            finally:
                trainer.accelerator.prepare = prepare

        trainer.get_train_dataloader = get_train_dataloader
    elif fault:
        raise ValueError(f"unknown SRPO_FAULT {fault!r}")


class Probe(TrainerCallback):
    def __init__(self, trainer, out: Path):
        self.trainer, self.out = trainer, out
        self.record = {"local_losses": {}, "logged_losses": {}, "logged_grad_norms": {}, "local_batches": {}}
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            result = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                loss = result[0] if return_outputs else result
                step = str(trainer.state.global_step + 1)
                self.record["local_losses"][step] = loss.detach().item()
                # what this rank trained on: the token ids of its micro-batch (packed or not)
                self.record["local_batches"][step] = sorted(row.tolist() for row in inputs["input_ids"])
            return result

        trainer.compute_loss = compute_loss

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        wrapped = trainer.model_wrapped
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        params = {}
        for name, p in trainer.model.named_parameters():
            params[name] = {
                "full": int(getattr(p, "ds_numel", p.numel())),
                "held": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel()),
                "local_tensor": int(p.numel()),
                "trainable": bool(p.requires_grad),
            }
        self.record.update(
            distributed_type=str(trainer.accelerator.distributed_type),
            num_processes=trainer.accelerator.num_processes,
            process_index=trainer.accelerator.process_index,
            wrapper=f"{type(wrapped).__module__}.{type(wrapped).__name__}",
            zero_stage=wrapped.zero_optimization_stage() if hasattr(wrapped, "zero_optimization_stage") else None,
            params=params,
            start_step=state.global_step,
            activation_checkpointing=bool(getattr(base, "is_gradient_checkpointing", False)),
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.record["logged_losses"][str(state.global_step)] = logs["loss"]
            self.record["logged_grad_norms"][str(state.global_step)] = logs.get("grad_norm")

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        with _gathered([p for _, p in named]):
            weights = {n: p.detach().clone().cpu() for n, p in named}
        if trainer.accelerator.is_main_process:
            torch.save(weights, self.out / "final_weights.pt")
        self.record["final_step"] = state.global_step

    def write(self):
        rank = self.record.get("process_index", 0)
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.record, indent=1))


def main(argv=None) -> int:
    out = Path(os.environ["SRPO_PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    script_args, training_args, model_args = parse_args(argv)
    trainer = build_trainer(script_args, training_args, model_args)
    inject_fault(trainer, os.environ.get("SRPO_FAULT", ""))
    probe = Probe(trainer, out)
    trainer.add_callback(probe)
    train_and_save(trainer, script_args, training_args)
    probe.write()
    finish(trainer)  # waits for every rank, then destroys the process group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # nothing may be left for interpreter exit to tear down
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
