"""Run by tests/test_iterable_datasets.py under `accelerate launch` (2 CPU processes): train and
evaluate SRPO with prefix sharing on streamed (`IterableDataset`) step pairs, then write this
rank's record to $SRPO_PROBE_DIR/rank{N}.json. argv[1]: "shard" (default loaders) or "dispatch"
(asks accelerate for its dispatching loader)."""

import json
import os
import sys

from srpo_trl import SRPOTrainer
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


sys.path.insert(0, os.path.dirname(__file__))
from helpers import srpo_args  # noqa: E402
from iterable_rows import rows_dataset  # noqa: E402


def main():
    mode = sys.argv[1]
    out = os.environ["SRPO_PROBE_DIR"]
    tok = build_tokenizer()
    args = srpo_args(
        os.path.join(out, "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-2,
        seed=3,
        accelerator_config={"dispatch_batches": True} if mode == "dispatch" else None,
    )
    data = rows_dataset()
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok, seed=8),
        args=args,
        train_dataset=data.to_iterable_dataset(),
        eval_dataset=data.to_iterable_dataset(),
        processing_class=tok,
    )
    seen = []
    collate = trainer.data_collator.__call__

    class Recording(type(trainer.data_collator)):
        def __call__(self, examples):
            seen.append([list(ex["prompt_ids"])[:3] + [len(ex["prefix_ids"])] for ex in examples])
            return collate(examples)

    trainer.data_collator.__class__ = Recording
    trainer.train()
    train_rows = list(seen)
    after = trainer.evaluate()
    state = trainer.accelerator.state
    record = {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "prefix_sharing": trainer.prefix_sharing,
        "dispatch_batches": trainer.accelerator.dataloader_config.dispatch_batches,
        "eval_after": after,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "train_rows": train_rows,
        "wrapper": type(trainer.model_wrapped).__name__,
    }
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
