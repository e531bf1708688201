"""
Exploration speed: prefix reuse (one prefill per request, its cache copied to the samples, finished
rows leaving the batch) against plain ``model.generate`` (every sample prefilled on its own).

On IDENTICAL requests (every branch point of the same records: prompt + image + reference prefix),
with the same sampling settings, it runs ``TransformersBackend.generate`` with ``shared_prefix=True``
and ``shared_prefix=False`` at ``batch_size`` 8 and 64, on two shapes built from srpo_trl.tiny:

  vlm   the demo's exploration: its tiny Qwen2.5-VL (hidden 128, 2 layers, vocabulary 768), its
        records (a request, one 28x28 image, a 4-step reference: 4 branch points), 8 samples per
        point, at most 64 new tokens, temperature 0.5 (srpo_trl.demo.run);
  text  a tiny Qwen2 of the same size on the same requests with the image described in words.

Reported per shape and batch size: branch tokens per second (tokens generated at the branch points,
stop tokens included, per second of wall time), prefill tokens, generated tokens, and the speedup of
prefix reuse. By default the models have random weights, so rows rarely stop before max_new_tokens:
the gain measured is the prefill shared. `--warm-steps N` first warm-starts the VLM as the demo does
(N SFT steps on its paths): it then writes the demo's answers and stops, and the early exit of
finished rows counts too. The two methods sample differently (each sample its own random stream
with prefix reuse), so their generated token counts differ slightly; tokens per second compares
them fairly.

Measurement: one untimed warm-up call per configuration, then --repeats timed calls alternating the
two methods; the fastest is kept (the machine is shared: the minimum is the least disturbed run).
Both wall time and the process's CPU time are reported (on a machine shared with other jobs the
CPU time is the steadier of the two). Torch runs with --threads threads (default 1: on 2 shared
cores, two threads stall on small kernels).

Run from the repository root, niced (about 4 minutes on 2 shared CPU cores; --quick about 1 minute):

    nice -n 19 python benchmarks/exploration.py --json benchmarks/results/exploration.json
    nice -n 19 python benchmarks/exploration.py --shapes vlm --warm-steps 150 \
        --json benchmarks/results/exploration_warm.json           # about 3 minutes more
    nice -n 19 python benchmarks/exploration.py --quick

The numbers as measured are in docs/exploration.md ("What exploration costs").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _requests(shape: str, records: list[dict], processor):
    from srpo_trl.backends import GenerationRequest
    from srpo_trl.demo import task
    from srpo_trl.rows import continuation_prefix_text

    out = []
    for rec in records:
        prompt, images = rec["prompt"], rec["images"]
        if shape == "text":  # the image in words instead: the same prompt length, roughly
            o = task.OBJECTS[rec["object"]]
            prompt, images = f"The picture shows a {o.colour} {o.shape}. {prompt}", []
        for k in range(len(rec["reference"])):
            prefix = continuation_prefix_text(rec["reference"][:k])
            out.append(GenerationRequest([{"role": "user", "content": prompt}], images, prefix))
    return out


def _warm(model, processor, steps: int, seed: int):
    """The demo's warm start (SFT on its reference, skip and over-cautious paths), ``steps`` steps:
    a model that writes the demo's 4-step answers and stops, as the demo explores with."""
    import tempfile

    from srpo_trl.demo.run import Budget, build_data, warm_start

    with tempfile.TemporaryDirectory() as tmp:
        budget = Budget(warm_steps=steps)
        data = build_data(Path(tmp), budget, seed, "test", quick=False, progress=False)
        summary = warm_start(model, processor, data["warm_rows"], budget, Path(tmp), seed, progress=False)
    model.__dict__.pop("forward", None)  # the trainer's wrapper (see srpo_trl.demo.run.clone_model)
    print(f"warm start: {steps} steps in {summary['seconds']} s", flush=True)
    return model


