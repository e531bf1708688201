"""Generate reasoning paths for every item, judge them, and keep a resumable record on disk.

For batch ``b`` (items ``b*batch_size`` .. in the given order), ``samples`` paths per item are
generated in one backend call seeded with ``seed + b``, so a run is reproducible for the same
items, settings and backend. The state file (``results.jsonl``) is append-only:

1. a ``config`` line: the settings that change results (checked on resume);
2. a ``generated`` line per batch: every sampled path of the batch, written before judging;
3. an ``item`` line per judged item: the item, its paths, their steps and verdicts.

A killed evaluation restarts from that file: judged items are neither generated nor judged again,
a batch that was generated but not fully judged is judged from its recorded paths (not sampled
again), and a line cut short by the kill is dropped. The result equals an uninterrupted run's.

Under a launcher (``accelerate launch`` / ``torchrun``: ``RANK`` and ``WORLD_SIZE`` set; one machine or
several) the batches are shared out: rank ``r`` of ``W`` takes batches ``b`` with ``b % W == r``
and keeps its own state file ``results.rank<r>-of<W>.jsonl`` beside ``results.jsonl``; when every
rank is done, rank 0 merges them into ``results.jsonl`` (item order) and removes them. Each batch
keeps its seed, so the items' paths and verdicts are those of one process. A rerun after a kill
resumes from the shards (with any number of processes). The state folder must be on a filesystem
every machine sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import collectives, store
from .judges import Judge
from .schema import EvalItem, EvalVerdict, ItemResult, RunResult


STATE_FILE = "results.jsonl"
STATE_VERSION = 1


class EvaluationStateError(store.StoreError):
    """The state file cannot be resumed (other settings, or a damaged line); the message says which."""


@dataclass
class EvalConfig:
    """Generation settings. ``system_prompt`` is prepended as a system message; string prompts are
    sent as one user message (the model answers as a chat assistant)."""

    samples: int = 3
    temperature: float = 0.5
    max_new_tokens: int = 512
    seed: int = 0
    batch_size: int = 8
    separator: str = "\n"
    system_prompt: str | None = None

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 with temperature 0 gives identical paths; set a temperature > 0")


def split_steps(text: str, separator: str = "\n") -> list[str]:
    """The reasoning steps of a path: pieces between separators, stripped, empty ones dropped."""
    if not separator:
        return [text.strip()] if text.strip() else []
    return [s.strip() for s in text.split(separator) if s.strip()]


def build_messages(item: EvalItem, system_prompt: str | None = None) -> list[dict]:
    """The chat the model answers: the item's prompt (a string becomes one user message)."""
    messages = [{"role": "user", "content": item.prompt}] if isinstance(item.prompt, str) else list(item.prompt)
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def items_fingerprint(items: Sequence[EvalItem]) -> str:
    """A hash of the items: ids, prompts, expected outcomes, categories, and the images by content
    (other pixels under the same file name are other items)."""
    digest = hashlib.sha256()
    for item in items:
        images = [_image_identity(image) for image in item.images]
        digest.update(
            json.dumps(
                [item.id, item.prompt, images, item.expected, item.category], sort_keys=True, default=str
            ).encode()
        )
    return digest.hexdigest()[:16]


def _image_identity(image: Any) -> Any:
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        return [str(image), store.content_hash(image)]
    return image  # not a file here (e.g. answers scored without their images): the path alone


def _damaged(path: Path, n: int) -> EvaluationStateError:
    return EvaluationStateError(
        f"{path}: line {n} is not valid JSON; the file is damaged. Delete it to start this model's evaluation again."
    )


class _State:
    """The append-only state file of one model's evaluation (:mod:`srpo_trl.store` does the file work)."""

    def __init__(self, path: Path, config: dict[str, Any], *, write: bool = True):
        self.path = path
        self.config = json.loads(json.dumps(config, default=str))  # as it reads back from the file
        self.generated: dict[str, list[str]] = {}
        self.done: dict[str, ItemResult] = {}
        if path.exists() and path.stat().st_size:
            self._load(repair=write)
        elif write:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "config", "version": STATE_VERSION, **config})

    def _load(self, repair: bool) -> None:
        records = store.read_lines(self.path, repair=repair, error=_damaged)
        if not records or records[0].get("type") != "config":
            raise EvaluationStateError(
                f"{self.path}: no config line; not an evaluation state file (delete it to start again)"
            )
        saved = {k: v for k, v in records[0].items() if k not in ("type", "version")}
        diff = store.settings_diff(saved, self.config)
        if diff:
            raise EvaluationStateError(
                store.mismatch_message(
                    self.path,
                    diff,
                    "Resume with the same model, data and settings, or use another --out / --label, or "
                    "pass --overwrite (or delete the file) to start a new evaluation.",
                )
            )
        for record in records[1:]:
            if record.get("type") == "generated":
                self.generated.update(record["samples"])
            elif record.get("type") == "item":
                result = ItemResult.from_dict(record["result"])
                self.done[result.id] = result

    def _append(self, record: dict[str, Any]) -> None:
        with store.Appender(self.path, repair=False) as fh:
            fh.write(record)

    def add_generated(self, samples: dict[str, list[str]]) -> None:
        self._append({"type": "generated", "samples": samples})
        self.generated.update(samples)

    def add_item(self, result: ItemResult) -> None:
        self._append({"type": "item", "result": result.to_dict()})
        self.done[result.id] = result


