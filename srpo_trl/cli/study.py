"""``srpo-trl study``: the pre-registered grid over data regimes on the demo task; see docs/study.md."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ..demo import study

    return int(study.main(argv) or 0)