def _build(shape: str, seed: int, warm_steps: int = 0):
    from srpo_trl.demo.run import build_model
    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm

    model, processor = build_model(seed, hidden_size=128, num_hidden_layers=2, vocab_size=768)
    if shape == "vlm":
        return (_warm(model, processor, warm_steps, seed) if warm_steps else model), processor
    tok = processor.tokenizer if hasattr(processor, "tokenizer") else build_tokenizer()
    return tiny_causal_lm(tok, seed=seed, hidden_size=128, num_hidden_layers=2), tok


def _run(backend, requests, args) -> dict:
    from srpo_trl import cost

    with cost.track() as spent:
        start, cpu = time.perf_counter(), time.process_time()
        backend.generate(
            requests,
            num_samples=args.num_samples,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=0,
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    c = spent.as_dict()
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "prefill_tokens": c["prefill_tokens"],
        "generated_tokens": c["generated_tokens"],
        "prefills": c["requests"],
        "branch_tokens_per_s": round(c["generated_tokens"] / seconds, 1),
        "branch_tokens_per_cpu_s": round(c["generated_tokens"] / cpu_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="vlm,text")
    p.add_argument("--batch-sizes", default="8,64")
    p.add_argument("--records", type=int, default=8, help="demo records (4 branch points each)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warm-steps",
        type=int,
        default=0,
        help="warm-start the VLM as the demo does, this many steps (default 0: random weights, rows rarely stop)",
    )
    p.add_argument("--quick", action="store_true", help="4 records, 32 new tokens, 1 repeat")
    p.add_argument("--json", default=None, help="write the raw results here")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.max_new_tokens, args.repeats = 4, 32, 1

    import torch

    from srpo_trl.backends import TransformersBackend
    from srpo_trl.demo import task

    torch.set_num_threads(args.threads)
    fit, _ = task.split_combinations()
    records = task.make_records(fit[: args.records], renders=1, seed=args.seed)
    results = []
    for shape in args.shapes.split(","):
        model, processor = _build(shape, args.seed, args.warm_steps if shape == "vlm" else 0)
        requests = _requests(shape, records, processor)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            backends = {
                "plain_generate": TransformersBackend(
                    model, processor, batch_size, show_progress=False, shared_prefix=False
                ),
                "prefix_reuse": TransformersBackend(model, processor, batch_size, show_progress=False),
            }
            for backend in backends.values():  # warm-up (not timed): kernels, allocator, caches
                backend.generate(requests[:2], num_samples=2, temperature=args.temperature, max_new_tokens=4, seed=0)
            runs = {name: [] for name in backends}
            for _ in range(args.repeats):
                for name, backend in backends.items():
                    runs[name].append(_run(backend, requests, args))
            best = {name: min(r, key=lambda x: x["seconds"]) for name, r in runs.items()}
            speedup = best["prefix_reuse"]["branch_tokens_per_s"] / best["plain_generate"]["branch_tokens_per_s"]
            cpu = {name: max(x["branch_tokens_per_cpu_s"] for x in r) for name, r in runs.items()}
            speedup_cpu = cpu["prefix_reuse"] / cpu["plain_generate"]
            row = {
                "shape": shape,
                "batch_size": batch_size,
                "requests": len(requests),
                "num_samples": args.num_samples,
                "max_new_tokens": args.max_new_tokens,
                "best": best,
                "runs": runs,
                "speedup": round(speedup, 2),
                "speedup_cpu": round(speedup_cpu, 2),
            }
            results.append(row)
            print(
                f"{shape:>4} batch {batch_size:>2}: plain generate {best['plain_generate']['branch_tokens_per_s']:>7.1f} "
                f"tok/s ({best['plain_generate']['prefill_tokens']:>6} prefill tokens), prefix reuse "
                f"{best['prefix_reuse']['branch_tokens_per_s']:>7.1f} tok/s ({best['prefix_reuse']['prefill_tokens']:>5} "
                f"prefill tokens): {speedup:.2f}x (CPU time: {speedup_cpu:.2f}x)",
                flush=True,
            )
    meta = {
        "benchmark": "exploration",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "device": "cpu",
        "torch": torch.__version__,
        "records": args.records,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "warm_steps": args.warm_steps,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
