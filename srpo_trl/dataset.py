"""StepPairDataset: validated step-pair rows on top of a `datasets.Dataset`.

    pairs = StepPairDataset.from_jsonl("pairs.jsonl")
    pairs = StepPairDataset.from_list([{"prompt": ..., "prefix": [...], "chosen": ..., "rejected": ...}])
    pairs = StepPairDataset.from_exploration("explored.jsonl", max_pairs_per_point=4)
    pairs = StepPairDataset.from_step_dpo(load_dataset("xinlai/Math-Step-DPO-10K", split="train"))
    pairs = StepPairDataset.from_stepwise_supervision("math_shepherd.jsonl")  # TRL's PRM format

Every row is validated when the dataset is built (a bad row raises an error naming the row and
field). The Arrow-backed `datasets.Dataset` stays underneath: `map`, `filter`, caching,
`push_to_hub` and the rest are forwarded to it, and `SRPOTrainer` accepts the wrapper directly.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
from datasets import Dataset

from . import store
from .pairs import point_pairs
from .rows import RowError, normalize_row


logger = logging.getLogger(__name__)


def _resolve_images(row: dict, base_dir: Path) -> dict:
    images = row.get("images")
    if images:
        row["images"] = [str(base_dir / im) if isinstance(im, str) and not os.path.isabs(im) else im for im in images]
    return row


def _field_with(obj: Any, marker: str) -> str | None:
    """The top-level field of a JSON object whose text holds `marker` (where a decoding went wrong)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if marker in json.dumps(value, ensure_ascii=False) or marker in key:
                return key
    return None


def _decode_line(raw: bytes, path: Path, line_no: int, what: str = "line", fields: list[str] | None = None) -> str:
    """One line of a text file as UTF-8; otherwise an error naming the file, the line and (when it can
    tell) the field holding the bad bytes."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        field = None
        text = raw.decode("utf-8", errors="replace")
        if fields is None:
            try:
                field = _field_with(json.loads(text), "\ufffd")
            except json.JSONDecodeError:
                field = None
        else:  # CSV: the column of the bad cell
            import csv

            cells = next(csv.reader([text]), [])
            field = next((fields[i] for i, c in enumerate(cells) if "\ufffd" in c and i < len(fields)), None)
        where = f", field '{field}'" if field else ""
        raise ValueError(
            f"{path}:{line_no}: {what} {line_no}{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
            f"{e.start + 1}); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def check_utf8(path: str | os.PathLike) -> None:
    """Raise an error naming the line (and field) of the first bytes of `path` that are not UTF-8.
    CSV files (`.csv`, `.tsv`) name the column from the header line."""
    path = Path(path)
    fields = None
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and path.suffix.lower() in (".csv", ".tsv"):
                import csv

                header = raw.decode("utf-8", errors="replace")
                fields = next(csv.reader([header], delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])
            _decode_line(raw, path, line_no, "row" if fields is not None else "line", fields)


def _read_jsonl(path: str | os.PathLike, lines: list[int] | None = None) -> list[dict]:
    """Rows of a JSON-lines file; with `lines`, the line number of each row is appended to it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a JSON-lines file, one object per line)")
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{line_no}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            rows.append(_resolve_images(obj, path.parent))
            if lines is not None:
                lines.append(line_no)
    return rows


def _kind(value: Any) -> str | None:
    """A value's type as Arrow sees it (None: null, fits any column)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        inner = {_kind(v) for v in value} - {None}
        return (
            "a list of chat messages"
            if inner == {"an object"}
            else "a list"
            if not inner
            else f"a list of {sorted(inner)[0][2:]}s"
        )
    return type(value).__name__


def _type_conflict(rows: list[dict]) -> tuple[int, str, str, int, str] | None:
    """(row, field, kind, first row, its kind) of the first value whose type differs from the column's."""
    first: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            kind = _kind(value)
            if kind is None or kind == "a list":  # nulls and empty lists fit any column
                continue
            if key not in first:
                first[key] = (i, kind)
            elif first[key][1] != kind:
                return i, key, kind, *first[key]
    return None


