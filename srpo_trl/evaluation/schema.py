"""The data that flows through an evaluation: items in, sampled paths and verdicts out.

Plain dataclasses with ``to_dict`` / ``from_dict`` so that the report JSON and the resume file hold
exactly what the metrics are computed from (``metrics.compute_metrics`` recomputes from them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..safety import CAUTION, OUTCOMES  # noqa: F401  (the shared vocabulary, re-exported for importers)


@dataclass
class EvalItem:
    """One benchmark question.

    ``expected`` is the outcome a safe model gives ("refuse", "warn" or "comply"; benign items are
    "comply"), or None when the benchmark does not say (then only a judge model can score it).
    ``images`` are file paths, opened when the item is generated. ``source`` says where the item
    came from ("file.json, item 3") so that later errors can name it.
    """

    id: str
    prompt: Any
    images: list[str] = field(default_factory=list)
    category: str = "uncategorized"
    expected: str | None = None
    reference: Any = None
    safety_warning: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def question_text(self) -> str:
        """The prompt as plain text (the text parts of the last user message for chat prompts)."""
        if isinstance(self.prompt, str):
            return self.prompt
        for message in reversed(self.prompt):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                return "".join(p.get("text", "") for p in content if p.get("type") == "text")
        return ""

    def reference_text(self, separator: str = "\n") -> str:
        if self.reference is None:
            return ""
        if isinstance(self.reference, str):
            return self.reference
        return separator.join(self.reference)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalItem:
        return cls(**data)


@dataclass
class EvalVerdict:
    """The evaluation judge's verdict on one sampled reasoning path (not exploration's pass / fail
    :class:`srpo_trl.verifiers.Verdict`).

    ``safe`` / ``effective``: None means "no verdict" (the aspect was not asked, e.g. effectiveness
    under MM-SafetyBench's protocol, or the judge's reply had none); such a verdict is left out of
    that metric's denominator.
    ``outcome``: the answer's safety outcome (refuse / warn / comply). ``steps_safe``: one bool per
    reasoning step, or None when the judge did not judge steps. ``replies``: the judge model's raw
    replies, kept for audit. ``scores``: a benchmark protocol's own per-sample scores, as its
    scripts record them (SIUO: ``{"safety": 1|0|-1, "effectiveness": ...}``; MM-SafetyBench:
    ``{"is_safe(gpt)": reply}``; MCQA: ``{"pred_ans", "score"}``); see ``evaluation.protocols``.
    """

    safe: bool | None
    effective: bool | None = None
    outcome: str | None = None
    steps_safe: list[bool] | None = None
    judge: str = ""
    replies: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def safe_and_effective(self) -> bool | None:
        if self.safe is None or self.effective is None:
            return None
        return self.safe and self.effective

    @property
    def path_safe(self) -> bool | None:
        """Every step of the path is safe (None when steps were not judged or the path is empty)."""
        if not self.steps_safe:
            return None
        return all(self.steps_safe)

    @property
    def first_unsafe_step(self) -> int | None:
        """1-based index of the first unsafe step, None when every step is safe or none was judged."""
        for i, ok in enumerate(self.steps_safe or []):
            if not ok:
                return i + 1
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalVerdict:
        return cls(**data)


#: The name before the rename (``srpo_trl.verifiers.Verdict`` is exploration's pass/fail verdict).
Verdict = EvalVerdict


@dataclass
class ItemResult:
    """An item with its sampled reasoning paths and one verdict per path."""

    item: EvalItem
    samples: list[str]
    verdicts: list[EvalVerdict]
    steps: list[list[str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.item.id

    @property
    def category(self) -> str:
        return self.item.category

    @property
    def expected(self) -> str | None:
        return self.item.expected

    def to_dict(self) -> dict[str, Any]:
        return {
            "item": self.item.to_dict(),
            "samples": list(self.samples),
            "steps": [list(s) for s in self.steps],
            "verdicts": [v.to_dict() for v in self.verdicts],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemResult:
        return cls(
            item=EvalItem.from_dict(data["item"]),
            samples=list(data["samples"]),
            steps=[list(s) for s in data.get("steps", [])],
            verdicts=[EvalVerdict.from_dict(v) for v in data["verdicts"]],
        )


@dataclass
class RunResult:
    """One model's evaluation: its label, the settings it ran with, and every item result."""

    label: str
    config: dict[str, Any]
    results: list[ItemResult]
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "config": dict(self.config),
            "complete": self.complete,
            "items": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        return cls(
            label=data["label"],
            config=dict(data.get("config", {})),
            results=[ItemResult.from_dict(r) for r in data["items"]],
            complete=bool(data.get("complete", True)),
        )
