"""StepPairDataset.from_step_dpo / from_stepwise_supervision on rows written in each format
(docs/step_formats.md): every field lands where the mapping says, the texts equal the source
format's texts, and every row that gives no pair is counted."""

import json
import random

import pytest
from datasets import Dataset, DatasetDict
from helpers import srpo_args

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.rows import RowError, continuation_prefix_text, render_row
from srpo_trl.step_formats import split_steps
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


# Step-DPO rows as in xinlai/Math-Step-DPO-10K: the prefix text ends with the header of the step the
# pair branches at ("Step 2:"), `chosen` / `rejected` are that step's rest, `full_chosen` goes on to
# the answer (data_pipeline/generate_dataset.py of dvlab-research/Step-DPO).
STEP_DPO = [
    {
        "dataset": "GSM_Rephrased",
        "prompt": "Tom has 3 apples and buys 2 more. How many apples does he have?",
        "initial_reason_steps": "Let's think step by step.\nStep 1: Tom starts with 3 apples.\nStep 2:",
        "chosen": " He buys 2 more, so he has $3 + 2 = 5$ apples.",
        "rejected": " He buys 2 more, so he has $3 \\times 2 = 6$ apples.",
        "full_chosen": " He buys 2 more, so he has $3 + 2 = 5$ apples.\nStep 3: The answer is $\\boxed{5}$.",
        "full_rejected": " He buys 2 more, so he has $3 \\times 2 = 6$ apples.\nStep 3: The answer is 6.",
        "answer": "5",
    },
    {  # branches at the first step; a multi-line step in the prefix of another row below
        "dataset": "MATH_Rephrased",
        "prompt": "What is $2^{10}$?",
        "initial_reason_steps": "Let's think step by step. \nStep 1:",
        "chosen": " $2^{10} = 1024$.",
        "rejected": " $2^{10} = 20$.",
        "full_chosen": " $2^{10} = 1024$.\nThe answer is: 1024",
        "full_rejected": " $2^{10} = 20$.",
        "answer": "1024",
    },
    {  # no rejected step (Math-Step-DPO-10K has such rows): no pair, counted
        "dataset": "MATH_Rephrased",
        "prompt": "What is $1 + 1$?",
        "initial_reason_steps": "Let's think step by step.\nStep 1:",
        "chosen": " $1 + 1 = 2$.",
        "rejected": "",
        "full_chosen": " $1 + 1 = 2$.",
        "full_rejected": "",
        "answer": "2",
    },
    {  # the same step twice: no pair, counted
        "dataset": "GSM_Rephrased",
        "prompt": "What is $3 - 1$?",
        "initial_reason_steps": "",
        "chosen": "Step 1: $3 - 1 = 2$.",
        "rejected": "Step 1: $3 - 1 = 2$.",
        "full_chosen": "Step 1: $3 - 1 = 2$.",
        "full_rejected": "Step 1: $3 - 1 = 2$.",
        "answer": "2",
    },
    {  # a step with a blank line inside, and a pair that starts a new step (no open header)
        "dataset": "MATH_Rephrased",
        "prompt": "Simplify $x + x$.",
        "initial_reason_steps": "Let's think step by step.\nStep 1: Add like terms.\n\nBoth are $x$.\n",
        "chosen": "Step 2: $x + x = 2x$.",
        "rejected": "Step 2: $x + x = x^2$.",
        "full_chosen": "Step 2: $x + x = 2x$.\nStep 3: The answer is $2x$.",
        "full_rejected": "Step 2: $x + x = x^2$.",
        "answer": "2x",
    },
]


def _jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_step_dpo_rows_map_field_by_field(caplog):
    pairs = StepPairDataset.from_step_dpo(STEP_DPO)
    assert len(pairs) == 3
    first, second, third = (pairs[i] for i in range(3))
    assert first["prompt"] == [{"role": "user", "content": STEP_DPO[0]["prompt"]}]
    assert first["prefix"] == ["Let's think step by step.", "Step 1: Tom starts with 3 apples."]
    assert first["chosen"] == "Step 2: He buys 2 more, so he has $3 + 2 = 5$ apples."
    assert first["rejected"] == "Step 2: He buys 2 more, so he has $3 \\times 2 = 6$ apples."
    assert first["reference"] == [
        "Let's think step by step.",
        "Step 1: Tom starts with 3 apples.",
        "Step 2: He buys 2 more, so he has $3 + 2 = 5$ apples.",
        "Step 3: The answer is $\\boxed{5}$.",
    ]
    assert first["branch_point"] == 1  # one reasoning step precedes the branch; the preamble is not a step
    assert second["prefix"] == ["Let's think step by step. "] and second["branch_point"] == 0
    assert second["chosen"] == "Step 1: $2^{10} = 1024$."
    # "The answer is: ..." opens no "Step N:", so it stays in the step it ends
    assert second["reference"] == ["Let's think step by step. ", "Step 1: $2^{10} = 1024$.\nThe answer is: 1024"]
    assert third["prefix"] == ["Let's think step by step.", "Step 1: Add like terms.\n\nBoth are $x$."]
    assert third["chosen"] == "Step 2: $x + x = 2x$." and third["branch_point"] == 1
    assert pairs.report == {
        "rows": 5,
        "pairs": 3,
        "rows_without_rejected": 1,
        "rows_identical": 1,
        "pairs_with_reference": 3,
    }
    assert "rows_without_rejected=1" in caplog.text


