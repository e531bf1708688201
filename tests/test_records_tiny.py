"""The record pipeline with the in-process transformers backend on a tiny Qwen2.5-VL.

The tiny model writes junk, so every item goes through the retry path and is recorded failed:
that is the point here (the end-to-end path with a real processor and ``model.generate``).
"""

import functools
import json

import pytest

from srpo_trl.records import PipelineConfig, generate_records, main_generate, output_paths


@pytest.fixture(scope="module")
def tiny_vlm():
    from srpo_trl.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(seed=0)


@pytest.fixture
def images(tmp_path):
    from srpo_trl.tiny import make_image

    d = tmp_path / "images"
    d.mkdir()
    make_image(1).save(d / "one.png")
    make_image(2, size=(56, 28)).save(d / "two.png")
    return d


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_in_process_backend_reaches_the_model_with_images_and_fails_items_cleanly(tiny_vlm, images, tmp_path):
    from srpo_trl.backends import TransformersBackend

    model, processor = tiny_vlm
    seen = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill (decode steps feed one token)
            seen.append({k: tuple(v.shape) for k, v in kwargs.items() if hasattr(v, "shape")})
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        backend = TransformersBackend(model, processor, batch_size=1, show_progress=False)
        out = tmp_path / "records.jsonl"
        summary = generate_records(
            backend,
            images,
            out,
            PipelineConfig(
                per_image=1, benign_per_image=1, max_retries=1, max_new_tokens=6, temperature=0.0, show_progress=False
            ),
        )
    finally:
        del model.forward

    # 4 items x 2 attempts each (the first agent never answers valid JSON), each with its image.
    assert len(seen) == 8
    assert all("pixel_values" in s and "image_grid_thw" in s for s in seen)
    assert seen[0]["image_grid_thw"] == (1, 3) and seen[-1]["image_grid_thw"] == (1, 3)
    # The retry turn makes the second prompt longer than the first.
    assert seen[1]["input_ids"][1] > seen[0]["input_ids"][1]

    assert _lines(out) == []
    failed = _lines(output_paths(out)["failed"])
    assert [(f["id"], f["stage"], f["attempts"]) for f in failed] == [
        ("one-png-u0", "query", 2),
        ("one-png-b0", "benign_query", 2),
        ("two-png-u0", "query", 2),
        ("two-png-b0", "benign_query", 2),
    ]
    assert all(f["reason"] in ("not_json", "missing_field", "bad_value", "bad_category") for f in failed)
    assert summary["items"] == {"planned": 4, "done": 0, "failed": 4, "pending": 0}
    assert sum(summary["failures_by_reason"].values()) == 4


def test_cli_with_a_local_model_folder(tiny_vlm, images, tmp_path, capsys):
    from srpo_trl.loading import save_model_and_processor

    folder = save_model_and_processor(*tiny_vlm, tmp_path / "model")
    out = tmp_path / "records.jsonl"
    argv = [
        "--images",
        str(images),
        "--model",
        str(folder),
        "--per-image",
        "1",
        "--benign-per-image",
        "0",
        "--agent-retries",
        "0",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--no-progress",
        "--dtype",
        "float32",
    ]
    assert main_generate(argv) == 0
    assert "items: 0 done, 2 failed of 2 planned" in capsys.readouterr().out
    failed = _lines(output_paths(out)["failed"])
    assert [f["id"] for f in failed] == ["one-png-u0", "two-png-u0"]
    assert failed[0]["generator"]["backend"] == "transformers" and failed[0]["generator"]["model"] == str(
        folder.resolve()
    )
