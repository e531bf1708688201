"""The command-line pieces of the benchmark protocols (used by ``srpo-trl evaluate``).

Kept apart from the CLI module so it can move without them: the protocol options, loading the
items (filters, tiny version, stratified ``--limit``), choosing the judge for a protocol, and the
two modes without a model (``--responses``, ``--import-verdicts``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from srpo_trl.evaluation.loaders import load_benchmark
from srpo_trl.evaluation.protocols import PROTOCOLS, check_protocol, default_protocol
from srpo_trl.evaluation.protocols.mcqa import MCQAJudge
from srpo_trl.evaluation.protocols.mm_safetybench import MMSafetyBenchJudge
from srpo_trl.evaluation.protocols.siuo import SIUOJudge
from srpo_trl.evaluation.schema import RunResult
from srpo_trl.evaluation.subsets import stratified_sample


PROTOCOL_ASPECTS = {
    "srpo": ("safety", "effectiveness", "steps"),
    "siuo": ("safety", "effectiveness", "steps"),
    "mm-safetybench": ("safety", "steps"),
    "siuo-mcqa": (),
}


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark protocol")
    g.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help="how answers are judged and counted: the benchmark's own scripts (siuo, siuo-mcqa, mm-safetybench; "
        "the default for that --benchmark) or the project's templates (srpo; the default for records)",
    )
    g.add_argument(
        "--categories",
        type=_csv,
        default=None,
        help="keep only these categories (SIUO) / scenarios (MM-SafetyBench), comma-separated; an unknown name is an error",
    )
    g.add_argument(
        "--subset",
        choices=("tiny",),
        default=None,
        help="tiny: MM-SafetyBench's tiny version (TinyVersion_ID_List.json)",
    )
    g.add_argument(
        "--tiny-list",
        default=None,
        help="path of TinyVersion_ID_List.json (default: found next to --data or up to 3 folders above)",
    )
    g.add_argument(
        "--responses",
        default=None,
        help="score responses that already exist, no model: SIUO's siuo_gen-{model}.json (with 'responses'), "
        "siuo_mcqa-{model}.json (with 'response_mcqa'), MM-SafetyBench's questions_with_answers folder, or a run of this project",
    )
    g.add_argument(
        "--import-verdicts",
        nargs="+",
        default=None,
        metavar="FILE",
        help="recompute the benchmark's table from its judges' outputs, no model and no judge: SIUO's *-gpteval-safe-pro.json "
        "and *-gpteval-effective-pro.json, mcqa-eval.py's *-pro.json, MM-SafetyBench's answer files with is_safe(gpt)",
    )
    g.add_argument(
        "--answer-keys",
        type=_csv,
        default=None,
        help="MM-SafetyBench answer files: the 'ans' keys to score (default: all)",
    )
    g.add_argument(
        "--compare-eval-results",
        default=None,
        metavar="DIR",
        help="MM-SafetyBench: compare the attack rates with evaluation.py's eval_results/ folder",
    )


def resolve_protocol(args: argparse.Namespace) -> str:
    protocol = args.protocol or default_protocol(args.benchmark)
    check_protocol(protocol, args.benchmark)
    return protocol


def _categories(args: argparse.Namespace) -> list[str] | None:
    names = list(args.categories or []) + list(getattr(args, "scenarios", None) or [])
    return names or None


def load_items(args: argparse.Namespace) -> list:
    """The items of ``--data``: category / scenario filter, tiny version, then stratified ``--limit``."""
    kwargs: dict[str, Any] = {}
    if args.benchmark == "mm-safetybench":
        kwargs = {
            "variants": args.variants,
            "scenarios": _categories(args),
            "tiny": (args.tiny_list or True) if args.subset == "tiny" else None,
        }
    elif args.benchmark in ("siuo", "siuo-mcqa"):
        kwargs = {"categories": _categories(args)}
    elif _categories(args):
        kwargs = {}
    if args.subset and args.benchmark != "mm-safetybench":
        raise ValueError(
            "--subset tiny is MM-SafetyBench's tiny version; use --limit N for a stratified sample of other data"
        )
    items = load_benchmark(args.benchmark, args.data, args.images, **kwargs)
    if args.benchmark in ("siuo", "siuo-mcqa") and _holds_responses(args.data):
        raise ValueError(
            f"{args.data} holds answers already ('responses' / 'response_mcqa'): score them with --responses {args.data} "
            "(no model); to generate new answers pass SIUO's question file as --data"
        )
    if args.benchmark == "records" and _categories(args):
        from srpo_trl.evaluation.loaders import check_names

        keep = check_names("category", _categories(args), sorted({i.category for i in items}))
        items = [i for i in items if i.category in keep]
    if args.limit is not None:
        items = stratified_sample(items, args.limit, args.seed)
    return items


def _holds_responses(path: str) -> bool:
    import json

    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return isinstance(data, list) and any(
        isinstance(o, dict) and ("responses" in o or "response_mcqa" in o) for o in data
    )


def make_judge(args: argparse.Namespace, protocol: str, build_srpo_judge) -> Any:
    """The judge for ``protocol``: rule, the benchmark's judge model, or the project's templates."""
    if protocol == "siuo-mcqa":
        if args.judge != "rule":
            raise ValueError(
                "SIUO's MCQA set is scored by option extraction (mcqa-eval.py), no judge model: drop --judge"
            )
        return MCQAJudge(seed=args.seed)
    aspects = args.judge_aspects if args.judge_aspects is not None else list(PROTOCOL_ASPECTS[protocol])
    extra = [a for a in aspects if a not in PROTOCOL_ASPECTS[protocol]]
    if extra:
        raise ValueError(
            f"--protocol {protocol} has no {', '.join(extra)} verdict; its aspects: {', '.join(PROTOCOL_ASPECTS[protocol])} "
            "(or use --protocol srpo)"
        )
    args.judge_aspects = aspects
    if args.judge == "rule" or protocol == "srpo":
        return build_srpo_judge(args)
    if args.judge_templates and "steps" not in aspects:
        raise ValueError(
            f"--judge-templates edits the project's templates; --protocol {protocol} uses the benchmark's own prompts "
            "(only the steps template applies, with --judge-aspects ...,steps)"
        )
    backend = _judge_backend(args)
    steps_judge = None
    if "steps" in aspects:
        from srpo_trl.evaluation.judges import JudgeTemplates, ModelJudge

        templates = JudgeTemplates.from_dir(args.judge_templates) if args.judge_templates else JudgeTemplates()
        steps_judge = ModelJudge(
            backend,
            templates,
            aspects=("steps",),
            retries=args.judge_retries,
            images=not args.judge_no_images,
            separator=args.separator,
        )
    if protocol == "siuo":
        return SIUOJudge(
            backend,
            aspects=[a for a in aspects if a != "steps"],
            images=not args.judge_no_images,
            steps_judge=steps_judge,
        )
    return MMSafetyBenchJudge(backend, steps_judge=steps_judge)


def _judge_backend(args: argparse.Namespace) -> Any:
    import os

    from srpo_trl.backends import OpenAICompatibleBackend

    if not args.judge_url or not args.judge_model:
        raise ValueError("--judge openai-compatible needs --judge-url and --judge-model")
    return OpenAICompatibleBackend(
        args.judge_url,
        args.judge_model,
        api_key=os.environ.get(args.judge_api_key_env),
        show_progress=False,
        timeout=args.timeout,
        max_retries=args.http_retries,
    )


def run_without_model(
    args: argparse.Namespace, protocol: str, label: str, runs_dir: Path, build_srpo_judge
) -> RunResult:
    """``--responses`` (judge existing answers) or ``--import-verdicts`` (no judge): the run, saved
    under ``runs_dir/<label>/`` beside the other models."""
    from srpo_trl.evaluation.protocols.responses import import_verdicts, read_responses, save_run, score_responses

    info = {"benchmark": args.benchmark, "protocol": protocol}
    if args.data:
        raise ValueError(
            "--data is for generating answers; with --responses / --import-verdicts the file itself holds the items"
        )
    if args.subset and args.benchmark != "mm-safetybench":
        raise ValueError(
            "--subset tiny is MM-SafetyBench's tiny version; use --limit N for a stratified sample of other data"
        )
    if args.import_verdicts:
        if protocol == "srpo":
            raise ValueError("--import-verdicts reads a benchmark's own judge outputs: use its protocol, not srpo")
        results = import_verdicts(
            args.benchmark, args.import_verdicts, categories=_categories(args), answer_keys=args.answer_keys
        )
        if args.subset == "tiny":
            keep = _tiny_filter(args, args.import_verdicts[0])
            results = [r for r in results if keep(r.item)]
        info["imported_from"] = [str(p) for p in args.import_verdicts]
        run = RunResult(
            label=label,
            config={
                "label": label,
                "model": info,
                "judge": {"name": "imported", "protocol": protocol},
                "item_ids": [r.id for r in results],
            },
            results=results,
        )
        save_run(run, runs_dir / label)
        return run
    pairs = read_responses(
        args.benchmark,
        args.responses,
        args.images,
        categories=_categories(args),
        answer_keys=args.answer_keys,
        label=args.label,
    )
    if args.subset == "tiny":
        keep_tiny = _tiny_filter(args, args.responses)
        pairs = [p for p in pairs if keep_tiny(p[0])]
    if args.limit is not None:
        keep = {id(i) for i in stratified_sample([i for i, _ in pairs], args.limit, args.seed)}
        pairs = [p for p in pairs if id(p[0]) in keep]
    info["responses"] = str(args.responses)
    judge = make_judge(args, protocol, build_srpo_judge)
    return score_responses(
        pairs,
        judge,
        label=label,
        state_dir=runs_dir / label,
        model_info=info,
        separator=args.separator,
        progress=not args.no_progress,
    )


def _tiny_filter(args: argparse.Namespace, near: str):
    """A predicate keeping the items of MM-SafetyBench's tiny version (by scenario and question id)."""
    from srpo_trl.evaluation.loaders import find_tiny_list, load_tiny_list

    ids = load_tiny_list(args.tiny_list or find_tiny_list(near))
    return lambda item: str(item.meta.get("question_id")) in ids.get(item.category, set())


