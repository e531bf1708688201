"""Benchmark loaders: SIUO, MM-SafetyBench and the project's own record format -> ``EvalItem``.

Each loader checks every item it reads and raises :class:`LoadError` naming the file, the item
and the field (and the image path when an image is missing), with what to do about it.

Formats (see docs/evaluation.md for examples):

- **SIUO** generation set (``siuo_gen.json``): a JSON list of objects with ``question_id`` (int),
  ``image, question, category, safety_warning, reference_answer`` (strings; ``category`` one of
  SIUO's nine); images live in ``--images DIR``. SIUO's questions are safe inputs whose
  combination is unsafe: a safe answer helps while warning, so ``expected`` is "warn". The
  **MCQA** set (``siuo_mcqa.json``) has ``options`` (A-D) and ``correct_option`` instead.
- **MM-SafetyBench** (github.com/isXinLiu/MM-SafetyBench): ``processed_questions/<scenario>.json``
  is a JSON object keyed by question id ("0", "1", ...) whose values hold ``Question``,
  ``Rephrased Question`` and ``Rephrased Question(SD)`` (plus ``Key Phrase``, ...); the images are
  ``<images>/<scenario>/<variant>/<id>.jpg`` for the variants ``SD``, ``SD_TYPO`` and ``TYPO``.
  As in the benchmark, ``SD`` goes with ``Rephrased Question(SD)`` and ``SD_TYPO`` / ``TYPO`` with
  ``Rephrased Question``; the extra variant ``TEXT`` asks ``Question`` with no image. The
  expected outcome per scenario is what the scenario's judge template counts as safe
  (:func:`srpo_trl.evaluation.protocols.mm_safetybench.expected_outcome`): "warn" (a disclaimer)
  for 10-Legal_Opinion, 11-Financial_Advice and 12-Health_Consultation, "refuse" for the others
  (13-Gov_Decision and 08-Political_Lobbying included). ``TinyVersion_ID_List.json`` selects the
  benchmark's tiny version (``tiny=``).
- **records** (this project): JSONL or a JSON list of objects with ``id, prompt, images,
  reference, expected, category``; ``expected`` is "refuse", "warn" or "comply" (benign items are
  "comply"); ``images`` are paths relative to ``--images`` (or to the records file's folder).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from ..contract import RecordError
from ..contract import load_records as load_contract_records
from .protocols.mm_safetybench import WARN_SCENARIOS as MMSB_WARN
from .protocols.mm_safetybench import expected_outcome as mmsb_expected
from .protocols.siuo import CATEGORIES as SIUO_CATEGORIES
from .schema import EvalItem


BENCHMARKS = ("siuo", "siuo-mcqa", "mm-safetybench", "records")
SIUO_FIELDS = ("question_id", "image", "question", "category", "safety_warning", "reference_answer")
SIUO_MCQA_FIELDS = ("question_id", "image", "question", "category", "options", "correct_option")
MCQA_CHOICES = ("A", "B", "C", "D")
TINY_LIST_FILE = "TinyVersion_ID_List.json"
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
MMSB_WARN_SCENARIOS = MMSB_WARN  # 13-Gov_Decision is "refuse": see protocols.mm_safetybench
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class LoadError(RecordError):
    """A benchmark file or item that cannot be read: the record contract's error (a
    :class:`srpo_trl.contract.RecordError`), built the way benchmark loaders name things. The message
    names the file, the item and the field; ``path``, ``item`` and ``field`` hold them."""

    def __init__(self, path: Any, item: Any, problem: str, field: str | None = None):
        where = f"{path}" + (f", item {item}" if item is not None else "")
        super().__init__(where, field, problem, path=path, item=item)
        self.args = (f"{where}" + (f", field '{field}'" if field else "") + f": {problem}",)  # the loaders' wording

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


def _names_error(kind: str, unknown: list[str], valid: list[str]) -> str:
    """ "unknown scenario 'x' (did you mean 'y'?); valid: ..." for every unknown name."""
    parts = []
    for name in unknown:
        lowered = {v.lower(): v for v in valid}  # case is a near miss too
        close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {lowered[close[0]]!r}?)" if close else ""))
    return f"unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; valid: {', '.join(valid)}"


def check_names(
    kind: str, names: list[str] | tuple[str, ...] | None, valid: list[str] | tuple[str, ...]
) -> list[str] | None:
    """``names`` stripped and checked against ``valid`` (ValueError listing the valid ones, and the
    closest for a near miss); None stays None (no filter)."""
    if names is None:
        return None
    cleaned = [n.strip() for n in names if n.strip()]
    unknown = [n for n in cleaned if n not in valid]
    if unknown:
        raise ValueError(_names_error(kind, unknown, list(valid)))
    return cleaned


def _typed(path: Path, label: str, obj: dict, name: str, kind: type | tuple, what: str) -> Any:
    value = obj.get(name)
    if value is None:
        raise LoadError(path, label, f"is missing; {what}", name)
    if isinstance(value, bool) or not isinstance(value, kind):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise LoadError(
            path,
            label,
            f"must be of type {want} (as in the benchmark's file), got {type(value).__name__} {value!r:.60}; values are never converted",
            name,
        )
    if isinstance(value, str) and not value.strip():
        raise LoadError(path, label, "is empty", name)
    return value


def siuo_item(
    path: Path, index: int, obj: Any, image_root: Path | None, check_images: bool, *, mcqa: bool = False
) -> EvalItem:
    """One checked SIUO item (generation set, or the MCQA set with ``mcqa=True``).

    Types are SIUO's own: ``question_id`` an int, the texts strings, ``category`` one of SIUO's
    nine (a list, a number or a float id is an error, never converted). The category and the image
    name are stripped (a stray space would only split a category); the texts that reach a prompt
    are kept as they are, as SIUO's scripts send them."""
    label = f"#{index}"
    if not isinstance(obj, dict):
        raise LoadError(path, label, f"must be a JSON object, got {type(obj).__name__}")
    fields = SIUO_MCQA_FIELDS if mcqa else SIUO_FIELDS
    missing = [f for f in fields if obj.get(f) is None]
    if obj.get("question_id") is not None:
        label = f"#{index} (question_id {obj['question_id']!r})"
    if missing:
        raise LoadError(path, label, "is missing; SIUO items need " + ", ".join(fields), missing[0])
    what = "SIUO items need " + ", ".join(fields)
    qid = _typed(path, label, obj, "question_id", int, what)
    question = _typed(path, label, obj, "question", str, what)
    category = _typed(path, label, obj, "category", str, what).strip()
    if category not in SIUO_CATEGORIES:
        raise LoadError(path, label, _names_error("SIUO category", [category], list(SIUO_CATEGORIES)), "category")
    image = _typed(path, label, obj, "image", str, what).strip()
    meta: dict[str, Any] = {"benchmark": "siuo-mcqa" if mcqa else "siuo", "question_id": qid}
    if mcqa:
        options = obj["options"]
        if (
            not isinstance(options, dict)
            or sorted(options) != list(MCQA_CHOICES)
            or not all(isinstance(v, str) for v in options.values())
        ):
            raise LoadError(path, label, f"must map each of {', '.join(MCQA_CHOICES)} to an option text", "options")
        correct = _typed(path, label, obj, "correct_option", str, what).strip()
        if correct not in MCQA_CHOICES:
            raise LoadError(
                path, label, f"must be one of {', '.join(MCQA_CHOICES)}, got {correct!r}", "correct_option"
            )
        from srpo_trl.evaluation.protocols.mcqa import mcqa_prompt

        meta.update(options=dict(options), correct_option=correct, question=question)
        prompt, expected, reference, warning = mcqa_prompt(question, options), None, options[correct], None
    else:
        warning = _typed(path, label, obj, "safety_warning", str, what)
        reference = _typed(path, label, obj, "reference_answer", str, what)
        prompt, expected = question, "warn"
    return EvalItem(
        id=str(qid),
        prompt=prompt,
        images=[_resolve_image(path, label, "image", image, image_root, check_images)],
        category=category,
        expected=expected,
        reference=reference,
        safety_warning=warning,
        source=f"{path}, item {label}",
        meta=meta,
    )


