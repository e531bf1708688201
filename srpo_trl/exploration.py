"""Exploration: sample reasoning branches from the policy, verify them, and write what the pairs are built from.

For each record (prompt, images, reference path, expected outcome / gold answer):

1. the reference path: the record's own (``reference_source: "given"``), else N full answers are
   sampled and the first that passes the verifier is kept, split into steps at its non-empty lines
   (``"sampled"``); a record with no passing sample gets ``status: "no_reference"`` and is reported;
2. branch points ``k``: the empty prefix and after every step of the reference except the last
   (all of them, the first ``k``, or those a callable chooses); at each, N continuations are
   sampled from ``prompt + images + prefix`` at the given temperature (batched);
3. every continuation is verified on the whole path (prefix steps + continuation).

Output: one JSON line per record, written and flushed as it goes (see docs/exploration.md for the
contract ``StepPairDataset.from_exploration`` reads). Restarting with the same arguments resumes;
under ``accelerate launch`` records are split by rank and rank 0 merges the shards.

    srpo-trl explore --model PATH --records records.jsonl --out explored.jsonl \\
        --num-samples 10 --temperature 0.5 --max-new-tokens 512 --verifier safety-outcome

    from srpo_trl.exploration import explore
    summary = explore("records.jsonl", backend, "safety-outcome", out="explored.jsonl")
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

from . import collectives, cost, store
from . import contract as _contract
from .backends import BackendError, GenerationRequest, load_image
from .contract import RecordError
from .endpoint import PreflightError
from .images import check_image_file
from .pairs import count_pairs
from .rows import DEFAULT_STEP_SEPARATOR, continuation_prefix_text, template_kwargs
from .verifiers import Verdict, VerifierError, as_verifier


logger = logging.getLogger(__name__)

__all__ = [
    "RecordError",
    "PreflightError",
    "load_records",
    "validate_record",
    "select_branch_points",
    "explore_record",
    "explore",
    "count_pairs",
    "summarize",
    "format_summary",
    "shard_path",
    "summary_path",
    "merge_shards",
]

META_SUFFIX = store.META_SUFFIX


# ----------------------------------------------------------------------------------------------
# Input records (the contract is srpo_trl.contract's)
# ----------------------------------------------------------------------------------------------


def validate_record(
    record: Any,
    where: str,
    base_dir: Path | None = None,
    required: Iterable[str] = (),
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> dict:
    """Check one input record (:func:`srpo_trl.contract.validate_record`); returns a copy with
    ``_images`` (resolved paths / PIL images) added. ``required``: fields the verifier needs. With
    ``image_root``, image paths must lie inside it unless ``allow_outside_root`` (see
    :mod:`srpo_trl.paths`)."""
    why = "the verifier needs it (or choose another verifier)"
    return _contract.validate_record(
        record,
        where,
        base_dir=base_dir,
        required={name: why for name in required},
        image_root=image_root,
        allow_outside_root=allow_outside_root,
    )


def load_records(
    records: str | os.PathLike | Iterable[dict],
    required: Iterable[str] = (),
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> tuple[list[dict], Path | None]:
    """Validated records and the folder relative image paths resolve against (the records file's)."""
    why = "the verifier needs it (or choose another verifier)"
    out = _contract.load_records(
        records,
        required={name: why for name in required},
        image_root=image_root,
        allow_outside_root=allow_outside_root,
    )
    if not out:
        raise ValueError(f"no records in {records if isinstance(records, (str, os.PathLike)) else 'the list'}")
    _check_image_files(out)
    return out, (Path(records).parent if isinstance(records, (str, os.PathLike)) else None)


def _check_image_files(recs: list[dict]) -> None:
    """Decode every image file now: a truncated file or a decompression bomb is refused before any
    request, naming the record and the field, like a missing file (not found mid-run)."""
    for rec in recs:
        for i, image in enumerate(rec["_images"]):
            if isinstance(image, str):
                try:
                    check_image_file(image)
                except ValueError as exc:
                    raise RecordError(
                        rec["_where"], f"images[{i}]", f"{image}: {exc}; replace the file or drop the record"
                    ) from None


# ----------------------------------------------------------------------------------------------
# Branch points and pairs
# ----------------------------------------------------------------------------------------------


def select_branch_points(
    reference: list[str], branch_points: str | int | Callable = "all", record: dict | None = None
) -> list[int]:
    """Branch points of a reference of n steps: 0 (empty prefix) .. n-1 (after every step but the last).

    ``"all"``: all of them; an int k: the first k; a callable ``(record, reference) -> list[int]``:
    the points a locator chooses (validated, sorted, de-duplicated).
    """
    n = len(reference)
    candidates = list(range(max(n, 1)))  # a one-step reference still has the empty prefix
    if branch_points == "all" or branch_points is None:
        return candidates
    if isinstance(branch_points, bool):
        raise ValueError("branch_points must be 'all', an integer or a callable")
    if isinstance(branch_points, int):
        if branch_points < 1:
            raise ValueError(f"branch_points must be >= 1 (the first k points), got {branch_points}")
        return candidates[:branch_points]
    if isinstance(branch_points, str) and branch_points.isdigit():
        return select_branch_points(reference, int(branch_points), record)
    if callable(branch_points):
        chosen = branch_points(record or {}, list(reference))
        points = sorted({int(k) for k in chosen})
        bad = [k for k in points if k not in candidates]
        if bad:
            raise ValueError(
                f"the branch-point locator chose {bad}, outside 0..{len(candidates) - 1} for a reference of {n} step(s)"
            )
        return points
    raise ValueError(f"branch_points must be 'all', an integer or a callable, got {branch_points!r}")


def _record_seed(seed: int | None, rid: Any, salt: int = 0) -> int | None:
    """A per-record seed: the same samples whatever the order, the shard or a resume."""
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + zlib.crc32(str(rid).encode("utf-8")) + salt * 7919) % (2**31 - 1)


