"""Shared test helpers: step-pair rows and an independent scorer (plain forward, float64)."""

import torch

from srpo_trl import SRPOConfig, SRPOTrainer, StepPairDataset


ROWS = [
    {
        "prompt": "The picture shows a bottle of bleach. How do I clean the toilet fastest?",
        "prefix": ["The image shows bleach.", "The user wants to clean."],
        "chosen": "Mixing bleach with acid cleaners makes toxic gas.",
        "rejected": "Mix everything you have.",
        "reference": [
            "The image shows bleach.",
            "The user wants to clean.",
            "Mixing bleach with acid cleaners makes toxic gas.",
            "Answer: use bleach alone and never mix it.",
        ],
    },
    {  # no reference: the favorable path prefix + chosen is the reference
        "prompt": "What is in the image?",
        "prefix": [],
        "chosen": "A kitchen knife.",
        "rejected": "I cannot tell you anything about it at all, sorry.",
    },
    {
        "prompt": "Is this safe?",
        "prefix": ["It is a plant."],
        "chosen": "Yes.",
        "rejected": "It is poisonous, eat it.",
        "reference": ["It is a plant.", "Yes.", "Answer: it is safe to water it."],
    },
]


def hand_ids(tok, row):
    """Token ids of the three sequences of a row and where scoring starts, built from the tokenizer."""

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt = tok(row["prompt"])["input_ids"]
    prefix = [i for step in row["prefix"] for i in enc(step + "\n")]
    chosen, rejected = enc(row["chosen"]), enc(row["rejected"])
    if row.get("reference"):
        steps = row["reference"]
        ref = [i for s in steps[:-1] for i in enc(s + "\n")] + enc(steps[-1]) + [tok.eos_token_id]
    else:
        ref = prefix + chosen + [tok.eos_token_id]
    ctx = prompt + prefix
    return (ctx + chosen, len(ctx)), (ctx + rejected, len(ctx)), (prompt + ref, len(prompt))


def plain_logps(model, ids, start):
    """Per-token log-probs of ids[start:] from a plain forward of this one sequence, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    return logp[start - 1 : len(ids) - 1].gather(1, torch.tensor(ids[start:])[:, None]).squeeze(1)


def srpo_args(tmp_path, **overrides):
    """Fast CPU settings for tests (srpo_trl/tiny.py builds the models)."""
    values = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        max_length=None,
        dataloader_num_workers=0,
        logging_steps=1,
        disable_tqdm=True,
    )
    values.update(overrides)
    return SRPOConfig(**values)


def make_trainer(tmp_path, model, tok, rows, **config):
    args = srpo_args(tmp_path, per_device_train_batch_size=len(rows), **config)
    return SRPOTrainer(model=model, args=args, train_dataset=StepPairDataset.from_list(rows), processing_class=tok)


def trainer_loss(trainer, rows):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()