def _siuo_list(path: Path, kind: str) -> list:
    data = _read_json(path)
    if isinstance(data, dict) and all(isinstance(k, str) and k[:2].isdigit() for k in list(data)[:3]):
        raise LoadError(
            path,
            None,
            "looks like an MM-SafetyBench scenario file (an object keyed by question id); use --benchmark mm-safetybench",
        )
    if not isinstance(data, list):
        raise LoadError(path, None, f"SIUO's {kind} file is a JSON list of items, got {type(data).__name__}")
    return data


def _siuo_items(path, image_dir, check_images, categories, mcqa):
    path = Path(path)
    data = _siuo_list(path, "MCQA" if mcqa else "generation")
    categories = check_names("SIUO category", categories, SIUO_CATEGORIES)
    image_root = Path(image_dir) if image_dir is not None else None
    items, seen = [], set()
    for index, obj in enumerate(data):
        item = siuo_item(path, index, obj, image_root, check_images, mcqa=mcqa)
        if item.id in seen:
            raise LoadError(path, item.source.split("item ", 1)[1], f"duplicate question_id {item.id}", "question_id")
        seen.add(item.id)
        if categories is None or item.category in categories:
            items.append(item)
    return items


def load_siuo(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    check_images: bool = True,
    categories: list[str] | None = None,
) -> list[EvalItem]:
    """SIUO's generation file (``siuo_gen.json``) -> items (expected "warn"; see the module doc).
    ``categories``: keep only these (checked against SIUO's nine)."""
    return _siuo_items(path, image_dir, check_images, categories, mcqa=False)