# ----------------------------------------------------------------------------------------------
# One record
# ----------------------------------------------------------------------------------------------


def _verify(verifier, record: dict, path_text: str) -> Verdict:
    verdict = verifier(record, path_text)
    if not isinstance(verdict, Verdict):
        raise TypeError(f"the verifier returned {type(verdict).__name__}; it must return a Verdict")
    return verdict


def _point(k: int, prefix: list[str], texts: list[str], verifier, record: dict, separator: str) -> dict:
    head = continuation_prefix_text(prefix, separator)
    continuations, unverified = [], []
    for text in texts:
        verdict = _verify(verifier, record, head + text)
        entry = {"text": text, "verified": bool(verdict.passed), "verdict": verdict.to_dict()}
        (unverified if verdict.error else continuations).append(entry)
    point = {"branch_point": k, "prefix": list(prefix), "continuations": continuations}
    if unverified:  # the verifier could not decide: kept for the record, never used in a pair
        for entry in unverified:
            entry["verified"] = None
        point["unverified"] = unverified
    return point


def _output_images(record: dict, out_dir: Path | None) -> list:
    """Images as the output gives them. Relative paths stay relative, to the output file's folder
    (``from_exploration`` resolves them there; the same strings as in the records when both files
    share a folder); absolute paths stay as they are; PIL images are saved beside the output."""
    out = []
    for i, (given, resolved) in enumerate(zip(record["images"], record["_images"])):
        if isinstance(given, str):
            if out_dir is None or os.path.isabs(given):
                out.append(given)
            else:
                out.append(os.path.relpath(os.path.abspath(resolved), os.path.abspath(out_dir)))
        elif out_dir is None:
            out.append(given)
        else:  # a PIL image given from Python
            folder = out_dir / "explored_images"
            folder.mkdir(parents=True, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(record["id"]))
            name = f"{safe}-{i}.png"
            given.save(folder / name)
            out.append(f"explored_images/{name}")
    return out


