"""Step-level data users already have, as step-pair rows (docs/step_formats.md has the mapping):

* Step-DPO's format (`prompt`, `initial_reason_steps`, `chosen`, `rejected`, optionally
  `full_chosen`; e.g. xinlai/Math-Step-DPO-10K): :func:`step_dpo_rows`;
* TRL's stepwise-supervision format (`prompt`, `completions`, `labels`, as PRMTrainer reads it;
  e.g. trl-lib/math_shepherd): :func:`stepwise_supervision_rows`.

Both take the rows (dicts) and return the step-pair rows plus a report that counts every row that
gave no pair and why (nothing is dropped silently). `StepPairDataset.from_step_dpo` /
`from_stepwise_supervision` read them from a `datasets.Dataset` (a Hub dataset the user loaded with
`datasets.load_dataset`), a JSON-lines file or a list, and wrap these functions.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from typing import Any

from .rows import RowError


logger = logging.getLogger(__name__)

STEP_DPO_COLUMNS = ("prompt", "initial_reason_steps", "chosen", "rejected")
STEPWISE_COLUMNS = ("prompt", "completions", "labels")
STEP_DPO_STEP_START = r"Step \d+:"  # Step-DPO's steps open with "Step N:" (its prompts ask for it)


def _label(i: int, source: str, lines: list[int] | None) -> str:
    return f"{i} ({source}:{lines[i]})" if lines else f"{i} ({source})"


def _check_columns(rows: list[dict], columns: tuple[str, ...], fmt: str, source: str) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(
            f"{source}: not in {fmt} format: no column {missing} (the format has {list(columns)}; "
            f"the first row has {sorted(present)})."
        )
    if "images" in present or "image" in present:
        raise ValueError(
            f"{source}: {fmt} rows are text; this reader does not take an 'images' column. Convert the rows to "
            "step pairs yourself (see the README's row format) to train on images."
        )


def _string(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(where, field, f"must be a string, got {type(value).__name__}")
    return value


def _prompt(value: Any, where: str, conversational: bool, template: str) -> Any:
    if isinstance(value, list):  # already chat messages
        if not value or not all(isinstance(m, dict) and "role" in m for m in value):
            raise RowError(where, "prompt", "must be a string or a non-empty list of chat messages with 'role'")
        return value
    if not isinstance(value, str) or not value.strip():
        raise RowError(where, "prompt", "must be a non-empty string (the question)")
    text = template.format(prompt=value)
    return [{"role": "user", "content": text}] if conversational else text


def split_steps(text: str, separator: str, step_start: str | None) -> tuple[list[str], str]:
    """`text` as (complete steps, open tail): the steps each ended by `separator`, and what follows the
    last one (a step begun but not ended, e.g. Step-DPO's "Step 3:"; "" when `text` ends with the
    separator). With `step_start` (a regex), a separator ends a step only where the next step starts
    with it, so a step may hold line breaks. Blank pieces are kept inside their neighbour, so that
    ``"".join(s + separator for s in steps) + tail == text`` always holds."""
    if not text:
        return [], ""
    pattern = re.escape(separator) + (f"(?={step_start})" if step_start else "")
    ended = text.endswith(separator)  # then every piece is a complete step and nothing is open
    body = text[: -len(separator)] if ended else text
    pieces = re.split(pattern, body) if body else [""]
    complete, tail = (pieces, "") if ended else (pieces[:-1], pieces[-1])
    steps: list[str] = []
    carry = ""
    for piece in complete:
        if not piece.strip():  # a blank line belongs to the step before it (at the start: to the next one)
            if steps:
                steps[-1] += separator + piece
            else:
                carry += piece + separator
            continue
        steps.append(carry + piece)
        carry = ""
    return steps, carry + tail


def step_dpo_rows(
    rows: list[dict],
    source_label: str,
    lines: list[int] | None,
    step_separator: str = "\n",
    step_start: str | None = STEP_DPO_STEP_START,
    conversational: bool = True,
    prompt_template: str = "{prompt}",
    use_full_chosen: bool = True,
) -> tuple[list[dict], dict]:
    """Step-DPO rows -> (step-pair rows, report). See docs/step_formats.md."""
    if not rows:
        raise ValueError(f"{source_label}: no rows")
    _check_columns(rows, STEP_DPO_COLUMNS, "Step-DPO", source_label)
    report: Counter = Counter()
    out = []
    for i, row in enumerate(rows):
        where = _label(i, source_label, lines)
        report["rows"] += 1
        prompt = _prompt(row.get("prompt"), where, conversational, prompt_template)
        initial = _string(row, "initial_reason_steps", where)
        chosen, rejected = _string(row, "chosen", where), _string(row, "rejected", where)
        if not chosen.strip():
            report["rows_without_chosen"] += 1
            continue
        if not rejected.strip():
            report["rows_without_rejected"] += 1
            continue
        prefix, tail = split_steps(initial, step_separator, step_start)
        pair = {
            "prompt": prompt,
            "prefix": prefix,
            "chosen": tail + chosen,
            "rejected": tail + rejected,
            "branch_point": _branch_point(prefix, step_start),
        }
        if pair["chosen"] == pair["rejected"]:
            report["rows_identical"] += 1
            continue
        full = _string(row, "full_chosen", where) if use_full_chosen else ""
        if full.strip():
            rest, rest_tail = split_steps(tail + full, step_separator, step_start)
            pair["reference"] = prefix + rest + ([rest_tail] if rest_tail.strip() else [])
            report["pairs_with_reference"] += 1
        if row.get("id") is not None:
            pair["id"] = row["id"]
        out.append(pair)
    report["pairs"] = len(out)
    return out, dict(report)


def _branch_point(prefix: list[str], step_start: str | None) -> int:
    """How many reasoning steps precede the branch: with `step_start`, the prefix steps that open with
    it (a preamble such as "Let's think step by step." is not a step); else every prefix step."""
    if not step_start:
        return len(prefix)
    opens = re.compile(step_start)
    return sum(1 for step in prefix if opens.match(step.lstrip()))


def _labels(value: Any, n: int, where: str) -> list[bool]:
    if not isinstance(value, (list, tuple)):
        raise RowError(where, "labels", f"must be a list of booleans (one per step), got {type(value).__name__}")
    if len(value) != n:
        raise RowError(where, "labels", f"has {len(value)} labels for {n} completions; give one label per step")
    out = []
    for j, label in enumerate(value):
        if isinstance(label, bool) or label in (0, 1):
            out.append(bool(label))
        else:
            raise RowError(where, "labels", f"label {j} is {label!r}; labels are true / false (or 1 / 0)")
    return out


def _steps(value: Any, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(where, "completions", "must be a non-empty list of steps (strings)")
    for j, step in enumerate(value):
        if not isinstance(step, str) or not step.strip():
            raise RowError(where, "completions", f"step {j} must be a non-empty string")
    return list(value)


def stepwise_supervision_rows(
    rows: list[dict],
    source_label: str,
    lines: list[int] | None,
    conversational: bool = False,
    prompt_template: str = "{prompt}",
) -> tuple[list[dict], dict]:
    """TRL stepwise-supervision rows -> (step-pair rows, report). See docs/step_formats.md."""
    if not rows:
        raise ValueError(f"{source_label}: no rows")
    _check_columns(rows, STEPWISE_COLUMNS, "stepwise-supervision", source_label)
    parsed = []  # (question key, prompt, steps, labels, row label)
    for i, row in enumerate(rows):
        where = _label(i, source_label, lines)
        prompt = _prompt(row.get("prompt"), where, conversational, prompt_template)
        steps = _steps(row.get("completions"), where)
        labels = _labels(row.get("labels"), len(steps), where)
        key = json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)
        parsed.append((key, prompt, steps, labels, row.get("id")))

    # Each question's solutions as a trie of steps (one id per distinct prefix, so memory grows with the
    # number of steps, not their square); donors[prefix id] = the rows whose steps up to and including
    # the next one are all labelled true, in dataset order.
    nodes: dict[tuple[Any, str], int] = {}
    prefix_ids: list[list[int]] = []  # per row: the id of steps[:k] for k = 0 .. len(steps)
    donors: dict[int, list[int]] = {}
    verified: dict[str, int] = {}  # question -> its first fully correct row
    for r, (key, _, steps, labels, _) in enumerate(parsed):
        ids = [nodes.setdefault(("question", key), len(nodes))]
        for step in steps:
            ids.append(nodes.setdefault((ids[-1], step), len(nodes)))
        prefix_ids.append(ids)
        if all(labels):
            verified.setdefault(key, r)
        for k in range(len(steps)):
            if not labels[k]:
                break
            donors.setdefault(ids[k], []).append(r)

    report: Counter = Counter(rows=len(parsed))
    out, seen = [], set()
    for r, (key, prompt, steps, labels, rid) in enumerate(parsed):
        if all(labels):
            report["rows_all_correct"] += 1  # no unfavourable step: a source of favourable steps and references
            continue
        k = labels.index(False)
        prefix, rejected = steps[:k], steps[k]
        candidates = [d for d in donors.get(prefix_ids[r][k], []) if parsed[d][2][k] != rejected]
        if not candidates:
            report["rows_without_favourable"] += 1
            continue
        full = [d for d in candidates if all(parsed[d][3])]
        donor = (full or candidates)[0]
        chosen = parsed[donor][2][k]
        if (prefix_ids[r][k], chosen, rejected) in seen:
            report["pairs_duplicate"] += 1
            continue
        seen.add((prefix_ids[r][k], chosen, rejected))
        reference_row = donor if full else verified.get(key)
        pair = {"prompt": prompt, "prefix": prefix, "chosen": chosen, "rejected": rejected, "branch_point": k}
        if reference_row is not None:
            pair["reference"] = list(parsed[reference_row][2])
        else:
            report["pairs_without_reference"] += 1
        if rid is not None:
            pair["id"] = rid
        out.append(pair)
    report["pairs"] = len(out)
    return out, dict(report)
