"""Score responses that already exist, and import verdicts computed elsewhere. No model is loaded.

``--responses FILE`` (:func:`read_responses` + :func:`score_responses`) reads, per benchmark:

- siuo: SIUO's results file ``siuo_gen-{model}.json``: ``siuo_gen.json``'s items with a
  ``responses`` list added (SIUO's README format; gpt-eval.py judges every response);
- siuo-mcqa: ``siuo_mcqa-{model}.json``: the MCQA items with ``response_mcqa`` added (the
  format mcqa-eval.py reads);
- mm-safetybench: the ``questions_with_answers`` folder (or one ``<scenario>.json``) that
  MM-SafetyBench's evaluation.py reads: the question files with ``"ans": {key: {"text": answer}}``
  per question; every key is one unit of its metric (a key named SD / SD_TYPO / TYPO / TEXT is
  that image variant);
- a run of this project (``runs/<label>/results.jsonl`` or a ``report.json``), with any
  ``--benchmark`` matching its items (records: any), to judge its answers again, e.g. under
  another protocol or judge.

``--import-verdicts FILE...`` (:func:`import_verdicts`) reads the judges' outputs:

- siuo: ``siuo_gen-{model}-gpteval-safe-pro.json`` and ``...-gpteval-effective-pro.json`` (one
  or both, or gen_score.py's merged file): per item the scores ``safety_gpt`` and
  ``effectiveness_gpt`` (also read: ``effective_gpt``, which gen_score.py's merge_json expects,
  and the merged names ``safetyness`` / ``helpfulness``); where a file holds only the judge's
  texts (``safety_evaluation`` / ``effectiveness_evaluation``) they are extracted with SIUO's
  patterns. Items are merged by ``question_id`` as merge_json does.
- mm-safetybench: the answer files after evaluation.py's perform_eval: ``is_safe(gpt)`` in every
  answer (an answer without it stays in the denominator, as in cal_metric).
- siuo-mcqa: mcqa-eval.py's ``siuo_mcqa-{model}-pro.json`` (``pred_ans``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from srpo_trl.evaluation import loaders
from srpo_trl.evaluation.loaders import LoadError, _read_json, check_names, mmsb_item, siuo_item
from srpo_trl.evaluation.protocols import mm_safetybench, siuo
from srpo_trl.evaluation.schema import EvalItem, ItemResult, RunResult, Verdict


SIUO_SAFETY_KEYS = ("safety_gpt", "safetyness")
SIUO_EFFECTIVE_KEYS = ("effectiveness_gpt", "effective_gpt", "helpfulness")


def _str_list(path: Path, label: str, obj: dict, name: str) -> list[str]:
    value = obj.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        got = "is missing" if value is None else f"must be a list of strings, got {type(value).__name__}"
        raise LoadError(path, label, got, name)
    return value


def _siuo_responses(path: Path, image_dir, check_images, categories, mcqa: bool) -> list[tuple[EvalItem, list[str]]]:
    data = loaders._siuo_list(path, "results")
    categories = check_names("SIUO category", categories, siuo.CATEGORIES)
    image_root = Path(image_dir) if image_dir is not None else None
    field = "response_mcqa" if mcqa else "responses"
    out, seen = [], set()
    for index, obj in enumerate(data):
        item = siuo_item(path, index, obj, image_root, check_images, mcqa=mcqa)
        label = item.source.split("item ", 1)[1]
        if item.id in seen:
            raise LoadError(path, label, f"duplicate question_id {item.id}", "question_id")
        seen.add(item.id)
        if field not in obj:
            raise LoadError(
                path,
                label,
                f"is missing: this looks like the question file; score-only reads SIUO's results "
                f"file (the items with '{field}' added, siuo_{'mcqa' if mcqa else 'gen'}-{{model}}.json)",
                field,
            )
        if mcqa:
            if not isinstance(obj[field], str):
                raise LoadError(path, label, f"must be a string, got {type(obj[field]).__name__}", field)
            samples = [obj[field]]
        else:
            samples = _str_list(path, label, obj, field)
        if categories is None or item.category in categories:
            out.append((item, samples))
    return out


def _mmsb_answers(path: Path, scenarios=None, answer_keys=None) -> list[tuple[Path, str, str, dict, str]]:
    """(file, scenario, question id, question object, answer key) for every answer in the files."""
    files = loaders._mmsb_files(path)
    scenarios = check_names("scenario", scenarios, [f.stem for f in files])
    rows, keys_seen = [], []
    for file in files:
        if scenarios and file.stem not in scenarios:
            continue
        data = _read_json(file)
        if not isinstance(data, dict):
            raise LoadError(
                file,
                None,
                f"an MM-SafetyBench answer file is a JSON object keyed by question id, got {type(data).__name__}",
            )
        file_keys = None
        for qid, obj in data.items():
            ans = obj.get("ans") if isinstance(obj, dict) else None
            if not isinstance(ans, dict) or not ans:
                raise LoadError(
                    file,
                    f"'{qid}'",
                    "is missing or empty: evaluation.py reads the answers from "
                    '"ans": {key: {"text": answer}} (this looks like a question file)',
                    "ans",
                )
            if file_keys is None:
                file_keys = list(ans)  # cal_metric takes the keys of question "0"'s answers
            missing = [k for k in file_keys if k not in ans]
            if missing:
                raise LoadError(
                    file, f"'{qid}'", f"has no answer for key(s) {missing} (evaluation.py would stop here)", "ans"
                )
            for key in file_keys:
                if key not in keys_seen:
                    keys_seen.append(key)
                rows.append((file, file.stem, qid, obj, key))
    if answer_keys is not None:
        wanted = check_names("answer key", answer_keys, keys_seen)
        rows = [r for r in rows if r[4] in wanted]
    return rows


def _mmsb_unit(file: Path, scenario: str, qid: str, obj: dict, key: str, image_dir) -> EvalItem:
    variant = key if key in loaders.MMSB_ALL_VARIANTS else "TEXT"
    item = mmsb_item(file, scenario, qid, obj, variant, Path(image_dir) if image_dir else None, bool(image_dir))
    if variant == "TEXT" and key != "TEXT" or not image_dir:
        item.images = []
    item.id = f"{scenario}/{key}/{qid}"
    item.meta["answer_key"] = key
    if key not in loaders.MMSB_ALL_VARIANTS:
        item.meta["variant"] = None
    return item


def _answer_text(file: Path, qid: str, obj: dict, key: str) -> dict:
    entry = obj["ans"][key]
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
        raise LoadError(file, f"'{qid}'", f'must be {{"text": answer string}}, got {entry!r:.80}', f"ans.{key}")
    return entry


def _run_file(path: Path, label: str | None) -> RunResult:
    from srpo_trl.evaluation.report import load_report, runs_from_report
    from srpo_trl.evaluation.runner import load_state

    if path.suffix == ".jsonl":
        return load_state(path)
    runs = runs_from_report(load_report(path))
    if len(runs) == 1 and label is None:
        return runs[0]
    chosen = [r for r in runs if r.label == label]
    if not chosen:
        raise LoadError(path, None, f"holds the models {[r.label for r in runs]}; pick one with --label")
    return chosen[0]


def read_responses(
    benchmark: str,
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    categories: Sequence[str] | None = None,
    answer_keys: Sequence[str] | None = None,
    label: str | None = None,
) -> list[tuple[EvalItem, list[str]]]:
    """(item, its existing responses) from a results file (see the module doc). Images are
    checked only when ``image_dir`` is given (SIUO's judge sees them: pass it for parity)."""
    path = Path(path)
    if not path.exists():
        raise LoadError(path, None, "not found; check --responses")
    if benchmark == "records" or path.suffix == ".jsonl" or path.name == "report.json":
        run = _run_file(path, label)
        pairs = [(r.item, list(r.samples)) for r in run.results]
        other = sorted({str(i.meta.get("benchmark")) for i, _ in pairs} - {benchmark})
        if benchmark != "records" and other:
            raise LoadError(
                path, None, f"is a run on {', '.join(other)} items, not {benchmark}; pass --benchmark {other[0]}"
            )
    elif benchmark in ("siuo", "siuo-mcqa"):
        pairs = _siuo_responses(path, image_dir, image_dir is not None, categories, benchmark == "siuo-mcqa")
    elif benchmark == "mm-safetybench":
        pairs = []
        for file, scenario, qid, obj, key in _mmsb_answers(path, categories, answer_keys):
            pairs.append(
                (_mmsb_unit(file, scenario, qid, obj, key, image_dir), [_answer_text(file, qid, obj, key)["text"]])
            )
    else:
        raise ValueError(
            f"unknown benchmark {benchmark!r} for --responses; choose from {', '.join(loaders.BENCHMARKS)}"
        )
    if not pairs:
        raise LoadError(path, None, "holds no responses (after the --categories / --scenarios filter)")
    return pairs


def score_responses(
    pairs: Sequence[tuple[EvalItem, list[str]]],
    judge: Any,
    *,
    label: str,
    state_dir: str | os.PathLike | None = None,
    model_info: dict[str, Any] | None = None,
    separator: str = "\n",
    progress: bool = True,
) -> RunResult:
    """Judge existing responses (no generation), resumable in ``state_dir/results.jsonl`` like
    :func:`srpo_trl.evaluation.runner.evaluate`."""
    from tqdm.auto import tqdm

    from srpo_trl.evaluation.runner import STATE_FILE, _State, items_fingerprint, split_steps

    items = [item for item, _ in pairs]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"item ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})[:10]}")
    settings = {
        "label": label,
        "model": model_info or {},
        "judge": judge.describe(),
        "generation": {"score_only": True, "separator": separator},
        "items": items_fingerprint(items),
        "item_ids": ids,
    }
    state = _State(Path(state_dir) / STATE_FILE, settings) if state_dir is not None else None
    done: dict[str, ItemResult] = dict(state.done) if state else {}
    for item, samples in tqdm(pairs, desc=f"score {label}", unit="item", disable=not progress):
        if item.id in done:
            continue
        steps = [split_steps(s, separator) for s in samples]
        verdicts = judge.judge(item, list(samples), steps)
        if len(verdicts) != len(samples):
            raise RuntimeError(
                f"item {item.id}: the judge returned {len(verdicts)} verdicts for {len(samples)} samples"
            )
        result = ItemResult(item=item, samples=list(samples), steps=steps, verdicts=verdicts)
        if state:
            state.add_item(result)
        done[item.id] = result
    return RunResult(label=label, config=settings, results=[done[i] for i in ids], complete=True)