def test_step_dpo_texts_are_step_dpos_texts():
    """Prefix + continuation is Step-DPO's `initial_reason_steps + chosen` character for character, the
    reference path is `initial_reason_steps + full_chosen`, and the prompt is what Step-DPO's qwen2-boxed
    template writes (the chat template with its instruction)."""
    tok = build_tokenizer()
    instruction = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    pairs = StepPairDataset.from_step_dpo(STEP_DPO, prompt_template=instruction)
    kept = [r for r in STEP_DPO if r["rejected"] and r["chosen"] != r["rejected"]]
    for row, source in zip(pairs, kept):
        prefix = continuation_prefix_text(row["prefix"], "\n")
        assert prefix + row["chosen"] == source["initial_reason_steps"] + source["chosen"]
        assert prefix + row["rejected"] == source["initial_reason_steps"] + source["rejected"]
        assert "\n".join(row["reference"]) == source["initial_reason_steps"] + source["full_chosen"]
        question = instruction.format(prompt=source["prompt"])
        expected = tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        assert render_row(tok, row)["prompt"] == expected


def test_step_dpo_from_a_file_a_dataset_and_a_list_agree(tmp_path):
    from_list = StepPairDataset.from_step_dpo(STEP_DPO)
    from_file = StepPairDataset.from_step_dpo(_jsonl(tmp_path, STEP_DPO))
    from_dataset = StepPairDataset.from_step_dpo(Dataset.from_list(STEP_DPO))
    assert list(from_list) == list(from_file) == list(from_dataset)
    assert from_file.report == from_list.report


def test_step_dpo_options(tmp_path):
    plain = StepPairDataset.from_step_dpo(STEP_DPO[:1], conversational=False, use_full_chosen=False)
    assert plain[0]["prompt"] == STEP_DPO[0]["prompt"] and "reference" not in plain.column_names
    every_line = StepPairDataset.from_step_dpo(STEP_DPO[4:], step_start=None)  # a step per line
    assert every_line[0]["prefix"] == ["Let's think step by step.", "Step 1: Add like terms.\n", "Both are $x$."]