def shard_path(state_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The state file of rank ``rank`` of ``world_size``: ``results.rank1-of2.jsonl``."""
    return Path(state_dir) / f"{Path(STATE_FILE).stem}.rank{rank}-of{world_size}{Path(STATE_FILE).suffix}"


def _shards(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob(f"{Path(STATE_FILE).stem}.rank*-of*{Path(STATE_FILE).suffix}"))


def launch_rank() -> tuple[int, int]:
    """(rank, world size) as a launcher sets them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_settings(
    items: Sequence[EvalItem], judge: Judge, config: EvalConfig, label: str, model_info: dict[str, Any] | None
) -> dict[str, Any]:
    """What a state file records and a resume must match: the model, the judge, the generation
    settings and the items."""
    return {
        "label": label,
        "model": model_info or {},
        "judge": judge.describe(),
        "generation": asdict(config),
        "items": items_fingerprint(items),
        "item_ids": [item.id for item in items],
    }


def check_resume(state_dir: str | os.PathLike, settings: dict[str, Any], overwrite: bool = False) -> None:
    """Raise :class:`EvaluationStateError` when ``state_dir`` holds an evaluation with other settings
    (nothing is written; call it before loading a model)."""
    path = Path(state_dir) / STATE_FILE
    if not overwrite and path.exists():
        _State(path, settings, write=False)


def lock_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / (STATE_FILE + ".lock")


def load_state(path: str | os.PathLike) -> RunResult:
    """A (possibly unfinished) evaluation from its state file, without resuming it."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    try:
        config = {k: v for k, v in json.loads(first).items() if k not in ("type", "version")}
    except json.JSONDecodeError as exc:
        raise EvaluationStateError(f"{path}: the first line is not a config record ({exc})") from exc
    state = _State(path, config, write=False)
    order = config.get("item_ids") or list(state.done)
    results = [state.done[i] for i in order if i in state.done]
    return RunResult(
        label=config.get("label", path.parent.name),
        config=config,
        results=results,
        complete=len(results) == len(order),
    )


def evaluate(
    items: Sequence[EvalItem],
    backend: Any,
    judge: Judge,
    config: EvalConfig | None = None,
    *,
    label: str = "model",
    state_dir: str | os.PathLike | None = None,
    model_info: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> RunResult:
    """Generate ``config.samples`` paths per item with ``backend``, judge them, return the results.

    With ``state_dir``, progress is kept in ``state_dir/results.jsonl`` and a later call with the same
    items and settings resumes from it (see the module doc); other settings (``model_info``, the
    judge, ``config``, the items) are refused, and a second run on the same ``state_dir`` is refused
    while one runs. ``overwrite`` starts again. Errors name the item.

    Under a launcher (or with ``rank`` / ``world_size`` given) each rank evaluates its share of the
    batches and rank 0 returns the merged result; the other ranks return their own items
    (``complete`` False).
    """
    config = config or EvalConfig()
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"item ids must be unique; repeated: {dupes[:10]}")
    settings = run_settings(items, judge, config, label, model_info)
    given = rank is not None or world_size is not None
    if not given:
        rank, world_size = launch_rank()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if world_size > 1 and state_dir is None:
        raise ValueError("several processes need a state folder (state_dir / --out) to share the items")
    # several processes, or one that finishes what several left in their shards
    if world_size > 1 or (state_dir is not None and _shards(Path(state_dir))):
        group = None if given or world_size == 1 else collectives.gloo_group()
        return _run_sharded(
            items,
            backend,
            judge,
            config,
            label,
            settings,
            Path(state_dir),
            progress,
            overwrite,
            rank,
            world_size,
            group,
        )
    if state_dir is None:
        return _run(items, backend, judge, config, label, settings, None, progress)
    with store.output_lock(lock_path(state_dir), "evaluate", Path(state_dir) / STATE_FILE):
        if overwrite:
            (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
        state = _State(Path(state_dir) / STATE_FILE, settings)
        return _run(items, backend, judge, config, label, settings, state, progress)


def _run_sharded(
    items, backend, judge, config, label, settings, state_dir: Path, progress, overwrite, rank, world_size, group
) -> RunResult:
    """This rank's batches into its own state file; rank 0 merges every shard once all are done."""
    merged = state_dir / STATE_FILE
    mine = shard_path(state_dir, rank, world_size)
    if rank == 0 and overwrite:
        for path in [merged, *_shards(state_dir)]:
            path.unlink(missing_ok=True)
    collectives.barrier(group)  # nobody reads before rank 0 has cleared an --overwrite
    with contextlib.ExitStack() as locks:
        if rank == 0:
            locks.enter_context(store.output_lock(lock_path(state_dir), "evaluate", merged))
        locks.enter_context(store.output_lock(mine.with_name(mine.name + ".lock"), "evaluate", mine))
        state = _State(mine, settings)
        # what earlier runs finished, with this or another number of processes
        for path in [merged, *_shards(state_dir)]:
            if path != mine and path.exists() and path.stat().st_size:
                other = _State(path, settings, write=False)
                state.generated = {**other.generated, **state.generated}
                state.done = {**other.done, **state.done}
        run = _run(
            items, backend, judge, config, label, settings, state, progress, owned=lambda b: b % world_size == rank
        )
        collectives.barrier(group)  # every shard is complete
        if rank == 0:
            run = _merge(state_dir, items, settings, label)
        collectives.barrier(group)  # the merged file is written: every rank may return
    return run


def _merge(state_dir: Path, items, settings: dict, label: str) -> RunResult:
    """Write every judged item of the shards (and of an earlier merge) into results.jsonl, in item
    order, then remove the shards. Items no shard holds yet stay out (``complete`` False)."""
    merged = state_dir / STATE_FILE
    shards = _shards(state_dir)
    done: dict[str, ItemResult] = {}
    for path in [merged, *shards]:
        if path.exists() and path.stat().st_size:
            done.update(_State(path, settings, write=False).done)
    results = [done[item.id] for item in items if item.id in done]
    config = {"type": "config", "version": STATE_VERSION, **json.loads(json.dumps(settings, default=str))}
    store.rewrite(merged, [config, *({"type": "item", "result": r.to_dict()} for r in results)])
    for path in shards:
        path.unlink(missing_ok=True)
    return RunResult(label=label, config=settings, results=results, complete=len(results) == len(items))


def _run(
    items,
    backend,
    judge,
    config: EvalConfig,
    label: str,
    settings: dict,
    state: _State | None,
    progress: bool,
    owned=lambda b: True,
) -> RunResult:
    """Generate and judge the items of every batch ``owned(batch number)`` accepts."""
    from tqdm.auto import tqdm

    from ..backends import GenerationRequest

    ids = [item.id for item in items]
    done: dict[str, ItemResult] = dict(state.done) if state else {}
    generated: dict[str, list[str]] = dict(state.generated) if state else {}
    batches = [b for b in range(0, len(items), config.batch_size) if owned(b // config.batch_size)]
    total = sum(len(items[b : b + config.batch_size]) for b in batches)
    initial = sum(1 for b in batches for item in items[b : b + config.batch_size] if item.id in done)

    bar = tqdm(total=total, initial=initial, desc=f"evaluate {label}", unit="item", disable=not progress)
    try:
        for b in batches:
            batch = list(items[b : b + config.batch_size])
            todo = [item for item in batch if item.id not in done]
            if not todo:
                continue
            if any(item.id not in generated for item in todo):
                requests = [
                    GenerationRequest(prompt=build_messages(item, config.system_prompt), images=list(item.images))
                    for item in batch
                ]
                try:
                    outputs = backend.generate(
                        requests,
                        num_samples=config.samples,
                        temperature=config.temperature,
                        max_new_tokens=config.max_new_tokens,
                        seed=config.seed + b // config.batch_size,
                    )
                except Exception as exc:
                    first, last = batch[0].id, batch[-1].id
                    raise RuntimeError(f"generation failed for items {first} .. {last}: {exc}") from exc
                if len(outputs) != len(batch) or any(len(o) != config.samples for o in outputs):
                    raise RuntimeError(
                        f"the backend returned {[len(o) for o in outputs]} samples for {len(batch)} items; expected {config.samples} each"
                    )
                batch_samples = {item.id: list(out) for item, out in zip(batch, outputs)}
                if state:
                    state.add_generated(batch_samples)
                generated.update(batch_samples)
            for item in todo:
                samples = generated[item.id]
                steps = [split_steps(s, config.separator) for s in samples]
                verdicts = judge.judge(item, samples, steps)
                if len(verdicts) != len(samples) or not all(isinstance(v, EvalVerdict) for v in verdicts):
                    raise RuntimeError(
                        f"item {item.id}: the judge returned {len(verdicts)} verdicts for {len(samples)} samples"
                    )
                result = ItemResult(item=item, samples=samples, steps=steps, verdicts=verdicts)
                if state:
                    state.add_item(result)
                done[item.id] = result
                bar.update(1)
    finally:
        bar.close()
    results = [done[i] for i in ids if i in done]
    return RunResult(label=label, config=settings, results=results, complete=len(results) == len(ids))