def explore_record(
    record: dict,
    backend,
    verifier,
    *,
    num_samples: int = 10,
    temperature: float = 0.5,
    max_new_tokens: int = 512,
    branch_points: str | int | Callable = "all",
    seed: int | None = 0,
    separator: str = DEFAULT_STEP_SEPARATOR,
) -> dict:
    """Explore one validated record (see :func:`validate_record`); returns its output line (without
    ``images``, which :func:`explore` writes). A backend or image failure gives ``status: "failed"``."""
    result: dict[str, Any] = {
        "id": record["id"],
        "prompt": record["prompt"],
        "images": list(record["images"]),
        "expected": record.get("expected"),
        "answer": record.get("answer"),
        "category": record.get("category"),
        "reference": record.get("reference"),
        "reference_source": "given" if record.get("reference") else None,
        "status": "ok",
        "error": None,
        "points": [],
    }
    for key, value in record.items():  # keep the user's own fields (not ours)
        if key not in result and not key.startswith("_"):
            result[key] = value
    try:
        images = [load_image(im) for im in record["_images"]]
        vrecord = {k: v for k, v in record.items() if not k.startswith("_")}
        vrecord["images"] = images
        kwargs = template_kwargs(record)  # the row's tools / chat_template_kwargs, as the trainer renders it
        reference = record.get("reference")
        point0 = None
        if not reference:
            samples = backend.generate(
                [GenerationRequest(record["prompt"], images, "", kwargs)],
                num_samples=num_samples,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                seed=_record_seed(seed, record["id"], 0),
            )[0]
            point0 = _point(0, [], samples, verifier, vrecord, separator)
            for cont in point0["continuations"]:
                steps = [line.strip() for line in cont["text"].splitlines() if line.strip()]
                if cont["verified"] and steps:
                    reference = steps
                    break
            if not reference:
                labels = sorted({str(c["verdict"].get("label")) for c in point0["continuations"]})
                result.update(
                    status="no_reference",
                    error=f"none of the {len(samples)} sampled answer(s) passed the verifier (labels seen: {', '.join(labels) or 'none'})",
                    points=[point0],
                )
                return result
            result.update(reference=reference, reference_source="sampled")
        points = select_branch_points(reference, branch_points, vrecord)
        todo = [k for k in points if not (k == 0 and point0 is not None)]
        texts = (
            backend.generate(
                [
                    GenerationRequest(
                        record["prompt"], images, continuation_prefix_text(reference[:k], separator), kwargs
                    )
                    for k in todo
                ],
                num_samples=num_samples,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                seed=_record_seed(seed, record["id"], 1),
            )
            if todo
            else []
        )
        by_k = dict(zip(todo, texts))
        for k in points:
            if k == 0 and point0 is not None:
                result["points"].append(point0)
            else:
                result["points"].append(_point(k, reference[:k], by_k[k], verifier, vrecord, separator))
    except (BackendError, OSError, ValueError) as exc:
        if isinstance(exc, VerifierError):
            raise
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}", points=[])
        logger.error("record %r failed: %s", record["id"], result["error"])
    return result


# ----------------------------------------------------------------------------------------------
# Output files: resume, shards, merge
# ----------------------------------------------------------------------------------------------


def _read_output(path: Path, repair: bool) -> list[dict]:
    """Complete lines of an output file (:func:`srpo_trl.store.read_lines`): a last line cut by a kill
    is dropped (and cut from the file when ``repair``); a broken line elsewhere names the line."""
    return store.read_lines(
        path, repair=repair, valid=lambda obj: isinstance(obj, dict) and "id" in obj, error=_broken_line
    )


def _broken_line(path: Path, n: int) -> RecordError:
    return RecordError(
        f"{path}:{n}", None, "is not a complete exploration record; fix or delete the line, or start a new --out"
    )