def load_siuo_mcqa(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    check_images: bool = True,
    categories: list[str] | None = None,
) -> list[EvalItem]:
    """SIUO's multiple-choice file (``siuo_mcqa.json``: ``question_id, image, question, category,
    options {A..D}, correct_option``) -> items whose prompt is SIUO's MCQA prompt (see
    :mod:`srpo_trl.evaluation.protocols.mcqa`); ``meta`` holds the options and the correct one."""
    return _siuo_items(path, image_dir, check_images, categories, mcqa=True)


def _mmsb_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / "data" / "processed_questions").is_dir():
            raise LoadError(
                path,
                None,
                "is the MM-SafetyBench repository root; point --data at its question folder: "
                f"{path / 'data' / 'processed_questions'} (images: --images {path / 'data' / 'imgs'})",
            )
        folder = path / "processed_questions" if (path / "processed_questions").is_dir() else path
        files = sorted(p for p in folder.glob("*.json") if p.name != TINY_LIST_FILE)
        if not files:
            raise LoadError(
                folder,
                None,
                "holds no <scenario>.json files; point --data at MM-SafetyBench's data/processed_questions folder",
            )
        return files
    raise LoadError(
        path, None, "not found; point --data at MM-SafetyBench's processed_questions folder or one <scenario>.json"
    )


def find_tiny_list(data_path: str | os.PathLike) -> Path:
    """MM-SafetyBench's ``TinyVersion_ID_List.json`` next to the question folder or above it."""
    start = Path(data_path)
    folder = start if start.is_dir() else start.parent
    for candidate in (folder, *list(folder.parents)[:3]):
        if (candidate / TINY_LIST_FILE).is_file():
            return candidate / TINY_LIST_FILE
    raise LoadError(
        start, None, f"no {TINY_LIST_FILE} found next to it or in the 3 folders above; pass --tiny-list PATH"
    )


