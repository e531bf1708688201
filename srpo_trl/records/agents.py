"""The record-writing agents: prompt templates, output schemas, parsing and validation, retries.

Four agents, as in the paper's SSUI pipeline (see docs/records.md):

* **Query** (``query``): from a harmless image, a harmless-looking request, the unsafe scenario
  the pair creates, and its category from the nine-class taxonomy (:data:`CATEGORIES`).
  ``benign_query`` writes benign controls (a request that is fine with the image).
* **Reasoning** (``reasoning``): a step-by-step path that exposes the risk (or, for a control,
  finds none).
* **Reflection / Check** (``reflection``): flags redundant steps, gaps, and text that is unsafe on
  its own; the pipeline sends a flagged item back for revision a bounded number of times.
* **Summary** (``summary``): the final safe answer and its outcome (refuse / warn / comply).

Each agent's prompt is a readable :class:`string.Template` (:mod:`srpo_trl.records.templates`,
overridable with ``--templates DIR``) and its answer must be one JSON object that
:func:`parse_output` parses and validates. :func:`call_agent` feeds a validation error back to the
model and asks again, ``max_retries`` times, then raises :class:`AgentFailure` with the reason.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..judging import AskFailed, BackendFailed, ReplyError, ask
from ..judging import extract_json_object as _extract_json_object
from ..safety import BENIGN_CATEGORY, CATEGORIES, OUTCOMES, UNSAFE_OUTCOMES  # noqa: F401  (re-exported)
from .templates import DEFAULT_TEMPLATES


__all__ = [
    "CATEGORIES",
    "BENIGN",
    "OUTCOMES",
    "AGENTS",
    "AGENT_VARIABLES",
    "OutputError",
    "AgentFailure",
    "AgentResult",
    "TemplateError",
    "normalize_category",
    "extract_json_object",
    "parse_output",
    "load_templates",
    "write_templates",
    "render",
    "call_agent",
]

# The vocabulary (categories, outcomes) is srpo_trl.safety's; these names stay for importers.
BENIGN = BENIGN_CATEGORY


def normalize_category(value: Any, allowed: tuple[str, ...] | list[str] = CATEGORIES) -> str | None:
    """``value`` as one of ``allowed`` (case, ``_``/``-`` and ``&`` are forgiven), else None."""
    if not isinstance(value, str):
        return None
    key = re.sub(r"[\s_\-]+", " ", value.replace("&", " and ")).strip().lower()
    for name in allowed:
        if key == name:
            return name
    return None


# ----------------------------------------------------------------------------------------------
# Output schemas
# ----------------------------------------------------------------------------------------------


#: A model answer that does not fit its agent's schema. ``reason`` is a short code (``not_json``,
#: ``missing_field``, ``bad_category``, ``bad_value``) used in the failure summary; the message says what
#: is wrong, and is fed back to the model. The same class as :class:`srpo_trl.judging.ReplyError`.
OutputError = ReplyError


@dataclass(frozen=True)
class Field:
    """One field of an agent's JSON answer.

    ``kind``: ``text`` (non-empty string), ``optional_text`` (string, may be empty or absent),
    ``text_list`` (list of non-empty strings), ``int_list`` (list of integers), ``bool``,
    ``choice`` (one of ``choices``, or of ``context[choices_from]`` when set), ``category``.
    """

    name: str
    kind: str
    hint: str
    choices: tuple[str, ...] = ()
    choices_from: str | None = None


@dataclass(frozen=True)
class Agent:
    name: str
    title: str
    fields: tuple[Field, ...]
    check: Callable[[dict, dict], None] | None = None

    def schema_hint(self, context: dict | None = None) -> str:
        """The JSON form the agent must answer with (fed back with validation errors)."""
        parts = []
        for f in self.fields:
            if f.kind in ("category", "choice"):
                options = _choices(f, context or {})
                value = json.dumps(f"<one of: {', '.join(options)}>")
            elif f.kind in ("text_list",):
                value = f'["{f.hint}", ...]'
            elif f.kind == "int_list":
                value = "[<step numbers>]"
            elif f.kind == "bool":
                value = "true | false"
            else:
                value = json.dumps(f"<{f.hint}>")
            parts.append(f'"{f.name}": {value}')
        return "{" + ", ".join(parts) + "}"


def _choices(f: Field, context: dict) -> tuple[str, ...]:
    if f.choices_from and context.get(f.choices_from):
        return tuple(context[f.choices_from])
    return CATEGORIES if f.kind == "category" and not f.choices else f.choices


def _one_line(text: str) -> str:
    """Steps are single lines (the step separator is a newline): inner line breaks become spaces."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _check_field(f: Field, obj: dict, context: dict) -> Any:
    if f.name not in obj or obj[f.name] is None:
        if f.kind == "optional_text":
            return ""
        if f.kind in ("text_list", "int_list"):
            raise OutputError("missing_field", f'the field "{f.name}" is missing (use [] for an empty list)')
        raise OutputError("missing_field", f'the field "{f.name}" is missing')
    value = obj[f.name]
    if f.kind in ("text", "optional_text"):
        if not isinstance(value, str):
            raise OutputError("bad_value", f'"{f.name}" must be a string, got {type(value).__name__}')
        value = value.strip()
        if f.kind == "text" and not value:
            raise OutputError("missing_field", f'the field "{f.name}" is empty')
        return value
    if f.kind == "text_list":
        if not isinstance(value, list):
            raise OutputError("bad_value", f'"{f.name}" must be a list of strings, got {type(value).__name__}')
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise OutputError("bad_value", f'"{f.name}"[{i}] must be a string, got {type(item).__name__}')
            if not item.strip():
                raise OutputError("bad_value", f'"{f.name}"[{i}] is empty')
            out.append(_one_line(item))
        return out
    if f.kind == "int_list":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise OutputError("bad_value", f'"{f.name}" must be a list of integers, got {json.dumps(value)[:100]}')
        return list(value)
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise OutputError("bad_value", f'"{f.name}" must be true or false, got {json.dumps(value)[:100]}')
        return value
    if f.kind == "category":
        options = _choices(f, context)
        name = normalize_category(value, options)
        if name is None:
            raise OutputError(
                "bad_category",
                f'"{f.name}" must be exactly one of: {", ".join(options)}; got {json.dumps(value)[:100]}',
            )
        return name
    if f.kind == "choice":
        options = _choices(f, context)
        key = value.strip().lower() if isinstance(value, str) else value
        if key not in options:
            raise OutputError(
                "bad_value", f'"{f.name}" must be one of: {", ".join(options)}; got {json.dumps(value)[:100]}'
            )
        return key
    raise AssertionError(f"unknown field kind {f.kind}")


