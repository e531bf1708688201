"""srpo_trl.store: the JSON-lines file work every resumable stage shares (no torch, fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from srpo_trl import store


def test_read_lines_drops_a_torn_tail_and_names_a_broken_middle_line(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2}\n{"id": 3, "x": "ha')
    assert store.read_lines(path) == [{"id": 1}, {"id": 2}]
    assert path.read_text().endswith('"ha')  # only read
    assert store.read_lines(path, repair=True) == [{"id": 1}, {"id": 2}]
    assert path.read_text() == '{"id": 1}\n\n{"id": 2}\n'  # cut back to the last whole line
    path.write_text('{"id": 1}\n{"id": \n{"id": 3}\n')
    with pytest.raises(store.StoreError, match=r"o\.jsonl: line 2 is not valid JSON"):
        store.read_lines(path)
    # a complete last line that is not a line of this file (valid=...) is a torn write too
    path.write_text('{"id": 1}\n[1, 2]\n')
    assert store.read_lines(path, valid=lambda o: isinstance(o, dict)) == [{"id": 1}]


def test_appender_repairs_then_appends_whole_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"n": 0}\n{"n": 1')
    with store.Appender(path) as out:
        out.write({"n": 2, "text": "é"})
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"n": 0},
        {"n": 2, "text": "é"},
    ]


def test_merge_keeps_the_first_line_of_each_key_in_order(tmp_path):
    a, b, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out.jsonl"
    store.rewrite(a, [{"id": "x", "v": 1}, {"id": "y", "v": 1}])
    store.rewrite(b, [{"id": "x", "v": 2}, {"id": "z", "v": 2}])
    assert store.merge(out, [a, b], key=lambda o: o["id"], order=["z", "y", "x"]) == 3
    assert store.read_lines(out) == [{"id": "z", "v": 2}, {"id": "y", "v": 1}, {"id": "x", "v": 1}]


def test_fingerprint_check(tmp_path):
    out = tmp_path / "o.jsonl"
    fp = {"policy": {"model": {"path": "/m/a", "weights": "111"}, "dtype": "float32"}, "num_samples": 2}
    store.check_fingerprint(out, fp)  # nothing there yet: recorded
    out.write_text('{"id": 1}\n')
    store.check_fingerprint(out, fp)  # the same: resumes
    changed = {"policy": {"model": {"path": "/m/a", "weights": "222"}, "dtype": "float32"}, "num_samples": 2}
    with pytest.raises(store.FingerprintMismatch) as err:
        store.check_fingerprint(out, changed)
    # only what differs is shown, and what to do
    assert 'policy: saved {"model": {"weights": "111"}}, now {"model": {"weights": "222"}}' in str(err.value)
    assert "--overwrite" in str(err.value) and "another --out" in str(err.value)
    store.check_fingerprint(out, changed, overwrite=True)
    assert json.loads(store.meta_path(out).read_text()) == changed
    store.meta_path(out).unlink()
    with pytest.raises(store.FingerprintMismatch, match=r"o\.jsonl\.meta\.json .* is missing"):
        store.check_fingerprint(out, changed)
    with pytest.raises(store.FingerprintMismatch, match="is missing"):  # a side output counts too
        store.check_fingerprint(tmp_path / "other.jsonl", changed, outputs=[out])


def test_fingerprint_counts_that_may_grow(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 1}\n')
    store.check_fingerprint(out, {"per_image": 2, "max_steps": 8}, overwrite=True)
    store.check_fingerprint(out, {"per_image": 3, "max_steps": 8}, may_grow=["per_image"])  # more: extends
    assert json.loads(store.meta_path(out).read_text())["per_image"] == 3  # the larger value is recorded
    with pytest.raises(store.FingerprintMismatch, match=r"per_image: saved 3, now 2"):
        store.check_fingerprint(out, {"per_image": 2, "max_steps": 8}, may_grow=["per_image"])
    with pytest.raises(store.FingerprintMismatch, match=r"per_image: saved 3, now 4"):  # only the keys named
        store.check_fingerprint(out, {"per_image": 4, "max_steps": 8})
    with pytest.raises(store.FingerprintMismatch, match=r"max_steps: saved 8, now 9.*choose another review file"):
        store.check_fingerprint(
            out, {"per_image": 4, "max_steps": 9}, may_grow=["per_image"], another="another review file"
        )


def test_lock_is_exclusive_across_processes_and_removed_after(tmp_path):
    lock = tmp_path / "o.jsonl.lock"
    code = (
        "import sys, time; from srpo_trl import store\n"
        f"with store.output_lock({str(lock)!r}, 'explore'):\n"
        "    print('held', flush=True); time.sleep(3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(store.OutputLocked, match=r"another explore run is writing"):
            with store.output_lock(lock, "explore"):
                pass
    finally:
        proc.wait(timeout=30)
    assert not lock.exists()
    with store.output_lock(lock, "explore"):
        assert lock.exists()
    assert not lock.exists()


def test_redact_url():
    assert store.redact_url("http://u:p@h:1/v1") == "http://***@h:1/v1"
    assert store.redact_url("https://h/v1?token=abc&model=m") == "https://h/v1?token=***&model=m"
    assert store.redact_url("http://h:8000/v1") == "http://h:8000/v1"
