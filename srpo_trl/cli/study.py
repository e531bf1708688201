"""``srpo-trl study``: the pre-registered grid over data regimes on the demo task; see docs/study.md."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    if {"--diagnose", "--audit-only"} & set(argv or []):  # the diagnosis imports the study, not the reverse
        from ..demo import diagnose

        return int(diagnose.cli(argv) or 0)
    from ..demo import study

    return int(study.main(argv) or 0)
