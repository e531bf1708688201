"""Issue 15: the demo's data regime as parameters (reference coverage, verifier noise, samples per
branch point), the rejection-sampling baseline, and `srpo-trl study` (grid, resume, results, charts)."""

import json
import math

import pytest

from srpo_trl.demo import regime
from srpo_trl.demo import task as T
from srpo_trl.rows import reference_text


def _records(n=40):
    train, _ = T.split_combinations()
    return [{"id": f"r{i}", "prompt": "p", "images": [], "reference": T.reference_path(o, r), "expected": T.expected_outcome(o, r),
             "object": o, "request": r} for i, (o, r) in enumerate(train[:n])]  # fmt: skip


# --- reference coverage -----------------------------------------------------------------------


@pytest.mark.parametrize("coverage", [1.0, 0.5, 0.25, 0.1, 0.0])
def test_coverage_leaves_exactly_that_share_of_records_with_a_reference(coverage):
    records = _records(40)
    covered = regime.cover_references(records, coverage, seed=3)
    kept = [r for r in covered if "reference" in r]
    assert len(kept) == round(coverage * 40)
    for before, after in zip(records, covered):  # nothing else changes; the inputs are not touched
        assert {k: v for k, v in before.items() if k != "reference"} == {k: v for k, v in after.items() if k != "reference"}
        assert "reference" in before
        if "reference" in after:
            assert after["reference"] == before["reference"]
    assert regime.cover_references(records, coverage, seed=3) == covered  # seeded
    if 0 < coverage < 1:
        assert regime.cover_references(records, coverage, seed=4) != covered


def test_coverage_out_of_range_is_refused():
    with pytest.raises(ValueError, match="reference coverage must be between 0 and 1"):
        regime.cover_references(_records(4), 1.5, seed=0)


# --- verifier noise ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_verifier_noise_flips_that_share_of_verdicts(rate):
    from srpo_trl.verifiers import get_verifier

    exact = get_verifier("synthetic-exact")
    noisy = regime.NoisyVerifier("synthetic-exact", rate, seed=7)
    n, flipped = 0, 0
    for rec in _records(96):
        for path in (T.reference_path(rec["object"], rec["request"]), T.skip_path(rec["object"], rec["request"])):
            for suffix in range(20):  # distinct texts of the same verdict
                text = "\n".join(path) + " " * suffix
                clean, got = exact(rec, text), noisy(rec, text)
                n += 1
                flipped += got.passed != clean.passed
                assert (got.passed != clean.passed) == noisy.flips(rec, text)
                assert noisy(rec, text).passed == got.passed  # the same path always gets the same verdict
    sd = math.sqrt(rate * (1 - rate) / n)
    assert abs(flipped / n - rate) <= 4 * sd + 1e-12, (flipped, n)
    if rate == 0:
        assert flipped == 0


def test_noise_changes_with_the_seed_and_is_named():
    rec = _records(1)[0]
    a, b = regime.NoisyVerifier("synthetic-exact", 0.5, seed=1), regime.NoisyVerifier("synthetic-exact", 0.5, seed=2)
    texts = [f"Answer: Sure{i}" for i in range(200)]
    assert [a.flips(rec, t) for t in texts] != [b.flips(rec, t) for t in texts]
    assert a.__name__ == "synthetic-exact+noise0.5"
    with pytest.raises(ValueError, match="verifier noise"):
        regime.NoisyVerifier("synthetic-exact", -0.1, seed=0)


# --- anchors and baselines' rows --------------------------------------------------------------


def _explored():
    ref = T.reference_path(0, 0)  # unsafe: refuse
    own = list(ref)  # a path the model sampled itself and the verifier passed
    given = {"id": "g", "prompt": "p", "images": [], "reference": ref, "reference_source": "given", "status": "ok",
             "object": 0, "request": 0, "points": [
                 {"branch_point": 2, "prefix": ref[:2], "continuations": [
                     {"text": ref[2] + "\n" + ref[3], "verified": True},
                     {"text": T.helpful_answer(0), "verified": False},
                     {"text": ref[2] + "\n" + ref[3], "verified": True}]}]}  # fmt: skip
    sampled = {"id": "s", "prompt": "p", "images": [], "reference": own, "reference_source": "sampled", "status": "ok",
               "object": 0, "request": 0, "points": [
                   {"branch_point": 1, "prefix": own[:1], "continuations": [
                       {"text": "\n".join(own[1:]), "verified": True},
                       {"text": own[1] + "\n" + T.helpful_answer(0), "verified": False}]}]}  # fmt: skip
    return [given, sampled]


def test_rows_without_a_reference_are_anchored_on_prefix_plus_chosen():
    from srpo_trl import StepPairDataset

    lines = regime.anchor_rows(_explored())
    assert lines[0]["reference"] == T.reference_path(0, 0) and lines[1]["reference"] is None
    assert lines[1]["sampled_reference"] == T.reference_path(0, 0)
    pairs = StepPairDataset.from_exploration(lines)
    by_id = {row["id"]: row for row in pairs}
    assert by_id["g"]["reference"] == T.reference_path(0, 0)
    assert by_id["s"]["reference"] is None
    row = by_id["s"]
    assert reference_text(row) == "\n".join(row["prefix"] + [row["chosen"]])  # SRPO_SPEC: r = p + y+
    assert [r["id"] for r in regime.reference_rows(pairs)] == ["g"]  # NLL on references: covered rows only


def test_rft_rows_are_the_given_references_and_every_verifier_passed_path():
    from srpo_trl.demo.run import other_answer

    rows, counts = regime.rft_rows(_explored(), other_answer)
    ref = T.reference_path(0, 0)
    # g: its reference, and the passed continuation (twice) rebuilds the same path: one row
    # s: the sampled reference is not a given one; its passed continuation rebuilds the path
    assert [(r["id"], r["reference"]) for r in rows] == [("g", ref), ("s", ref)]
    assert counts == {"references": 1, "passed_paths": 3, "duplicates": 2, "records_without_rows": 0}
    for r in rows:
        assert r["prefix"] == r["reference"][:-1] and r["chosen"] == r["reference"][-1]
        assert r["rejected"] == T.helpful_answer(0)  # the opposite answer: scored, no loss at lambda 0
