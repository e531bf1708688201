"""Bad input fails early and names where: vision rows' images are opened when the dataset is prepared
(errors name the dataset row), mixed prompt types and non-UTF-8 files name file, line and field, a
column present only on later rows is kept. (Every row over-long: tests/test_guards.py.)"""

from __future__ import annotations

import json

import pytest
from helpers import ROWS, srpo_args

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.rows import RowError
from srpo_trl.tiny import make_image, tiny_qwen2_5_vl


def _vision_rows(tmp_path, bad: str):
    good = tmp_path / "good.png"
    make_image(0).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = {"missing": tmp_path / "missing.png", "broken": broken}[bad]
    row = {
        "prompt": [{"role": "user", "content": "What is this?"}],
        "prefix": [],
        "chosen": "A cup.",
        "rejected": "Drink it.",
    }
    return [{**row, "images": [str(good)]} for _ in range(3)] + [{**row, "images": [str(path)]}]


@pytest.mark.parametrize("bad", ["missing", "broken"])
def test_vision_images_are_opened_when_the_dataset_is_prepared(tmp_path, bad):
    model, processor = tiny_qwen2_5_vl(seed=0)
    rows = _vision_rows(tmp_path, bad)
    args = srpo_args(tmp_path, per_device_train_batch_size=2, max_steps=2, max_length=None)
    with pytest.raises(RowError) as info:  # at construction, not at training step 2
        SRPOTrainer(model=model, args=args, train_dataset=StepPairDataset.from_list(rows), processing_class=processor)
    assert info.value.index == 3 and info.value.field == "images"
    assert f"{bad}.png" in str(info.value) and "row 3" in str(info.value)


def test_mixed_prompt_types_name_the_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    chat = {**ROWS[1], "prompt": [{"role": "user", "content": "What is in the image?"}]}
    path.write_text("\n".join(json.dumps(r) for r in [chat, chat, ROWS[2]]) + "\n")  # line 3: a string prompt
    with pytest.raises(RowError) as info:
        StepPairDataset.from_jsonl(path)
    msg = str(info.value)
    assert f"{path}:3" in msg and "field 'prompt'" in msg and "is a string here but a list of chat messages" in msg


def test_non_utf8_jsonl_names_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS]
    lines[1] = lines[1].replace(b"A kitchen knife.", b"A kitchen kn\xe9fe.")  # latin-1, in 'chosen'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError) as info:
        StepPairDataset.from_jsonl(path)
    msg = str(info.value)
    assert f"{path}:2" in msg and "field 'chosen'" in msg and "not UTF-8" in msg and "0xe9" in msg


def test_non_utf8_csv_names_file_row_and_column(tmp_path):
    from srpo_trl.dataset import check_utf8

    path = tmp_path / "pairs.csv"
    path.write_bytes(b"prompt,chosen,rejected\nIs it safe?,Yes.,No.\nIs this caf\xe9 safe?,Yes.,No.\n")
    with pytest.raises(ValueError) as info:
        check_utf8(path)
    msg = str(info.value)
    assert f"{path}:3" in msg and "row 3, field 'prompt'" in msg


def test_cli_dataset_name_csv_that_is_not_utf8_is_named(tmp_path):
    from types import SimpleNamespace

    from srpo_trl.recipe_runner import _load_named_dataset

    path = tmp_path / "pairs.csv"
    path.write_bytes(b"prompt,chosen,rejected\nIs it safe?,Yes.,N\xf6.\n")
    args = SimpleNamespace(dataset_name=str(path), dataset_config=None, dataset_streaming=False)
    with pytest.raises(ValueError, match=r"pairs\.csv:2: row 2, field 'rejected' is not UTF-8"):
        _load_named_dataset(args)


def test_a_column_present_only_on_later_rows_is_kept():
    rows = [dict(r) for r in ROWS]
    rows[2]["id"] = "q3"  # only the last row has an id
    rows[1]["source"] = "handwritten"
    ds = StepPairDataset.from_list(rows)
    assert ds["id"] == [None, None, "q3"]
    assert ds["source"] == [None, "handwritten", None]