# ----------------------------------------------------------------------------------------------
# Imported verdicts
# ----------------------------------------------------------------------------------------------


def _scores(path: Path, label: str, obj: dict, keys: Sequence[str], text_key: str, extract) -> list[int] | None:
    for key in keys:
        if key in obj:
            value = obj[key]
            if not isinstance(value, list) or not all(type(v) is int and v in (-1, 0, 1) for v in value):
                raise LoadError(path, label, f"must be a list of SIUO scores (1, 0 or -1), got {value!r:.80}", key)
            return value
    if text_key in obj:
        return [extract(unicode_nfkc(t)) for t in _str_list(path, label, obj, text_key)]
    return None


def unicode_nfkc(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKC", text)


def _import_siuo(paths: Sequence[Path]) -> list[ItemResult]:
    merged: dict[int, dict[str, Any]] = {}
    for path in paths:
        data = loaders._siuo_list(path, "gpt-eval output")
        for index, obj in enumerate(data):
            item = siuo_item(path, index, obj, None, False)
            label = item.source.split("item ", 1)[1]
            safety = _scores(path, label, obj, SIUO_SAFETY_KEYS, "safety_evaluation", siuo.extract_safety)
            effective = _scores(
                path, label, obj, SIUO_EFFECTIVE_KEYS, "effectiveness_evaluation", siuo.extract_effectiveness
            )
            if safety is None and effective is None:
                raise LoadError(
                    path,
                    label,
                    "holds no verdicts: expected safety_gpt / effectiveness_gpt (gpt-eval.py's "
                    "-pro.json) or safety_evaluation / effectiveness_evaluation",
                    "safety_gpt",
                )
            entry = merged.setdefault(
                item.meta["question_id"], {"item": item, "responses": obj.get("responses") or []}
            )
            for name, scores, texts in (
                ("safety", safety, "safety_evaluation"),
                ("effectiveness", effective, "effectiveness_evaluation"),
            ):
                if scores is None:
                    continue
                if name in entry:
                    raise LoadError(
                        path, label, f"{name} verdicts for this question_id were already read from another file", name
                    )
                entry[name] = scores
                entry[name + "_texts"] = obj.get(texts) or []
    results = []
    for entry in merged.values():
        safety, effective = entry.get("safety", []), entry.get("effectiveness", [])
        n = max(len(safety), len(effective))
        responses = list(entry["responses"]) + [""] * max(0, n - len(entry["responses"]))
        verdicts = []
        for i in range(n):
            scores = {}
            if i < len(safety):
                scores["safety"] = safety[i]
            if i < len(effective):
                scores["effectiveness"] = effective[i]
            texts = {
                k: entry[k + "_texts"][i] for k in ("safety", "effectiveness") if i < len(entry.get(k + "_texts", []))
            }
            verdicts.append(
                Verdict(
                    safe=None if scores.get("safety", -1) == -1 else scores["safety"] == 1,
                    effective=None if scores.get("effectiveness", -1) == -1 else scores["effectiveness"] == 1,
                    judge="siuo (imported)",
                    replies=texts,
                    scores=scores,
                )
            )
        results.append(
            ItemResult(item=entry["item"], samples=responses[:n], steps=[[] for _ in range(n)], verdicts=verdicts)
        )
    return results


def _import_mmsb(paths: Sequence[Path], scenarios=None, answer_keys=None) -> list[ItemResult]:
    results = []
    for path in paths:
        for file, scenario, qid, obj, key in _mmsb_answers(path, scenarios, answer_keys):
            entry = _answer_text(file, qid, obj, key)
            verdict = Verdict(safe=None, judge="mm-safetybench (imported)")
            if mm_safetybench.VERDICT_FIELD in entry:
                reply = entry[mm_safetybench.VERDICT_FIELD]
                if not isinstance(reply, str):
                    raise LoadError(
                        file,
                        f"'{qid}'",
                        f"must be the judge's reply (a string), got {type(reply).__name__}",
                        f"ans.{key}.{mm_safetybench.VERDICT_FIELD}",
                    )
                verdict = Verdict(
                    safe=mm_safetybench.read_verdict(reply),
                    judge="mm-safetybench (imported)",
                    replies={"safety": reply},
                    scores={mm_safetybench.VERDICT_FIELD: reply},
                )
            item = _mmsb_unit(file, scenario, qid, obj, key, None)
            results.append(ItemResult(item=item, samples=[entry["text"]], steps=[[]], verdicts=[verdict]))
    return results


def _import_mcqa(paths: Sequence[Path]) -> list[ItemResult]:
    results = []
    for path in paths:
        for index, obj in enumerate(loaders._siuo_list(path, "mcqa-eval output")):
            item = siuo_item(path, index, obj, None, False, mcqa=True)
            label = item.source.split("item ", 1)[1]
            pred = obj.get("pred_ans")
            if pred not in ("A", "B", "C", "D"):
                raise LoadError(
                    path,
                    label,
                    f"must be the extracted option letter A-D (mcqa-eval.py's -pro.json), got {pred!r}",
                    "pred_ans",
                )
            scores = {"pred_ans": pred, "score": int(pred == item.meta["correct_option"]), "random_pick": None}
            sample = obj.get("response_mcqa") if isinstance(obj.get("response_mcqa"), str) else ""
            results.append(
                ItemResult(
                    item=item,
                    samples=[sample],
                    steps=[[]],
                    verdicts=[Verdict(safe=None, judge="siuo-mcqa (imported)", scores=scores)],
                )
            )
    return results


def import_verdicts(
    benchmark: str, paths: Sequence[str | os.PathLike], *, categories=None, answer_keys=None
) -> list[ItemResult]:
    """Item results from the benchmark's own judge outputs (see the module doc)."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise LoadError(p, None, "not found; check --import-verdicts")
    if benchmark == "siuo":
        results = _import_siuo(paths)
        if categories is not None:
            keep = check_names("SIUO category", categories, siuo.CATEGORIES)
            results = [r for r in results if r.category in keep]
    elif benchmark == "mm-safetybench":
        results = _import_mmsb(paths, categories, answer_keys)
    elif benchmark == "siuo-mcqa":
        results = _import_mcqa(paths)
    else:
        raise ValueError(f"--import-verdicts reads siuo, siuo-mcqa or mm-safetybench outputs, not {benchmark!r}")
    if not results:
        raise LoadError(paths[0], None, "holds no verdicts")
    return results


def save_run(run: RunResult, state_dir: str | os.PathLike) -> Path:
    """Write ``run`` as a state file (``state_dir/results.jsonl``) so reports list it beside others."""
    from srpo_trl.evaluation.runner import STATE_FILE, _State

    path = Path(state_dir) / STATE_FILE
    if path.exists():
        path.unlink()  # an import is recomputed from its files, never resumed
    state = _State(path, run.config)
    for result in run.results:
        state.add_item(result)
    return path


def compare_eval_results(cal: dict[str, Any], eval_dir: str | os.PathLike) -> list[str]:
    """Differences between our cal_metric and evaluation.py's ``eval_results/<scenario>.json`` files."""
    problems = []
    for scenario, keys in cal.items():
        file = Path(eval_dir) / f"{scenario}.json"
        if not file.is_file():
            problems.append(f"{file}: not found")
            continue
        theirs = json.loads(file.read_text(encoding="utf-8"))
        for key, ours in keys.items():
            other = theirs.get(key)
            if other is None:
                problems.append(f"{file}: no key {key!r}")
                continue
            for name in ("safe", "unsafe", "attack_rate"):
                if other.get(name) != ours[name]:
                    problems.append(f"{scenario}/{key} {name}: ours {ours[name]}, evaluation.py {other.get(name)}")
    return problems
