"""``srpo-trl demo``: the SRPO loop end to end on a tiny model (CPU, offline); see docs/demo.md."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    import srpo_trl.demo as demo

    return int(demo.main(argv) or 0)
