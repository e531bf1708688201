"""The one HTTP layer of srpo_trl: JSON POSTs to OpenAI-compatible servers, built on ``httpx``.

Every request made by generation (exploration, ``evaluate --generation-url``), judges and the
record-writing agents goes through :func:`post_json`, which gives each attempt

* a **whole-request deadline**: connecting, sending, the headers and every byte of the body must be
  done within ``timeout`` seconds. The exchange runs under ``asyncio.wait_for``, so a server that
  trickles its headers or body (1 byte/s) is cut off at the deadline; httpx's own timeouts only
  bound each single read;
* a **response-size cap**: the body is read in chunks and the attempt stops as soon as it passes
  ``max_bytes`` (a too-large declared ``Content-Length`` stops it before any read). Callers derive
  the cap from ``max_new_tokens`` with :func:`response_cap`, which never exceeds
  :data:`HARD_MAX_RESPONSE_BYTES`;
* **retries**: connection errors, a missed deadline, a too-large reply, HTTP 429 / 5xx, a reply
  that is not a JSON object (also JSON Python cannot hold: nesting deeper than the recursion limit,
  an integer of more than 4300 digits), and a reply ``parse`` cannot use (it raises
  :class:`RetryableError`, or any other exception on a malformed reply: a non-integer ``index``, a
  non-string ``text``) are retried
  ``retries`` times with exponential backoff (``backoff * 2**attempt`` seconds) or the server's
  ``Retry-After`` (seconds or an HTTP date), capped at :data:`MAX_BACKOFF` seconds. Other 4xx
  replies fail at once. The final failure is :class:`RequestFailed`, naming the URL (credentials
  redacted with :func:`redact_url`), the number of attempts and the last error.

Each attempt opens its own connection (the event loop lives only for that attempt); the cost is
one TCP/TLS handshake per request, small next to a generation.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import httpx


logger = logging.getLogger(__name__)

__all__ = [
    "HARD_MAX_RESPONSE_BYTES",
    "MAX_BACKOFF",
    "RequestFailed",
    "RetryableError",
    "post_json",
    "redact_url",
    "response_cap",
]

#: No reply is read past this many bytes, whatever ``max_new_tokens`` says.
HARD_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Bytes allowed per generated token and choice (JSON escaping of multi-byte text included), plus a
#: fixed allowance for the envelope (ids, usage, finish reasons).
BYTES_PER_TOKEN = 256
ENVELOPE_BYTES = 64 * 1024
#: Longest wait between two attempts, also for a larger ``Retry-After``.
MAX_BACKOFF = 60.0

_SECRET_QUERY_KEYS = ("key", "token", "secret", "password", "passwd", "auth", "sig", "signature", "credential")


class RetryableError(Exception):
    """A failure worth another attempt; ``retry_after`` is the server's wish in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(RuntimeError):
    """A request failed for good: a client error (4xx other than 429) or every attempt used up."""


def redact_url(url: str) -> str:
    """``url`` with credentials hidden: ``user:password@`` (or a lone user token) becomes ``***@``
    (the user name too: some servers take a key there) and the values of query parameters named like
    keys, tokens, secrets or signatures become ``***``. Anything that is not a URL is returned unchanged."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(any(s in k.lower() for s in _SECRET_QUERY_KEYS) for k, _ in pairs):
            pairs = [(k, "***" if any(s in k.lower() for s in _SECRET_QUERY_KEYS) else v) for k, v in pairs]
            query = urlencode(pairs, safe="*")
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def response_cap(max_new_tokens: int | None, n: int = 1) -> int:
    """Bytes a reply with ``n`` choices of at most ``max_new_tokens`` tokens may take."""
    if not max_new_tokens or max_new_tokens <= 0:
        return HARD_MAX_RESPONSE_BYTES
    return min(HARD_MAX_RESPONSE_BYTES, ENVELOPE_BYTES + max(1, n) * int(max_new_tokens) * BYTES_PER_TOKEN)


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (it is either a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_ssl_lock = threading.Lock()
_ssl_context = None


def _verify():
    # One SSL context for every request: loading the CA bundle per request would cost CPU.
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            _ssl_context = httpx.create_ssl_context()
        return _ssl_context


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``user:password@`` taken out of the URL and sent as basic auth, so the URL httpx logs and puts
    in its errors holds no credentials."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


class _RedactFilter(logging.Filter):
    """httpx logs every request's URL at INFO; hide credentials in query strings there too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url(str(a)) if isinstance(a, (str, httpx.URL)) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_RedactFilter())


