"""`make demo` / `srpo-trl demo` (the run; the task is :mod:`.task`, the outputs :mod:`.report`): the whole SRPO loop on a tiny vision-language model, offline, on CPU.

    srpo-trl demo [--seed 0] [--quick] [--out demo_out] [--ablate-lambda 0,0.3,0.9] [--eval-split test|val]
    srpo-trl demo --summarize demo_out/seed0 demo_out/seed1 demo_out/seed2

Stages (each with a progress bar):

1. the synthetic cross-modal safety task (:mod:`srpo_trl.demo.task`): images drawn in code, requests
   in text, a hidden risk relation; a tiny Qwen2.5-VL built from a config with a tokenizer trained
   on the task's text, and its processor;
2. warm start: SFT (``SRPOTrainer`` with ``srpo_lambda=0``: the reference-path NLL only) on paths of a
   base model with implicit reasoning risk (for most requests it usually skips the step that connects
   image and request and helps, and it over-refuses two harmless cells; see
   :func:`task.warm_start_paths`);
3. exploration from the warm model (temperature 0.5) with :func:`srpo_trl.exploration.explore`,
   verified by the task's exact verifier, step pairs by ``StepPairDataset.from_exploration``;
4. four trainings from the warm model, the same budget each (steps, batch, learning rate):
   SRPO (odds ratio, lambda 0.3), NLL on the reference paths only (lambda 0), response-level DPO
   (TRL's ``DPOTrainer`` on whole answers) and Step-DPO (``align_loss="sigmoid"``);
5. evaluation of the five models on the test split (unseen combinations) with
   :mod:`srpo_trl.evaluation`: attack success rate, over-refusal, path safety, Safe & Effective;
6. the table, ``results.json``, ``demo_chart.png`` (and ``lambda_ablation.png``) in ``--out``.

Design, results over three seeds and timings: docs/demo.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .report import LABELS, _pct, check_claims, format_table, plot_ablation, plot_chart, summarize_seeds


METHODS = ("srpo", "nll", "dpo", "step_dpo")  # what `srpo-trl demo` trains by default
ALL_METHODS = (*METHODS, "rft")  # `--methods` / the study add rejection-sampling fine-tuning

RESULTS_FORMAT = "srpo_trl.demo/1"


@dataclass
class Budget:
    """Everything the run's size depends on (the default and ``--quick`` differ only here)."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    vocab_size: int = 768
    warm_renders: int = 10  # warm-start paths per train combination (different renders and styles)
    warm_steps: int = 400
    warm_lr: float = 3e-3
    skip_rate: float = 0.6  # warm-start paths of skip-prone requests that skip the combination step
    attentive_skip_rate: float = 0.1  # the same for the other requests
    explore_renders: int = 2
    num_samples: int = 8
    max_new_tokens: int = 64
    max_pairs_per_point: int = 4
    train_steps: int = 60
    train_lr: float = 1e-4
    batch_size: int = 16
    beta: float = 0.1
    eval_renders: int = 4
    eval_samples: int = 3
    eval_temperature: float = 0.5
    reference_coverage: float = 1.0  # share of training records that carry their verified reference path
    verifier_noise: float = 0.0  # share of exploration verdicts flipped (seeded)


QUICK = dict(warm_renders=6, warm_steps=250, explore_renders=1, num_samples=6, train_steps=20, eval_renders=1)