def _not_repeated(output: dict, context: dict) -> None:
    previous = {p.strip().lower() for p in context.get("previous", [])}
    if output["request"].strip().lower() in previous:
        raise OutputError(
            "bad_value", '"request" repeats a request already written for this image; write a different one'
        )


def _check_steps(output: dict, context: dict) -> None:
    n = len(output["steps"])
    lo, hi = context.get("min_steps", 1), context.get("max_steps", 100)
    if not lo <= n <= hi:
        raise OutputError("bad_value", f'"steps" must have {lo} to {hi} steps, got {n}')


def _check_reflection(output: dict, context: dict) -> None:
    n = context.get("n_steps")
    if n is not None:
        bad = [i for i in output["redundant_steps"] if not 1 <= i <= n]
        if bad:
            raise OutputError("bad_value", f'"redundant_steps" must be step numbers from 1 to {n}, got {bad}')
    output["redundant_steps"] = sorted(set(output["redundant_steps"]))


def _check_outcome(output: dict, context: dict) -> None:
    allowed = context.get("allowed_outcomes") or OUTCOMES
    if output["outcome"] not in allowed:
        raise OutputError(
            "bad_value", f'"outcome" must be one of: {", ".join(allowed)} for this item, got "{output["outcome"]}"'
        )


AGENTS: dict[str, Agent] = {
    "query": Agent(
        "query",
        "Query agent",
        (
            Field("request", "text", "the user's request"),
            Field("unsafe_scenario", "text", "what in the image, with the request, creates which risk"),
            Field("category", "category", "risk category", choices_from="categories"),
        ),
        _not_repeated,
    ),
    "benign_query": Agent(
        "benign_query",
        "Query agent (benign control)",
        (
            Field("request", "text", "the user's request"),
            Field("rationale", "text", "why helping is safe"),
        ),
        _not_repeated,
    ),
    "reasoning": Agent(
        "reasoning",
        "Reasoning agent",
        (Field("steps", "text_list", "one reasoning step"),),
        _check_steps,
    ),
    "reflection": Agent(
        "reflection",
        "Check agent",
        (
            Field("redundant_steps", "int_list", "step numbers"),
            Field("gaps", "text_list", "what is missing"),
            Field("unsafe_text", "text_list", "text unsafe on its own"),
            Field("request_unsafe_alone", "bool", ""),
            Field("feedback", "optional_text", "advice for the revision, or empty"),
        ),
        _check_reflection,
    ),
    "summary": Agent(
        "summary",
        "Summary agent",
        (
            Field("answer", "text", "the final answer to the user"),
            Field("outcome", "choice", "outcome", choices=OUTCOMES, choices_from="allowed_outcomes"),
        ),
        _check_outcome,
    ),
}