async def _exchange(url: str, data: bytes, headers: dict, timeout: float, max_bytes: int) -> tuple[int, Any, bytes]:
    url, auth = _split_credentials(url)
    if "Authorization" in headers:  # an API key wins over URL credentials
        auth = None
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), verify=_verify(), auth=auth) as client:
        async with client.stream("POST", url, content=data, headers=headers) as resp:
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise RetryableError(f"the reply is too large: Content-Length {declared} > cap of {max_bytes} bytes")
            chunks, total = [], 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise RetryableError(f"the reply is too large: more than the cap of {max_bytes} bytes")
                chunks.append(chunk)
            return resp.status_code, resp.headers, b"".join(chunks)


def _run(make_coro: Callable[[], Any]) -> Any:
    """Run a coroutine to the end from sync code, also when the caller is inside an event loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


def _attempt(url: str, data: bytes, headers: dict, timeout: float, max_bytes: int) -> Any:
    async def bounded():
        return await asyncio.wait_for(_exchange(url, data, headers, timeout, max_bytes), timeout)

    try:
        status, resp_headers, raw = _run(bounded)
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        raise RetryableError(f"no complete reply within the {timeout:g} s deadline") from exc
    except httpx.HTTPError as exc:  # connection refused / reset, protocol errors, ...
        raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
    if status >= 400:
        detail = raw[:500].decode("utf-8", "replace")
        message = f"HTTP {status}: {detail}".strip()
        if status == 429 or status >= 500:
            raise RetryableError(message, retry_after_seconds(resp_headers.get("retry-after")))
        raise RequestFailed(f"POST {redact_url(url)} failed: {message}")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or bytes; too deep; an int over 4300 digits
        raise RetryableError(f"malformed JSON in the reply ({type(exc).__name__}: {exc}): {raw[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise RetryableError(f"the reply is not a JSON object: {raw[:200]!r}")
    return payload


def post_json(
    url: str,
    body: dict,
    *,
    headers: dict | None = None,
    timeout: float = 60.0,
    max_bytes: int = HARD_MAX_RESPONSE_BYTES,
    retries: int = 3,
    backoff: float = 0.5,
    parse: Callable[[dict], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """POST ``body`` as JSON to ``url`` and return ``parse(reply)`` (the reply object without ``parse``).

    See the module docstring for the deadline, the size cap and what is retried. ``parse`` may raise
    :class:`RetryableError` for a reply that parses as JSON but is unusable (e.g. no choices); any
    other exception it raises is taken as the same (a reply of the wrong shape), never let through.
    """
    if timeout is None or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    data = json.dumps(body).encode("utf-8")
    all_headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    max_bytes = min(int(max_bytes), HARD_MAX_RESPONSE_BYTES)
    shown = redact_url(url)
    last: RetryableError | None = None
    for attempt in range(retries + 1):
        try:
            payload = _attempt(url, data, all_headers, timeout, max_bytes)
            return _parsed(payload, parse)
        except RetryableError as exc:
            last = exc
            if attempt == retries:
                break
            delay = exc.retry_after if exc.retry_after is not None else backoff * (2**attempt)
            delay = min(delay, MAX_BACKOFF) * (1 + 0.1 * random.random())
            logger.warning("POST %s: %s; retry %d/%d in %.2fs", shown, _hide(exc, url), attempt + 1, retries, delay)
            sleep(delay)
    raise RequestFailed(f"POST {shown} failed after {retries + 1} attempt(s): {_hide(last, url)}")


def _parsed(payload: dict, parse: Callable[[dict], Any] | None) -> Any:
    """``parse(payload)``; a reply it cannot read (wrong types, absurd values) becomes a :class:`RetryableError`."""
    if parse is None:
        return payload
    try:
        return parse(payload)
    except RetryableError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed reply must take the retry path, not crash the caller
        raise RetryableError(f"the reply cannot be read ({type(exc).__name__}: {exc})") from exc


def _hide(exc: BaseException | None, url: str) -> str:
    # Library messages may quote the URL; never let its credentials through.
    return str(exc).replace(url, redact_url(url))
