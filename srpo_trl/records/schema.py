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

``prompt`` is plain text here (chat messages are accepted too, as everywhere: see
:mod:`srpo_trl.contract`, which owns the rules): the trainer and the explorer put the image
placeholders in themselves.
Steps are single lines (the step separator is a newline); the last step is the final answer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from .. import contract
from ..contract import COMPLETE_FIELDS as REQUIRED_FIELDS
from ..contract import RecordError


__all__ = ["RecordError", "REQUIRED_FIELDS", "validate_record", "read_jsonl", "load_records", "image_path_for"]


def _line(path: Path) -> Any:
    return lambda n: f"{path}: line {n}"


def validate_record(
    obj: Any, where: str, base_dir: str | os.PathLike | None = None, check_images: bool = True
) -> dict:
    """Check one record against the complete format (:func:`srpo_trl.contract.validate_record` with
    ``complete=True``); returns it unchanged. Raises :class:`RecordError`.

    Image paths are resolved against ``base_dir`` (the records file's folder) when checked.
    """
    contract.validate_record(obj, where, base_dir=base_dir, check_images=check_images, complete=True)
    return obj


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` for each non-blank line; a broken line raises :class:`RecordError`."""
    path = Path(path)
    for _where, _item, n, obj in contract.read_json_records(path, _line(path)):
        yield n, obj


def load_records(path: str | os.PathLike, check_images: bool = True) -> list[dict]:
    """Read and validate a records file (JSONL); ids must be unique. Returns the records as written."""
    path = Path(path)
    checked = contract.load_records(path, label=_line(path), check_images=check_images, complete=True)
    return [{k: v for k, v in rec.items() if k not in ("_images", "_where")} for rec in checked]


def image_path_for(image: str | os.PathLike, records_dir: str | os.PathLike) -> str:
    """How a records file in ``records_dir`` refers to ``image``: a relative path (POSIX style)
    when one exists, else the absolute path."""
    image = Path(image).resolve()
    try:
        return Path(os.path.relpath(image, Path(records_dir).resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(image)
