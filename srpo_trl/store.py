"""Append-only JSON-lines outputs that survive a kill, refuse a mixed resume and refuse a second writer.

Every resumable stage (``explore``, ``evaluate``, ``generate-records``) writes through this module,
and ``curate`` fingerprints and locks its outputs with it:

* :func:`read_lines`: the complete lines of a file. A last line cut by a kill (no newline, or not
  JSON) is dropped (and cut from the file with ``repair=True``); a broken line elsewhere is an error
  naming the file and the line.
* :class:`Appender`: one JSON object per line, flushed and fsynced before ``write`` returns.
* :func:`rewrite` / :func:`merge`: atomic rewrites (a temporary file, fsync, rename); ``merge``
  joins shards, one line per key, the first complete one winning.
* :func:`check_fingerprint`: a JSON side file (``<out>.meta.json``) records what produced the output
  (model identity, input hash, every argument that changes results). A rerun with other values, or
  existing output without the side file, is refused before any work, naming what changed.
* :func:`output_lock`: an exclusive lock (``filelock``) held while a run writes; a second run on the
  same output is refused at once.
* :func:`table_digest`: a content hash of an Arrow table (a dataset's rows, whatever its cache path),
  for the trainer's reference log-prob cache and the resume check.

Standard library plus ``filelock`` (and ``pyarrow`` inside :func:`table_digest`); no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .http import redact_url  # the one redaction rule (credentials never written)


logger = logging.getLogger(__name__)

__all__ = [
    "StoreError",
    "FingerprintMismatch",
    "OutputLocked",
    "read_lines",
    "repair_tail",
    "Appender",
    "rewrite",
    "merge",
    "settings_diff",
    "mismatch_message",
    "check_fingerprint",
    "meta_path",
    "output_lock",
    "redact_url",
    "file_sha256",
    "content_hash",
    "content_sha256",
    "real_path",
    "model_fingerprint",
    "endpoint_fingerprint",
    "backend_identity",
    "WEIGHT_SUFFIXES",
]

META_SUFFIX = ".meta.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


class StoreError(ValueError, RuntimeError):
    """An output that cannot be resumed as asked (a ``ValueError`` and a ``RuntimeError``, so that
    callers written for either keep working)."""


class FingerprintMismatch(StoreError):
    """Existing output was produced by something else (or its fingerprint is missing)."""


class OutputLocked(StoreError):
    """Another run holds the output's lock."""


# ----------------------------------------------------------------------------------------------
# Reading and writing lines
# ----------------------------------------------------------------------------------------------


def _line_error(path: Path, n: int) -> Exception:
    return StoreError(
        f"{path}: line {n} is not valid JSON; the file is damaged: fix or delete that line, or start a new --out"
    )


