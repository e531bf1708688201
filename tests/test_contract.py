"""The record contract (srpo_trl.contract): one validator and one error type for explore, evaluate and
the record tools, and the light modules importing without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from srpo_trl import contract
from srpo_trl.contract import RecordError


def test_light_modules_import_without_torch():
    code = (
        "import sys\n"
        "import srpo_trl.verifiers, srpo_trl.evaluation, srpo_trl.records, srpo_trl.contract, srpo_trl.safety\n"
        "import srpo_trl.store, srpo_trl.pairs\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_one_error_type_everywhere(tmp_path):
    from srpo_trl.evaluation.loaders import LoadError
    from srpo_trl.exploration import RecordError as ExploreError
    from srpo_trl.records.schema import RecordError as RecordsError

    assert issubclass(LoadError, RecordError) and ExploreError is RecordError and RecordsError is RecordError


@pytest.mark.parametrize("rid", ["a", 7])
@pytest.mark.parametrize("prompt", ["How?", [{"role": "user", "content": "How?"}]])
def test_ids_and_prompts_accepted_by_every_stage(tmp_path, rid, prompt):
    """The most permissive of the old rules: string or integer ids, text or chat prompts, in all three readers."""
    from srpo_trl.evaluation.loaders import load_records as eval_load
    from srpo_trl.exploration import load_records as explore_load
    from srpo_trl.records.schema import load_records as records_load

    row = {
        "id": rid,
        "prompt": prompt,
        "images": [],
        "reference": ["Step.", "Answer."],
        "expected": "warn",
        "category": "dangerous behavior",
        "unsafe_scenario": "mixing",
    }
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert explore_load(path)[0][0]["id"] == rid
    assert eval_load(path)[0].id == str(rid) and eval_load(path)[0].prompt == prompt
    assert records_load(path)[0]["id"] == rid


def test_integer_and_string_ids_collide(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n')
    with pytest.raises(RecordError) as err:
        contract.load_records(path)
    assert err.value.field == "id" and err.value.where == f"{path}:2" and f"already used at {path}:1" in str(err.value)


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=r"r\.jsonl:2: is not UTF-8"):
        contract.load_records(path)


def test_complete_format_rules(tmp_path):
    good = {
        "id": "a",
        "prompt": "x",
        "images": [],
        "reference": ["Answer."],
        "expected": "comply",
        "category": "benign",
        "unsafe_scenario": "",
    }
    contract.validate_record(good, "here", complete=True)
    contract.validate_record({"id": "a", "prompt": "x"}, "here")  # a stage that needs no more
    for change, field in [
        ({"reference": ["two\nlines"]}, "reference"),
        ({"expected": "warn"}, "expected"),
        ({"category": "weather"}, "category"),
        ({"unsafe_scenario": None}, "unsafe_scenario"),
    ]:
        with pytest.raises(RecordError) as err:
            contract.validate_record({**good, **change}, "here", complete=True)
        assert err.value.field == field
    # a two-line step is fine where the format does not require single lines
    assert contract.validate_record({**good, "reference": ["two\nlines"]}, "here")["reference"] == ["two\nlines"]


def test_json_list_file_and_image_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"id": "a", "prompt": "x", "images": ["a.png"]}]))
    (rec,) = contract.load_records(path, image_dir=tmp_path / "imgs")
    assert rec["_images"] == [str(tmp_path / "imgs" / "a.png")] and rec["_where"] == f"{path}, item #0"
    with pytest.raises(RecordError, match="image not found.*check --images") as err:
        contract.load_records(path, image_dir=tmp_path)
    assert err.value.field == "images[0]" and err.value.item == "#0"


@pytest.mark.parametrize(
    "message, problem",
    [
        ({"role": 1, "content": "How?"}, "has role 1"),
        ({"role": None, "content": "How?"}, "has role None"),
        ({"role": "", "content": "How?"}, "has role ''"),
        ({"role": "user", "content": 42}, "has content 42 (int)"),
        ({"role": "user", "content": None}, "has content null"),
        (
            {"role": "user", "content": [{"type": "text", "text": 3}]},
            "content part 0 is a text part whose 'text' is not",
        ),
        ({"role": "user", "content": ["How?"]}, 'content part 0 must be an object with a string "type"'),
    ],
)
def test_a_message_role_or_content_of_the_wrong_type_is_refused(tmp_path, message, problem):
    # Before: accepted and sent to the model server as it was.
    path = tmp_path / "r.jsonl"
    rows = [
        {"id": "ok", "prompt": "fine"},
        {"id": "bad", "prompt": [{"role": "system", "content": "Be safe."}, message]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError) as err:
        contract.load_records(path)
    assert err.value.where == f"{path}:2" and err.value.field == "prompt"
    assert f"message 1 {problem}" in str(err.value)


def test_messages_the_chat_templates_take_are_accepted(tmp_path):
    prompt = [
        {"role": "system", "content": "Be safe."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": "And now?"},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": prompt}) + "\n")
    assert contract.load_records(path)[0]["prompt"] == prompt