def _log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 2, vocab_size: int = 768):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` built from a config (:func:`srpo_trl.tiny.tiny_qwen2_5_vl`)
    with a tokenizer trained on the task's text, so a reasoning step is about ten tokens, and the
    image-only processor (a 28x28 image is one merged image token)."""
    from ..tiny import build_tokenizer, tiny_qwen2_5_vl
    from . import task

    tok = build_tokenizer(corpus=task.corpus(), vocab_size=vocab_size)
    return tiny_qwen2_5_vl(seed, hidden_size, num_hidden_layers, tokenizer=tok)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def build_data(
    out: Path, budget: Budget, seed: int, eval_split: str, quick: bool, progress: bool = True
) -> dict[str, Any]:
    """Records of every split (images written under ``out/data/images``) and the warm-start rows."""
    from tqdm.auto import tqdm

    from . import regime, task

    train, test = task.split_combinations()
    if eval_split == "val":  # tuning without the test split: hold a validation carve-out of train out
        train, evaluation = task.carve_validation(train)
    else:
        evaluation = test
    data = out / "data"
    images = data / "images"
    rng = random.Random(seed)
    with tqdm(total=3, desc="data", unit="split", disable=not progress) as bar:
        explore_records = task.make_records(train, budget.explore_renders, images, seed, split="train")
        bar.update(1)
        eval_records = task.make_records(evaluation, budget.eval_renders, images, seed, split=eval_split)
        bar.update(1)
        warm_rows, styles = [], Counter()
        for o, r in train:
            paths = task.warm_start_paths(o, r, budget.warm_renders, rng, budget.skip_rate, budget.attentive_skip_rate)
            renders = task.make_records([(o, r)], budget.warm_renders, images, seed + 1, split="warm")
            for rec, (path, style) in zip(renders, paths):
                styles[f"{style}/{'unsafe' if rec['unsafe'] else 'benign'}"] += 1
                other = (
                    task.helpful_answer(r) if path[-1].startswith("Answer: I cannot") else task.refusal_answer(o, r)
                )
                warm_rows.append(
                    {
                        "id": rec["id"],
                        "prompt": rec["prompt"],
                        "images": rec["images"],
                        "prefix": path[:-1],
                        "chosen": path[-1],
                        "rejected": other,
                        "reference": path,
                    }
                )
        bar.update(1)
    if quick:  # a third of the train combinations are explored (every cell still has unsafe ones)
        explore_records = explore_records[::3]
    # the data regime: records without a reference explore from a path of their own (see regime.py)
    explore_records = regime.cover_references(explore_records, budget.reference_coverage, seed)
    records_path = task.write_records(explore_records, data / "train_records.jsonl")
    eval_path = task.write_records(eval_records, data / f"{eval_split}_records.jsonl")
    with open(data / "warm_start.jsonl", "w", encoding="utf-8") as f:
        for row in warm_rows:
            f.write(json.dumps(row) + "\n")
    return {
        "train_combinations": len(train),
        "eval_combinations": len(evaluation),
        "explore_records": explore_records,
        "explore_path": records_path,
        "eval_records": eval_records,
        "eval_path": eval_path,
        "warm_rows": warm_rows,
        "warm_styles": dict(sorted(styles.items())),
    }


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _train_args(out: Path, name: str, steps: int, lr: float, budget: Budget, seed: int, **extra):
    common = dict(
        output_dir=str(out / "train" / name),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        max_steps=steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=max(1, steps // 10),
        max_length=None,
        seed=seed,
        data_seed=seed,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    common.update(extra)
    return common


def _srpo_args(out: Path, name: str, steps: int, lr: float, budget: Budget, seed: int, **extra):
    """SRPOConfig arguments. ``group_by_question=False``: batches here are a few rows and every
    question has pairs at every branch point, so grouping would fill a batch with one or two
    questions: correlated batches that learn slower at this budget. Rows are shuffled instead;
    prefix sharing still scores each row's three sequences as one tree."""
    return _train_args(out, name, steps, lr, budget, seed, group_by_question=False, **extra)


def _fit(trainer, desc: str, progress: bool) -> None:
    """``trainer.train()`` with one tqdm bar (loss in its postfix) instead of the printed log dicts."""
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=desc, unit="step", disable=not progress)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Bar())
    trainer.train()


def _train_summary(trainer, seconds: float) -> dict[str, Any]:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    keep = ("loss", "loss/reference", "loss/align", "margin", "accuracy", "rewards/margins", "rewards/accuracies")
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "first": {k: logs[0][k] for k in keep if logs and k in logs[0]},
        "last": {k: logs[-1][k] for k in keep if logs and k in logs[-1]},
    }


def warm_start(model, processor, rows: list[dict], budget: Budget, out: Path, seed: int, progress: bool):
    from .. import SRPOConfig, SRPOTrainer, StepPairDataset

    config = SRPOConfig(**_srpo_args(out, "warm", budget.warm_steps, budget.warm_lr, budget, seed, srpo_lambda=0.0))
    trainer = SRPOTrainer(
        model=model, args=config, train_dataset=StepPairDataset.from_list(rows), processing_class=processor
    )
    start = time.time()
    _fit(trainer, "warm start", progress)
    model.eval()
    return _train_summary(trainer, time.time() - start)


def clone_model(model):
    """An independent copy of ``model``. A TRL trainer replaces ``model.forward`` by an instance
    attribute whose closure calls the ORIGINAL model's forward; ``copy.deepcopy`` keeps that
    closure, so without this a copy would train its own weights (TRL's fused loss path) but
    generate and evaluate with the original's. The instance attribute is dropped from the copy."""
    clone = copy.deepcopy(model)
    clone.__dict__.pop("forward", None)
    return clone


def dpo_rows(pairs) -> list[dict]:
    """Whole-answer pairs for response-level DPO: each step pair's prefix + continuation, both ways
    (a favorable and an unfavorable full path from the same question), de-duplicated."""
    from ..backends import load_image

    rows, seen = [], set()
    for row in pairs:
        chosen = "\n".join(list(row["prefix"]) + [row["chosen"]])
        rejected = "\n".join(list(row["prefix"]) + [row["rejected"]])
        key = (row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"]), chosen, rejected)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "images": [load_image(im) for im in row["images"]],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def train_method(
    method: str,
    warm,
    processor,
    pairs,
    budget: Budget,
    out: Path,
    seed: int,
    progress: bool,
    srpo_lambda: float = 0.3,
    name: str | None = None,
    trainer_cls=None,
):
    """A copy of the warm model trained with ``method`` on ``pairs`` (for ``nll`` and ``rft`` the rows of
    :func:`method_datasets`); returns (model, summary). ``trainer_cls``: a subclass of SRPOTrainer to
    train the SRPO-family methods with (the diagnosis's gradient probe, :mod:`srpo_trl.demo.diagnose`)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from .. import SRPOConfig, SRPOTrainer

    name = name or method
    model = clone_model(warm).train()
    start = time.time()
    if method == "dpo":
        rows = dpo_rows(pairs)
        config = DPOConfig(
            **_train_args(out, name, budget.train_steps, budget.train_lr, budget, seed, beta=budget.beta)
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=clone_model(warm).eval(),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=processor,
        )
    else:
        extra: dict[str, Any] = {"srpo_lambda": srpo_lambda}
        if method in ("nll", "rft"):  # NLL only: on the references / on the verifier-passed paths
            extra["srpo_lambda"] = 0.0
        elif method == "step_dpo":
            extra.update(align_loss="sigmoid", beta=budget.beta, precompute_ref_log_probs=True, ref_logps_cache_dir="")
        config = SRPOConfig(**_srpo_args(out, name, budget.train_steps, budget.train_lr, budget, seed, **extra))
        trainer = (trainer_cls or SRPOTrainer)(
            model=model, args=config, train_dataset=pairs, processing_class=processor
        )
    _fit(trainer, name, progress)
    model.eval()
    summary = _train_summary(trainer, time.time() - start)
    summary["rows"] = len(trainer.train_dataset)
    return model, summary


def other_answer(record: dict, path: list[str]) -> str:
    """The answer opposite to a path's final one (the unused ``rejected`` side of an NLL-only row)."""
    from . import task

    if path[-1].startswith("Answer: I cannot"):
        return task.helpful_answer(int(record["request"]))
    return task.refusal_answer(int(record["object"]), int(record["request"]))


def read_explored(path: Path) -> list[dict]:
    """Exploration lines with image paths resolved, and sampled references moved out of ``reference``
    (:func:`regime.anchor_rows`): their pairs are anchored on ``prefix + chosen``."""
    from ..dataset import _read_jsonl
    from . import regime

    return regime.anchor_rows(_read_jsonl(path))


def method_datasets(
    explored: list[dict], pairs, methods, allow_empty: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each method's training rows from the same exploration: SRPO, Step-DPO and DPO the step pairs,
    NLL the pair rows that carry a reference, RFT every verifier-passed path and given reference.
    Returns the datasets and what was built (counts). A method left without rows raises, or with
    ``allow_empty`` (the study: one cell's data may leave one method nothing) has no dataset and its
    reason under ``info["empty"][method]``."""
    from .. import StepPairDataset
    from . import regime

    datasets: dict[str, Any] = {m: pairs for m in methods if m in ("srpo", "dpo", "step_dpo")}
    info: dict[str, Any] = {}
    empty: dict[str, str] = {}
    if "nll" in methods:
        rows = regime.reference_rows(pairs)
        info["nll_rows"] = len(rows)
        if rows:
            datasets["nll"] = StepPairDataset.from_list(rows)
        else:
            empty["nll"] = "NLL on references: no step pair carries a reference path; raise --reference-coverage"
    if "rft" in methods:
        rows, counts = regime.rft_rows(explored, other_answer)
        info["rft"] = {"rows": len(rows), **counts}
        if rows:
            datasets["rft"] = StepPairDataset.from_list(rows)
        else:
            empty["rft"] = f"rejection-sampling fine-tuning: no verifier-passed path in the exploration ({counts})"
    if empty and not allow_empty:
        raise ValueError("; ".join(empty.values()))
    if empty:
        info["empty"] = empty
    return datasets, info


def exploration_verifier(budget: Budget, seed: int):
    """The task's exact verifier, with ``budget.verifier_noise`` of its verdicts flipped."""
    from .regime import NoisyVerifier

    return (
        "synthetic-exact"
        if budget.verifier_noise == 0
        else NoisyVerifier("synthetic-exact", budget.verifier_noise, seed)
    )


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate_model(model, processor, items, label: str, out: Path, budget: Budget, seed: int, progress: bool):
    from ..backends import TransformersBackend
    from ..evaluation import EvalConfig, evaluate
    from .task import SyntheticJudge

    config = EvalConfig(
        samples=budget.eval_samples,
        temperature=budget.eval_temperature,
        max_new_tokens=budget.max_new_tokens,
        seed=seed,
        batch_size=32,
    )
    backend = TransformersBackend(model, processor, batch_size=config.batch_size * config.samples, show_progress=False)
    return evaluate(
        items,
        backend,
        SyntheticJudge(),
        config,
        label=label,
        state_dir=out / "eval" / "runs" / label,
        model_info={"model": LABELS.get(label, label)},
        progress=progress,
    )


def summarize_run(run) -> dict[str, Any]:
    """The demo's metrics of one evaluated model (each a ``{k, n, pct, ci_low, ci_high}`` entry)."""
    from ..evaluation import compute_metrics

    overall = compute_metrics(run.results)["overall"]
    unsafe = compute_metrics([r for r in run.results if r.item.expected == "refuse"])["overall"]
    return {
        "attack_success": overall["attack_success"],
        "over_refusal": overall["over_refusal"],
        "path_safe_unsafe": unsafe["path_safe"],
        "safe_and_effective": overall["safe_and_effective"],
        "safe": overall["safe"],
        "effective": overall["effective"],
        "refusal": overall["refusal"],
        "first_unsafe_step": unsafe["first_unsafe_step"],
    }


def _parse_lambdas(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"srpo-trl demo: --ablate-lambda takes comma-separated numbers (e.g. 0,0.3,0.9), got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise SystemExit(f"srpo-trl demo: --ablate-lambda values must be >= 0, got {text!r}")
    return values


def _parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise SystemExit(f"srpo-trl demo: --methods takes names from {','.join(ALL_METHODS)}, got {text!r}")
    if "srpo" not in methods:
        raise SystemExit("srpo-trl demo: --methods must include srpo (the claims compare every method with it)")
    return methods


def _lam_key(value: float) -> str:
    return f"{value:g}"


@contextlib.contextmanager
def _quiet_libraries():
    """Silence library chatter for the demo's run only; levels and warning filters are restored after,
    so a caller in the same process (a test session, a notebook) keeps its logging."""
    import warnings

    import transformers

    names = ("transformers", "trl", "accelerate", "datasets", "srpo_trl.trainer")
    levels = {name: logging.getLogger(name).level for name in names}
    verbosity = transformers.logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        transformers.logging.set_verbosity_error()
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _clean(out: Path) -> None:
    """Remove what an earlier demo run left in ``out`` (only the demo's own files and folders)."""
    for name in ("data", "train", "eval"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (
        "explored.jsonl",
        "explored.jsonl.meta.json",
        "pairs.jsonl",
        "results.json",
        "demo_chart.png",
        "lambda_ablation.png",
    ):
        (out / name).unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``srpo-trl demo`` (the docs test parses documented commands with it)."""
    parser = argparse.ArgumentParser(prog="srpo-trl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and every stage (default 0)")
    parser.add_argument("--quick", action="store_true", help="a smaller run (CI): under 3 minutes on 2 CPU cores")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument(
        "--ablate-lambda",
        default=None,
        metavar="L1,L2,...",
        help="also train SRPO with each lambda and plot ASR / over-refusal against it (e.g. 0,0.3,0.9)",
    )
    parser.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default="test",
        help="test: the unseen combinations (default); val: a carve-out of train, for tuning",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is so small that more threads mostly wait on each other)",
    )
    parser.add_argument(
        "--reference-coverage",
        type=float,
        default=1.0,
        metavar="F",
        help="share of training records that carry a verified reference path (default 1.0); the others "
        "explore from a verified path of their own and their pairs are anchored on prefix + chosen",
    )
    parser.add_argument(
        "--samples-per-point",
        type=int,
        default=None,
        metavar="N",
        help="continuations sampled per branch point (default 8; 6 with --quick)",
    )
    parser.add_argument(
        "--verifier-noise",
        type=float,
        default=0.0,
        metavar="F",
        help="share of the exploration verifier's verdicts flipped, seeded (default 0)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        metavar="M1,M2,...",
        help=f"methods to train, from {','.join(ALL_METHODS)} (default {','.join(METHODS)}; rft: "
        "rejection-sampling fine-tuning)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="OUT",
        help="only print mean and spread over earlier runs' --out folders (e.g. one per seed), then exit",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize_seeds(args.summarize))
        return 0
    lambdas = _parse_lambdas(args.ablate_lambda)
    args.methods = _parse_methods(args.methods)
    for flag, value in (("--reference-coverage", args.reference_coverage), ("--verifier-noise", args.verifier_noise)):
        if not 0.0 <= value <= 1.0:
            raise SystemExit(f"srpo-trl demo: {flag} must be between 0 and 1, got {value}")
    if args.samples_per_point is not None and args.samples_per_point < 2:
        raise SystemExit(
            f"srpo-trl demo: --samples-per-point must be at least 2 (a pair needs two samples), got {args.samples_per_point}"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    progress = not args.no_progress

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        with _quiet_libraries():
            return _run(args, argv, lambdas, progress)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv, lambdas: list[float], progress: bool) -> int:
    t_start = time.time()
    import torch
    from tqdm.auto import tqdm

    from .. import StepPairDataset
    from ..backends import TransformersBackend
    from ..evaluation import write_report
    from ..exploration import explore
    from . import task

    budget = Budget(
        **(QUICK if args.quick else {}), reference_coverage=args.reference_coverage, verifier_noise=args.verifier_noise
    )
    if args.samples_per_point is not None:
        budget.num_samples = args.samples_per_point
    methods = args.methods
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    timing: dict[str, float] = {}
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    def stage(name: str):
        timing[name] = time.time()
        _log(f"\n=== {name} ===")

    def done(name: str):
        timing[name] = round(time.time() - timing[name], 1)

    # 1. task, model, processor
    stage("1. task and model")
    _log(task.describe_task())
    data = build_data(out, budget, args.seed, args.eval_split, args.quick)
    model, processor = build_model(args.seed, budget.hidden_size, budget.num_hidden_layers, budget.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    _log(
        f"Tiny Qwen2.5-VL: {n_params:,} parameters (hidden {budget.hidden_size}, {budget.num_hidden_layers} layers), "
        f"vocabulary {len(processor.tokenizer)}; {len(data['warm_rows'])} warm-start paths {data['warm_styles']}"
    )
    done("1. task and model")

    # 2. warm start
    stage("2. warm start (SFT)")
    warm_summary = warm_start(model, processor, data["warm_rows"], budget, out, args.seed, progress)
    _log(
        f"warm start: {warm_summary['steps']} steps in {warm_summary['seconds']} s, loss {warm_summary['first'].get('loss', float('nan')):.3f} -> {warm_summary['last'].get('loss', float('nan')):.3f}"
    )
    done("2. warm start (SFT)")

    # 3. exploration and pairs
    stage("3. exploration")
    backend = TransformersBackend(model, processor, batch_size=64, show_progress=False)
    explored_path = out / "explored.jsonl"
    summary = explore(
        str(data["explore_path"]),
        backend,
        exploration_verifier(budget, args.seed),
        num_samples=budget.num_samples,
        temperature=0.5,
        max_new_tokens=budget.max_new_tokens,
        branch_points="all",
        max_pairs_per_point=budget.max_pairs_per_point,
        seed=args.seed,
        out=explored_path,
        overwrite=True,
        show_progress=progress,
        print_summary=True,
    )
    explored = read_explored(explored_path)
    pairs = StepPairDataset.from_exploration(explored, max_pairs_per_point=budget.max_pairs_per_point, seed=args.seed)
    pairs.to_jsonl(out / "pairs.jsonl")
    by_point = Counter(int(k) for k in pairs["branch_point"])
    unsafe_ids = {r["id"] for r in data["explore_records"] if r["unsafe"]}
    pair_info = {
        "rows": len(pairs),
        "by_branch_point": {str(k): by_point[k] for k in sorted(by_point)},
        "from_unsafe_records": sum(1 for i in pairs["id"] if i in unsafe_ids),
        "report": pairs.report,
    }
    _log(
        f"step pairs: {len(pairs)} (by branch point {pair_info['by_branch_point']}; {pair_info['from_unsafe_records']} from unsafe items)"
    )
    done("3. exploration")

    # 4. training, the same budget each
    stage("4. training")
    warm = model
    trained: dict[str, Any] = {}
    train_info: dict[str, Any] = {}
    datasets, pair_info["method_rows"] = method_datasets(explored, pairs, methods)
    runs_to_train = [(m, m, 0.3) for m in methods]
    for lam in lambdas:
        if lam == 0.3 or lam == 0.0:
            continue  # SRPO (0.3) and NLL (0) are trained anyway
        runs_to_train.append(("srpo", f"srpo_lambda_{_lam_key(lam)}", lam))
    for method, name, lam in tqdm(runs_to_train, desc="train methods", unit="model", disable=not progress):
        _log(f"--- {name} ---")
        trained[name], train_info[name] = train_method(
            method,
            warm,
            processor,
            datasets.get(method, pairs),
            budget,
            out,
            args.seed,
            progress,
            srpo_lambda=lam,
            name=name,
        )
    done("4. training")

    # 5. evaluation
    stage("5. evaluation")
    items = task.to_eval_items(data["eval_records"])
    runs, models = [], {}
    for label, mdl in tqdm(
        [("warm", warm), *trained.items()], desc="evaluate models", unit="model", disable=not progress
    ):
        run = evaluate_model(mdl, processor, items, label, out, budget, args.seed, progress)
        runs.append(run)
        models[label] = {"metrics": summarize_run(run), "train": train_info.get(label, warm_summary)}
    report_paths = write_report(runs, out / "eval")
    done("5. evaluation")

    # 6. outputs
    stage("6. results")
    main_models = {k: models[k] for k in ("warm", *methods)}
    split_name = (
        "test split: unseen combinations" if args.eval_split == "test" else "validation split (carved from train)"
    )
    table = format_table(main_models)
    _log(
        f"\nResults on the {split_name} ({len(items)} items, {budget.eval_samples} samples each, majority vote):\n{table}"
    )
    claims = check_claims(main_models)
    for name, c in claims.items():
        _log(
            f"  claim {name}: {'HOLDS' if c['holds'] else 'does NOT hold'} ({', '.join(f'{k} {v:.1f}' for k, v in c.items() if k != 'holds')})"
        )
    chart = plot_chart(
        main_models,
        out / "demo_chart.png",
        f"SRPO demo (seed {args.seed}{', quick' if args.quick else ''}): {split_name}",
    )
    ablation = {}
    ablation_chart = None
    if lambdas:
        for lam in sorted(set(lambdas)):
            key = "nll" if lam == 0 else "srpo" if lam == 0.3 else f"srpo_lambda_{_lam_key(lam)}"
            ablation[_lam_key(lam)] = models[key]
        ablation_chart = plot_ablation(
            ablation, out / "lambda_ablation.png", f"SRPO lambda ablation (seed {args.seed})"
        )
        _log(
            "\nLambda ablation: "
            + "; ".join(
                f"lambda {lam}: ASR {_pct(m['metrics']['attack_success']):.1f}%, over-refusal {_pct(m['metrics']['over_refusal']):.1f}%"
                for lam, m in ablation.items()
            )
        )
    done("6. results")
    timing["total"] = round(time.time() - t_start, 1)
    results = {
        "format": RESULTS_FORMAT,
        "seed": args.seed,
        "methods": list(methods),
        "quick": args.quick,
        "eval_split": args.eval_split,
        "command": "srpo-trl demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "task": task.describe_task(),
        "budget": asdict(budget),
        "model": {
            "architecture": "Qwen2_5_VLForConditionalGeneration",
            "parameters": n_params,
            "vocabulary": len(processor.tokenizer),
        },
        "data": {
            "train_combinations": data["train_combinations"],
            "eval_combinations": data["eval_combinations"],
            "eval_items": len(items),
            "explore_records": len(data["explore_records"]),
            "warm_start_paths": len(data["warm_rows"]),
            "warm_start_styles": data["warm_styles"],
        },
        "warm_start": warm_summary,
        "exploration": {k: v for k, v in summary.items() if k not in ("results", "failures")},
        "pairs": pair_info,
        "labels": LABELS,
        "models": models,
        "claims": claims,
        "ablation": ablation,
        "timing_s": timing,
        "paths": {
            "results": str(out / "results.json"),
            "chart": str(chart),
            "ablation_chart": str(ablation_chart) if ablation_chart else None,
            "report": str(report_paths["json"]),
            "report_markdown": str(report_paths["markdown"]),
            "explored": str(explored_path),
            "pairs": str(out / "pairs.jsonl"),
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    _log(
        f"\nDone in {timing['total']:.0f} s. Results: {out / 'results.json'}; chart: {chart}"
        + (f"; lambda ablation: {ablation_chart}" if ablation_chart else "")
        + f"; full evaluation report: {report_paths['markdown']}"
    )
    return 0
