"""The ``srpo-trl`` command: one subcommand per stage of the SRPO loop.

    srpo-trl demo [--quick] [--seed N] [--out DIR]
    srpo-trl train --config recipes/<model>/srpo/config_*.yaml [--field value ...]
    srpo-trl explore --model PATH --records records.jsonl --out explored.jsonl ...
    srpo-trl evaluate --model PATH --benchmark siuo --data ... --out report/
    srpo-trl generate-records --images DIR --chat-url URL --model NAME --out records.jsonl
    srpo-trl curate export|import ...

Each subcommand lives in its own module and is imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("srpo_trl.demo", "main", "run the SRPO loop end to end on a tiny model (CPU, offline)"),
    "study": ("srpo_trl.demo.study", "main", "the pre-registered grid over data regimes on the demo task (docs/study.md)"),
    "train": ("srpo_trl.train", "main", "train with a recipe YAML (same code path as recipes/srpo.py)"),
    "explore": ("srpo_trl.exploration", "main", "sample reasoning branches, verify them, write step pairs"),
    "evaluate": ("srpo_trl.evaluation", "main", "safety evaluation of reasoning paths"),
    "generate-records": ("srpo_trl.records", "main_generate", "agents that write reasoning-path records"),
    "curate": ("srpo_trl.records", "main_curate", "export records for human review and import the edits"),
}


def _usage() -> str:
    lines = ["usage: srpo-trl COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"srpo-trl: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