def test_step_dpo_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"no column \['initial_reason_steps'\]"):
        StepPairDataset.from_step_dpo([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    bad = [dict(STEP_DPO[0]), {**STEP_DPO[1], "chosen": 3}]
    with pytest.raises(RowError, match=r"row 1 \(.*rows.jsonl:2\): field 'chosen': must be a string"):
        StepPairDataset.from_step_dpo(_jsonl(tmp_path, bad))
    with pytest.raises(ValueError, match="pass one split"):
        StepPairDataset.from_step_dpo(DatasetDict({"train": Dataset.from_list(STEP_DPO)}))
    with pytest.raises(FileNotFoundError, match=r"load_dataset\('xinlai/Math-Step-DPO-10K', split='train'\)"):
        StepPairDataset.from_step_dpo("xinlai/Math-Step-DPO-10K")
    with pytest.raises(ValueError, match="no step pair could be built"):
        StepPairDataset.from_step_dpo(STEP_DPO[2:4])


def test_split_steps_keeps_the_text():
    rng = random.Random(0)
    pieces = ["a", "\n", " ", "Step 1:", "Step 12: x", "\n\n"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        for start in (None, r"Step \d+:"):
            steps, tail = split_steps(text, "\n", start)
            assert continuation_prefix_text(steps, "\n") + tail == text
            assert all(step.strip() for step in steps)


# TRL's stepwise-supervision rows (PRMTrainer's format; e.g. trl-lib/math_shepherd): one sampled solution
# per row, its steps and one label per step.
Q1, Q2, Q3 = "Ann has 4 pens and gives away 1. How many are left?", "What is 6 / 2?", "What is 0 * 5?"
S1, S2, S3 = "Ann starts with 4 pens.", "She gives away 1.", "So 4 - 1 = 3 pens are left."
STEPWISE = [
    {"prompt": Q1, "completions": [S1, S2, "So 4 + 1 = 5 pens are left."], "labels": [True, True, False]},  # 0
    {"prompt": Q1, "completions": [S1, S2, S3, "The answer is 3."], "labels": [True, True, True, True]},  # 1
    {"prompt": Q1, "completions": ["Ann has 5 pens.", "The answer is 4."], "labels": [False, False]},  # 2
    {"prompt": Q1, "completions": [S1, "She gets 1 more."], "labels": [True, False]},  # 3
    {"prompt": Q1, "completions": [S1, S2, "So 4 * 1 = 4."], "labels": [True, True, False]},  # 4
    {"prompt": Q2, "completions": ["We divide.", "6 / 2 = 4."], "labels": [True, False]},  # 5
    {
        "prompt": Q2,
        "completions": ["We divide.", "6 / 2 = 3.", "The answer is 4."],
        "labels": [True, True, False],
    },  # 6
    {"prompt": Q3, "completions": ["0 * 5 = 5."], "labels": [False]},  # 7
    {"prompt": Q1, "completions": [S1, S2, "So 4 + 1 = 5 pens are left."], "labels": [True, True, False]},  # 8
    {"prompt": Q1, "completions": [S1, S2, S3], "labels": [True, True, False]},  # 9: S3 labelled both ways
]


def test_stepwise_supervision_pairs_the_first_false_step(caplog):
    pairs = StepPairDataset.from_stepwise_supervision(STEPWISE)
    got = [(r["prompt"], r["prefix"], r["chosen"], r["rejected"], r["branch_point"], r["reference"]) for r in pairs]
    full = STEPWISE[1]["completions"]
    assert got == [
        (Q1, [S1, S2], S3, "So 4 + 1 = 5 pens are left.", 2, full),  # row 0: the fully correct row 1 gives S3
        (Q1, [], S1, "Ann has 5 pens.", 0, full),  # row 2: the first step
        (Q1, [S1], S2, "She gets 1 more.", 1, full),  # row 3
        (Q1, [S1, S2], S3, "So 4 * 1 = 4.", 2, full),  # row 4
        (Q2, ["We divide."], "6 / 2 = 3.", "6 / 2 = 4.", 1, None),  # row 5: Q2 has no fully correct row
    ]
    assert pairs.report == {
        "rows": 10,
        "pairs": 5,
        "rows_all_correct": 1,  # row 1: no unfavourable step (it gives favourable steps and the reference)
        "rows_without_favourable": 3,  # rows 6 and 7 (nothing else shares their prefix), 9 (S3 both ways)
        "pairs_duplicate": 1,  # row 8 repeats row 0
        "pairs_without_reference": 1,
    }
    assert "fallback_reference_eos=False" in caplog.text and "rows_without_favourable=3" in caplog.text


def test_stepwise_texts_are_prms_texts(tmp_path):
    """The prompt is PRMTrainer's plain prompt; prefix + rejected is the row's steps joined as
    PRMTrainer joins them (each step followed by the separator) up to the false step."""
    pairs = StepPairDataset.from_stepwise_supervision(_jsonl(tmp_path, STEPWISE))
    row, source = pairs[0], STEPWISE[0]
    assert row["prompt"] == source["prompt"]
    prm_text = "".join(step + "\n" for step in source["completions"])
    assert continuation_prefix_text(row["prefix"], "\n") + row["rejected"] + "\n" == prm_text
    chat = StepPairDataset.from_stepwise_supervision(Dataset.from_list(STEPWISE), conversational=True)
    assert chat[0]["prompt"] == [{"role": "user", "content": Q1}] and chat.report == pairs.report


def test_stepwise_bad_rows_are_named(tmp_path):
    with pytest.raises(RowError, match="row 0 .*field 'labels': has 1 labels for 2 completions"):
        StepPairDataset.from_stepwise_supervision([{"prompt": Q1, "completions": [S1, S2], "labels": [True]}])
    with pytest.raises(RowError, match="field 'labels': label 0 is 'yes'"):
        StepPairDataset.from_stepwise_supervision([{"prompt": Q1, "completions": [S1], "labels": ["yes"]}])
    with pytest.raises(RowError, match="field 'completions': step 1 must be a non-empty string"):
        StepPairDataset.from_stepwise_supervision([{"prompt": Q1, "completions": [S1, " "], "labels": [True, False]}])
    with pytest.raises(ValueError, match=r"no column \['completions', 'labels'\]"):
        StepPairDataset.from_stepwise_supervision([{"prompt": Q1, "chosen": "a", "rejected": "b"}])


def test_converted_pairs_are_scored_by_the_trainer(tmp_path):
    """Both conversions give rows the trainer takes as they are (rows with and without a reference)."""
    import math

    from helpers import trainer_loss

    tok = build_tokenizer()
    for pairs in (StepPairDataset.from_step_dpo(STEP_DPO), StepPairDataset.from_stepwise_supervision(STEPWISE)):
        args = srpo_args(tmp_path, per_device_train_batch_size=len(pairs), fallback_reference_eos=False)
        trainer = SRPOTrainer(model=tiny_causal_lm(tok), args=args, train_dataset=pairs, processing_class=tok)
        assert len(trainer.train_dataset) == len(pairs)  # nothing dropped on the way
        loss = trainer_loss(trainer, list(pairs))
        assert math.isfinite(loss) and loss > 0
