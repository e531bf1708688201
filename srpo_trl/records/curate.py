"""Human curation: export records to a review file, import the reviewer's decisions and edits.

    srpo-trl curate export records.jsonl review.csv        # or review.jsonl
    srpo-trl curate import review.csv --out curated.jsonl

The review file has one row per record. The reviewer fills ``decision`` with ``accept``, ``edit``
or ``reject`` (an empty decision means "not reviewed yet": the row is left out and counted) and may
write a ``note``. Editable columns: ``prompt``, ``category``, ``expected``, ``unsafe_scenario``,
``reasoning`` (one step per line), ``final_answer`` and ``images`` (one path per line, relative
to the review file). ``_fingerprint`` and ``_provenance`` are written by the export: leave them
as they are. An ``accept`` row whose text was changed is an error (say ``edit`` to keep changes),
so an edit is never taken or dropped by accident.

Import checks every row and reports every bad one, naming the row (as a spreadsheet numbers it:
the header is row 1; for JSONL the line) and the field, then writes nothing unless
``skip_invalid`` is set.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store
from ..paths import OutsideRoot, image_under_root
from .agents import BENIGN, CATEGORIES, OUTCOMES, normalize_category
from .schema import RecordError, image_path_for, load_records, validate_record


__all__ = ["REVIEW_COLUMNS", "DECISIONS", "ReviewError", "ImportResult", "export_review", "import_review"]

EDITABLE = ("prompt", "category", "expected", "unsafe_scenario", "reasoning", "final_answer", "images")
REVIEW_COLUMNS = ("id", "decision", "note", "kind") + EDITABLE + ("_fingerprint", "_provenance")
DECISIONS = ("accept", "edit", "reject")
_CORE = ("id", "prompt", "images", "reference", "expected", "category", "unsafe_scenario")


class ReviewError(ValueError):
    """Bad rows in a review file; ``errors`` holds one message per problem (row and field named)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(f"{len(errors)} problem(s) in the review file:\n" + "\n".join(f"  {e}" for e in errors))


@dataclass
class ImportResult:
    records: list[dict]
    accepted: int = 0
    edited: int = 0
    rejected: int = 0
    pending: list[str] = field(default_factory=list)  # where the rows without a decision are
    errors: list[str] = field(default_factory=list)  # with skip_invalid: the rows left out


def _lines(value: Any) -> list[str]:
    """A cell with one entry per line (or a JSON list in a JSONL review) -> stripped, non-empty entries."""
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    if value is None:
        return []
    return [line.strip() for line in str(value).splitlines() if line.strip()]


def _text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _canonical(values: dict) -> dict:
    """The editable fields as the import compares them (whitespace and line-ending differences ignored)."""
    return {
        "prompt": str(values.get("prompt") or "").strip(),
        "category": _text(values.get("category")).lower(),
        "expected": _text(values.get("expected")).lower(),
        "unsafe_scenario": str(values.get("unsafe_scenario") or "").strip(),
        "reasoning": [_text(s) for s in _lines(values.get("reasoning"))],
        "final_answer": _text(values.get("final_answer")),
        "images": _lines(values.get("images")),
    }


def _fingerprint(values: dict) -> str:
    canon = _canonical(values)
    return ".".join(
        hashlib.sha256(json.dumps(canon[k], ensure_ascii=False).encode()).hexdigest()[:8] for k in EDITABLE
    )


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _review_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise ValueError(f"{path}: the review file must end in .csv or .jsonl")


def _root(image_root: str | os.PathLike | None) -> str | None:
    return str(Path(image_root).resolve()) if image_root is not None else None


