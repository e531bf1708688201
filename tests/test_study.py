"""Issue 15: the demo's data regime as parameters (reference coverage, verifier noise, samples per
branch point), the rejection-sampling baseline, and `srpo-trl study` (grid, resume, results, charts)."""

import json
import math
from pathlib import Path

import pytest

from srpo_trl.demo import regime
from srpo_trl.demo import task as T
from srpo_trl.rows import reference_text


def _records(n=40):
    train, _ = T.split_combinations()
    return [
        {
            "id": f"r{i}",
            "prompt": "p",
            "images": [],
            "reference": T.reference_path(o, r),
            "expected": T.expected_outcome(o, r),
            "object": o,
            "request": r,
        }
        for i, (o, r) in enumerate(train[:n])
    ]


# --- reference coverage -----------------------------------------------------------------------


@pytest.mark.parametrize("coverage", [1.0, 0.5, 0.25, 0.1, 0.0])
def test_coverage_leaves_exactly_that_share_of_records_with_a_reference(coverage):
    records = _records(40)
    covered = regime.cover_references(records, coverage, seed=3)
    kept = [r for r in covered if "reference" in r]
    assert len(kept) == round(coverage * 40)
    for before, after in zip(records, covered):  # nothing else changes; the inputs are not touched
        assert {k: v for k, v in before.items() if k != "reference"} == {
            k: v for k, v in after.items() if k != "reference"
        }
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
    given = {
        "id": "g",
        "prompt": "p",
        "images": [],
        "reference": ref,
        "reference_source": "given",
        "status": "ok",
        "object": 0,
        "request": 0,
        "points": [
            {
                "branch_point": 2,
                "prefix": ref[:2],
                "continuations": [
                    {"text": ref[2] + "\n" + ref[3], "verified": True},
                    {"text": T.helpful_answer(0), "verified": False},
                    {"text": ref[2] + "\n" + ref[3], "verified": True},
                ],
            }
        ],
    }
    sampled = {
        "id": "s",
        "prompt": "p",
        "images": [],
        "reference": own,
        "reference_source": "sampled",
        "status": "ok",
        "object": 0,
        "request": 0,
        "points": [
            {
                "branch_point": 1,
                "prefix": own[:1],
                "continuations": [
                    {"text": "\n".join(own[1:]), "verified": True},
                    {"text": own[1] + "\n" + T.helpful_answer(0), "verified": False},
                ],
            }
        ],
    }
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
    assert reference_text(row) == "\n".join(row["prefix"] + [row["chosen"]])  # docs/method.md: r = p + y+
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


# --- srpo-trl study: intervals, the decision rule, resume, the --quick cell ----------------------


def test_interval_is_the_t_interval_of_the_mean():
    from srpo_trl.demo.study import interval

    s = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(sum((v - 3.0) ** 2 for v in [1, 2, 3, 4, 5]) / 4)  # 1.5811
    assert s["mean"] == 3.0 and s["sd"] == pytest.approx(sd)
    assert s["high"] - s["mean"] == pytest.approx(2.776 * sd / math.sqrt(5), rel=1e-3)  # t(0.975, 4 df)
    assert interval([4.0, 4.0, 4.0]) == {"n": 3, "mean": 4.0, "sd": 0.0, "low": 4.0, "high": 4.0}


def test_decision_rule_needs_the_interval_to_exclude_the_runner_up():
    from srpo_trl.demo.study import decide, interval

    clear = {"a": interval([0, 0, 1, 0, 0]), "b": interval([10, 12, 8, 11, 9]), "c": interval([20] * 5)}
    d = decide(clear, lower_is_better=True)
    assert d["winner"] == "a" and d["runner_up"] == "b" and d["tied"] == ["a"]
    close = {"a": interval([0, 0, 10, 0, 0]), "b": interval([3, 2, 4, 3, 3])}  # a's interval holds b's mean
    d = decide(close, lower_is_better=True)
    assert d["best"] == "a" and d["winner"] is None and d["tied"] == ["a", "b"]
    higher = {"a": interval([90, 91, 92, 90, 91]), "b": interval([80, 81, 79, 80, 80])}
    assert decide(higher, lower_is_better=False)["winner"] == "a"
    assert decide(higher, lower_is_better=True)["winner"] == "b"
    assert decide({"a": interval([0.0]), "b": interval([50.0])}, True)["winner"] is None  # one seed: no interval


