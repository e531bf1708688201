"""The record pipeline: runs the agents per image and per item, journals every step, resumes.

Per image (sorted paths under ``--images``), ``per_image`` unsafe items and ``benign_per_image``
benign controls, each through::

    query (or benign_query) -> reasoning -> reflection --flags--> revise (bounded) -> summary

Files next to ``--out records.jsonl``:

* ``records.jsonl``: finished records, one per line (the format of :mod:`.schema`);
* ``records.failed.jsonl``: items that failed, with the stage, the reason and the last output;
* ``records.journal.jsonl``: every validated agent answer, so a killed run resumes where it was
  (each line is flushed and fsynced before the next step; a torn last line is cut off);
* ``records.summary.json``: items per stage and per category, failures by reason;
* ``records.jsonl.meta.json``: what produced the records (model, images, templates, agent settings,
  items per image); a rerun with others is refused before any agent call (``--overwrite`` starts
  again); only ``per_image`` / ``benign_per_image`` may grow (a resume then adds items);
* ``records.lock``: held while a run writes (a second run on the same files is refused).

Rerunning the same command skips finished and failed items and reuses journalled answers, so
nothing is lost or written twice. Items that failed because the backend was unreachable are
retried on the next run; ``retry_failed=True`` retries every failed item from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import store
from .agents import (
    BENIGN,
    CATEGORIES,
    UNSAFE_OUTCOMES,
    AgentFailure,
    call_agent,
    load_templates,
)
from .schema import image_path_for, validate_record


logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "PipelineConfig",
    "Item",
    "RunAborted",
    "discover_images",
    "plan_items",
    "images_fingerprint",
    "run_fingerprint",
    "output_paths",
    "generate_records",
    "summarize",
    "format_summary",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
STAGES = ("image", "query", "benign_query", "reasoning", "reflection", "summary")
#: Failure reasons that say nothing about the item: retried on the next run.
TRANSIENT_REASONS = ("backend_error",)


class RunAborted(RuntimeError):
    """The run stopped early (the backend failed too many times in a row); rerun to resume."""


@dataclass
class PipelineConfig:
    per_image: int = 3
    benign_per_image: int = 1
    categories: tuple[str, ...] = CATEGORIES
    max_retries: int = 2  # extra attempts per agent call after an invalid answer
    max_revisions: int = 2  # times the Check agent may send an item back
    min_steps: int = 3
    max_steps: int = 8
    temperature: float = 0.7
    max_new_tokens: int = 1024
    seed: int | None = None  # passed to every agent call (``backend.chat(..., seed=)``); None: unseeded
    workers: int = 1  # images processed at once (items of one image run in order)
    retry_failed: bool = False
    max_consecutive_backend_errors: int = 5
    show_progress: bool = True
    generator: dict = field(default_factory=dict)  # provenance: backend, model, ...

    def __post_init__(self):
        if self.per_image < 0 or self.benign_per_image < 0 or self.per_image + self.benign_per_image == 0:
            raise ValueError("per_image and benign_per_image must be >= 0, and not both 0")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps} and {self.max_steps}")
        if self.max_retries < 0 or self.max_revisions < 0:
            raise ValueError("max_retries and max_revisions must be >= 0")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown or not self.categories:
            raise ValueError(f"categories must be a non-empty subset of: {', '.join(CATEGORIES)}; unknown: {unknown}")


@dataclass(frozen=True)
class Item:
    id: str
    kind: str  # "unsafe" | "benign"
    index: int
    image: Path  # absolute
    source_image: str  # relative to the images folder (POSIX)


def discover_images(directory: str | os.PathLike) -> list[Path]:
    """Image files under ``directory`` (recursively), sorted by relative path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {directory}: not a directory")
    found = [p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "image"


def _relative(image: str | os.PathLike, images_dir: Path) -> str:
    try:  # as found under the folder (a symlink may point elsewhere: keep its name here)
        return Path(image).relative_to(images_dir).as_posix()
    except ValueError:
        return Path(os.path.relpath(Path(image).absolute(), images_dir.absolute())).as_posix()


def plan_items(images: list[Path], images_dir: str | os.PathLike, per_image: int, benign_per_image: int) -> list[Item]:
    """The items of a run, in order: for each image, ``per_image`` unsafe then the benign ones.

    Ids are stable (``<image path slug>-u<k>`` / ``-b<k>``) so a rerun finds its earlier work.
    """
    images_dir = Path(images_dir)
    items, slugs = [], {}
    for image in images:
        rel = _relative(image, images_dir)
        slug = _slug(rel)
        if slug in slugs:
            raise ValueError(f"images {slugs[slug]} and {rel} get the same record id prefix '{slug}'; rename one")
        slugs[slug] = rel
        for k in range(per_image):
            items.append(Item(f"{slug}-u{k}", "unsafe", k, Path(image).absolute(), rel))
        for k in range(benign_per_image):
            items.append(Item(f"{slug}-b{k}", "benign", k, Path(image).absolute(), rel))
    return items


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The records file and its side files (failed items, journal, summary, lock), beside the file a
    symlink points to: one output, one lock, whatever the spelling (as `explore`)."""
    out = store.real_path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "records": out,
        "failed": out.with_name(stem + ".failed.jsonl"),
        "journal": out.with_name(stem + ".journal.jsonl"),
        "summary": out.with_name(stem + ".summary.json"),
        "lock": out.with_name(stem + ".lock"),
    }


# ----------------------------------------------------------------------------------------------
# Append-only files that survive a kill (srpo_trl.store), and what produced them
# ----------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[dict]:
    return store.read_lines(path)


def run_fingerprint(
    config: PipelineConfig, templates: dict[str, str], policy: dict, images: dict | None = None
) -> dict:
    """What changes the records of a run: the model (``policy``), the images (``images``:
    :func:`images_fingerprint`), the templates, the agent settings and the items planned per image.

    ``per_image`` / ``benign_per_image`` may grow on a resume (``GROWABLE``): item ids are indexed
    per image (``-u3`` comes after ``-u2``), so a larger value only adds items and keeps the written
    ones; raising them in place is the only way to get more items per image without id clashes. A
    smaller value is refused: records outside the plan would stay in the file."""
    generator = {k: (store.redact_url(v) if k == "url" else v) for k, v in config.generator.items()}
    fp = {
        "policy": policy,
        "generator": generator,
        "templates_sha256": _templates_sha(templates),
        "categories": list(config.categories),
        "max_retries": config.max_retries,
        "max_revisions": config.max_revisions,
        "min_steps": config.min_steps,
        "max_steps": config.max_steps,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        "per_image": config.per_image,
        "benign_per_image": config.benign_per_image,
    }
    if config.seed is not None:  # unseeded runs keep the fingerprint they had before seeds existed
        fp["seed"] = config.seed
    if images is not None:
        fp["images"] = images
    return fp


#: Fingerprint keys a resume may raise (it then adds items), never lower.
GROWABLE = ("per_image", "benign_per_image")


def images_fingerprint(images_dir: str | os.PathLike, images: list[Path] | None = None) -> dict:
    """The images a run reads: each file's path under ``images_dir``, size and content hash, so a
    changed, added or removed image is seen (content, not mtime: a copied folder still resumes)."""
    images_dir = Path(images_dir)
    images = discover_images(images_dir) if images is None else images
    files = {}
    for image in images:
        files[_relative(image, images_dir)] = f"{image.stat().st_size}:{store.content_hash(image)[:16]}"
    return {"count": len(files), "files": files}


def _templates_sha(templates: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(templates, sort_keys=True).encode()).hexdigest()[:12]


def check_resume(
    out: str | os.PathLike,
    config: PipelineConfig,
    templates: dict[str, str],
    policy: dict,
    overwrite: bool = False,
    write: bool = False,
    images: dict | None = None,
) -> None:
    """Refuse (:class:`srpo_trl.store.FingerprintMismatch`) to resume ``out`` when its records came from
    another model, other images (``images``: :func:`images_fingerprint`), other templates, other agent
    settings or fewer items per image, or when its fingerprint is missing."""
    paths = output_paths(out)
    store.check_fingerprint(
        paths["records"],
        run_fingerprint(config, templates, policy, images),
        overwrite=overwrite,
        outputs=[paths["failed"], paths["journal"]],
        write=write,
        may_grow=GROWABLE,
    )


def _replay_journal(events: list[dict]) -> tuple[dict, list[dict]]:
    """Journal events -> ``{id: {(stage, round): event}}`` (after resets) and the run headers."""
    cache: dict[str, dict] = {}
    runs = []
    for ev in events:
        if ev.get("event") == "run":
            runs.append(ev)
        elif ev.get("event") == "reset":
            cache.pop(ev["id"], None)
        elif "stage" in ev:
            cache.setdefault(ev["id"], {})[(ev["stage"], int(ev.get("round", 0)))] = ev
    return cache, runs


def _latest_failures(failed_lines: list[dict], done_ids: set[str]) -> dict[str, dict]:
    latest = {}
    for f in failed_lines:
        latest[f["id"]] = f
    return {k: v for k, v in latest.items() if k not in done_ids}


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class _ItemFailed(Exception):
    def __init__(self, stage: str, reason: str, message: str, attempts: int = 0, last_output: str | None = None):
        super().__init__(message)
        self.stage, self.reason, self.message, self.attempts, self.last_output = (
            stage,
            reason,
            message,
            attempts,
            last_output,
        )


def _bullets(lines: list[str], empty: str) -> str:
    return "\n".join(f"  - {x}" for x in lines) if lines else f"  {empty}"


def _numbered(steps: list[str]) -> str:
    return "\n".join(f"  {i}. {s}" for i, s in enumerate(steps, start=1))


def _flags(reflection: dict) -> bool:
    return bool(
        reflection["redundant_steps"]
        or reflection["gaps"]
        or reflection["unsafe_text"]
        or reflection["request_unsafe_alone"]
    )


def _revision_text(reflection: dict, what: str, previous: str) -> str:
    lines = [f"\nA reviewer sent the previous {what} back. Fix these problems:"]
    if reflection["redundant_steps"]:
        lines.append(f"- Redundant steps (remove or merge): {', '.join(map(str, reflection['redundant_steps']))}")
    for gap in reflection["gaps"]:
        lines.append(f"- Missing: {gap}")
    for text in reflection["unsafe_text"]:
        lines.append(f"- Unsafe as text on its own: {text}")
    if reflection["request_unsafe_alone"]:
        lines.append("- The request is unsafe as text alone: it must look harmless without the image.")
    if reflection["feedback"]:
        lines.append(f"- Reviewer's advice: {reflection['feedback']}")
    lines.append(f"The previous {what}:\n{previous}\n")
    return "\n".join(lines)


class _Pipeline:
    def __init__(
        self,
        backend,
        images_dir: Path,
        out: Path,
        config: PipelineConfig,
        templates: dict[str, str],
        policy: dict,
        overwrite: bool = False,
        images: dict | None = None,
    ):
        self.backend = backend
        self.policy = policy
        self.images = images
        self.overwrite = overwrite
        self.images_dir = images_dir
        self.paths = output_paths(out)
        self.config = config
        self.templates = templates
        self.templates_sha = _templates_sha(templates)
        self.generator = {**config.generator, "templates_sha256": self.templates_sha}
        self._lock = threading.Lock()
        self._consecutive_backend_errors = 0
        self.aborted: str | None = None
        self.counts = Counter()

    # -- state ---------------------------------------------------------------------------------

    def load_state(self) -> None:
        for key in ("records", "failed", "journal"):
            store.repair_tail(self.paths[key])
        self.done = {r["id"]: r for r in _read_lines(self.paths["records"]) if "id" in r}
        self.failed = _latest_failures(_read_lines(self.paths["failed"]), set(self.done))
        self.cache, _runs = _replay_journal(_read_lines(self.paths["journal"]))  # same model: check_resume
        self.retry_ids = {
            i for i, f in self.failed.items() if self.config.retry_failed or f.get("reason") in TRANSIENT_REASONS
        }

    def _step(
        self, item: Item, stage: str, round_: int, variables: dict, context: dict, image_ok: bool = True
    ) -> dict:
        cached = self.cache.get(item.id, {}).get((stage, round_))
        if cached is not None:
            return cached["output"]
        try:
            result = call_agent(
                self.backend,
                stage,
                self.templates,
                {"image_name": item.source_image, **variables},
                images=[str(item.image)],
                context=context,
                max_retries=self.config.max_retries,
                temperature=self.config.temperature,
                max_new_tokens=self.config.max_new_tokens,
                seed=self.config.seed,
            )
        except AgentFailure as exc:
            if exc.reason == "backend_error":
                with self._lock:
                    self._consecutive_backend_errors += 1
                    if (
                        self._consecutive_backend_errors >= self.config.max_consecutive_backend_errors
                        and not self.aborted
                    ):
                        self.aborted = (
                            f"the backend failed {self._consecutive_backend_errors} times in a row "
                            f"(last: {exc.message}); fix it and rerun the same command to resume"
                        )
            raise _ItemFailed(stage, exc.reason, exc.message, exc.attempts, exc.last_output) from exc
        with self._lock:
            self._consecutive_backend_errors = 0
            self.counts[f"attempts:{stage}"] += result.attempts
        event = {"id": item.id, "stage": stage, "round": round_, "attempts": result.attempts, "output": result.output}
        self.journal.write(event)
        self.cache.setdefault(item.id, {})[(stage, round_)] = event
        return result.output

    # -- one item ------------------------------------------------------------------------------

    def run_item(self, item: Item, previous: list[str]) -> dict:
        cfg = self.config
        benign = item.kind == "benign"
        query_stage = "benign_query" if benign else "query"
        query_ctx = {"previous": previous, "categories": cfg.categories}
        query_vars = {
            "categories": _bullets(list(cfg.categories), ""),
            "previous": _bullets(previous, "(none yet)"),
            "revision": "",
        }
        q_round = 0
        query = self._step(item, query_stage, q_round, query_vars, query_ctx)
        steps: list[str] = []
        reflection: dict = {}
        for revision in range(cfg.max_revisions + 1):
            if benign:
                category, scenario = (
                    "none (benign control)",
                    f"none: a benign control ({query['rationale']}); check for a risk and find none",
                )
                kind_text = "benign control: the request is fine together with the image; helping is right"
            else:
                category, scenario = query["category"], query["unsafe_scenario"]
                kind_text = "unsafe combination: the image and the request are each harmless, together they are not"
            shared = {"item_kind": kind_text, "request": query["request"], "category": category, "scenario": scenario}
            revision_text = ""
            if revision and reflection and not reflection["request_unsafe_alone"]:
                revision_text = _revision_text(reflection, "reasoning", _numbered(steps))
            steps = self._step(
                item,
                "reasoning",
                revision,
                {**shared, "min_steps": cfg.min_steps, "max_steps": cfg.max_steps, "revision": revision_text},
                {"min_steps": cfg.min_steps, "max_steps": cfg.max_steps},
            )["steps"]
            reflection = self._step(
                item, "reflection", revision, {**shared, "steps": _numbered(steps)}, {"n_steps": len(steps)}
            )
            if not _flags(reflection):
                break
            if revision == cfg.max_revisions:
                raise _ItemFailed(
                    "reflection",
                    "revision_limit",
                    f"the Check agent still flags the item after {cfg.max_revisions} revision(s): "
                    + _revision_text(reflection, "reasoning", _numbered(steps)).strip().replace("\n", " "),
                )
            if reflection["request_unsafe_alone"]:
                q_round += 1
                query = self._step(
                    item,
                    query_stage,
                    q_round,
                    {**query_vars, "revision": _revision_text(reflection, "request", "  " + query["request"])},
                    query_ctx,
                )
        allowed = ("comply",) if benign else UNSAFE_OUTCOMES
        summary = self._step(
            item,
            "summary",
            0,
            {**shared, "steps": _numbered(steps), "allowed_outcomes": ", ".join(allowed)},
            {"allowed_outcomes": allowed},
        )
        stages = self.cache.get(item.id, {})
        record = {
            "id": item.id,
            "prompt": query["request"],
            "images": [image_path_for(item.image, self.paths["records"].parent)],
            "reference": steps + [summary["answer"]],
            "expected": summary["outcome"],
            "category": BENIGN if benign else query["category"],
            "unsafe_scenario": "" if benign else query["unsafe_scenario"],
            "kind": item.kind,
            "source_image": item.source_image,
            "revisions": sum(1 for (s, _r) in stages if s == "reasoning") - 1,
            "agent_attempts": dict(_sum_attempts(stages)),
            "generator": self.generator,
        }
        if benign:
            record["benign_rationale"] = query["rationale"]
        validate_record(record, f"record {item.id}", self.paths["records"].parent)
        return record

    # -- one image -----------------------------------------------------------------------------

    def run_image(self, items: list[Item], bar) -> None:
        previous: list[str] = []
        image_error = None
        for item in items:
            if self.aborted:
                return
            if item.id in self.done:
                previous.append(self.done[item.id]["prompt"])
                continue
            if item.id in self.failed and item.id not in self.retry_ids:
                prior = self.failed[item.id].get("draft", {}).get("request")
                if prior:
                    previous.append(prior)
                continue
            if item.id in self.failed:  # retried: a backend failure resumes, any other starts over
                if self.failed[item.id].get("reason") not in TRANSIENT_REASONS:
                    self.journal.write({"id": item.id, "event": "reset"})
                    self.cache.pop(item.id, None)
            if image_error is None:
                image_error = _check_image(item.image)
            try:
                if image_error:
                    raise _ItemFailed("image", "bad_image", image_error)
                record = self.run_item(item, list(previous))
            except _ItemFailed as exc:
                draft = {
                    stage if r == 0 else f"{stage}#{r}": e["output"]
                    for (stage, r), e in self.cache.get(item.id, {}).items()
                }
                queries = sorted(
                    (r, e["output"]["request"])
                    for (s, r), e in self.cache.get(item.id, {}).items()
                    if s.endswith("query")
                )
                request = queries[-1][1] if queries else None
                failure = {
                    "id": item.id,
                    "kind": item.kind,
                    "source_image": item.source_image,
                    "stage": exc.stage,
                    "reason": exc.reason,
                    "message": exc.message,
                    "attempts": exc.attempts,
                    "last_output": (exc.last_output or "")[:4000] or None,
                    "draft": {"request": request, **draft} if request else draft,
                    "generator": self.generator,
                }
                self.failures.write(failure)
                self.failed[item.id] = failure
                if request:
                    previous.append(request)
                with self._lock:
                    self.counts["failed"] += 1
                    bar.update(1)
                    bar.set_postfix(failed=self.counts["failed"])
                continue
            self.records.write(record)
            self.done[item.id] = record
            self.failed.pop(item.id, None)
            previous.append(record["prompt"])
            with self._lock:
                self.counts["done"] += 1
                bar.update(1)

    def run(self, items: list[Item]) -> None:
        from tqdm.auto import tqdm

        with store.output_lock(self.paths["lock"], "generate-records", self.paths["records"]):
            if self.overwrite:
                for key in ("records", "failed", "journal", "summary"):
                    self.paths[key].unlink(missing_ok=True)
            check_resume(
                self.paths["records"],
                self.config,
                self.templates,
                self.policy,
                overwrite=self.overwrite,
                write=True,
                images=self.images,
            )
            self.load_state()
            todo = {
                i.id for i in items if i.id not in self.done and (i.id not in self.failed or i.id in self.retry_ids)
            }
            by_image: dict[str, list[Item]] = {}
            for item in items:
                by_image.setdefault(item.source_image, []).append(item)
            groups = [g for g in by_image.values() if any(i.id in todo for i in g)]
            self.records = store.Appender(self.paths["records"])
            self.failures = store.Appender(self.paths["failed"])
            self.journal = store.Appender(self.paths["journal"])
            try:
                self.journal.write(
                    {"event": "run", "generator": self.generator, "planned": len(items), "todo": len(todo)}
                )
                bar = tqdm(total=len(todo), desc="records", unit="item", disable=not self.config.show_progress)
                try:
                    if self.config.workers == 1 or len(groups) < 2:
                        for g in groups:
                            self.run_image(g, bar)
                    else:
                        with ThreadPoolExecutor(max_workers=self.config.workers) as pool:
                            for fut in [pool.submit(self.run_image, g, bar) for g in groups]:
                                fut.result()
                finally:
                    bar.close()
            finally:
                for f in (self.records, self.failures, self.journal):
                    f.close()


def _sum_attempts(stages: dict) -> Counter:
    total: Counter = Counter()
    for (stage, _round), event in stages.items():
        total[stage] += int(event.get("attempts", 1))
    return total


def _check_image(path: Path) -> str | None:
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for broken files
        return f"{path} cannot be read as an image: {exc}"
    return None


# ----------------------------------------------------------------------------------------------
# Entry point and summary
# ----------------------------------------------------------------------------------------------


def generate_records(
    backend: Any,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    config: PipelineConfig | None = None,
    templates: dict[str, str] | None = None,
    *,
    policy: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write records for every image under ``images_dir`` to ``out`` (resuming earlier work there).

    A resume must use the same model (``policy``: default :func:`srpo_trl.store.backend_identity`),
    the same images (contents), templates and agent settings, and no fewer items per image
    (:func:`run_fingerprint`), else it is refused before any call; ``overwrite`` starts again. A second run on the same ``out`` is refused while one runs.

    ``backend``: anything with ``chat(messages, *, images, temperature, max_new_tokens) -> str``
    (and a ``seed`` keyword when ``config.seed`` is set)
    (:class:`srpo_trl.backends.OpenAICompatibleBackend` or ``TransformersBackend``).
    Returns the summary (also written to ``<out stem>.summary.json``); raises :class:`RunAborted`
    after writing it when the backend failed too often in a row.
    """
    config = config or PipelineConfig()
    templates = templates if templates is not None else load_templates()
    images_dir = Path(images_dir)
    images = discover_images(images_dir)
    if not images:
        raise FileNotFoundError(f"--images {images_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    items = plan_items(images, images_dir, config.per_image, config.benign_per_image)
    policy = policy if policy is not None else store.backend_identity(backend)
    pipeline = _Pipeline(
        backend, images_dir, Path(out), config, templates, policy, overwrite, images_fingerprint(images_dir, images)
    )
    pipeline.run(items)
    summary = summarize(out, [i.id for i in items])
    output_paths(out)["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if pipeline.aborted:
        raise RunAborted(pipeline.aborted)
    return summary


def summarize(out: str | os.PathLike, planned_ids: list[str] | None = None) -> dict:
    """Items per stage and per category, and failures by reason, from the files of a run."""
    paths = output_paths(out)
    records = {r["id"]: r for r in _read_lines(paths["records"]) if "id" in r}
    failed = _latest_failures(_read_lines(paths["failed"]), set(records))
    cache, _runs = _replay_journal(_read_lines(paths["journal"]))
    ids = set(records) | set(failed) | set(cache) | set(planned_ids or [])
    stages: dict[str, Counter] = {s: Counter() for s in STAGES}
    revisions: Counter = Counter()
    for item_id in ids:
        entries = cache.get(item_id, {})
        for stage in ("query", "benign_query", "reasoning", "summary"):
            if any(s == stage for s, _ in entries):
                stages[stage]["passed"] += 1
        reflections = [
            e["output"] for (s, _r), e in sorted(entries.items(), key=lambda kv: kv[0][1]) if s == "reflection"
        ]
        if reflections:
            sent_back = sum(1 for r in reflections if _flags(r))
            stages["reflection"]["sent_back"] += sent_back
            if not _flags(reflections[-1]):
                stages["reflection"]["passed"] += 1
        if item_id in records:
            revisions[str(records[item_id].get("revisions", 0))] += 1
    for f in failed.values():
        stages.setdefault(f.get("stage", "?"), Counter())["failed"] += 1
    status = {
        "planned": len(planned_ids) if planned_ids is not None else None,
        "done": len(records),
        "failed": len(failed),
        "pending": len([i for i in (planned_ids or []) if i not in records and i not in failed]),
    }
    return {
        "files": {k: str(v) for k, v in paths.items() if k != "lock"},
        "items": status,
        "by_kind": dict(Counter(r.get("kind", "?") for r in records.values())),
        "by_category": dict(sorted(Counter(r.get("category", "?") for r in records.values()).items())),
        "by_expected": dict(Counter(r.get("expected", "?") for r in records.values())),
        "failed_by_category": dict(
            Counter(
                BENIGN
                if f.get("kind") == "benign"
                else (f.get("draft", {}).get("query", {}) or {}).get("category", "unknown")
                for f in failed.values()
            )
        ),
        "failures_by_reason": dict(
            sorted(Counter(f"{f.get('stage')}: {f.get('reason')}" for f in failed.values()).items())
        ),
        "stages": {s: dict(c) for s, c in stages.items() if c},
        "revisions": dict(sorted(revisions.items())),
    }


def format_summary(summary: dict) -> str:
    """The summary as a few readable lines (what the CLI prints)."""
    it = summary["items"]
    lines = [
        f"items: {it['done']} done, {it['failed']} failed"
        + (f", {it['pending']} pending (rerun to resume)" if it.get("pending") else "")
        + (f" of {it['planned']} planned" if it.get("planned") is not None else ""),
        "per stage: "
        + "; ".join(f"{s} " + ", ".join(f"{k} {v}" for k, v in c.items()) for s, c in summary["stages"].items()),
        "per category: " + (", ".join(f"{k} {v}" for k, v in summary["by_category"].items()) or "-"),
    ]
    if summary["failures_by_reason"]:
        lines.append("failures by reason: " + ", ".join(f"{k} x{v}" for k, v in summary["failures_by_reason"].items()))
        lines.append(f"details: {summary['files']['failed']}")
    return "\n".join(lines)