def _lock(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def export_review(
    records_path: str | os.PathLike,
    review_path: str | os.PathLike,
    force: bool = False,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    *,
    overwrite: bool = False,
) -> int:
    """Write a review file (CSV or JSONL, by extension) for the records; returns the number of rows.

    What produced the review (the records file's content hash, the image root) is stored beside it
    (``<review>.meta.json``, :mod:`srpo_trl.store`). An existing review file (a reviewer's work) is
    never replaced unless ``overwrite`` (or its old name ``force``): exported from other records or
    with other arguments (or with no meta file) the refusal names what changed; exported from the same
    ones, it says the review is up to date. Image paths outside ``image_root`` (when given; the command
    line always sets one) are refused unless ``allow_outside_root``. A second export to the same
    review file is refused while one runs.
    """
    records_path, review_path = Path(records_path), Path(review_path)
    overwrite = overwrite or force
    fmt = _review_format(review_path)
    if not records_path.is_file():
        load_records(records_path)  # its error: no such records file, and what one holds
    fingerprint = {
        "records_sha256": store.file_sha256(records_path),
        "image_root": _root(image_root),
        "allow_outside_root": allow_outside_root,
    }
    with store.output_lock(_lock(review_path), "curate export", review_path):
        if review_path.exists() and not overwrite:
            store.check_fingerprint(
                review_path,
                fingerprint,
                write=False,
                another="another review file",
                advice="Exporting again would replace a reviewer's work with rows from other records: pass "
                "--overwrite to replace it anyway, or choose another review file",
            )
            raise FileExistsError(
                f"{review_path} exists and was exported from the same records with the same arguments (it may "
                "hold a reviewer's work); nothing written. Pass --overwrite (or --force) to export it again"
            )
        n = _export(records_path, review_path, fmt, image_root, allow_outside_root)
        store.check_fingerprint(review_path, fingerprint, overwrite=True)  # record what produced it
    return n


def _export(
    records_path: Path, review_path: Path, fmt: str, image_root: str | os.PathLike | None, allow_outside_root: bool
) -> int:
    records = load_records(records_path)
    rows = []
    for n, rec in enumerate(records, start=1):
        try:
            paths = [image_under_root(p, records_path.parent, image_root, allow_outside_root) for p in rec["images"]]
        except OutsideRoot as exc:
            raise RecordError(f"{records_path}: record {n} (id {rec['id']})", "images", str(exc)) from None
        images = [image_path_for(p, review_path.parent) for p in paths]
        values = {
            "prompt": rec["prompt"],
            "category": rec["category"],
            "expected": rec["expected"],
            "unsafe_scenario": rec["unsafe_scenario"],
            "reasoning": rec["reference"][:-1],
            "final_answer": rec["reference"][-1],
            "images": images,
        }
        provenance = {k: v for k, v in rec.items() if k not in _CORE and k != "curation"}
        if "curation" in rec:
            provenance["previous_curation"] = rec["curation"]
        row = {
            "id": rec["id"],
            "decision": "",
            "note": "",
            "kind": rec.get("kind", BENIGN if rec["category"] == BENIGN else "unsafe"),
            **values,
            "_fingerprint": _fingerprint(values),
            "_provenance": json.dumps(provenance, ensure_ascii=False, sort_keys=True),
        }
        rows.append(row)
    review_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = review_path.with_name(review_path.name + ".tmp")
    if fmt == "csv":
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=REVIEW_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "reasoning": "\n".join(row["reasoning"]), "images": "\n".join(row["images"])})
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: row[k] for k in REVIEW_COLUMNS}, ensure_ascii=False) + "\n")
    os.replace(tmp, review_path)
    return len(rows)


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def _read_review(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` pairs; ``where`` is "row N" (spreadsheet numbering) or "line N"."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such review file (write one with `srpo-trl curate export`)")
    if _review_format(path) == "csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REVIEW_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ReviewError(
                    [
                        f"{path}: the header lacks column(s) {', '.join(missing)}; keep the columns `curate export` wrote"
                    ]
                )
            rows = []
            for n, row in enumerate(reader, start=2):
                if None in row:
                    rows.append((f"row {n}", {"__extra__": row.pop(None), **row}))
                else:
                    rows.append((f"row {n}", row))
            return rows
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append((f"line {n}", {"__broken__": f"is not valid JSON ({exc.msg} at column {exc.colno})"}))
                continue
            rows.append((f"line {n}", obj if isinstance(obj, dict) else {"__broken__": "is not a JSON object"}))
    return rows


class _RowProblem(Exception):
    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem
        super().__init__(problem)


def _build_record(
    row: dict, review_dir: Path, out_dir: Path, check_images: bool, image_root=None, allow_outside_root: bool = False
) -> tuple[dict, list[str]]:
    """An edited/accepted row -> a record (images relative to ``out_dir``) and the changed fields."""
    raw_prov = row.get("_provenance")
    if isinstance(raw_prov, dict):
        provenance = raw_prov
    else:
        try:
            provenance = json.loads(raw_prov) if raw_prov not in (None, "") else {}
        except json.JSONDecodeError as exc:
            raise _RowProblem(
                "_provenance", f"is not valid JSON ({exc.msg}); restore it from the export (it is not for editing)"
            ) from exc
        if not isinstance(provenance, dict):
            raise _RowProblem(
                "_provenance", "must be a JSON object; restore it from the export (it is not for editing)"
            )
    fingerprint = str(row.get("_fingerprint") or "")
    parts = fingerprint.split(".")
    if len(parts) != len(EDITABLE):
        raise _RowProblem("_fingerprint", "is damaged; restore it from the export (it is not for editing)")
    current = _fingerprint(row).split(".")
    changed = [name for name, a, b in zip(EDITABLE, parts, current) if a != b]

    canon = _canonical(row)
    if not canon["prompt"]:
        raise _RowProblem("prompt", "is empty; write the user's request")
    category = canon["category"]
    category = BENIGN if category == BENIGN else normalize_category(category, CATEGORIES)
    if category is None:
        raise _RowProblem(
            "category", f"must be one of: {', '.join(CATEGORIES)}, or {BENIGN}; got {row.get('category')!r}"
        )
    expected = canon["expected"]
    if expected not in OUTCOMES:
        raise _RowProblem("expected", f"must be one of: {', '.join(OUTCOMES)}; got {row.get('expected')!r}")
    if (category == BENIGN) != (expected == "comply"):
        raise _RowProblem(
            "expected",
            f"a '{BENIGN}' item expects 'comply' and any other category expects refuse or warn; "
            f"got category {category!r} with expected {expected!r}",
        )
    if category != BENIGN and not canon["unsafe_scenario"]:
        raise _RowProblem("unsafe_scenario", "is empty; say what makes the image and the request unsafe together")
    if not canon["reasoning"]:
        raise _RowProblem("reasoning", "is empty; write the reasoning steps, one per line")
    if not canon["final_answer"]:
        raise _RowProblem("final_answer", "is empty; write the final safe answer")
    images = []
    for i, p in enumerate(canon["images"]):
        try:
            path = image_under_root(p, review_dir, image_root, allow_outside_root)
        except OutsideRoot as exc:
            raise _RowProblem("images", f"line {i + 1}: {exc}") from None
        if check_images and not path.is_file():
            raise _RowProblem(
                "images", f"line {i + 1}: {p}: no such file ({path}); paths are relative to the review file"
            )
        images.append(image_path_for(path, out_dir))
    record = {
        "id": str(row["id"]).strip(),
        "prompt": canon["prompt"],
        "images": images,
        "reference": canon["reasoning"] + [canon["final_answer"]],
        "expected": expected,
        "category": category,
        "unsafe_scenario": canon["unsafe_scenario"],
        **{k: v for k, v in provenance.items() if k not in _CORE},
    }
    record["kind"] = BENIGN if category == BENIGN else "unsafe"
    return record, changed


def import_review(
    review_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    skip_invalid: bool = False,
    check_images: bool = True,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    overwrite: bool = False,
) -> ImportResult:
    """Read a review file and return (and write to ``out_path``, JSONL) the curated records.

    Image paths (relative to the review file) must lie inside ``image_root`` (when given; the command
    line always sets one) unless ``allow_outside_root``: a review file cannot smuggle in ``/etc/passwd``.

    Raises :class:`ReviewError` listing every bad row unless ``skip_invalid`` (then the bad rows
    are left out and listed in ``result.errors``).

    What produced ``out_path`` (the review file's content hash and the arguments) is stored beside it
    (``<out>.meta.json``, :mod:`srpo_trl.store`). When ``out_path`` exists, an import from another
    review (or the same one changed since), with other arguments, or with no meta file is refused
    before any row is read, naming what changed, unless ``overwrite``; the same import again rewrites
    the same records (idempotent). A second import to the same ``out_path`` is refused while one runs.
    """
    review_path = Path(review_path)
    if out_path is None:
        return _import(review_path, None, skip_invalid, check_images, image_root, allow_outside_root)
    out_path = Path(out_path)
    if not review_path.is_file():
        raise FileNotFoundError(f"{review_path}: no such review file (write one with `srpo-trl curate export`)")
    fingerprint = {
        "review_sha256": store.file_sha256(review_path),
        "skip_invalid": skip_invalid,
        "check_images": check_images,
        "image_root": _root(image_root),
        "allow_outside_root": allow_outside_root,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with store.output_lock(_lock(out_path), "curate import", out_path):
        if out_path.exists() and not overwrite:
            store.check_fingerprint(
                out_path,
                fingerprint,
                write=False,
                advice=f"Importing would replace {out_path} with records made from another review or with other "
                "arguments: pass --overwrite to replace it, or choose another --out",
            )
        result = _import(review_path, out_path, skip_invalid, check_images, image_root, allow_outside_root)
        store.check_fingerprint(out_path, fingerprint, overwrite=True)  # record what produced it
    return result


def _import(
    review_path: Path,
    out_path: Path | None,
    skip_invalid: bool,
    check_images: bool,
    image_root: str | os.PathLike | None,
    allow_outside_root: bool,
) -> ImportResult:
    out_dir = out_path.parent if out_path is not None else review_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)  # image paths are checked as the output will hold them
    result = ImportResult(records=[])
    seen: dict[str, str] = {}
    for where, row in _read_review(review_path):
        label = f"{review_path}: {where}"
        if "__broken__" in row:
            result.errors.append(f"{label}: {row['__broken__']}")
            continue
        if "__extra__" in row:
            result.errors.append(f"{label}: has more cells than the header; a stray separator or quote?")
            continue
        rid = str(row.get("id") or "").strip()
        if not rid:
            result.errors.append(f"{label}: field 'id': is empty; every row needs the id `curate export` wrote")
            continue
        label = f"{label} (id {rid})"
        if rid in seen:
            result.errors.append(f"{label}: field 'id': duplicate of {seen[rid]}; keep one row per record")
            continue
        seen[rid] = where
        decision = str(row.get("decision") or "").strip().lower()
        if decision == "":
            result.pending.append(where)
            continue
        if decision not in DECISIONS:
            result.errors.append(
                f"{label}: field 'decision': must be one of {', '.join(DECISIONS)} (or empty), got {row.get('decision')!r}"
            )
            continue
        if decision == "reject":
            result.rejected += 1
            continue
        try:
            record, changed = _build_record(
                row, review_path.parent, out_dir, check_images, image_root, allow_outside_root
            )
            if decision == "accept" and changed:
                raise _RowProblem(
                    changed[0],
                    f"decision is 'accept' but {', '.join(changed)} changed since the export; "
                    "set decision to 'edit' to keep the changes, or undo them",
                )
            note = str(row.get("note") or "").strip()
            record["curation"] = {"decision": decision, "changed": changed, **({"note": note} if note else {})}
            validate_record(record, label, out_dir, check_images)
        except _RowProblem as exc:
            result.errors.append(f"{label}: field '{exc.field}': {exc.problem}")
            continue
        except RecordError as exc:
            result.errors.append(str(exc))
            continue
        result.records.append(record)
        if decision == "accept":
            result.accepted += 1
        else:
            result.edited += 1
    if result.errors and not skip_invalid:
        raise ReviewError(result.errors)
    if out_path is not None:
        store.rewrite(out_path, result.records)  # atomic: the old file or the new one, never half
    return result