def test_grid_parsing_and_order():
    from srpo_trl.demo.study import PREREGISTERED, grid_cells, parse_grid

    grid = parse_grid(["coverage=1,0.25", "seeds=101-103"], quick=False)
    assert (
        grid["coverage"] == [1.0, 0.25]
        and grid["seeds"] == [101, 102, 103]
        and grid["noise"] == PREREGISTERED["noise"]
    )
    cells = grid_cells(grid)
    assert [(c.coverage, c.seed) for c in cells[:3]] == [(1.0, 101), (1.0, 102), (1.0, 103)]  # seeds differ first
    assert len(cells) == 6 and len({c.key for c in cells}) == 6
    assert len(grid_cells(parse_grid(None, quick=False))) == 20 and len(PREREGISTERED["seeds"]) >= 5
    for bad in (["coverage=2"], ["bogus=1"], ["samples=1"], ["seeds=a"]):
        with pytest.raises(SystemExit, match="--grid"):
            parse_grid(bad, quick=False)


def _fake_line(cell, settings, asr):
    from dataclasses import asdict

    from srpo_trl.demo.study import _jsonable

    metric = lambda pct: {"k": 0, "n": 10, "pct": pct, "ci_low": 0.0, "ci_high": 100.0}  # noqa: E731
    models = {
        m: {
            "attack_success": metric(asr + i),
            "over_refusal": metric(1.0),
            "safe_and_effective": metric(90.0 - i),
            "path_safe_unsafe": metric(50.0),
        }
        for i, m in enumerate(["warm", "srpo", "nll", "dpo", "step_dpo", "rft"])
    }
    return {"cell": asdict(cell), "key": cell.key, "settings": _jsonable(asdict(settings)), "models": models}


def test_a_resumed_study_runs_only_the_missing_cells(tmp_path, monkeypatch):
    from dataclasses import asdict

    from srpo_trl.demo import study
    from srpo_trl.demo.run import Budget

    out = tmp_path / "study"
    out.mkdir()
    argv = ["--grid", "coverage=1,0.5", "seeds=7,8", "--out", str(out), "--no-progress"]
    settings = study.Settings(budget=asdict(Budget(**study.STUDY_BUDGET)))
    cells = study.grid_cells(study.parse_grid(argv[1:3], quick=False))
    done = [_fake_line(c, settings, asr=float(c.seed)) for c in cells[:2]]
    torn = json.dumps(_fake_line(cells[2], settings, 0.0))[:50]  # a line cut by a kill
    (out / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in done) + torn)
    ran = []

    def fake_run_cell(out_, cell, settings_):
        ran.append(cell.key)
        return _fake_line(cell, settings_, asr=float(cell.seed) + 10 * cell.coverage)

    monkeypatch.setattr(study, "run_cell", fake_run_cell)
    assert study.main(argv) == 0
    assert ran == [c.key for c in cells[2:]]  # the finished cells were skipped; the torn one is redone
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == [c.key for c in cells]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished_cells"] == summary["expected_cells"] == 4
    by_cov = {c["coverage"]: c for c in summary["cells"]}
    assert by_cov[1.0]["metrics"]["attack_success"]["stats"]["srpo"]["values"] == [
        8.0,
        9.0,
    ]  # seeds 7, 8 (+1 per method index)
    assert "Study results (complete)" in (out / "summary.md").read_text()

    ran.clear()  # a third run has nothing to do
    assert study.main(argv) == 0 and ran == []
    with pytest.raises(SystemExit, match="other settings"):  # a resumed study must keep its settings
        study.main(argv + ["--quick"])


def test_a_failed_cell_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from srpo_trl.demo import study

    def flaky(out_, cell, settings_):
        if cell.seed == 7:
            raise RuntimeError("boom")
        return _fake_line(cell, settings_, 1.0)

    monkeypatch.setattr(study, "run_cell", flaky)
    out = tmp_path / "s"
    assert study.main(["--grid", "coverage=1", "seeds=7,8", "--out", str(out), "--no-progress"]) == 1
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["key"] for f in failures] == ["seed=7 coverage=1 noise=0 samples=8"] and "boom" in failures[0]["error"]
    assert "PARTIAL: 1 of 2 cells" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_quick_study_cell_end_to_end(tmp_path):
    """The grid's smallest cell for real (CI): every method trained with the same budget and evaluated,
    the coverage applied to the exploration, the results line, the summary and one chart per metric."""
    from PIL import Image

    from srpo_trl.demo import study

    out = tmp_path / "quick"
    assert study.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["cell"] == {"seed": 0, "coverage": 0.25, "noise": 0.0, "samples": 4}
    assert set(line["models"]) == {"warm", *study.STUDY_METHODS}
    budget = line["settings"]["budget"]
    for name, t in line["train"].items():
        assert t["steps"] == budget["train_steps"], name
    data = line["data"]
    n = data["records"]
    assert data["records_with_reference"] == round(0.25 * n)  # exactly the coverage
    assert data["records_own_path"] + data["records_no_path"] == n - data["records_with_reference"]
    assert data["pairs_with_reference"] == data["method_rows"]["nll_rows"] < data["pairs"]  # NLL: covered rows only
    assert data["method_rows"]["rft"]["references"] == data["records_with_reference"]
    for m in line["models"].values():
        assert m["attack_success"]["n"] == 12 and m["over_refusal"]["n"] == 36 and m["safe_and_effective"]["n"] == 48
        assert 0 <= m["attack_success"]["pct"] <= 100
    explored_own = (out / "work" / "seed0" / "explored_own_samples4_noise0.jsonl").read_text().splitlines()
    assert all(json.loads(x)["reference_source"] in ("sampled", None) for x in explored_own)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"][0]["seeds"] == [0] and summary["finished_cells"] == 1
    for key, _, _ in study.METRICS:
        assert summary["cells"][0]["metrics"][key]["decision"]["winner"] is None  # one seed decides nothing
        png = out / f"chart_{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 300
    assert "| SRPO (odds ratio, lambda 0.3) |" in (out / "summary.md").read_text()


