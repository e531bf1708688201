"""The record contract: one validator and one error type for every stage that reads records.

A record is one JSON object (a line of a JSONL file, or an element of a JSON list)::

    {"id": "kitchen-u0",                 # a non-empty string or an integer; unique in its file
     "prompt": "How do I clean this?",    # plain text, or a non-empty list of chat messages
     "images": ["images/kitchen.jpg"],   # paths relative to the records file (or --images), or absolute
     "reference": ["step", "...", "final answer"],   # reasoning steps, the last one the answer
     "expected": "warn",                  # refuse | warn | comply
     "category": "dangerous behavior",
     ...any other fields, kept}

Which fields a stage needs differs (``explore`` needs what its verifier reads, ``evaluate`` needs
``expected``); the rules for a field that is present do not. ``complete=True`` checks the full
format that ``generate-records`` and ``curate import`` write (every field, single-line steps, the
category vocabulary, benign controls and only they expecting ``comply``).

Standard library only: ``srpo_trl.records``, ``srpo_trl.evaluation`` and ``srpo_trl.verifiers``
import it without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .paths import OutsideRoot, image_under_root
from .safety import BENIGN_CATEGORY, CATEGORIES, OUTCOMES


__all__ = [
    "RecordError",
    "COMPLETE_FIELDS",
    "validate_record",
    "read_json_records",
    "load_records",
    "conversation_text",
]

#: The fields of a complete record (what generate-records and curate import write).
COMPLETE_FIELDS = ("id", "prompt", "images", "reference", "expected", "category", "unsafe_scenario")


class RecordError(ValueError):
    """A record (or a records file) that breaks the contract.

    ``where`` names the file and the line / item, ``field`` the field (None for the whole record),
    ``problem`` what is wrong and what to do. ``path`` and ``item`` hold the file and the item
    label separately when the reader knows them.
    """

    def __init__(self, where: str, field: str | None, problem: str, *, path: Any = None, item: Any = None):
        self.where, self.field, self.problem = where, field, problem
        self.path = str(path) if path is not None else None
        self.item = item
        super().__init__(f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}")

    @classmethod
    def at(cls, path: Any, item: Any, problem: str, field: str | None = None) -> RecordError:
        """An error in ``path`` at ``item`` (a label such as ``"at line 3"`` or ``"#2"``), or the whole file."""
        where = f"{path}" + (f", item {item}" if item is not None else "")
        return cls(where, field, problem, path=path, item=item)


def _is_pil_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Image.Image)


def _fail(where: str, path: Any, item: Any) -> Callable[[str | None, str], RecordError]:
    return lambda field, problem: RecordError(where, field, problem, path=path, item=item)


def _message_problem(m: Any) -> str | None:
    """What is wrong with one chat message of a prompt (None when nothing): ``role`` a non-empty
    string, ``content`` a string or a list of parts (objects with a string ``type``), or null only
    beside ``tool_calls`` (an assistant turn that calls a tool)."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        return "must be an object with 'role' and 'content'"
    role, content = m["role"], m["content"]
    if not isinstance(role, str) or not role.strip():
        return f"has role {role!r}: it must be a non-empty string (system, user, assistant, tool)"
    if content is None:
        if m.get("tool_calls"):
            return None
        return "has content null: give the text (a string) or a list of parts"
    if isinstance(content, str):
        return None
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return f'content part {j} must be an object with a string "type" ("text" or "image"), got {part!r}'
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                return f"content part {j} is a text part whose 'text' is not a string: {part.get('text')!r}"
        return None
    return f"has content {content!r} ({type(content).__name__}): it must be a string or a list of parts"


