"""Curation round trip: export records to a review file, edit it like a reviewer, import it back."""

import csv
import json

import pytest

from srpo_trl.records import ReviewError, export_review, import_review, main_curate
from srpo_trl.records.schema import RecordError, load_records


def _record(rid, category="dangerous behavior", expected="warn", **kw):
    rec = {
        "id": rid,
        "prompt": f"How do I clean with this? ({rid})",
        "images": ["imgs/a.png"],
        "reference": [
            "The image shows bleach.",
            "Mixing it with acid makes chlorine gas.",
            "Use it alone, ventilate.",
        ],
        "expected": expected,
        "category": category,
        "unsafe_scenario": "" if category == "benign" else "bleach plus an acid cleaner",
        "kind": "benign" if category == "benign" else "unsafe",
        "source_image": "a.png",
        "generator": {"model": "m", "templates_sha256": "abc"},
        "revisions": 0,
    }
    rec.update(kw)
    return rec


@pytest.fixture
def records(tmp_path):
    from PIL import Image

    (tmp_path / "data" / "imgs").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "imgs" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "imgs" / "b.png")
    path = tmp_path / "data" / "records.jsonl"
    recs = [
        _record("r0"),
        _record("r1"),
        _record("r2", "benign", "comply"),
        _record("r3"),
        _record("r4", "violence", "refuse"),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_csv_round_trip(records, tmp_path):
    from srpo_trl.exploration import load_records as explore_load

    review = tmp_path / "review" / "review.csv"
    assert export_review(records, review) == 5
    rows = _read_csv(review)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    assert rows[0]["decision"] == "" and rows[0]["images"] == "../data/imgs/a.png"  # relative to the review file
    assert rows[0]["reasoning"] == "The image shows bleach.\nMixing it with acid makes chlorine gas."
    assert rows[0]["final_answer"] == "Use it alone, ventilate."

    rows[0]["decision"] = "accept"
    rows[1].update(
        decision="Edit",
        category="Illegal crimes",
        expected="refuse",
        note="sharper",
        reasoning="Step one.\r\n\r\n  Step two.\r\nStep three.",
        final_answer="I won't help with that.",
        images="../data/imgs/b.png",
    )
    rows[2]["decision"] = "reject"
    rows[4]["decision"] = "accept"  # r3 stays pending
    _write_csv(review, rows)

    out = tmp_path / "curated" / "curated.jsonl"
    result = import_review(review, out)
    assert (result.accepted, result.edited, result.rejected, result.pending) == (2, 1, 1, ["row 5"])
    curated = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in curated] == ["r0", "r1", "r4"]
    original = {r["id"]: r for r in load_records(records)}
    r0 = curated[0]
    for key in (
        "prompt",
        "reference",
        "expected",
        "category",
        "unsafe_scenario",
        "generator",
        "source_image",
        "revisions",
    ):
        assert r0[key] == original["r0"][key]  # accepted as it was, provenance kept
    assert r0["images"] == ["../data/imgs/a.png"] and r0["curation"] == {"decision": "accept", "changed": []}
    r1 = curated[1]
    assert r1["reference"] == ["Step one.", "Step two.", "Step three.", "I won't help with that."]
    assert (r1["category"], r1["expected"], r1["images"]) == ("illegal crimes", "refuse", ["../data/imgs/b.png"])
    assert r1["curation"] == {
        "decision": "edit",
        "changed": ["category", "expected", "reasoning", "final_answer", "images"],
        "note": "sharper",
    }
    # What comes out is what exploration reads, and what export reads again.
    assert [r["id"] for r in explore_load(out)[0]] == ["r0", "r1", "r4"]
    assert export_review(out, tmp_path / "again.csv") == 3