def test_srpo_verdict_and_paired_differences():
    from srpo_trl.demo.study import decide, interval, paired_differences, srpo_verdict

    assert srpo_verdict(decide({"srpo": interval([0, 0, 0]), "nll": interval([5, 6, 7])}, True)) == "wins"
    assert srpo_verdict(decide({"srpo": interval([5, 6, 7]), "nll": interval([0, 0, 0])}, True)) == "loses"
    assert (
        srpo_verdict(decide({"srpo": interval([0, 0, 3]), "nll": interval([2, 2, 2])}, True)) == "ties"
    )  # wide interval
    # best NLL's interval excludes SRPO but holds RFT: no winner, SRPO outside the tie
    tie = decide({"nll": interval([1, 2, 3]), "rft": interval([2, 2, 2]), "srpo": interval([9, 9, 9])}, True)
    assert tie["winner"] is None and srpo_verdict(tie) == "loses"
    metric = lambda pct: {"pct": pct}  # noqa: E731
    group = [{"models": {"srpo": {"k": metric(s)}, "nll": {"k": metric(n)}}} for s, n in [(1, 4), (2, 4), (3, 7)]]
    d = paired_differences(group, "k", ["srpo", "nll"])["nll"]
    assert d["mean"] == pytest.approx(-3.0) and d["n"] == 3  # differences -3, -2, -4


def test_a_grid_over_noise_gets_one_chart_per_metric_and_noise(tmp_path, monkeypatch):
    from srpo_trl.demo import study

    monkeypatch.setattr(study, "run_cell", lambda out_, cell, s: _fake_line(cell, s, 10.0 * cell.noise + cell.seed))
    out = tmp_path / "s"
    assert (
        study.main(["--grid", "coverage=1,0.5", "noise=0,0.2", "seeds=1,2", "--out", str(out), "--no-progress"]) == 0
    )
    for key, _, _ in study.METRICS:
        for noise in ("0", "0.2"):
            assert (out / f"chart_{key}_noise{noise}_samples8.png").read_bytes()[:4] == b"\x89PNG"
    cells = json.loads((out / "summary.json").read_text())["cells"]
    assert {(c["coverage"], c["noise"]) for c in cells} == {(1.0, 0.0), (1.0, 0.2), (0.5, 0.0), (0.5, 0.2)}
    noisy = next(c for c in cells if c["noise"] == 0.2 and c["coverage"] == 1.0)
    assert noisy["metrics"]["attack_success"]["stats"]["warm"]["values"] == [3.0, 4.0]  # 10 * 0.2 + seed


def test_budget_demo_is_the_preregistrations_own(tmp_path, monkeypatch):
    """--budget demo: the demo's defaults (60 steps, 400 warm-start steps on 10 paths, 2 renders explored, 4
    test renders) and the ablation arms at coverage 1 and 0.1; the default stays the first run's budget."""
    from dataclasses import asdict

    from srpo_trl.demo import study
    from srpo_trl.demo.run import Budget

    seen = []
    monkeypatch.setattr(study, "run_cell", lambda out_, cell, s: seen.append(s) or _fake_line(cell, s, 1.0))
    argv = ["--grid", "coverage=1", "seeds=1", "--no-progress"]
    assert study.main(argv + ["--out", str(tmp_path / "a"), "--budget", "demo"]) == 0
    assert seen[-1].budget == asdict(Budget())
    assert (seen[-1].budget["train_steps"], seen[-1].budget["warm_steps"], seen[-1].budget["eval_renders"]) == (
        60,
        400,
        4,
    )
    assert tuple(seen[-1].ablation_coverages) == (1.0, 0.1) and tuple(seen[-1].ablation_lambdas) == (0.0, 0.9)
    assert study.main(argv + ["--out", str(tmp_path / "b")]) == 0
    assert seen[-1].budget == asdict(Budget(**study.STUDY_BUDGET)) and tuple(seen[-1].ablation_coverages) == (0.1,)
    with pytest.raises(SystemExit, match="other settings"):  # the two budgets never share a results file
        study.main(argv + ["--out", str(tmp_path / "a")])