def load_tiny_list(path: str | os.PathLike) -> dict[str, set[str]]:
    """``TinyVersion_ID_List.json`` (``[{"Scenario": ..., "Sampled_ID_List": [ids]}, ...]``) -> scenario -> ids."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise LoadError(path, None, f"must be a JSON list of {{Scenario, Sampled_ID_List}}, got {type(data).__name__}")
    out: dict[str, set[str]] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("Scenario"), str):
            raise LoadError(path, f"#{i}", "must be an object with a 'Scenario' name", "Scenario")
        ids = entry.get("Sampled_ID_List")
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise LoadError(
                path, f"#{i} ({entry['Scenario']})", "must be a list of integer question ids", "Sampled_ID_List"
            )
        out[entry["Scenario"].strip()] = {str(x) for x in ids}
    return out


def mmsb_scenario_names(path: str | os.PathLike) -> list[str]:
    return [f.stem for f in _mmsb_files(Path(path))]


def mmsb_item(
    file: Path, scenario: str, qid: str, obj: Any, variant: str, image_root: Path | None, check_images: bool
) -> EvalItem:
    """One checked MM-SafetyBench item (scenario, question, variant)."""
    label = f"'{qid}'"
    if not isinstance(obj, dict):
        raise LoadError(file, label, f"must be a JSON object, got {type(obj).__name__}")
    field = MMSB_QUESTION_FIELD[variant]
    question = obj.get(field)
    if not isinstance(question, str) or not question.strip():
        got = (
            "is missing"
            if question is None
            else f"must be a non-empty string, got {type(question).__name__} {question!r:.60}"
        )
        raise LoadError(file, label, f"{got}; variant {variant} asks this question", field)
    for name in ("Question", "Key Phrase"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise LoadError(file, label, f"must be a string, got {type(obj[name]).__name__}", name)
    images = []
    if variant != "TEXT":
        images = [
            _resolve_image(
                file, label, f"image ({variant})", f"{scenario}/{variant}/{qid}.jpg", image_root, check_images
            )
        ]
    return EvalItem(
        id=f"{scenario}/{variant}/{qid}",
        prompt=question,
        images=images,
        category=scenario,
        expected=mmsb_expected(scenario),
        reference=None,
        safety_warning=None,
        source=f"{file}, item {label} ({variant})",
        meta={
            "benchmark": "mm-safetybench",
            "variant": variant,
            "question_id": str(qid),
            "original_question": obj.get("Question"),
            "key_phrase": obj.get("Key Phrase"),
        },
    )


def load_mm_safetybench(
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    variants: tuple[str, ...] | list[str] = MMSB_VARIANTS,
    scenarios: tuple[str, ...] | list[str] | None = None,
    tiny: str | os.PathLike | bool | None = None,
    check_images: bool = True,
) -> list[EvalItem]:
    """MM-SafetyBench's questions (a ``processed_questions`` folder or one scenario file) -> items.

    One item per (scenario, question, variant); the item id is ``<scenario>/<variant>/<question id>``
    and the category is the scenario. ``scenarios``: keep only these (an unknown name is an error
    listing the valid ones). ``tiny``: keep only the questions of MM-SafetyBench's tiny version
    (True: find ``TinyVersion_ID_List.json`` near ``path``; or its path).
    """
    path = Path(path)
    variants = [v.strip() for v in variants]
    for v in variants:
        if v not in MMSB_ALL_VARIANTS:
            raise ValueError(_names_error("MM-SafetyBench variant", [v], list(MMSB_ALL_VARIANTS)))
    files = _mmsb_files(path)
    scenarios = check_names("scenario", scenarios, [f.stem for f in files])
    if any(v != "TEXT" for v in variants) and image_dir is None:
        raise LoadError(
            path,
            None,
            "MM-SafetyBench's image variants need the image folder: pass --images <imgs> (or --variants TEXT)",
        )
    tiny_ids = None
    if tiny:
        tiny_path = find_tiny_list(path) if tiny is True else Path(tiny)
        tiny_ids = load_tiny_list(tiny_path)
        check_names(f"scenario in {tiny_path}", list(tiny_ids), list(MMSB_SCENARIOS))
    image_root = Path(image_dir) if image_dir is not None else None
    items = []
    for file in files:
        scenario = file.stem
        if scenarios and scenario not in scenarios:
            continue
        data = _read_json(file)
        if not isinstance(data, dict):
            raise LoadError(
                file,
                None,
                f"an MM-SafetyBench scenario file is a JSON object keyed by question id, got {type(data).__name__}",
            )
        if tiny_ids is not None:
            keep = tiny_ids.get(scenario, set())
            absent = sorted(keep - set(data), key=int)
            if absent:
                raise LoadError(
                    file, None, f"the tiny list names question id(s) {absent[:10]} that this file does not hold"
                )
            data = {qid: obj for qid, obj in data.items() if qid in keep}
        for qid, obj in data.items():
            for variant in variants:
                items.append(mmsb_item(file, scenario, qid, obj, variant, image_root, check_images))
    return items


def load_records(
    path: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, check_images: bool = True
) -> list[EvalItem]:
    """The project's records (JSONL or JSON list; :mod:`srpo_trl.contract`) -> items. ``expected`` is required."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(path, None, "file not found; check --data")
    label = lambda n: f"{path}, item at line {n}"  # noqa: E731
    try:
        records = load_contract_records(
            path,
            label=label,
            image_dir=image_dir,
            check_images=check_images,
            required={"expected": "benign items expect 'comply'"},
            name_ids=True,
        )
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


def load_benchmark(
    name: str, path: str | os.PathLike, image_dir: str | os.PathLike | None = None, **kwargs: Any
) -> list[EvalItem]:
    """Dispatch on the benchmark name: "siuo", "siuo-mcqa", "mm-safetybench" or "records"."""
    key = name.lower().replace("_", "-")
    if key in ("mmsafetybench", "mm-safety-bench"):
        key = "mm-safetybench"
    if key == "siuo":
        items = load_siuo(path, image_dir, **kwargs)
    elif key == "siuo-mcqa":
        items = load_siuo_mcqa(path, image_dir, **kwargs)
    elif key == "mm-safetybench":
        items = load_mm_safetybench(path, image_dir, **kwargs)
    elif key == "records":
        items = load_records(path, image_dir, **kwargs)
    else:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if not items:
        raise LoadError(path, None, "holds no items")
    return items
