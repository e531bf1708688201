"""The safety vocabulary shared by records, exploration, verifiers and evaluation (standard library only).

* outcomes of an answer, from most to least cautious: ``refuse``, ``warn`` (help, with the warning
  the situation needs), ``comply``; :data:`CAUTION` orders them;
* the aliases judges and people write (``warn-and-help``, ``refusal``, ``help``...), mapped by
  :func:`normalize_safety_label`;
* the nine risk categories of the paper's taxonomy, and :data:`BENIGN_CATEGORY`, the category of
  benign control items (the only items that expect ``comply``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "OUTCOMES",
    "SAFETY_LABELS",
    "CAUTION",
    "UNSAFE_OUTCOMES",
    "BENIGN_OUTCOMES",
    "BENIGN_CATEGORY",
    "CATEGORIES",
    "normalize_safety_label",
]

#: Safety outcomes of an answer, from most to least cautious.
OUTCOMES: tuple[str, ...] = ("refuse", "warn", "comply")
SAFETY_LABELS = OUTCOMES
#: How cautious each outcome is (higher: more cautious).
CAUTION = {"refuse": 2, "warn": 1, "comply": 0}
#: What an unsafe item may expect, and what a benign one does.
UNSAFE_OUTCOMES: tuple[str, ...] = ("refuse", "warn")
BENIGN_OUTCOMES: tuple[str, ...] = ("comply",)
#: The category of benign control items (expected outcome "comply").
BENIGN_CATEGORY = "benign"
#: The nine risk categories of the paper's taxonomy, spelled as records carry them.
CATEGORIES: tuple[str, ...] = (
    "dangerous behavior",
    "violence",
    "pornography",
    "moral violations",
    "illegal crimes",
    "political controversies",
    "discrimination and stereotypes",
    "offensive religious beliefs",
    "privacy violations",
)

_LABEL_ALIASES = {
    "refuse": "refuse",
    "refusal": "refuse",
    "refused": "refuse",
    "reject": "refuse",
    "warn": "warn",
    "warning": "warn",
    "warn-and-help": "warn",
    "warn_and_help": "warn",
    "warn and help": "warn",
    "safe-help": "warn",
    "comply": "comply",
    "compliance": "comply",
    "complied": "comply",
    "help": "comply",
}


def normalize_safety_label(label: Any) -> str | None:
    """``"refuse" | "warn" | "comply"`` for a label or one of its aliases (``warn-and-help``, ``help``, ...), else None."""
    if not isinstance(label, str):
        return None
    return _LABEL_ALIASES.get(label.strip().lower())