#: The placeholders each template may use (``image_name`` in all agent templates).
AGENT_VARIABLES: dict[str, tuple[str, ...]] = {
    "system": (),
    "query": ("image_name", "categories", "previous", "revision"),
    "benign_query": ("image_name", "previous", "revision"),
    "reasoning": ("image_name", "item_kind", "request", "category", "scenario", "min_steps", "max_steps", "revision"),
    "reflection": ("image_name", "item_kind", "request", "category", "scenario", "steps"),
    "summary": ("image_name", "item_kind", "request", "category", "scenario", "steps", "allowed_outcomes"),
    "retry": ("error", "schema"),
}


extract_json_object = _extract_json_object  # srpo_trl.judging's: raises OutputError (not_json)


def parse_output(agent: str | Agent, text: str, context: dict | None = None) -> dict:
    """Parse and validate one answer of ``agent``; returns the cleaned fields (others dropped).

    ``context`` carries what validation needs: ``categories`` (allowed categories), ``previous``
    (requests already written for the image), ``min_steps``/``max_steps``, ``n_steps`` (steps
    under review), ``allowed_outcomes``. Raises :class:`OutputError`.
    """
    agent = AGENTS[agent] if isinstance(agent, str) else agent
    context = context or {}
    obj = extract_json_object(text)
    output = {f.name: _check_field(f, obj, context) for f in agent.fields}
    if agent.check is not None:
        agent.check(output, context)
    return output


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------


class TemplateError(ValueError):
    """A template that cannot be used; the message names the template (and file) and the problem."""


def _check_template(name: str, text: str, source: str) -> None:
    tmpl = string.Template(text)
    if not tmpl.is_valid():
        for m in tmpl.pattern.finditer(text):
            if m.group("invalid") is not None:
                line = text.count("\n", 0, m.start()) + 1
                raise TemplateError(
                    f"{source}: line {line}: a '$' that is not a placeholder; write '$$' for a literal dollar sign"
                )
    allowed = AGENT_VARIABLES[name]
    unknown = [v for v in tmpl.get_identifiers() if v not in allowed]
    if unknown:
        raise TemplateError(
            f"{source}: unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
            f"the {name} template may use: {', '.join('$' + a for a in allowed) or 'none'}"
        )


