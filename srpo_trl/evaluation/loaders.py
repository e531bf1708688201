"""Benchmark loaders: SIUO, MM-SafetyBench and the project's own record format -> ``EvalItem``.

Each loader checks every item it reads and raises :class:`LoadError` naming the file, the item
and the field (and the image path when an image is missing), with what to do about it.

Formats (see docs/evaluation.md for examples):

- **SIUO** generation set (``siuo_gen.json``): a JSON list of objects with ``question_id, image,
  question, category, safety_warning, reference_answer``; images live in ``--images DIR``.
  SIUO's questions are safe inputs whose combination is unsafe: a safe answer helps while warning,
  so ``expected`` is "warn".
- **MM-SafetyBench** (github.com/isXinLiu/MM-SafetyBench): ``processed_questions/<scenario>.json``
  is a JSON object keyed by question id ("0", "1", ...) whose values hold ``Question``,
  ``Rephrased Question`` and ``Rephrased Question(SD)`` (plus ``Key Phrase``, ...); the images are
  ``<images>/<scenario>/<variant>/<id>.jpg`` for the variants ``SD``, ``SD_TYPO`` and ``TYPO``.
  As in the benchmark, ``SD`` goes with ``Rephrased Question(SD)`` and ``SD_TYPO`` / ``TYPO`` with
  ``Rephrased Question``; the extra variant ``TEXT`` asks ``Question`` with no image. Its queries
  are harmful: ``expected`` is "refuse", except the advice scenarios (10-Legal_Opinion,
  11-Financial_Advice, 12-Health_Consultation, 13-Gov_Decision), where the benchmark counts an
  answer with a risk warning / disclaimer as safe: "warn".
- **records** (this project): JSONL or a JSON list of objects with ``id, prompt, images,
  reference, expected, category``; ``expected`` is "refuse", "warn" or "comply" (benign items are
  "comply"); ``images`` are paths relative to ``--images`` (or to the records file's folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..contract import RecordError
from ..contract import load_records as load_contract_records
from .schema import EvalItem

BENCHMARKS = ("siuo", "mm-safetybench", "records")
SIUO_FIELDS = ("question_id", "image", "question", "category", "safety_warning", "reference_answer")
MMSB_VARIANTS = ("SD", "SD_TYPO", "TYPO")
MMSB_ALL_VARIANTS = MMSB_VARIANTS + ("TEXT",)
MMSB_QUESTION_FIELD = {
    "SD": "Rephrased Question(SD)",
    "SD_TYPO": "Rephrased Question",
    "TYPO": "Rephrased Question",
    "TEXT": "Question",
}
MMSB_SCENARIOS = (
    "01-Illegal_Activitiy",  # sic: the benchmark's own spelling
    "02-HateSpeech",
    "03-Malware_Generation",
    "04-Physical_Harm",
    "05-EconomicHarm",
    "06-Fraud",
    "07-Sex",
    "08-Political_Lobbying",
    "09-Privacy_Violence",
    "10-Legal_Opinion",
    "11-Financial_Advice",
    "12-Health_Consultation",
    "13-Gov_Decision",
)
MMSB_WARN_SCENARIOS = ("10-Legal_Opinion", "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class LoadError(RecordError):
    """A benchmark file or item that cannot be read: the record contract's error (a
    :class:`srpo_trl.contract.RecordError`), built the way benchmark loaders name things. The message
    names the file, the item and the field; ``path``, ``item`` and ``field`` hold them."""

    def __init__(self, path: Any, item: Any, problem: str, field: str | None = None):
        where = f"{path}" + (f", item {item}" if item is not None else "")
        super().__init__(where, field, problem, path=path, item=item)

    @classmethod
    def at(cls, path: Any, item: Any, problem: str, field: str | None = None) -> LoadError:
        return cls(path, item, problem, field)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise LoadError(path, None, "file not found; check --data")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise LoadError(path, None, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise LoadError(path, None, f"is not UTF-8 text ({exc.reason})") from exc


def _resolve_image(path: Path, item: Any, field: str, name: Any, image_dir: Path | None, check: bool) -> str:
    if not isinstance(name, str) or not name.strip():
        raise LoadError(path, item, f"must be an image file name, got {name!r}", field)
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = (image_dir if image_dir is not None else path.parent) / candidate
    if check and not candidate.is_file():
        hint = "pass the image folder with --images" if image_dir is None else "check --images"
        raise LoadError(path, item, f"image not found: {candidate}; {hint}", field)
    return str(candidate)


def load_siuo(path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, check_images: bool = True) -> list[EvalItem]:
    """SIUO's generation file (``siuo_gen.json``) -> items (expected "warn"; see the module doc)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise LoadError(path, None, f"SIUO's generation file is a JSON list of items, got {type(data).__name__}")
    image_root = Path(image_dir) if image_dir is not None else None
    items, seen = [], set()
    for index, obj in enumerate(data):
        label = f"#{index}"
        if not isinstance(obj, dict):
            raise LoadError(path, label, f"must be a JSON object, got {type(obj).__name__}")
        if obj.get("question_id") is not None:
            label = f"#{index} (question_id {obj['question_id']})"
        for name in SIUO_FIELDS:
            if name not in obj or obj[name] is None:
                raise LoadError(path, label, "is missing; SIUO items need " + ", ".join(SIUO_FIELDS), name)
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise LoadError(path, label, "must be a non-empty string", "question")
        qid = str(obj["question_id"])
        if qid in seen:
            raise LoadError(path, label, f"duplicate question_id {qid}", "question_id")
        seen.add(qid)
        items.append(
            EvalItem(
                id=qid,
                prompt=obj["question"],
                images=[_resolve_image(path, label, "image", obj["image"], image_root, check_images)],
                category=str(obj["category"]),
                expected="warn",
                reference=str(obj["reference_answer"]),
                safety_warning=str(obj["safety_warning"]),
                source=f"{path}, item {label}",
                meta={"benchmark": "siuo"},
            )
        )
    return items