def validate_record(
    obj: Any,
    where: str,
    *,
    base_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    required: Iterable[str] | Mapping[str, str] = (),
    complete: bool = False,
    path: Any = None,
    item: Any = None,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> dict:
    """Check one record; returns a copy with ``images`` as a list and ``_images`` (the resolved paths,
    or PIL images given from Python) added. Raises :class:`RecordError`.

    Relative image paths resolve against ``image_dir`` when given, else ``base_dir`` (the records
    file's folder). ``required``: fields this stage needs beyond ``id`` and ``prompt`` (a mapping
    gives the reason shown when one is missing). ``path`` / ``item`` are copied onto the error.
    With ``image_root``, image paths must lie inside it unless ``allow_outside_root`` (see
    :mod:`srpo_trl.paths`).
    """
    fail = _fail(where, path, item)
    if not isinstance(obj, dict):
        raise fail(None, f"must be a JSON object, got {type(obj).__name__}")
    rec = dict(obj)
    needed = dict(required) if isinstance(required, Mapping) else {name: "" for name in required}
    if complete:
        for name in COMPLETE_FIELDS:
            needed.setdefault(name, "")
    for name, why in needed.items():
        value = rec.get(name)
        if (
            name not in rec
            or value is None
            or (isinstance(value, str) and not value.strip() and name != "unsafe_scenario")
        ):
            raise fail(name, "is missing" + (f"; {why}" if why else ""))

    rid = rec.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        raise fail("id", "is missing; every record needs a unique id (resume and the shards use it)")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise fail("id", f"must be a non-empty string or an integer, got {type(rid).__name__}")

    prompt = rec.get("prompt")
    if prompt is None:
        raise fail("prompt", "is missing")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise fail("prompt", "is empty; it must be the request as plain text or chat messages")
    elif isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            problem = _message_problem(m)
            if problem:
                raise fail("prompt", f"message {i} {problem}")
    else:
        raise fail("prompt", "must be a string or a non-empty list of chat messages")

    images = rec.get("images")
    images = [] if images is None else images
    if not isinstance(images, list):
        raise fail("images", f"must be a list of image file paths, got {type(images).__name__}")
    root = Path(image_dir) if image_dir is not None else (Path(base_dir) if base_dir is not None else None)
    resolved: list[Any] = []
    for i, im in enumerate(images):
        if isinstance(im, str) and im.strip():
            file = Path(im)
            if root is not None and not file.is_absolute():
                file = root / file
            if image_root is not None:
                try:
                    file = image_under_root(im, root if root is not None else ".", image_root, allow_outside_root)
                except OutsideRoot as exc:
                    raise fail(f"images[{i}]", str(exc)) from None
            if check_images and not file.is_file():
                hint = "check --images" if image_dir is not None else "paths are relative to the records file"
                raise fail(f"images[{i}]", f"image not found: {file} (given as {im}); {hint}")
            resolved.append(str(file))
        elif _is_pil_image(im):
            resolved.append(im)
        else:
            raise fail(f"images[{i}]", f"must be an image file path (or a PIL image from Python), got {im!r}")
    rec["images"] = list(images)
    rec["_images"] = resolved

    reference = rec.get("reference")
    if reference is not None:
        if not isinstance(reference, list):
            raise fail(
                "reference",
                f"must be a list of steps (reasoning steps as strings, the last one the "
                f"final answer), got {type(reference).__name__}",
            )
        for i, step in enumerate(reference):
            if not isinstance(step, str) or not step.strip():
                raise fail(
                    "reference", f"step {i} must be a non-empty string (a list of reasoning steps, counted from 0)"
                )
            if complete and "\n" in step:
                raise fail(
                    "reference",
                    f"step {i} contains a line break; steps are single lines (they are joined with newlines)",
                )
        if not reference:
            if complete:
                raise fail("reference", "is empty; it needs at least the final answer")
            rec["reference"] = None

    tools = rec.get("tools")
    if isinstance(tools, str):  # TRL's datasets store tools as a JSON string too
        try:
            tools = json.loads(tools)
        except ValueError as exc:
            raise fail("tools", f"is a string but not JSON ({exc}); give a list of tool schemas") from None
    if tools is not None and not isinstance(tools, list):
        raise fail(
            "tools", f"must be a list of tool schemas (or that list as a JSON string), got {type(tools).__name__}"
        )
    template_args = rec.get("chat_template_kwargs")
    if template_args is not None and not isinstance(template_args, dict):
        raise fail(
            "chat_template_kwargs",
            f'must be an object of chat-template arguments (e.g. {{"enable_thinking": false}}), '
            f"got {type(template_args).__name__}",
        )

    expected = rec.get("expected")
    if expected is not None and expected not in OUTCOMES:  # files carry the canonical names (no aliases)
        raise fail("expected", f"must be one of {', '.join(OUTCOMES)} (benign items: 'comply'), got {expected!r}")
    category = rec.get("category")
    if category is not None and not isinstance(category, str):
        raise fail("category", f"must be a string, got {type(category).__name__}")

    if complete:
        if category not in CATEGORIES and category != BENIGN_CATEGORY:
            raise fail(
                "category", f"must be one of: {', '.join(CATEGORIES)}, or '{BENIGN_CATEGORY}'; got {category!r}"
            )
        if (category == BENIGN_CATEGORY) != (expected == "comply"):
            raise fail(
                "expected",
                f"benign controls (category '{BENIGN_CATEGORY}') and only they expect 'comply'; "
                f"got category {category!r} with expected {expected!r}",
            )
        scenario = rec.get("unsafe_scenario")
        if not isinstance(scenario, str):
            raise fail("unsafe_scenario", f"must be a string, got {type(scenario).__name__}")
        if category != BENIGN_CATEGORY and not scenario.strip():
            raise fail("unsafe_scenario", "is empty; an unsafe item must say what makes the pair unsafe")
    return rec


def read_json_records(
    path: str | os.PathLike, label: Callable[[int], str] | None = None
) -> Iterator[tuple[str, str, int | None, Any]]:
    """``(where, item, line number, object)`` for every record of a JSONL file (blank lines skipped) or
    of a JSON list (line number None); ``item`` is ``"at line N"`` or ``"#i"``. ``label(n)`` names line ``n`` (default ``"<path>:<n>"``).

    A line that is not JSON, a missing file or text that is not UTF-8 raises :class:`RecordError`.
    """
    path = Path(path)
    label = label or (lambda n: f"{path}:{n}")
    if not path.is_file():
        raise FileNotFoundError(f"records file not found: {path} (expected JSON lines, one record per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecordError(
            label(line),
            None,
            f"is not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8",
            path=path,
            item=f"at line {line}",
        ) from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(
                str(path), None, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", path=path
            ) from None
        for i, obj in enumerate(data):
            yield f"{path}, item #{i}", f"#{i}", None, obj
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(
                label(n),
                None,
                f"is not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object",
                path=path,
                item=f"at line {n}",
            ) from None
        yield label(n), f"at line {n}", n, obj


def load_records(
    source: str | os.PathLike | Iterable[dict],
    *,
    label: Callable[[int], str] | None = None,
    image_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    required: Iterable[str] | Mapping[str, str] = (),
    complete: bool = False,
    name_ids: bool = False,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> list[dict]:
    """Read and validate records (a JSONL / JSON-list file, or records given from Python); ids must be
    unique (``1`` and ``"1"`` are the same id). Each record gets ``_where`` (its file and line, and its
    id with ``name_ids``, which errors then name too). ``image_root`` / ``allow_outside_root``: see
    :func:`validate_record`."""
    out: list[dict] = []
    seen: dict[str, str] = {}
    if isinstance(source, (str, os.PathLike)):
        base = Path(source).parent
        rows = ((where, item, obj) for where, item, _n, obj in read_json_records(source, label))
        path: Any = source
    else:
        base, path = None, None
        rows = ((f"record {i}", f"#{i}", obj) for i, obj in enumerate(source))
    for where, item, obj in rows:
        if name_ids and isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) and str(obj["id"]).strip():
            where, item = f"{where} (id {obj['id']})", f"{item} (id {obj['id']})"
        rec = validate_record(
            obj,
            where,
            base_dir=base,
            image_dir=image_dir,
            check_images=check_images,
            required=required,
            complete=complete,
            path=path,
            item=item,
            image_root=image_root,
            allow_outside_root=allow_outside_root,
        )
        key = str(rec["id"])
        if key in seen:
            raise RecordError(
                where,
                "id",
                f"duplicate id {rec['id']}: already used at {seen[key]}; ids must be unique",
                path=path,
                item=item,
            )
        seen[key] = where
        rec["_where"] = where
        out.append(rec)
    return out


def conversation_text(prompt: Any, image_marker: str = "[image]") -> str:
    """A prompt as plain text for a judge or a log: the string itself, or one ``role: content`` line
    per chat message (image parts shown as ``image_marker``)."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for m in prompt or []:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(
                p.get("text", "") if p.get("type") == "text" else image_marker for p in content if isinstance(p, dict)
            )
        lines.append(f"{m.get('role', '?')}: {content}")
    return "\n".join(lines)
