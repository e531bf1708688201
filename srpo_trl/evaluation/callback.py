"""A trainer callback that runs a small safety evaluation at eval time.

    from srpo_trl.evaluation import SafetyEvalCallback, load_benchmark, EvalConfig

    items = load_benchmark("records", "eval_records.jsonl")[:32]
    trainer = SRPOTrainer(model=..., args=SRPOConfig(eval_strategy="steps", eval_steps=50, ...), ...)
    SafetyEvalCallback(items, config=EvalConfig(samples=1, max_new_tokens=256)).attach(trainer)
    trainer.train()

Each time the trainer evaluates, the callback generates paths for ``items`` with the model being
trained (in-process :class:`srpo_trl.backends.TransformersBackend`, seeded, the caller's RNG left
alone), judges them (:class:`RuleJudge` by default) and logs ``eval_safety/<metric>`` (percentages:
safe, effective, safe_and_effective, attack_success, refusal, over_refusal, path_safe; and
``n_items``) through ``trainer.log``: they land in ``trainer.state.log_history`` and every
configured reporter (TensorBoard, W&B, ...) next to the trainer's own eval metrics, and in the dict
``trainer.evaluate()`` returns (so ``metric_for_best_model="eval_safety/safe"`` works).

It runs on the main process only; under DeepSpeed ZeRO-3 (sharded weights, generation needs every
rank) evaluate with ``srpo-trl evaluate`` on a saved checkpoint instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from .judges import RuleJudge
from .metrics import PROPORTIONS, compute_metrics
from .runner import EvalConfig, evaluate
from .schema import EvalItem, RunResult


logger = logging.getLogger(__name__)


class SafetyEvalCallback(TrainerCallback):
    """Safety evaluation of ``items`` at every evaluation of the trainer (see the module doc).

    ``judge``: a :class:`RuleJudge` (default) or a :class:`ModelJudge`. ``config``: generation
    settings (default: 1 sample, 256 new tokens, temperature 0.5). ``processing_class``: the
    tokenizer / processor to generate with (default: the trainer's). ``metric_prefix``: the logged
    keys are ``eval_<prefix>/<metric>``. ``keep_runs``: keep every evaluation's results in
    ``self.runs`` (step -> :class:`RunResult`).
    """

    def __init__(
        self,
        items: Sequence[EvalItem],
        judge: Any = None,
        *,
        config: EvalConfig | None = None,
        processing_class: Any = None,
        metric_prefix: str = "safety",
        vote: str = "majority",
        keep_runs: bool = True,
    ):
        if not items:
            raise ValueError("SafetyEvalCallback needs at least one item to evaluate")
        self.items = list(items)
        self.judge = judge if judge is not None else RuleJudge()
        self.config = config or EvalConfig(samples=1, max_new_tokens=256)
        self.processing_class = processing_class
        self.metric_prefix = metric_prefix
        self.vote = vote
        self.keep_runs = keep_runs
        self.trainer = None
        self.runs: dict[int, RunResult] = {}
        self._last_step: int | None = None
        self._logged: dict[str, float] = {}
        self._warned = False

    def attach(self, trainer: Any) -> SafetyEvalCallback:
        """Add this callback to ``trainer`` and log through it (``trainer.log``)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def metric_key(self, name: str) -> str:
        return f"eval_{self.metric_prefix}/{name}"

    def run(self, model: Any, processing_class: Any, step: int) -> tuple[RunResult, dict[str, float]]:
        """Evaluate ``model`` now; returns the run and the metrics to log."""
        from ..backends import TransformersBackend

        backend = TransformersBackend(
            model,
            processing_class,
            batch_size=self.config.batch_size * self.config.samples,
            separator=self.config.separator,
            show_progress=False,
        )
        run = evaluate(self.items, backend, self.judge, self.config, label=f"step-{step}", progress=False)
        overall = compute_metrics(run.results, vote=self.vote)["overall"]
        logs = {self.metric_key(name): overall[name]["pct"] for name in PROPORTIONS if overall[name]["n"] > 0}
        logs[self.metric_key("n_items")] = overall["n_items"]
        return run, logs

    def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self._last_step == state.global_step:  # several eval datasets: evaluate the items once per step
            if metrics is not None:
                metrics.update(self._logged)
            return
        processing_class = self.processing_class or processing_class
        if model is None or processing_class is None:
            raise ValueError("SafetyEvalCallback needs the model and its processing class (pass processing_class=...)")
        run, logs = self.run(model, processing_class, state.global_step)
        self._last_step = state.global_step
        if self.keep_runs:
            self.runs[state.global_step] = run
        self._logged = dict(logs)
        if metrics is not None:
            metrics.update(logs)
        if self.trainer is not None:
            self.trainer.log(dict(logs))
        else:
            if not self._warned:
                logger.warning(
                    "SafetyEvalCallback was added without attach(trainer): its metrics go to state.log_history "
                    "only, not to the reporters. Use SafetyEvalCallback(...).attach(trainer)."
                )
                self._warned = True
            state.log_history.append({**logs, "step": state.global_step})