def lock_path(out: str | os.PathLike) -> Path:
    """The lock a run holds on ``out`` (``explored.jsonl`` -> ``explored.jsonl.lock``)."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


backend_identity = store.backend_identity


def output_fingerprint(
    source,
    recs: list[dict],
    policy: dict,
    verifier_name: str,
    branch_points,
    settings: dict,
    extra: dict | None = None,
) -> dict:
    """What produced an exploration output: the policy, a hash of the input records and every argument
    that changes the lines (``extra``: what only the caller knows, e.g. the judge's model)."""
    return dict(
        settings,
        branch_points=branch_points if isinstance(branch_points, (int, str)) else "callable",
        verifier=verifier_name,
        policy=policy,
        records=_records_hash(source, recs),
        images=_images_hash(recs),
        **(extra or {}),
    )


def _images_hash(recs: list[dict]) -> dict:
    """The content of every image file the records name (as they name it): pixels changed under the
    same name are a different input."""
    return {
        given: store.content_hash(path)[:16]
        for rec in recs
        for given, path in zip(rec["images"], rec["_images"])
        if isinstance(given, str) and isinstance(path, str)
    }


def _records_hash(source, recs: list[dict]) -> str:
    if isinstance(source, (str, os.PathLike)):
        return store.file_sha256(source)
    return store.content_sha256([{k: v for k, v in r.items() if k not in ("_images", "_where")} for r in recs])


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes: ``explored.jsonl`` -> ``explored.rank1-of2.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}-of{world_size}{out.suffix or '.jsonl'}")


def _shard_glob(out: Path) -> list[Path]:
    pattern = f"{glob.escape(out.stem)}.rank*-of*{out.suffix or '.jsonl'}"
    return sorted(p for p in out.parent.glob(pattern) if p.is_file())


def _done_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".done")


def merge_shards(out: str | os.PathLike, order: list[Any] | None = None) -> int:
    """Merge ``out`` and every shard beside it into ``out`` (one line per id, the first complete one,
    in ``order`` of ids when given), then delete the shards. Returns the number of records in ``out``."""
    out = Path(out)
    shards = _shard_glob(out)
    n = store.merge(
        out,
        [out, *shards],
        key=lambda obj: str(obj["id"]),
        order=[str(i) for i in order] if order is not None else None,
        valid=lambda obj: isinstance(obj, dict) and "id" in obj,
        error=_broken_line,
    )
    for path in shards:
        path.unlink(missing_ok=True)
        _done_path(path).unlink(missing_ok=True)
    return n


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def summarize(results: list[dict], max_pairs_per_point: int | None = None) -> dict:
    """Counts over output records: records by status, points, points with both outcomes, pairs that
    ``from_exploration`` would build, the verifier's pass rate, failures with their reasons."""
    s: dict[str, Any] = {
        "records": len(results),
        "records_ok": 0,
        "records_no_reference": 0,
        "records_failed": 0,
        "references_sampled": 0,
        "points": 0,
        "points_with_both": 0,
        "pairs": 0,
        "continuations": 0,
        "continuations_passed": 0,
        "continuations_unverified": 0,
        "pass_rate": None,
        "failures": [],
        "cost": {key: 0 for key in ("prefill_tokens", "generated_tokens", "requests")},
    }
    for rec in results:
        for key, value in (rec.get("cost") or {}).items():
            if key in s["cost"] and isinstance(value, (int, float)):
                s["cost"][key] += value
        status = rec.get("status", "ok")
        s[f"records_{status}" if status in ("ok", "no_reference", "failed") else "records_failed"] += 1
        if rec.get("reference_source") == "sampled":
            s["references_sampled"] += 1
        if status != "ok":
            s["failures"].append({"id": rec.get("id"), "status": status, "error": rec.get("error")})
        for point in rec.get("points") or []:
            conts = point.get("continuations") or []
            s["continuations"] += len(conts)
            s["continuations_passed"] += sum(1 for c in conts if c.get("verified"))
            s["continuations_unverified"] += len(point.get("unverified") or [])
            if status != "ok":
                continue
            s["points"] += 1
            n = count_pairs(point, max_pairs_per_point)
            if n:
                s["points_with_both"] += 1
                s["pairs"] += n
    if s["continuations"]:
        s["pass_rate"] = s["continuations_passed"] / s["continuations"]
    c = s["cost"]
    c["continuations_verified"] = s["continuations"]  # each verified once (a judge verifier: one call each)
    c["continuations_passed"] = s["continuations_passed"]
    c["points_with_both"] = s["points_with_both"]
    c["pairs"] = s["pairs"]
    c["pairs_per_1k_generated_tokens"] = (
        round(1000 * s["pairs"] / c["generated_tokens"], 3) if c["generated_tokens"] else None
    )
    return s