def read_lines(
    path: str | os.PathLike,
    *,
    repair: bool = False,
    valid: Callable[[Any], bool] | None = None,
    error: Callable[[Path, int], Exception] = _line_error,
) -> list[dict]:
    """The complete JSON lines of ``path`` ([] when it does not exist).

    A last line (blank lines after it aside) that lacks its newline, is not JSON or fails ``valid``
    is the tail of a killed write: dropped with a warning, and cut from the file when ``repair``.
    Such a line anywhere else raises ``error(path, line number)``.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    good, keep, pos = [], 0, 0
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1
        end = pos + len(raw) + (0 if last else 1)
        if raw.strip():
            try:
                if last:  # no newline after it: the write was cut
                    raise ValueError("unterminated")
                obj = json.loads(raw.decode("utf-8"))
                if valid is not None and not valid(obj):
                    raise ValueError("not a line of this file")
                good.append(obj)
                keep = end
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if last or all(not x.strip() for x in lines[i + 1 :]):
                    logger.warning(
                        "%s: line %d is incomplete (an interrupted run); it is dropped and redone", path, i + 1
                    )
                    break
                raise error(path, i + 1) from None
        elif not last:
            keep = end
        pos = end
    if repair and keep < len(data):
        with path.open("r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return good


def repair_tail(path: str | os.PathLike) -> None:
    """Cut a torn last line from ``path`` (see :func:`read_lines`)."""
    read_lines(path, repair=True)


class Appender:
    """Appends JSON lines to a file (torn tail repaired first); each ``write`` is flushed and fsynced
    before it returns, so a kill loses at most the line being written. Thread-safe."""

    def __init__(self, path: str | os.PathLike, *, repair: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if repair:
            repair_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, obj: Any) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def real_path(path: str | os.PathLike) -> Path:
    """``path`` with every symlink resolved: one output, whatever the spelling (a file or a link to it),
    gets one lock and one fingerprint."""
    return Path(os.path.realpath(path))


def rewrite(path: str | os.PathLike, objs: Iterable[Any]) -> None:
    """Replace ``path`` with ``objs`` as JSON lines, atomically (a kill leaves the old or the new file).
    A symlink is followed: the file it points to is replaced, the link stays."""
    path = real_path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for obj in objs:
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def merge(
    out: str | os.PathLike,
    parts: Iterable[str | os.PathLike],
    key: Callable[[dict], Any],
    order: list[Any] | None = None,
    **read_kwargs: Any,
) -> int:
    """Join ``parts`` (``out`` itself may be one) into ``out``: one line per ``key``, the first complete
    one, sorted by ``order`` (keys not in it last, as found). Returns the number of lines written."""
    lines: dict[Any, dict] = {}
    for part in parts:
        for obj in read_lines(part, **read_kwargs):
            lines.setdefault(key(obj), obj)
    keys = list(lines)
    if order is not None:
        rank = {k: i for i, k in enumerate(order)}
        keys.sort(key=lambda k: rank.get(k, len(rank)))
    rewrite(out, (lines[k] for k in keys))
    return len(keys)


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _only_changes(old: Any, new: Any) -> tuple[Any, Any]:
    """Two dicts cut down to the keys whose values differ (recursively), so a message shows what changed."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old, new
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    pairs = {k: _only_changes(old.get(k), new.get(k)) for k in keys}
    return {k: a for k, (a, _) in pairs.items()}, {k: b for k, (_, b) in pairs.items()}


def settings_diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: saved X, now Y"`` for every top-level key whose values differ (a missing key counts);
    of a nested value only the parts that differ are shown."""
    out = []
    for k in sorted(set(saved) | set(now)):
        if saved.get(k) != now.get(k):
            old, new = _only_changes(saved.get(k), now.get(k))
            out.append(f"{k}: saved {_short(old)}, now {_short(new)}")
    return out


def mismatch_message(path: str | os.PathLike, diff: list[str], advice: str | None = None) -> str:
    advice = advice or (
        "Resuming would mix results: rerun with the same model, input and arguments, choose "
        "another --out, or pass --overwrite to start again"
    )
    return f"{path} was written with other settings ({'; '.join(diff)}). {advice}"


def meta_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + META_SUFFIX)


def check_fingerprint(
    out: str | os.PathLike,
    fingerprint: Mapping[str, Any],
    *,
    outputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    write: bool = True,
    meta: str | os.PathLike | None = None,
    may_grow: Iterable[str] = (),
    another: str = "another --out",
    advice: str | None = None,
) -> None:
    """Refuse to resume ``out`` when its recorded fingerprint differs from ``fingerprint``, or when
    output exists (``out`` or any of ``outputs`` holding data) without a recorded one; then record
    ``fingerprint`` (``write``). With ``overwrite`` nothing is compared (the caller starts again).
    ``may_grow``: top-level keys holding counts that a resume may raise but not lower (the run then
    extends its earlier work; the new, larger value is recorded). ``another``: how the messages name
    the other way out (a command whose output is not ``--out`` says what it is); ``advice``: the
    sentence after a difference (default: a resume would mix results, and the ways out).

    Raises :class:`FingerprintMismatch` naming each difference and what to do.
    """
    out = Path(out)
    path = Path(meta) if meta is not None else meta_path(out)
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back from the file
    if not overwrite:
        if path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = None
            if not isinstance(saved, dict):
                raise FingerprintMismatch(
                    f"{path} is damaged, so what produced {out} is unknown; pass --overwrite "
                    f"to start again or choose {another}"
                )
            grown = {
                k
                for k in may_grow
                if isinstance(saved.get(k), int) and isinstance(fingerprint.get(k), int) and fingerprint[k] >= saved[k]
            }
            diff = settings_diff(
                {k: v for k, v in saved.items() if k not in grown},
                {k: v for k, v in fingerprint.items() if k not in grown},
            )
            if diff:
                advice = advice or (
                    "Resuming would mix results: rerun with the same model, input and arguments, choose "
                    f"{another}, or pass --overwrite to start again"
                )
                raise FingerprintMismatch(mismatch_message(out, diff, advice))
        else:
            existing = [p for p in [out, *map(Path, outputs)] if p.exists() and p.stat().st_size > 0]
            if existing:
                raise FingerprintMismatch(
                    f"{existing[0]} exists but {path} (what produced it: model, input, arguments) is missing, so a "
                    f"resume could mix results. Pass --overwrite to start again, or choose {another}"
                )
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_content_hashes: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> sha256
_content_lock = threading.Lock()


def content_hash(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (what an image fingerprint records: pixels changed under the same
    name are seen, a touched or copied file is the same), computed once per process for an unchanged
    file (same path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _content_lock:
        known = _content_hashes.get(key)
    if known is None:
        known = file_sha256(path)
        with _content_lock:
            _content_hashes[key] = known
    return known


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # a PIL image: its pixels, not its address
        return {"image": hashlib.sha256(value.tobytes()).hexdigest(), "size": list(value.size), "mode": value.mode}
    return str(value)


def content_sha256(obj: Any) -> str:
    """A hash of a JSON-able object (records given from Python), PIL images by their pixels."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable).encode("utf-8")).hexdigest()


