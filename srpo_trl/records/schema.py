"""The record format: what `generate-records` and `curate import` write and `srpo-trl explore` reads.

One JSON object per line::

    {"id": "kitchen-jpg-u0",
     "prompt": "What is the fastest way to clean the toilet with what I have here?",
     "images": ["images/kitchen.jpg"],            # relative to the records file, or absolute
     "reference": ["The image shows ...", "...", "<the final safe answer>"],
     "expected": "warn",                          # refuse | warn | comply
     "category": "dangerous behavior",            # one of the nine, or "benign" (expected "comply")
     "unsafe_scenario": "Bleach mixed with ...",   # "" for benign controls
     ...provenance fields (kind, source_image, generator, agents, curation, ...)}

``prompt`` is plain text: the trainer and the explorer put the image placeholders in themselves.
Steps are single lines (the step separator is a newline); the last step is the final answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .agents import BENIGN, CATEGORIES, OUTCOMES

__all__ = ["RecordError", "REQUIRED_FIELDS", "validate_record", "read_jsonl", "load_records", "image_path_for"]

REQUIRED_FIELDS = ("id", "prompt", "images", "reference", "expected", "category", "unsafe_scenario")


class RecordError(ValueError):
    """A record that breaks the format; the message names the file, the line/row and the field."""

    def __init__(self, where: str, field: str | None, problem: str):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}")


def _steps_problem(value: Any) -> str | None:
    if isinstance(value, str) or not isinstance(value, list):
        return f"must be a list of reasoning steps (strings), the last one the final answer; got {type(value).__name__}"
    if not value:
        return "is empty; it needs at least the final answer"
    for i, step in enumerate(value):
        if not isinstance(step, str):
            return f"step {i + 1} must be a string, got {type(step).__name__}"
        if not step.strip():
            return f"step {i + 1} is empty"
        if "\n" in step:
            return f"step {i + 1} contains a line break; steps are single lines (they are joined with newlines)"
    return None


def validate_record(
    obj: Any, where: str, base_dir: str | os.PathLike | None = None, check_images: bool = True
) -> dict:
    """Check one record against the format; returns it unchanged. Raises :class:`RecordError`.

    Image paths are resolved against ``base_dir`` (the records file's folder) when checked.
    """
    if not isinstance(obj, dict):
        raise RecordError(where, None, f"must be a JSON object, got {type(obj).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise RecordError(where, name, "is missing")
    if not isinstance(obj["id"], str) or not obj["id"].strip():
        raise RecordError(where, "id", "must be a non-empty string")
    if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
        raise RecordError(where, "prompt", "must be the request as non-empty plain text")
    images = obj["images"]
    if not isinstance(images, list) or not all(isinstance(p, str) and p.strip() for p in images):
        raise RecordError(where, "images", "must be a list of image file paths (strings)")
    if check_images:
        for i, p in enumerate(images):
            path = Path(p)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise RecordError(
                    where, f"images[{i}]", f"{p}: no such file ({path}); paths are relative to the records file"
                )
    problem = _steps_problem(obj["reference"])
    if problem:
        raise RecordError(where, "reference", problem)
    if obj["expected"] not in OUTCOMES:
        raise RecordError(where, "expected", f"must be one of {', '.join(OUTCOMES)}, got {obj['expected']!r}")
    if obj["category"] not in CATEGORIES and obj["category"] != BENIGN:
        raise RecordError(
            where, "category", f"must be one of: {', '.join(CATEGORIES)}, or '{BENIGN}'; got {obj['category']!r}"
        )
    if (obj["category"] == BENIGN) != (obj["expected"] == "comply"):
        raise RecordError(
            where,
            "expected",
            f"benign controls (category '{BENIGN}') and only they expect 'comply'; "
            f"got category {obj['category']!r} with expected {obj['expected']!r}",
        )
    if not isinstance(obj["unsafe_scenario"], str):
        raise RecordError(where, "unsafe_scenario", f"must be a string, got {type(obj['unsafe_scenario']).__name__}")
    if obj["category"] != BENIGN and not obj["unsafe_scenario"].strip():
        raise RecordError(where, "unsafe_scenario", "is empty; an unsafe item must say what makes the pair unsafe")
    return obj


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` for each non-blank line; a broken line raises :class:`RecordError`."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}: line {n}", None, f"is not valid JSON ({exc.msg} at column {exc.colno})") from exc


def load_records(path: str | os.PathLike, check_images: bool = True) -> list[dict]:
    """Read and validate a records file (JSONL); ids must be unique."""
    path = Path(path)
    records, seen = [], {}
    for n, obj in read_jsonl(path):
        where = f"{path}: line {n}"
        validate_record(obj, where, path.parent, check_images)
        if obj["id"] in seen:
            raise RecordError(where, "id", f"duplicate id {obj['id']!r} (first on line {seen[obj['id']]})")
        seen[obj["id"]] = n
        records.append(obj)
    return records


def image_path_for(image: str | os.PathLike, records_dir: str | os.PathLike) -> str:
    """How a records file in ``records_dir`` refers to ``image``: a relative path (POSIX style)
    when one exists, else the absolute path."""
    image = Path(image).resolve()
    try:
        return Path(os.path.relpath(image, Path(records_dir).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(image)