def test_bad_rows_are_each_named_and_nothing_is_written(records, tmp_path, capsys):
    review = tmp_path / "review.csv"
    export_review(records, review)
    pristine = _read_csv(review)
    rows = [dict(r) for r in pristine]
    rows[0].update(decision="edit", category="weapons")
    rows[1].update(decision="accept", prompt="Something else entirely")
    rows[2].update(decision="maybe")
    rows[3].update(decision="edit", expected="comply")  # comply is for benign items
    rows[4].update(decision="edit", images="imgs/missing.png", _provenance="{broken")
    _write_csv(review, rows)
    out = tmp_path / "curated.jsonl"

    with pytest.raises(ReviewError) as err:
        import_review(review, out)
    errors = err.value.errors
    assert len(errors) == 5 and not out.exists()
    assert errors[0].startswith(f"{review}: row 2 (id r0): field 'category': must be one of")
    assert "weapons" in errors[0]
    assert "row 3 (id r1): field 'prompt': decision is 'accept' but prompt changed" in errors[1]
    assert "set decision to 'edit'" in errors[1]
    assert "row 4 (id r2): field 'decision': must be one of accept, edit, reject" in errors[2]
    assert "row 5 (id r3): field 'expected':" in errors[3] and "'benign' item expects 'comply'" in errors[3]
    assert "row 6 (id r4): field '_provenance': is not valid JSON" in errors[4]

    # The command prints every bad row and says nothing was written.
    assert main_curate(["import", str(review), "--out", str(out)]) == 1
    err_text = capsys.readouterr().err
    assert (
        "row 2 (id r0): field 'category'" in err_text and "row 6 (id r4)" in err_text and "nothing written" in err_text
    )
    assert not out.exists()

    # Restored provenance: the next problem of that row shows up.
    rows[4]["_provenance"] = pristine[4]["_provenance"]
    _write_csv(review, rows)
    with pytest.raises(ReviewError) as err:
        import_review(review, out)
    assert any("row 6 (id r4): field 'images': line 1: imgs/missing.png: no such file" in e for e in err.value.errors)
    # --skip-invalid writes the good rows and lists the others.
    rows[4]["images"] = "data/imgs/a.png"
    _write_csv(review, rows)
    result = import_review(review, out, skip_invalid=True)
    assert [r["id"] for r in result.records] == ["r4"] and len(result.errors) == 4
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r4"]


def test_duplicate_ids_missing_columns_and_extra_cells(records, tmp_path):
    review = tmp_path / "review.csv"
    export_review(records, review)
    rows = _read_csv(review)
    rows[1]["id"] = "r0"
    rows[0]["decision"] = rows[1]["decision"] = "accept"
    _write_csv(review, rows)
    with pytest.raises(ReviewError, match=r"row 3 \(id r0\): field 'id': duplicate of row 2"):
        import_review(review, tmp_path / "c.jsonl")
    _write_csv(review, [{k: v for k, v in r.items() if k != "decision"} for r in rows])
    with pytest.raises(ReviewError, match="the header lacks column\\(s\\) decision"):
        import_review(review, tmp_path / "c.jsonl")


def test_jsonl_review_round_trip(records, tmp_path):
    review = tmp_path / "review.jsonl"
    export_review(records, review)
    rows = [json.loads(line) for line in review.read_text().splitlines()]
    assert rows[0]["reasoning"] == ["The image shows bleach.", "Mixing it with acid makes chlorine gas."]
    rows[0]["decision"] = "accept"
    rows[2].update(decision="edit", final_answer="Sure, it is a cleaning product; use it as labelled.")
    lines = [json.dumps(r) for r in rows]
    lines[3] = "{not json"
    review.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReviewError, match=r"line 4: is not valid JSON"):
        import_review(review, tmp_path / "c.jsonl")
    lines[3] = json.dumps(rows[3])
    review.write_text("\n".join(lines) + "\n")
    result = import_review(review, tmp_path / "c.jsonl")
    assert [r["id"] for r in result.records] == ["r0", "r2"]
    assert result.records[1]["reference"][-1] == "Sure, it is a cleaning product; use it as labelled."
    assert result.records[1]["curation"]["changed"] == ["final_answer"]


def test_export_checks_its_input_and_protects_a_review(records, tmp_path, capsys):
    review = tmp_path / "review.csv"
    export_review(records, review)
    with pytest.raises(FileExistsError, match="--force"):
        export_review(records, review)
    assert export_review(records, review, force=True) == 5

    bad = tmp_path / "data" / "bad.jsonl"
    bad.write_text(json.dumps(_record("x")) + "\n" + json.dumps(_record("y", expected="comply")) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl: line 2: field 'expected'"):
        export_review(bad, tmp_path / "r2.csv")
    assert main_curate(["export", str(bad), str(tmp_path / "r2.csv")]) == 1
    assert "line 2: field 'expected'" in capsys.readouterr().err
    assert main_curate(["export", str(records), str(tmp_path / "r3.csv")]) == 0
    assert "wrote 5 rows" in capsys.readouterr().out