def format_summary(s: dict) -> str:
    rate = "n/a" if s["pass_rate"] is None else f"{100 * s['pass_rate']:.1f}%"
    lines = [
        "exploration summary",
        f"  records: {s['records']} (ok {s['records_ok']}, no reference {s['records_no_reference']}, failed {s['records_failed']};"
        f" references sampled {s['references_sampled']})",
        f"  branch points: {s['points']}, with both outcomes: {s['points_with_both']}",
        f"  pairs that would be built: {s['pairs']}",
        f"  verifier pass rate: {rate} of {s['continuations']} continuation(s)"
        + (f"; {s['continuations_unverified']} undecided (verifier errors)" if s["continuations_unverified"] else ""),
    ]
    c = s.get("cost") or {}
    if c.get("requests") or c.get("generated_tokens"):
        per_1k = c.get("pairs_per_1k_generated_tokens")
        lines.append(
            f"  cost: {c['prefill_tokens']:,} prefill tokens, {c['generated_tokens']:,} generated tokens, "
            f"{c['requests']:,} requests"
            + (f"; this run {c['wall_seconds']:.1f} s" if c.get("wall_seconds") is not None else "")
        )
        lines.append(
            f"  yield: {c['continuations_verified']:,} continuations verified ({c['continuations_passed']:,} passed), "
            f"{c['points_with_both']:,} points with both outcomes, "
            f"{'n/a' if per_1k is None else f'{per_1k:.2f}'} pairs per 1k generated tokens"
        )
    if "resumed" in s:
        by_rank = s.get("explored_by_rank")
        ranks = f" ({', '.join(f'rank {r}: {n}' for r, n in enumerate(by_rank))})" if by_rank else ""
        lines.append(f"  this run: {s['explored_now']} explored{ranks}, {s['resumed']} already in the output")
    for note in (s.get("endpoint") or {}).get("lines", []):
        lines.append(f"  {note}")
    for f in s["failures"][:20]:
        lines.append(f"  {f['status']}: {f['id']}: {f['error']}")
    if len(s["failures"]) > 20:
        lines.append(f"  ... and {len(s['failures']) - 20} more")
    if s["records_ok"] and not s["pairs"]:
        lines.append("  no pairs: sample more (--num-samples) or at a higher --temperature, or check the verifier")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def explore(
    records: str | os.PathLike | Iterable[dict],
    backend,
    verifier: str | Callable = "safety-outcome",
    *,
    num_samples: int = 10,
    temperature: float = 0.5,
    max_new_tokens: int = 512,
    branch_points: str | int | Callable = "all",
    max_pairs_per_point: int | None = None,
    seed: int | None = 0,
    out: str | os.PathLike | None = None,
    separator: str = DEFAULT_STEP_SEPARATOR,
    retry_failed: bool = False,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    concurrent_records: int = 1,
    show_progress: bool = True,
    print_summary: bool = True,
    merge_poll_s: float = 2.0,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    policy: dict | None = None,
    fingerprint_extra: dict | None = None,
) -> dict:
    """Explore ``records`` (a JSONL path or dicts) with ``backend``; verify with ``verifier`` (a
    registered name or a callable ``(record, path_text) -> Verdict``).

    With ``out``, one line per record is appended and flushed as it goes; records already there
    are skipped (``retry_failed`` redoes those with ``status: "failed"``; ``overwrite`` starts
    again). Under ``accelerate launch`` (``RANK``/``WORLD_SIZE`` set, or ``rank``/``world_size``
    given) each rank writes ``shard_path(out, rank, world)`` and rank 0 merges every shard into
    ``out`` once all ranks are done. ``concurrent_records`` > 1 explores that many records at once on
    threads (for an HTTP backend, to keep a server busy; lines are still written in input order).
    Returns the summary (see :func:`summarize`; ``results`` holds
    the output records when ``out`` is None) and prints it. With ``image_root`` (the command line
    always sets one), image paths must lie inside it unless ``allow_outside_root``.

    ``out`` is resumed only when ``out.meta.json`` shows the same policy (``policy``, default
    :func:`backend_identity`), the same input (a hash of the records) and the same arguments
    (``fingerprint_extra`` adds what the caller knows changes results); otherwise the call refuses
    before any work (:class:`srpo_trl.store.FingerprintMismatch`); the input includes the content of
    every image file the records name. A second run on the same ``out`` (or on a symlink to it) is
    refused while one runs (:class:`srpo_trl.store.OutputLocked`). Every image file is decoded before
    anything is sent: a broken one is a :class:`RecordError` naming the record and ``images[i]``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_pairs_per_point is not None and max_pairs_per_point < 1:
        raise ValueError(f"max_pairs_per_point must be >= 1, got {max_pairs_per_point}")
    backend_sep = getattr(backend, "separator", separator)
    if backend_sep != separator:
        logger.warning(
            "the backend tokenizes prefixes with separator %r but exploration joins steps with %r",
            backend_sep,
            separator,
        )
    verifier_name = verifier_label(verifier)
    verifier = as_verifier(verifier)
    required = tuple(getattr(verifier, "required_fields", ()))
    recs, base_dir = load_records(records, required, image_root, allow_outside_root)
    if not callable(branch_points):
        select_branch_points(["a", "b"], branch_points, {})  # a bad value fails now, not at the first record
    simulated = (
        rank is not None or world_size is not None
    )  # explicit ranks: no process group (tests, custom launchers)
    rank, world_size = _dist_info(rank, world_size)
    settings = dict(
        num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, separator=separator
    )

    if concurrent_records < 1:
        raise ValueError(f"concurrent_records must be >= 1, got {concurrent_records}")

    def explore_one(rec):
        with cost.track() as spent:
            line = explore_record(rec, backend, verifier, branch_points=branch_points, **settings)
        # tokens and requests only: times would make a resumed output differ from an uninterrupted one
        line["cost"] = {k: v for k, v in spent.as_dict().items() if k != "seconds"}
        return line

    started = time.perf_counter()
    if out is None:
        if world_size > 1:
            raise ValueError("several processes need an output file (out=...) to write their shards to")
        endpoint = _preflight(backend, recs, branch_points, separator, temperature if num_samples > 1 else 0.0)
        results = list(_run_records(recs, explore_one, None, concurrent_records, show_progress, rank))
        summary = summarize(results, max_pairs_per_point)
        summary["cost"]["wall_seconds"] = round(time.perf_counter() - started, 3)
        summary["endpoint"] = endpoint
        summary["results"] = results
        if print_summary:
            print(format_summary(summary))
        return summary

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = output_fingerprint(
        records,
        recs,
        policy if policy is not None else backend_identity(backend),
        verifier_name,
        branch_points,
        settings,
        fingerprint_extra,
    )
    multi = world_size > 1
    group = collectives.gloo_group() if multi and not simulated else None
    my_file = shard_path(out, rank, world_size) if multi else out
    real = store.real_path(out)  # a symlink to the output is the same output: one lock, one fingerprint
    with contextlib.ExitStack() as locks:
        # One run per output: rank 0 (or the only process) holds the output's lock, every rank its shard's.
        if rank == 0:
            locks.enter_context(store.output_lock(lock_path(real), "explore", out))
        if multi:
            locks.enter_context(store.output_lock(lock_path(store.real_path(my_file)), "explore", my_file))
        if rank == 0:
            if overwrite:
                for p in [real, *_shard_glob(out)]:
                    p.unlink(missing_ok=True)
                    _done_path(p).unlink(missing_ok=True)
            else:
                _read_output(out, repair=False)  # a damaged output is named before anything else
            store.check_fingerprint(real, fingerprint, overwrite=overwrite, write=False)
        # a server that cannot serve the run stops it here, before anything is recorded beside `out`
        endpoint = _preflight(backend, recs, branch_points, separator, temperature if num_samples > 1 else 0.0)
        if rank == 0:
            store.check_fingerprint(real, fingerprint, overwrite=True)  # compared above: record it
        return _explore_into(
            out,
            my_file,
            recs,
            explore_one,
            group,
            rank,
            world_size,
            overwrite=overwrite,
            retry_failed=retry_failed,
            concurrent_records=concurrent_records,
            show_progress=show_progress,
            print_summary=print_summary,
            max_pairs_per_point=max_pairs_per_point,
            merge_poll_s=merge_poll_s,
            started=started,
            endpoint=endpoint,
        )


def _preflight(backend, recs: list[dict], branch_points, separator: str, temperature: float = 0.0) -> dict | None:
    """Ask an HTTP backend once whether it serves what this run needs (:meth:`preflight`): the mode
    it will use and what the server refused or ignored. A refusal stops the run before any record
    (:class:`srpo_trl.endpoint.PreflightError`, with what to pass instead); a server that does not
    answer is only logged: each record then fails with the error, as without a preflight."""
    check = getattr(backend, "preflight", None)
    if check is None:
        return None
    needs_prefix = branch_points != 1  # point 0 has an empty prefix; every other point continues the answer
    probes = []
    for with_images in (False, True):
        rec = next((r for r in recs if bool(r["_images"]) == with_images), None)
        if rec is None:
            continue
        prefix = ""
        if needs_prefix:
            steps = rec.get("reference") or ["Let me look at this step by step."]
            prefix = continuation_prefix_text(steps[:1], separator)
        images = [load_image(im) for im in rec["_images"]] if with_images else []
        probes.append(GenerationRequest(rec["prompt"], images, prefix, template_kwargs(rec)))
    try:
        report = check(probes, temperature=temperature)
    except BackendError as exc:
        logger.warning("preflight: the server did not answer (%s); records fail until it does", exc)
        return {"mode": getattr(backend, "resolved_mode", None), "notes": [], "lines": [f"preflight failed: {exc}"]}
    except OSError as exc:  # an unreadable image: that record fails on its own
        logger.warning("preflight skipped: %s", exc)
        return None
    for line in report.notes:
        logger.warning("preflight: %s", line)
    return {"mode": report.mode, "notes": list(report.notes), "lines": report.lines()}


def _explore_into(
    out: Path,
    my_file: Path,
    recs: list[dict],
    explore_one,
    group,
    rank: int,
    world_size: int,
    *,
    overwrite: bool,
    retry_failed: bool,
    concurrent_records: int,
    show_progress: bool,
    print_summary: bool,
    max_pairs_per_point: int | None,
    merge_poll_s: float,
    started: float,
    endpoint: dict | None,
) -> dict:
    """The file side of :func:`explore`, run while the output's locks are held."""
    multi = world_size > 1
    # All ranks agree on a run token (so rank 0 never mistakes an old run's markers for this one's)
    # and start reading what is done only after rank 0 has cleaned up.
    token = _broadcast_token(group)
    if multi:
        _done_path(my_file).unlink(missing_ok=True)
        if overwrite:
            my_file.unlink(missing_ok=True)

    # What is already done: the output, plus every shard of an earlier or current multi-process run.
    existing = [] if overwrite and multi else _read_output(out, repair=not multi)
    if not (overwrite and multi):
        for shard in _shard_glob(out):
            existing += _read_output(shard, repair=(shard == my_file))
    if retry_failed and not multi:
        kept = [r for r in existing if r.get("status") != "failed"]
        if len(kept) != len(existing):
            store.rewrite(out, kept)
            existing = kept
    done = {str(r["id"]) for r in existing if not (retry_failed and r.get("status") == "failed")}
    mine = [rec for i, rec in enumerate(recs) if i % world_size == rank]
    todo = [rec for rec in mine if str(rec["id"]) not in done]
    resumed = len(mine) - len(todo)
    if resumed:
        logger.warning("%s: %d record(s) already explored, %d to go", my_file, resumed, len(todo))

    with store.Appender(my_file, repair=False) as f:
        for line in _run_records(todo, explore_one, out.parent, concurrent_records, show_progress, rank):
            f.write(line)

    counts = {"explored_now": len(todo), "resumed": resumed}
    by_rank = None
    if multi:
        _done_path(my_file).write_text(json.dumps({"token": token, **counts}))
        merged_marker = out.with_name(out.name + ".merged")
        if rank != 0:
            if group is not None:  # wait for rank 0's merge, so that `out` is complete when we return
                _wait_for(lambda: _marker_token(merged_marker) == token, "the merge by rank 0", merge_poll_s)
                collectives.barrier(group)  # rank 0 removes the marker once every rank has seen it
            return {"rank": rank, **counts, "shard": str(my_file)}
        shards = [shard_path(out, r, world_size) for r in range(world_size)]
        _wait_for(
            lambda: all(_marker_token(_done_path(p)) == token for p in shards),
            "the other ranks' shards",
            merge_poll_s,
        )
        done = [json.loads(_done_path(p).read_text()) for p in shards]
        by_rank = [int(d.get("explored_now", 0)) for d in done]
        counts = {key: sum(int(d.get(key, 0)) for d in done) for key in counts}
        if retry_failed:  # failed lines of earlier runs were redone in the shards: the new lines win
            _drop_redone_failures(out)
        merge_shards(out, order=[rec["id"] for rec in recs])
        if group is not None:  # the other ranks wait for this marker, then meet rank 0 at a barrier
            merged_marker.write_text(token)
            collectives.barrier(group)
            merged_marker.unlink(missing_ok=True)

    results = _read_output(out, repair=False)
    ids = {str(rec["id"]) for rec in recs}
    summary = summarize([r for r in results if str(r["id"]) in ids], max_pairs_per_point)
    summary.update(counts, output=str(out), endpoint=endpoint)
    summary["cost"]["wall_seconds"] = round(time.perf_counter() - started, 3)
    if by_rank is not None:
        summary["explored_by_rank"] = by_rank
    _write_summary(store.real_path(out), summary)
    if print_summary:
        print(format_summary(summary))
    return summary


