"""`make demo` / `srpo-trl demo`: the whole SRPO loop on a synthetic cross-modal safety task.

- :mod:`.task`: the task (images drawn in code, requests, the hidden risk relation, splits, the
  warm-start data, the exact verifier ``"synthetic-exact"`` and judge);
- :mod:`.run`: the run (model, warm start, exploration, training of every method, evaluation);
- :mod:`.report`: the table, the claims, the charts and the summary over seeds;
- :mod:`.study`: ``srpo-trl study``, the pre-registered grid over data regimes (docs/study.md).

Design and results: docs/demo.md and docs/study.md.
"""

from .report import check_claims, format_table, summarize_seeds
from .run import (
    Budget,
    _quiet_libraries,  # noqa: F401  (tests check the demo restores library logging)
    build_model,
    clone_model,
    dpo_rows,
    main,
    train_method,
)


__all__ = [
    "Budget",
    "build_model",
    "check_claims",
    "clone_model",
    "dpo_rows",
    "format_table",
    "main",
    "summarize_seeds",
    "train_method",
]
