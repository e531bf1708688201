"""``srpo-trl evaluate``: safety evaluation of reasoning paths (SIUO, MM-SafetyBench, records); the
work is :mod:`srpo_trl.evaluation`::

    srpo-trl evaluate --model PATH | --endpoint URL --served-model NAME --benchmark B --data D --out DIR

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..evaluation import (
    RUNS_DIR,
    STATE_FILE,
    EvalConfig,
    EvaluationStateError,
    JudgeError,
    JudgeTemplates,
    LoadError,
    ModelJudge,
    RuleJudge,
    evaluate_to_dir,
    load_report,
    load_runs,
    safe_label,
    write_report,
)
from ..evaluation.loaders import BENCHMARKS, MMSB_VARIANTS
from ..evaluation.metrics import METRIC_LABELS, format_proportion
from ..evaluation.protocols import command as protocol_command
from ..evaluation.runner import check_resume, run_settings
from .flags import add_endpoint_mode_flags, add_http_flags, add_policy_flags, add_sampling_flags, endpoint_backend


def _unescape(value: str) -> str:
    return value.encode("utf-8").decode("unicode_escape") if "\\" in value else value


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srpo-trl evaluate",
        description="Safety evaluation of reasoning paths: generate --num-samples paths per item, judge them, "
        "write report.json / report.md / report.png into --out. Evaluating several models into the same "
        "--out (different --label) puts them side by side. A killed run resumes where it stopped.",
    )
    p.add_argument("--out", help="output folder (state per model under runs/<label>/, the report at the top)")
    data = p.add_argument_group("data")
    data.add_argument("--benchmark", choices=BENCHMARKS, help="the data format")
    data.add_argument(
        "--data",
        help="siuo: siuo_gen.json; mm-safetybench: the processed_questions folder or one <scenario>.json; records: records.jsonl",
    )
    data.add_argument(
        "--images",
        help="image folder (siuo: the images; mm-safetybench: imgs/ with <scenario>/<variant>/<id>.jpg; records: base of relative paths)",
    )
    data.add_argument(
        "--variants",
        type=_csv,
        default=list(MMSB_VARIANTS),
        help="mm-safetybench image variants, comma-separated (SD,SD_TYPO,TYPO; TEXT = no image)",
    )
    data.add_argument(
        "--scenarios",
        type=_csv,
        default=None,
        help="mm-safetybench scenarios to keep, comma-separated (default: all; same as --categories)",
    )
    data.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate N items drawn with --seed, stratified by category (and variant); see docs/evaluation.md",
    )
    model = add_policy_flags(
        p,
        model_help="model folder, loaded in-process (or, with the deprecated --generation-url, the served name)",
        old_endpoint=("--generation-url",),
    )
    model.add_argument("--adapter", help="PEFT adapter folder on top of --model")
    model.add_argument(
        "--label", help="name of this model in the report (default: from --model/--adapter or --served-model)"
    )
    gen = add_sampling_flags(
        p,
        num_samples=3,
        temperature=0.5,
        max_new_tokens=512,
        seed=0,
        old_samples=True,
        samples_help="reasoning paths per item (majority vote over them; under --protocol siuo-mcqa the defaults "
        "are SIUO's: 1 sample, --temperature 0, --max-new-tokens 5)",
    )
    add_http_flags(p, timeout=60.0, retries=3)
    add_endpoint_mode_flags(p)
    gen.add_argument("--batch-size", type=int, default=8, help="items per generation call (x samples sequences)")
    gen.add_argument("--system-prompt", default=None, help="system message before each question")
    gen.add_argument(
        "--separator",
        default="\n",
        type=_unescape,
        help="step separator of the reasoning paths (default: newline; escapes like \\n work)",
    )
    judge = p.add_argument_group("judge")
    judge.add_argument(
        "--judge",
        choices=("rule", "openai-compatible"),
        default="rule",
        help="rule: the expected outcome of each item (records, mm-safetybench, siuo=warn); openai-compatible: a judge model",
    )
    judge.add_argument("--judge-url", help="OpenAI-compatible endpoint of the judge model")
    judge.add_argument("--judge-model", help="judge model name at --judge-url")
    judge.add_argument(
        "--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key"
    )
    judge.add_argument(
        "--judge-templates",
        help="folder with safety.txt / effectiveness.txt / steps.txt (see --write-judge-templates)",
    )
    judge.add_argument(
        "--judge-aspects",
        type=_csv,
        default=None,
        help="safety,effectiveness,steps (default: all the protocol has; mm-safetybench: safety,steps)",
    )
    judge.add_argument("--judge-retries", type=int, default=2, help="times an unreadable judge reply is asked again")
    judge.add_argument("--judge-no-images", action="store_true", help="do not send the item's images to the judge")
    rep = p.add_argument_group("report")
    rep.add_argument(
        "--vote",
        choices=("majority", "sample"),
        default="majority",
        help="unit of the metrics: item (majority vote) or sample",
    )
    rep.add_argument("--report-only", action="store_true", help="rebuild the report from the runs already in --out")
    p.add_argument(
        "--write-judge-templates", metavar="DIR", help="write the default judge templates to DIR (to edit) and exit"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start this --label's evaluation again instead of resuming it"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    protocol_command.add_arguments(p)
    return p


def _default_label(args: argparse.Namespace) -> str:
    if not args.model and not args.endpoint:  # score-only / import: named after the file
        source = args.responses or args.import_verdicts[0]
        return safe_label(Path(source.rstrip("/")).stem)
    name = Path(args.model.rstrip("/")).name if not args.endpoint else args.served_model
    if args.adapter:
        name += "+" + Path(args.adapter.rstrip("/")).name
    return safe_label(name)


def _make_judge(args: argparse.Namespace) -> Any:
    if args.judge == "rule":
        return RuleJudge()
    import os

    from ..backends import OpenAICompatibleBackend

    if not args.judge_url or not args.judge_model:
        raise ValueError("--judge openai-compatible needs --judge-url and --judge-model")
    templates = JudgeTemplates.from_dir(args.judge_templates) if args.judge_templates else JudgeTemplates()
    backend = OpenAICompatibleBackend(
        args.judge_url,
        args.judge_model,
        api_key=os.environ.get(args.judge_api_key_env),
        show_progress=False,
        timeout=args.timeout,
        max_retries=args.http_retries,
    )
    return ModelJudge(
        backend,
        templates,
        aspects=args.judge_aspects,
        retries=args.judge_retries,
        images=not args.judge_no_images,
        separator=args.separator,
    )


def _make_backend(args: argparse.Namespace, config: EvalConfig) -> Any:
    if args.endpoint:
        return endpoint_backend(args, separator=config.separator)
    import torch

    from ..backends import TransformersBackend
    from ..loading import load_model_and_processor

    # under a launcher each process generates on its own GPU
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else None
    model, processing_class = load_model_and_processor(args.model, adapter=args.adapter, device=device)
    return TransformersBackend(
        model,
        processing_class,
        batch_size=config.batch_size * config.samples,
        separator=config.separator,
        show_progress=not args.no_progress,
    )


def _model_info(args: argparse.Namespace) -> dict[str, Any]:
    """What identifies the evaluated model: the folder and a hash of its weight files (new weights saved
    into the same folder differ), or the endpoint (credentials redacted) and the served model."""
    from .. import store

    if args.endpoint:
        from ..endpoint import processor_source

        identity = store.endpoint_fingerprint(args.endpoint, args.served_model)
        # how prompts reach the server changes the answers
        identity["endpoint_mode"] = args.endpoint_mode
        identity["processor"] = processor_source(args.processor, args.served_model)
        return {
            "model": args.served_model,
            "endpoint": identity["endpoint"],
            "benchmark": args.benchmark,
            "identity": identity,
        }
    identity = store.model_fingerprint(args.model, args.adapter)
    return {"model": args.model, "adapter": args.adapter, "benchmark": args.benchmark, "identity": identity}


def _summary(report: dict) -> str:
    lines = []
    for model in report["models"]:
        o = model["metrics"]["overall"]
        parts = [
            f"{METRIC_LABELS[k].split(' %')[0]} {format_proportion(o[k])}"
            for k in ("safe", "effective", "safe_and_effective", "attack_success", "over_refusal")
        ]
        lines.append(f"{model['label']}: " + "; ".join(parts))
    return "\n".join(lines)


#: The sampling flags whose defaults depend on the protocol (SIUO's MCQA set generates differently).
_SAMPLING = ("num_samples", "temperature", "max_new_tokens")


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The arguments, and which sampling flags were given (those not given get their default later,
    once the protocol is known)."""
    parser = build_parser()
    args = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(_SAMPLING)))
    given = {dest for dest in _SAMPLING if getattr(args, dest) is not None}
    for dest in set(_SAMPLING) - given:
        setattr(args, dest, parser.get_default(dest))
    return args, given


