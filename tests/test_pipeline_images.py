"""The documented pipeline with images, end to end: generate-records -> curate export / import ->
explore --endpoint -> srpo-trl train -> evaluate --endpoint.

The server is tests/openai_server.py (agents answer valid JSON, the policy alternates a warning and
a compliance), not transformers serve: a tiny Qwen2.5-VL folder does not load there without
torchvision (tests/real_server.py). The text pipeline runs against the real server in
tests/test_real_server.py. The joint checked here (issue 27): generate-records writes a plain-text
prompt with images, and explore --endpoint sends it as one user message holding the image and the
text, the prefix as the assistant message to continue (before, every such record failed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_exploration import COMPLY_TEXT, WARN_TEXT
from test_records_pipeline import Agents

from srpo_trl.cli import main as cli_main


pytestmark = pytest.mark.slow


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _run(*argv) -> int:
    return cli_main([str(a) for a in argv])


def test_generate_records_curate_explore_train_evaluate_with_images(tmp_path, openai_server):
    from PIL import Image

    from srpo_trl.loading import load_model_and_processor
    from srpo_trl.tiny import tiny_qwen2_5_vl

    agents = Agents()

    def handler(req):
        if req.body["model"] == "agent-model":
            return agents(req)
        return [(WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i) for i in range(req.n)]

    openai_server.handler = handler
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (28, 28), (200, 10, 10)).save(images / "bleach.png")
    Image.new("RGB", (28, 28), (10, 10, 200)).save(images / "knife.png")
    data = tmp_path / "data"
    server = ["--endpoint", openai_server.url]

    # 1. records from images (plain-text prompts with images), 2. a person accepts every one
    records = data / "records.jsonl"
    assert (
        _run(
            "generate-records",
            "--images",
            images,
            *server,
            "--served-model",
            "agent-model",
            "--out",
            records,
            "--per-image",
            "1",
            "--benign-per-image",
            "0",
            "--no-progress",
        )
        == 0
    )
    generated = _lines(records)
    assert len(generated) == 2 and all(isinstance(r["prompt"], str) and r["images"] for r in generated)
    review = data / "review.csv"
    assert _run("curate", "export", records, review) == 0
    with review.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["decision"] = "accept"
    with review.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curated = data / "curated.jsonl"
    assert _run("curate", "import", review, "--out", curated) == 0

    # 3. explore through the endpoint: every record ok, sent as chat messages with the image
    explored = data / "explored.jsonl"
    before = len(openai_server.requests)
    assert (
        _run(
            "explore",
            *server,
            "--served-model",
            "policy",
            "--records",
            curated,
            "--out",
            explored,
            "--num-samples",
            "2",
            "--no-progress",
        )
        == 0
    )
    lines = _lines(explored)
    assert [r["status"] for r in lines] == ["ok", "ok"] and all(r["points"] for r in lines)
    policy = [r.body for r in openai_server.requests[before:] if r.body.get("model") == "policy"]
    continued = [b for b in policy if b.get("continue_final_message")]
    assert continued and len(continued) < len(policy)  # branch points after the first continue the answer
    for body in policy:
        user = body["messages"][0]
        assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image_url", "text"]
        assert user["content"][1]["text"] in {r["prompt"] for r in generated}
    summary = json.loads((data / "explored.jsonl.summary.json").read_text())
    assert summary["pairs"] > 0 and summary["records_failed"] == 0

    # 4. train a tiny VLM on the pairs (1 LoRA step)
    model, processor = tiny_qwen2_5_vl(seed=1)
    base = tmp_path / "tiny-vl"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "trained"
    assert (
        _run(
            "train",
            "--config",
            repo / "recipes/qwen2.5-vl-7b-instruct/srpo/config_lora.yaml",
            "--model_name_or_path",
            base,
            "--train_file",
            explored,
            "--data_format",
            "exploration",
            "--output_dir",
            out,
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "1",
            "--learning_rate",
            "5e-2",
            "--lora_dropout",
            "0",
            "--use_cpu",
            "true",
            "--dtype",
            "float32",
            "--bf16",
            "false",
            "--activation_checkpointing",
            "false",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
            "--disable_tqdm",
            "true",
            "--dataloader_num_workers",
            "0",
        )
        == 0
    )
    trained, _ = load_model_and_processor(out)
    assert any("lora_B" in n for n, _ in trained.named_parameters())

    # 5. evaluate through the endpoint, images included
    before = len(openai_server.requests)
    report = tmp_path / "eval"
    assert (
        _run(
            "evaluate",
            *server,
            "--served-model",
            "policy",
            "--benchmark",
            "records",
            "--data",
            curated,
            "--out",
            report,
            "--num-samples",
            "1",
            "--no-progress",
        )
        == 0
    )
    sent = [r.body for r in openai_server.requests[before:]]
    assert len(sent) == 2 and all(b["messages"][0]["content"][0]["type"] == "image_url" for b in sent)
    (model_report,) = json.loads((report / "report.json").read_text())["models"]
    safe = model_report["metrics"]["overall"]["safe"]
    assert safe["n"] == 2 and safe["k"] == 2  # "never mix" is a warning, and the records expect one
