"""StepPairDataset constructors, exploration expansion, and every bad-input case."""

import json
import logging

import pytest
from datasets import Dataset
from helpers import ROWS, srpo_args

from srpo_trl import StepPairDataset
from srpo_trl.rows import RowError, check_image_count, normalize_row
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


GOOD = {"prompt": "Q?", "prefix": ["a"], "chosen": "b", "rejected": "c", "reference": ["a", "b"]}


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"chosen": None}, "chosen", "missing"),
        ({"rejected": "   "}, "rejected", "empty"),
        ({"rejected": "b"}, "rejected", "identical"),
        ({"prefix": "a single string"}, "prefix", "list of strings"),
        ({"prefix": ["ok", 3]}, "prefix", "step 1 must be a string"),
        ({"reference": ["a", ""]}, "reference", "step 1 is empty"),
        ({"reference": []}, "reference", "empty list"),
        ({"prompt": ""}, "prompt", "empty"),
        (
            {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "chosen",
            "one assistant",
        ),
    ],
)
def test_bad_rows_name_the_row_and_field(change, field, words):
    rows = [GOOD, {**GOOD, **change}]
    with pytest.raises(RowError) as err:
        StepPairDataset.from_list(rows)
    assert err.value.field == field and str(err.value.index).startswith("1")
    assert words in str(err.value) and f"'{field}'" in str(err.value)


def test_image_count_must_match_placeholders():
    row = normalize_row(
        {"prompt": "<|image_pad|> and <|image_pad|>: same?", "images": ["a.png"], "chosen": "x", "rejected": "y"}, 7
    )
    with pytest.raises(
        RowError, match=r"row 7: field 'images': the prompt has 2 image placeholder\(s\) but the row has 1"
    ):
        check_image_count(row, 7, "<|image_pad|>")
    chat = normalize_row(
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
            "images": [],
            "chosen": "x",
            "rejected": "y",
        },
        3,
    )
    with pytest.raises(RowError, match="row 3"):
        check_image_count(chat, 3, "<|image_pad|>")


def test_jsonl_round_trip_and_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds = StepPairDataset.from_jsonl(path)
    assert len(ds) == 3 and ds[0]["prefix"] == ROWS[0]["prefix"] and ds[1]["reference"] is None
    out = tmp_path / "again.jsonl"
    ds.to_jsonl(out)
    assert [r["chosen"] for r in StepPairDataset.from_jsonl(out)] == [r["chosen"] for r in ROWS]

    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not valid JSON"):
        StepPairDataset.from_jsonl(path)


def test_relative_image_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**GOOD, "images": ["img/a.png"]}) + "\n")
    assert StepPairDataset.from_jsonl(path)[0]["images"] == [str(tmp_path / "img" / "a.png")]


def test_dataset_methods_are_forwarded():
    ds = StepPairDataset.from_list(ROWS)
    mapped = ds.map(lambda r: {"chosen": r["chosen"].upper()})
    assert isinstance(mapped, StepPairDataset) and mapped[0]["chosen"] == ROWS[0]["chosen"].upper()
    assert isinstance(StepPairDataset.from_dataset(Dataset.from_list(ROWS[:2])).dataset, Dataset)
    assert ds.column_names[:3] == ["prompt", "prefix", "chosen"]


def explored_record(rid="r1", status="ok"):
    return {
        "id": rid,
        "prompt": "Q?",
        "reference": ["s1", "s2", "s3"],
        "status": status,
        "points": [
            {  # 2 distinct good (one duplicated) x 3 bad = 6 pairs
                "branch_point": 0,
                "prefix": [],
                "continuations": [
                    {"text": "good A", "verified": True},
                    {"text": "good A", "verified": True},
                    {"text": "good B", "verified": True},
                    {"text": "bad A", "verified": False},
                    {"text": "bad B", "verified": False},
                    {"text": "bad C", "verified": False},
                    {"text": "undecided", "verified": None},
                ],
            },
            {"branch_point": 1, "prefix": ["s1"], "continuations": [{"text": "only good", "verified": True}]},
            {  # "flip" judged both ways: dropped from both sides -> 1 x 1 pair
                "branch_point": 2,
                "prefix": ["s1", "s2"],
                "continuations": [
                    {"text": "flip", "verified": True},
                    {"text": "flip", "verified": False},
                    {"text": "good C", "verified": True},
                    {"text": "bad D", "verified": False},
                ],
            },
        ],
    }


def test_from_exploration_expands_every_pair_and_reports(caplog):
    records = [explored_record(), explored_record("r2", status="no_reference")]
    with caplog.at_level(logging.WARNING):
        ds = StepPairDataset.from_exploration(records)
    assert len(ds) == 7
    assert ds.report["points_with_both"] == 2 and ds.report["points_one_sided"] == 1
    assert ds.report["records_skipped_no_reference"] == 1 and ds.report["continuations_conflicting"] == 1
    assert ds.report["continuations_unverified"] == 1
    pairs0 = {(r["chosen"], r["rejected"]) for r in ds if r["branch_point"] == 0}
    assert pairs0 == {(g, b) for g in ("good A", "good B") for b in ("bad A", "bad B", "bad C")}
    last = [r for r in ds if r["branch_point"] == 2]
    assert len(last) == 1 and last[0]["prefix"] == ["s1", "s2"] and last[0]["reference"] == ["s1", "s2", "s3"]
    assert "pairs=7" in caplog.text


def test_from_exploration_caps_pairs_per_point_reproducibly(tmp_path):
    path = tmp_path / "explored.jsonl"
    path.write_text(json.dumps(explored_record()) + "\n")
    a = StepPairDataset.from_exploration(path, max_pairs_per_point=2, seed=1)
    b = StepPairDataset.from_exploration(path, max_pairs_per_point=2, seed=1)
    assert len(a) == 3 and a.report["pairs_capped"] == 4
    assert [(r["chosen"], r["rejected"]) for r in a] == [(r["chosen"], r["rejected"]) for r in b]


def test_from_exploration_with_no_pairs_says_why():
    record = explored_record()
    record["points"] = record["points"][1:2]
    with pytest.raises(ValueError, match="No step pair could be built"):
        StepPairDataset.from_exploration([record])


def test_rows_that_do_not_fit_max_length_are_dropped_and_reported(tmp_path, caplog):
    from srpo_trl import SRPOTrainer

    tok = build_tokenizer()
    long_prefix = {**ROWS[0], "prefix": ["word " * 60]}
    rows = [ROWS[1], long_prefix, ROWS[2]]
    with caplog.at_level(logging.WARNING):
        trainer = SRPOTrainer(
            model=tiny_causal_lm(tok),
            args=srpo_args(tmp_path, max_length=48),
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=tok,
        )
    assert len(trainer.train_dataset) == 2
    assert [i for i, _ in trainer.dropped_rows["train"]] == [1]
    assert "dropped 1 of 3 rows" in caplog.text and "row 1:" in caplog.text


def test_images_are_placed_once_in_a_multi_turn_chat():
    from srpo_trl.rows import render_prompt
    from srpo_trl.tiny import make_image, tiny_qwen2_5_vl

    _, processor = tiny_qwen2_5_vl()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A bottle."},
        {"role": "user", "content": "Is it safe?"},
    ]
    text = render_prompt(processor, messages, [make_image(0)])
    assert text.count("<|image_pad|>") == 1
    plain = render_prompt(processor, [{"role": "user", "content": "What is it?"}], [make_image(0), make_image(1)])
    assert plain.count("<|image_pad|>") == 2