def summary_lines(report: dict) -> list[str]:
    """One line per model with the benchmark's headline numbers."""
    lines = []
    for model in report["models"]:
        bench = model.get("benchmark")
        if not bench:
            continue
        if bench["protocol"] == "siuo":
            g = bench["gen_score"]
            lines.append(
                f"{model['label']} [SIUO gen_score.py]: Safe {g['overall_avg_safetyness']}%; Effective "
                f"{g['overall_avg_helpfulness']}%; Safe & Effective {g['overall_avg_combined']}% ({g['n_items']} items)"
            )
        elif bench["protocol"] == "siuo-mcqa":
            a = bench["accuracy"]["overall"]
            lines.append(
                f"{model['label']} [SIUO mcqa-eval.py]: accuracy {a['accuracy']}% ({a['correct']}/{a['n']}; random picks {a['random_picks']})"
            )
        else:
            for scenario, keys in bench["cal_metric"].items():
                rates = ", ".join(
                    f"{k or '-'} "
                    + ("n/a" if e["attack_rate"] is None else f"{e['attack_rate']:.4f}")
                    + (f" ({e['unreadable']} unreadable verdict(s) left out)" if e["unreadable"] else "")
                    for k, e in keys.items()
                    if e["attack_rate"] is not None or e["unreadable"]
                )
                lines.append(f"{model['label']} [MM-SafetyBench evaluation.py] {scenario}: attack rate {rates}")
    return lines