def _mmsb_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        folder = path / "processed_questions" if (path / "processed_questions").is_dir() else path
        files = sorted(p for p in folder.glob("*.json"))
        if not files:
            raise LoadError(folder, None, "holds no <scenario>.json files; point --data at MM-SafetyBench's processed_questions folder")
        return files
    raise LoadError(path, None, "not found; point --data at MM-SafetyBench's processed_questions folder or one <scenario>.json")


def load_mm_safetybench(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    variants: tuple[str, ...] | list[str] = MMSB_VARIANTS,
    scenarios: tuple[str, ...] | list[str] | None = None,
    check_images: bool = True,
) -> list[EvalItem]:
    """MM-SafetyBench's questions (a ``processed_questions`` folder or one scenario file) -> items.

    One item per (scenario, question, variant); the item id is ``<scenario>/<variant>/<question id>``
    and the category is the scenario.
    """
    path = Path(path)
    for v in variants:
        if v not in MMSB_ALL_VARIANTS:
            raise ValueError(f"unknown MM-SafetyBench variant {v!r}; choose from {', '.join(MMSB_ALL_VARIANTS)}")
    if any(v != "TEXT" for v in variants) and image_dir is None:
        raise LoadError(path, None, "MM-SafetyBench's image variants need the image folder: pass --images <imgs>")
    image_root = Path(image_dir) if image_dir is not None else None
    items = []
    for file in _mmsb_files(path):
        scenario = file.stem
        if scenarios and scenario not in scenarios:
            continue
        data = _read_json(file)
        if not isinstance(data, dict):
            raise LoadError(file, None, f"an MM-SafetyBench scenario file is a JSON object keyed by question id, got {type(data).__name__}")
        expected = "warn" if scenario in MMSB_WARN_SCENARIOS else "refuse"
        for qid, obj in data.items():
            label = f"'{qid}'"
            if not isinstance(obj, dict):
                raise LoadError(file, label, f"must be a JSON object, got {type(obj).__name__}")
            for variant in variants:
                field = MMSB_QUESTION_FIELD[variant]
                question = obj.get(field)
                if not isinstance(question, str) or not question.strip():
                    raise LoadError(file, label, f"is missing or empty; variant {variant} asks this question", field)
                images = []
                if variant != "TEXT":
                    images = [
                        _resolve_image(file, label, f"image ({variant})", f"{scenario}/{variant}/{qid}.jpg", image_root, check_images)
                    ]
                items.append(
                    EvalItem(
                        id=f"{scenario}/{variant}/{qid}",
                        prompt=question,
                        images=images,
                        category=scenario,
                        expected=expected,
                        reference=None,
                        safety_warning=None,
                        source=f"{file}, item {label} ({variant})",
                        meta={"benchmark": "mm-safetybench", "variant": variant, "question_id": str(qid),
                              "original_question": obj.get("Question")},
                    )
                )
    return items


def load_records(path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, check_images: bool = True) -> list[EvalItem]:
    """The project's records (JSONL or JSON list; :mod:`srpo_trl.contract`) -> items. ``expected`` is required."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(path, None, "file not found; check --data")
    label = lambda n: f"{path}, item at line {n}"  # noqa: E731
    try:
        records = load_contract_records(path, label=label, image_dir=image_dir, check_images=check_images,
                                        required={"expected": "benign items expect 'comply'"}, name_ids=True)  # fmt: skip
    except RecordError as exc:  # the contract's checks, named as this loader names items
        raise LoadError(path, exc.item, exc.problem, exc.field) from None
    items = []
    for rec in records:
        items.append(
            EvalItem(
                id=str(rec["id"]),
                prompt=rec["prompt"],
                images=list(rec["_images"]),
                category=str(rec.get("category") or "uncategorized"),
                expected=rec["expected"],
                reference=rec.get("reference"),
                safety_warning=rec.get("safety_warning"),
                source=rec["_where"],
                meta={"benchmark": "records"},
            )
        )
    return items


def load_benchmark(name: str, path: str | os.PathLike, image_dir: str | os.PathLike | None = None, **kwargs: Any) -> list[EvalItem]:
    """Dispatch on the benchmark name: "siuo", "mm-safetybench" or "records"."""
    key = name.lower().replace("_", "-")
    if key in ("mmsafetybench", "mm-safety-bench"):
        key = "mm-safetybench"
    if key == "siuo":
        items = load_siuo(path, image_dir, **kwargs)
    elif key == "mm-safetybench":
        items = load_mm_safetybench(path, image_dir, **kwargs)
    elif key == "records":
        items = load_records(path, image_dir, **kwargs)
    else:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if not items:
        raise LoadError(path, None, "holds no items")
    return items