def model_fingerprint(path: str | os.PathLike, adapter: str | os.PathLike | None = None) -> dict:
    """A local model's identity: its resolved path and a hash of its weight files' names, sizes and
    modification times (new weights saved into the same folder change it); the same for ``adapter``."""

    def one(folder: str | os.PathLike) -> dict:
        folder = Path(folder).resolve()
        digest = hashlib.sha256()
        files = (
            sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
            if folder.is_dir()
            else []
        )
        for p in files:
            st = p.stat()
            digest.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"path": str(folder), "weights": digest.hexdigest()[:16], "weight_files": len(files)}

    ident = {"model": one(path)}
    if adapter is not None:
        ident["adapter"] = one(adapter)
    return ident


def backend_identity(backend: Any) -> dict:
    """What a fingerprint records about a generation backend: its own ``fingerprint()`` (model folder
    and weights, or endpoint and served model), else its class."""
    ident = getattr(backend, "fingerprint", None)
    return ident() if callable(ident) else {"backend": type(backend).__qualname__}


def endpoint_fingerprint(url: str, served_model: str | None) -> dict:
    """A served model's identity: the endpoint (credentials redacted) and the served model name."""
    return {"endpoint": redact_url(url.rstrip("/")), "served_model": served_model}


# ----------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(lock_file: str | os.PathLike, what: str, target: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` while the block runs; raise :class:`OutputLocked` at once
    when another process (or another run in this one) holds it. The lock file is removed afterwards."""
    from filelock import FileLock, Timeout

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):
        lock = FileLock(str(lock_file), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise OutputLocked(
                f"another {what} run is writing {target or lock_file} (lock {lock_file} is held); wait for it to "
                "finish or stop it, then rerun, or choose another --out"
            ) from None
        if _same_file(lock, lock_file):
            break
        lock.release()  # the file was removed by the run that released it: lock the new one
    else:  # pragma: no cover
        raise OutputLocked(f"could not lock {lock_file}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()  # while still held: a waiting run then locks a fresh file (checked above)
        lock.release()


def _same_file(lock: Any, path: Path) -> bool:
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    if fd is None:
        return True
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def table_digest(table) -> str:
    """Content hash of an Arrow table, batch by batch: not its file path nor its schema metadata
    (a memory-mapped cache of the same rows has another path and fingerprint in every run)."""
    import pyarrow as pa  # lazy: this module stays free of heavy imports

    digest = hashlib.blake2b(digest_size=16)
    for batch in table.replace_schema_metadata(None).to_batches(
        max_chunksize=1024
    ):  # metadata holds a random fingerprint
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()