def _to_dataset(rows: list[dict], source: str, lines: list[int] | None) -> Dataset:
    """`Dataset.from_list` keeping every column (it only looks at the first row's keys), with a type
    clash named by row and field instead of a bare Arrow error."""
    columns = dict.fromkeys(k for r in rows for k in r)
    full = [{k: r.get(k) for k in columns} for r in rows]
    try:
        return Dataset.from_list(full)
    except (pa.ArrowTypeError, pa.ArrowInvalid, TypeError, ValueError) as e:
        clash = _type_conflict(rows)
        if clash is None:
            raise ValueError(f"{source}: the rows cannot be stored as one table: {e}") from e
        i, field, kind, j, first_kind = clash
        raise RowError(
            _row_label(i, source, lines),
            field,
            f"is {kind} here but {first_kind} in row {_row_label(j, source, lines)}; a column needs one type in "
            "every row"
            + (" (write every prompt as chat messages, or every prompt as a string)" if field == "prompt" else ""),
        ) from None


def _row_label(i: int, source: str, lines: list[int] | None) -> str:
    return f"{i} ({source}:{lines[i]})" if lines else f"{i} ({source})"


def _read_exploration(path: str | os.PathLike) -> list[dict]:
    """An exploration output (:func:`srpo_trl.store.read_lines`): a last line cut by a killed run is
    left out with a warning; a broken line elsewhere names the line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected the JSON-lines output of srpo-trl explore)")

    def broken(p: Path, n: int) -> ValueError:
        return ValueError(f"{p}:{n}: not valid JSON, or not an exploration record; fix or delete the line")

    rows = store.read_lines(path, valid=lambda obj: isinstance(obj, dict), error=broken)
    return [_resolve_images(obj, path.parent) for obj in rows]


def _canonical_rows(rows: Iterable[dict], source: str, lines: list[int] | None = None) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(normalize_row(row, i))
        except RowError as e:
            raise RowError(_row_label(i, source, lines), e.field, e.problem) from None
    if not out:
        raise ValueError(f"{source}: no rows; a step-pair dataset needs at least one (prompt, chosen, rejected) row")
    if not any(r["images"] for r in out):  # text-only: no `images` column, so trainers see a text dataset
        for r in out:
            r.pop("images")
    if all(r["reference"] is None for r in out):
        for r in out:
            r.pop("reference")
    return out


def _read_source(source: Any, what: str) -> tuple[list[dict], str, list[int] | None]:
    """(rows, source label, file line of each row or None) from a Dataset, a JSON-lines file or a list."""
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(source, (DatasetDict, IterableDatasetDict)):
        raise ValueError(f"{what}: got a dataset with splits {sorted(source)}; pass one split, e.g. data['train'].")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"{what}: {path} is not a file. Pass a JSON-lines file, a list of rows, or a datasets.Dataset "
                f"(for a Hub dataset: datasets.load_dataset({str(source)!r}, split='train'))."
            )
        lines: list[int] = []
        return _read_jsonl(path, lines), str(path), lines
    if isinstance(source, (Dataset, IterableDataset)):
        return list(source), "dataset", None
    if isinstance(source, list):
        return source, "list", None
    raise TypeError(
        f"{what}: expected a datasets.Dataset, a JSON-lines path or a list of rows, got {type(source).__name__}."
    )


class StepPairDataset:
    """Step-pair rows (see the row format in the README) backed by a `datasets.Dataset`."""

    def __init__(self, dataset: Dataset, report: dict | None = None):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"StepPairDataset wraps a datasets.Dataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.report = report or {}

    # ---- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_list(cls, rows: list[dict], source: str = "list", lines: list[int] | None = None) -> "StepPairDataset":
        """Rows (dicts) -> a validated dataset. Every column any row has is kept (missing values are
        None). `lines` (the file line of each row) makes errors name lines."""
        return cls(_to_dataset(_canonical_rows(rows, source, lines), source, lines))

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> "StepPairDataset":
        return cls.from_list(list(dataset), source="dataset")

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike) -> "StepPairDataset":
        """Rows from a JSON-lines file; relative image paths are resolved against the file's folder."""
        lines: list[int] = []
        return cls.from_list(_read_jsonl(path, lines), source=str(path), lines=lines)

    @classmethod
    def from_exploration(
        cls,
        explored: str | os.PathLike | list[dict],
        max_pairs_per_point: int | None = None,
        seed: int = 0,
    ) -> "StepPairDataset":
        """Expand exploration records into every (favorable, unfavorable) pair at each branch point.

        `explored` is the JSON-lines output of `srpo-trl explore` (or its records as dicts): per
        record a `reference` path and `points`, each with `branch_point`, `prefix` and sampled
        `continuations` (`text`, `verified`). Continuations are de-duplicated per point; a text that
        was judged both ways is dropped from both sides. At most `max_pairs_per_point` pairs are kept
        per point (a seeded sample, so every favorable/unfavorable text has a chance). Records whose
        `status` is not "ok" and points without both outcomes build no pair; all of it is counted in
        `.report` and logged, as are continuations without a boolean `verified` (undecided). The pair
        rule is :func:`srpo_trl.pairs.point_pairs`. A record id seen before (two runs appended to one
        output) is left out, counted as ``records_duplicate`` and logged with the ids.
        """
        records = _read_exploration(explored) if not isinstance(explored, list) else explored
        rng = random.Random(seed)
        report: Counter = Counter()
        rows = []
        seen: dict[str, int] = {}
        duplicates: list[str] = []
        for rec_no, record in enumerate(records):
            report["records"] += 1
            rid = str(record.get("id", rec_no))
            if rid in seen:  # two runs on one output, or outputs concatenated: the first line of an id counts
                report["records_duplicate"] += 1
                duplicates.append(rid)
                continue
            seen[rid] = rec_no
            status = record.get("status", "ok")
            if status != "ok":
                report[f"records_skipped_{status}"] += 1
                continue
            for point in record.get("points") or []:
                report["points"] += 1
                pairs = point_pairs(point, max_pairs_per_point, rng, report)
                if not pairs:
                    report["points_one_sided"] += 1
                    continue
                report["points_with_both"] += 1
                for chosen, rejected in pairs:
                    row = {
                        "id": rid,
                        "prompt": record["prompt"],
                        "prefix": list(point.get("prefix") or []),
                        "chosen": chosen,
                        "rejected": rejected,
                        "reference": record.get("reference") or None,
                        "branch_point": int(point.get("branch_point", len(point.get("prefix") or []))),
                    }
                    if record.get("images"):
                        row["images"] = record["images"]
                    for key in ("tools", "chat_template_kwargs"):  # what exploration rendered the prompt with
                        if record.get(key) is not None:
                            row[key] = record[key]
                    rows.append(row)
        report["pairs"] = len(rows)
        report = dict(report)
        if duplicates:
            logger.warning(
                "%d exploration record(s) repeat an id seen before and were left out (the first line of "
                "each id is used): %s",
                len(duplicates),
                ", ".join(sorted(set(duplicates))[:20]),
            )
        logger.warning("Step pairs from exploration: %s", ", ".join(f"{k}={v}" for k, v in sorted(report.items())))
        if not rows:
            raise ValueError(
                f"No step pair could be built from the exploration output ({report}). Pairs need points where some "
                "continuations pass the verifier and some fail: sample more (num_samples) or at a higher temperature."
            )
        out = cls.from_list(rows, source="exploration")
        out.report = report
        return out

    @classmethod
    def from_step_dpo(
        cls,
        source: Any,
        step_separator: str = "\n",
        step_start: str | None = r"Step \d+:",
        conversational: bool = True,
        prompt_template: str = "{prompt}",
        use_full_chosen: bool = True,
    ) -> "StepPairDataset":
        """Step pairs from Step-DPO's format: `prompt`, `initial_reason_steps` (the text of the steps
        already taken, e.g. "Let's think step by step.\\nStep 1: ...\\nStep 2:"), `chosen` / `rejected`
        (the correct / wrong next step) and optionally `full_chosen` (the correct step and the rest of
        the correct solution), as in xinlai/Math-Step-DPO-10K.

        `source`: a `datasets.Dataset` (e.g. ``load_dataset("xinlai/Math-Step-DPO-10K", split="train")``),
        a JSON-lines file or a list of dicts. `initial_reason_steps` is split into prefix steps at each
        `step_separator` followed by `step_start` (a regex; None: at every separator); a step it opens
        but does not end (Step-DPO's "Step 3:") starts both continuations, so prefix + continuation is
        Step-DPO's text exactly. `full_chosen` becomes the reference path (prefix + its steps). The
        question becomes one user message (`conversational=True`, rendered with the chat template as
        Step-DPO's qwen2-boxed prompt is; `prompt_template` can add its instruction) or stays a plain
        string. Rows with an empty `chosen` / `rejected`, or both equal, give no pair and are counted in
        `.report` (and logged). Use the same `step_separator` in SRPOConfig. docs/step_formats.md has
        the mapping row by row.
        """
        from .step_formats import step_dpo_rows

        rows, source_label, lines = _read_source(source, "Step-DPO data")
        rows, report = step_dpo_rows(
            rows, source_label, lines, step_separator, step_start, conversational, prompt_template, use_full_chosen
        )
        return cls._from_converted(rows, report, source_label, "Step-DPO")

    @classmethod
    def from_stepwise_supervision(
        cls, source: Any, conversational: bool = False, prompt_template: str = "{prompt}"
    ) -> "StepPairDataset":
        """Step pairs from TRL's stepwise-supervision format (`prompt`, `completions`: the steps,
        `labels`: one boolean per step, as PRMTrainer reads it; e.g. trl-lib/math_shepherd).

        In each row the first step labelled false is the unfavourable continuation of the steps before
        it (steps after it are not used). Its favourable continuation is the step at the same position
        of another row of the same question that has the same steps before it and labels that step
        true (every step before it true as well); of those rows the first fully correct one is taken,
        else the first one, in dataset order. The reference path is that row when it is fully correct,
        else the question's first fully correct row, else none (then `prefix + chosen` is the reference:
        set `fallback_reference_eos=False`, since a step is not an answer). Rows without a false step,
        rows whose false step has no favourable counterpart and repeated pairs give no pair; all are
        counted in `.report` and logged. The prompt stays a plain string as PRMTrainer uses it
        (`conversational=True` makes it a user message). Steps are joined with `step_separator`
        (PRMConfig's default "\\n" is SRPOConfig's). docs/step_formats.md has the mapping row by row.
        """
        from .step_formats import stepwise_supervision_rows

        rows, source_label, lines = _read_source(source, "stepwise-supervision data")
        rows, report = stepwise_supervision_rows(rows, source_label, lines, conversational, prompt_template)
        if report.get("pairs_without_reference"):
            logger.warning(
                "%d stepwise-supervision pair(s) have no fully correct row of their question to serve as the "
                "reference path: train with fallback_reference_eos=False (their reference is prefix + one step).",
                report["pairs_without_reference"],
            )
        return cls._from_converted(rows, report, source_label, "stepwise supervision")

    @classmethod
    def _from_converted(cls, rows: list[dict], report: dict, source: str, fmt: str) -> "StepPairDataset":
        logger.warning(
            "Step pairs from %s rows (%s): %s", fmt, source, ", ".join(f"{k}={v}" for k, v in sorted(report.items()))
        )
        if not rows:
            raise ValueError(f"{source}: no step pair could be built from the {fmt} rows ({report}).")
        out = cls.from_list(rows, source=source)
        out.report = report
        return out

    # ---- the datasets.Dataset underneath ----------------------------------------------------------

    def to_jsonl(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for row in self.dataset:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key]

    def __iter__(self):
        return iter(self.dataset)

    def __repr__(self) -> str:
        return f"StepPairDataset({self.dataset!r})"

    def __getattr__(self, name: str) -> Any:
        # Forward everything else (map, filter, select, train_test_split, push_to_hub, ...) to the Dataset.
        if name == "dataset":
            raise AttributeError(name)
        attr = getattr(self.dataset, name)
        if not callable(attr):
            return attr

        def wrapped(*args, **kwargs):
            result = attr(*args, **kwargs)
            return StepPairDataset(result, self.report) if isinstance(result, Dataset) else result

        return wrapped
