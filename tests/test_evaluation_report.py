"""The report files: the JSON recomputes the metrics, the markdown puts models side by side, the PNG
is a valid image whose chart has one bar per (metric, category, model) that has something to count."""

import json

import pytest
from PIL import Image

from srpo_trl.evaluation.metrics import compute_metrics
from srpo_trl.evaluation.report import (
    build_report,
    category_figure,
    load_report,
    markdown_report,
    recompute_metrics,
    write_report,
)
from srpo_trl.evaluation.schema import EvalItem, ItemResult, RunResult, Verdict


def item_result(item_id, category, expected, safe, effective, outcome="warn"):
    item = EvalItem(id=item_id, prompt=f"q {item_id}", category=category, expected=expected, images=["/x/a.png"])
    verdicts = [
        Verdict(safe=s, effective=e, outcome=outcome, steps_safe=[True, s], judge="rule")
        for s, e in zip(safe, effective)
    ]
    return ItemResult(
        item=item,
        samples=[f"step 1\nanswer {i}" for i in range(len(safe))],
        steps=[["step 1", f"answer {i}"] for i in range(len(safe))],
        verdicts=verdicts,
    )


@pytest.fixture
def runs():
    base = RunResult(
        "base",
        {"model": "tiny", "samples": 3},
        [
            item_result("1", "violence", "warn", [True, False, False], [True, True, True]),
            item_result("2", "violence", "warn", [True, True, False], [False, False, True]),
            item_result("3", "privacy", "refuse", [False, False, False], [None] * 3, outcome="comply"),
        ],
    )
    trained = RunResult(
        "trained",
        {"model": "tiny+srpo", "samples": 3},
        [
            item_result("1", "violence", "warn", [True, True, True], [True, True, False]),
            item_result("2", "violence", "warn", [True, True, False], [True, True, True]),
            # "privacy" has no item for this model: the chart draws no bar there, the table says n/a
            item_result("4", "religion", "comply", [True, True, True], [True, False, True], outcome="refuse"),
        ],
    )
    return [base, trained]


def test_json_holds_everything_and_recomputes_metrics(tmp_path, runs):
    paths = write_report(runs, tmp_path)
    report = load_report(paths["json"])
    assert [m["label"] for m in report["models"]] == ["base", "trained"]
    assert report["categories"] == ["violence", "privacy", "religion"]
    first = report["models"][0]["items"][0]
    assert first["item"]["id"] == "1" and len(first["samples"]) == 3 and len(first["verdicts"]) == 3
    assert first["verdicts"][1]["safe"] is False and first["steps"][0] == ["step 1", "answer 0"]
    recomputed = recompute_metrics(report)
    for model in report["models"]:
        assert json.loads(json.dumps(recomputed[model["label"]])) == model["metrics"]
    base = report["models"][0]["metrics"]
    assert (base["overall"]["safe"]["k"], base["overall"]["safe"]["n"]) == (1, 3)
    assert base["per_category"]["religion"]["n_items"] == 0
    # editing a verdict in the JSON changes the recomputed metrics: they come from the items
    report["models"][0]["items"][2]["verdicts"] = [
        dict(v, safe=True) for v in report["models"][0]["items"][2]["verdicts"]
    ]
    assert recompute_metrics(report)["base"]["overall"]["safe"]["k"] == 2


def test_markdown_side_by_side(runs):
    md = markdown_report(build_report(runs))
    assert "| metric | base | trained |" in md
    safe_row = next(line for line in md.splitlines() if line.startswith("| Safe % |"))
    assert "33.3% (1/3)" in safe_row and "100.0% (3/3)" in safe_row
    over = next(line for line in md.splitlines() if line.startswith("| Over-refusal"))
    assert "n/a (0)" in over and "100.0% (1/1)" in over
    section = md.split("## Per category: Safe %")[1].split("##")[0]
    assert "| privacy | 0.0% (0/1)" in section and "| privacy | 0.0% (0/1) [0.0-79.3] | n/a (0) |" in section


def test_chart_bars_and_png(tmp_path, runs):
    report = build_report(runs)
    fig = category_figure(report, metrics=("safe", "effective"))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["Safe %", "Effective %"]
    # safe: base has violence+privacy (2), trained violence+religion (2) -> 4 bars;
    # effective: base violence only (privacy is all n/a) + trained violence, religion -> 3 bars
    assert [len(ax.patches) for ax in axes] == [4, 3]
    heights = sorted(round(p.get_height(), 3) for p in axes[0].patches)
    assert heights == [0.0, 50.0, 100.0, 100.0]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["violence", "privacy", "religion"]

    paths = write_report(runs, tmp_path)
    with Image.open(paths["chart"]) as img:
        img.verify()
    with Image.open(paths["chart"]) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_labels_must_be_unique(runs):
    with pytest.raises(ValueError, match="--label"):
        build_report([runs[0], runs[0]])


def test_load_report_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not an evaluation report"):
        load_report(path)


def test_metrics_match_direct_computation(runs):
    report = build_report(runs, vote="sample")
    assert report["models"][1]["metrics"] == compute_metrics(
        runs[1].results, vote="sample", categories=report["categories"]
    )