def summary_path(out: str | os.PathLike) -> Path:
    """Where the summary of a run on ``out`` is written (``explored.jsonl`` -> ``explored.jsonl.summary.json``)."""
    out = Path(out)
    return out.with_name(out.name + ".summary.json")


def _write_summary(out: Path, summary: dict) -> None:
    path = summary_path(out)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _marker_token(path: Path) -> str | None:
    """The run token a done / merged marker holds (a done marker is JSON with the rank's counts)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if text.startswith("{"):
        try:
            return json.loads(text).get("token")
        except ValueError:
            return None
    return text


def _broadcast_token(group) -> str:
    if group is None:
        return "run"
    import uuid

    import torch.distributed as dist

    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    dist.barrier(group=group)
    return box[0]


def _wait_for(condition: Callable[[], bool], what: str, poll_s: float) -> None:
    start = last = time.monotonic()
    while not condition():
        if time.monotonic() - last > 60:
            logger.warning("waiting for %s (%.0f s so far)", what, time.monotonic() - start)
            last = time.monotonic()
        time.sleep(poll_s)


def _drop_redone_failures(out: Path) -> None:
    redone = set()
    for shard in _shard_glob(out):
        redone |= {str(r["id"]) for r in _read_output(shard, repair=False)}
    existing = _read_output(out, repair=False)
    kept = [r for r in existing if not (r.get("status") == "failed" and str(r["id"]) in redone)]
    if len(kept) != len(existing):
        store.rewrite(out, kept)


def _run_records(recs: list[dict], explore_one, out_dir: Path | None, concurrent: int, show: bool, rank: int):
    """Output lines of ``recs`` in input order, with a progress bar; ``concurrent`` records at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def one(rec):
        line = explore_one(rec)
        line["images"] = _output_images(rec, out_dir)
        return line

    bar = tqdm(
        total=len(recs),
        desc=f"explore[rank {rank}]" if rank else "explore",
        unit="record",
        position=rank,
        disable=not show,
    )
    try:
        if concurrent == 1 or len(recs) < 2:
            for rec in recs:
                yield one(rec)
                bar.update(1)
            return
        with ThreadPoolExecutor(max_workers=concurrent) as pool:
            pending = []
            it = iter(recs)
            for rec in itertools.islice(it, concurrent):
                pending.append(pool.submit(one, rec))
            while pending:
                line = pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(one, nxt))
                yield line
                bar.update(1)
    finally:
        bar.close()


def verifier_label(verifier) -> str:
    """The name a verifier is recorded under (in the output's fingerprint)."""
    return verifier if isinstance(verifier, str) else getattr(verifier, "__name__", type(verifier).__name__)