def test_record_images_are_rewritten_only_when_they_change(tmp_path):
    """Processes of one study share a seed's image folder: an unchanged image is not rewritten (a reader
    never sees it half-written), a changed one is replaced whole."""
    import os

    from PIL import Image

    recs = T.make_records([(0, 0), (1, 2)], renders=2, image_dir=tmp_path, seed=3)
    paths = [r["images"][0] for r in recs]
    stamps = {p: os.stat(p).st_mtime_ns for p in paths}
    inodes = {p: os.stat(p).st_ino for p in paths}
    Path(paths[0]).write_bytes(b"not a png")  # a stale or broken file is replaced
    again = T.make_records([(0, 0), (1, 2)], renders=2, image_dir=tmp_path, seed=3)
    assert [r["images"] for r in again] == [r["images"] for r in recs]
    for p in paths[1:]:
        assert os.stat(p).st_mtime_ns == stamps[p] and os.stat(p).st_ino == inodes[p]  # untouched
    assert Image.open(paths[0]).size == (28, 28)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(os.path.basename(p) for p in paths)  # no temp files


def test_a_method_left_without_rows_is_named_not_trained_on_other_rows():
    """Coverage 0.1 with 4 samples can leave no pair on a record with a reference (seed 104 of the
    second run): the demo refuses, the study gets no NLL dataset and the reason, never the pairs."""
    from srpo_trl import StepPairDataset
    from srpo_trl.demo import run

    explored = _explored()
    explored[0]["reference_source"] = "sampled"  # no record keeps a given reference
    explored[0]["points"][0]["continuations"] = [c for c in explored[0]["points"][0]["continuations"] if c["verified"]]
    from srpo_trl.demo import regime

    explored = regime.anchor_rows(explored)
    pairs = StepPairDataset.from_exploration(explored, seed=0)
    assert len(pairs) > 0 and not regime.reference_rows(pairs)
    with pytest.raises(ValueError, match="no step pair carries a reference path"):
        run.method_datasets(explored, pairs, ["srpo", "nll"])
    datasets, info = run.method_datasets(explored, pairs, ["srpo", "nll"], allow_empty=True)
    assert set(datasets) == {"srpo"} and info["nll_rows"] == 0
    assert "no step pair carries a reference path" in info["empty"]["nll"]


def test_summary_counts_an_arm_over_the_seeds_it_has_and_names_the_others(tmp_path, monkeypatch):
    from srpo_trl.demo import study

    def line(out_, cell, settings):
        out = _fake_line(cell, settings, float(cell.seed))
        if cell.seed == 2:  # this seed's cell had no NLL rows
            del out["models"]["nll"]
            out["train"] = {"nll": {"steps": 0, "rows": 0, "seconds": 0.0, "skipped": "NLL on references: no rows"}}
        return out

    monkeypatch.setattr(study, "run_cell", line)
    out = tmp_path / "s"
    assert study.main(["--grid", "coverage=0.1", "seeds=1-3", "--out", str(out), "--no-progress"]) == 0
    cell = json.loads((out / "summary.json").read_text())["cells"][0]
    nll = cell["metrics"]["attack_success"]["stats"]["nll"]
    assert nll["n"] == 2 and nll["values"] == [3.0, 5.0]  # seeds 1 and 3: asr = seed + 2
    assert cell["metrics"]["attack_success"]["stats"]["srpo"]["n"] == 3
    assert cell["metrics"]["attack_success"]["srpo_minus"]["nll"]["n"] == 2  # paired on the seeds both have
    assert cell["skipped"] == {"nll": {"seeds": [2], "reason": "NLL on references: no rows"}}
    text = (out / "summary.md").read_text()
    assert "(2 seeds)" in text
    assert "NLL on reference paths (lambda 0) not trained in seed(s) 2: NLL on references: no rows" in text


def test_a_summary_without_finished_cells_says_so_instead_of_empty_tables(tmp_path):
    from srpo_trl.demo import study

    study.write_summary(tmp_path, [], ["srpo", "nll"], expected_cells=1)
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("# Study results (PARTIAL: 0 of 1 cells)")
    assert "No cell has finished yet" in text and "| model |" not in text