def load_templates(directory: str | Path | None = None, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The default templates, with ``DIR/<name>.txt`` files and then ``overrides`` replacing them.

    Every template is checked: unknown placeholders or a stray ``$`` raise :class:`TemplateError`
    naming the file; files in ``DIR`` that match no agent are an error too (a typo would otherwise
    be ignored silently).
    """
    templates = dict(DEFAULT_TEMPLATES)
    if directory is not None:
        directory = Path(directory)
        if not directory.is_dir():
            raise TemplateError(f"--templates {directory}: not a directory")
        for path in sorted(directory.iterdir()):
            if path.suffix != ".txt":
                continue
            if path.stem not in DEFAULT_TEMPLATES:
                raise TemplateError(
                    f"{path}: no agent is called '{path.stem}'; template files are: "
                    + ", ".join(f"{n}.txt" for n in DEFAULT_TEMPLATES)
                )
            text = path.read_text(encoding="utf-8")
            _check_template(path.stem, text, str(path))
            templates[path.stem] = text
    for name, text in (overrides or {}).items():
        if name not in DEFAULT_TEMPLATES:
            raise TemplateError(f"template '{name}': no such agent; templates are: {', '.join(DEFAULT_TEMPLATES)}")
        _check_template(name, text, f"template '{name}'")
        templates[name] = text
    for name in ("query", "benign_query", "reasoning", "reflection", "summary", "retry"):
        if not templates[name].strip():
            raise TemplateError(f"template '{name}' is empty")
    return templates


def write_templates(directory: str | Path, overwrite: bool = False) -> list[Path]:
    """Write the default templates to ``DIR/<name>.txt`` (for editing); returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in DEFAULT_TEMPLATES.items():
        path = directory / f"{name}.txt"
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; remove it or pick another directory (your edits would be lost)")
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def render(templates: dict[str, str], name: str, variables: dict[str, Any]) -> str:
    """Fill template ``name``; every placeholder the agent allows is expected in ``variables``."""
    values = {k: str(variables.get(k, "")) for k in AGENT_VARIABLES[name]}
    return string.Template(templates[name]).substitute(values)


# ----------------------------------------------------------------------------------------------
# Calling an agent
# ----------------------------------------------------------------------------------------------


class AgentFailure(Exception):
    """An agent gave no valid answer after its retries (or the backend failed).

    ``reason``: ``not_json`` / ``missing_field`` / ``bad_category`` / ``bad_value`` (the last
    validation error) or ``backend_error``. ``last_output``: the last raw answer (may be None).
    """

    def __init__(self, agent: str, reason: str, message: str, attempts: int, last_output: str | None = None):
        self.agent, self.reason, self.attempts, self.last_output = agent, reason, attempts, last_output
        super().__init__(f"{agent}: {reason}: {message}")
        self.message = message


@dataclass
class AgentResult:
    output: dict
    attempts: int
    raw: str
    errors: list[str] = field(default_factory=list)


def call_agent(
    backend: Any,
    agent: str,
    templates: dict[str, str],
    variables: dict[str, Any],
    *,
    images: list | None = None,
    context: dict | None = None,
    max_retries: int = 2,
    temperature: float = 0.0,
    max_new_tokens: int = 1024,
    seed: int | None = None,
) -> AgentResult:
    """Ask ``agent`` through ``backend.chat`` and return its validated answer.

    The first user message holds the image(s) and the rendered template; an invalid answer is
    kept in the conversation and followed by the ``retry`` template (the error and the expected
    JSON form), up to ``max_retries`` more times. ``seed`` (not None) goes to ``backend.chat``.
    Raises :class:`AgentFailure`.
    """
    spec = AGENTS[agent]
    context = context or {}
    images = list(images or [])
    prompt = render(templates, agent, variables)
    content: list[dict] | str = (
        [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}] if images else prompt
    )
    messages: list[dict] = []
    system = render(templates, "system", {})
    if system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    try:
        asked = ask(
            backend,
            messages,
            lambda raw: parse_output(spec, raw, context),
            retries=max_retries,
            retry_message=lambda exc: render(
                templates, "retry", {"error": str(exc), "schema": spec.schema_hint(context)}
            ),
            images=images,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            what=f"{agent} agent answer",
            seed=seed,
        )
    except BackendFailed as exc:  # the backend's own retries are spent (or it cannot send this input)
        cause = exc.__cause__
        raise AgentFailure(agent, "backend_error", f"{type(cause).__name__}: {cause}", exc.attempt, exc.raw) from cause
    except AskFailed as exc:
        raise AgentFailure(
            agent,
            getattr(exc.error, "reason", "bad_value"),
            f"no valid answer after {exc.attempts} attempt(s); last error: {exc.error}",
            exc.attempts,
            exc.raw,
        )
    return AgentResult(asked.value, asked.attempts, asked.raw, asked.errors)