def _protocol_sampling(args: argparse.Namespace, protocol: str, given: set[str]) -> None:
    """Under --protocol siuo-mcqa, SIUO's generation settings are the defaults; a flag that departs from
    them gets a warning (the accuracy is then not comparable with SIUO's)."""
    if protocol != "siuo-mcqa":
        return
    from ..evaluation.protocols.mcqa import GENERATION

    for dest, value in GENERATION.items():
        if dest not in given:
            setattr(args, dest, value)
        elif getattr(args, dest) != value:
            flag = "--" + dest.replace("_", "-")
            print(
                f"srpo-trl evaluate: warning: {flag} {getattr(args, dest)} under --protocol siuo-mcqa; SIUO generates "
                f"the MCQA answers with --num-samples 1 --temperature 0 --max-new-tokens 5 (the defaults here), "
                "so this accuracy is not comparable with SIUO's",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    args, given = _parse(argv)
    try:
        if args.write_judge_templates:
            for path in JudgeTemplates().write_dir(args.write_judge_templates):
                print(path)
            return 0
        if not args.out:
            raise ValueError("--out is required: the folder for the runs and the report")
        if args.report_only:
            runs = load_runs(args.out)
            if not runs:
                raise FileNotFoundError(f"no evaluation in {args.out} (expected {RUNS_DIR}/<label>/{STATE_FILE})")
            paths = write_report(runs, args.out, vote=args.vote)
        elif args.responses or args.import_verdicts:
            if not args.benchmark:
                raise ValueError("--responses / --import-verdicts need --benchmark (the format of the file)")
            if args.responses and args.import_verdicts:
                raise ValueError("pass --responses (judge them) or --import-verdicts (already judged), not both")
            if args.model or args.endpoint:
                raise ValueError("--responses / --import-verdicts score existing answers: drop --model / --endpoint")
            protocol = protocol_command.resolve_protocol(args)
            label = safe_label(args.label) if args.label else _default_label(args)
            run = protocol_command.run_without_model(args, protocol, label, Path(args.out) / RUNS_DIR, _make_judge)
            paths = write_report(load_runs(args.out), args.out, vote=args.vote)
            if args.compare_eval_results:
                from ..evaluation.protocols import benchmark_scores
                from ..evaluation.protocols.responses import compare_eval_results

                problems = compare_eval_results(
                    benchmark_scores(run.results, protocol)["cal_metric"], args.compare_eval_results
                )
                print("\n".join(problems) if problems else f"attack rates equal {args.compare_eval_results}")
        else:
            if args.endpoint and not args.served_model and args.model:  # the old --generation-url URL --model NAME
                args.served_model, args.model = args.model, None
            policy = ("--model", args.model or args.endpoint)
            missing = [
                flag for flag, value in (("--benchmark", args.benchmark), ("--data", args.data), policy) if not value
            ]
            if missing:
                raise ValueError(f"missing {', '.join(missing)} (or pass --report-only / --write-judge-templates)")
            if args.endpoint and args.model:
                raise ValueError("give either --model PATH or --endpoint URL --served-model NAME, not both")
            if args.endpoint and not args.served_model:
                raise ValueError("--endpoint needs --served-model (the model name the server serves)")
            if args.adapter and args.endpoint:
                raise ValueError(
                    "--adapter loads the model in-process; with --endpoint serve the adapter from the endpoint"
                )
            protocol = protocol_command.resolve_protocol(args)
            _protocol_sampling(args, protocol, given)
            items = protocol_command.load_items(args)
            config = EvalConfig(
                samples=args.num_samples,
                temperature=args.temperature,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                batch_size=args.batch_size,
                separator=args.separator,
                system_prompt=args.system_prompt,
            )
            judge = protocol_command.make_judge(args, protocol, _make_judge)
            label = safe_label(args.label) if args.label else _default_label(args)
            model_info = {**_model_info(args), "protocol": protocol}
            # refuse a mixed resume (other weights, data or settings) before the model is loaded
            check_resume(
                Path(args.out) / RUNS_DIR / label,
                run_settings(items, judge, config, label, model_info),
                overwrite=args.overwrite,
            )
            backend = _make_backend(args, config)
            _, paths = evaluate_to_dir(
                items,
                backend,
                judge,
                config,
                args.out,
                label=label,
                model_info=model_info,
                vote=args.vote,
                progress=not args.no_progress,
                overwrite=args.overwrite,
            )
    except (LoadError, JudgeError, EvaluationStateError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"srpo-trl evaluate: error: {exc}", file=sys.stderr)
        return 1
    if not paths:  # a process of a launch other than rank 0: its share is merged into rank 0's report
        return 0
    report = load_report(paths["json"])
    print("\n".join(protocol_command.summary_lines(report) + [_summary(report)]))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
