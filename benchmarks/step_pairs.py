"""
Prefix sharing benchmark: what SRPO's packed tree forward saves on step-pair data.

On IDENTICAL step-pair rows (the same pairs, in the same batches of rows, for the same number of
optimizer steps) it trains each configuration in a fresh subprocess:

  srpo_packed      SRPOTrainer, prefix_sharing=True (the default): one token tree per question
  srpo_unpacked    SRPOTrainer, prefix_sharing=False: 3 sequences per row (chosen, rejected, reference)
  srpo_packed_ref  SRPOTrainer with prefix sharing and align_loss="sigmoid" (Step-DPO) and a reference
                   model: like DPOTrainer it runs a no-grad reference forward every step (on the trees)
  dpo_nll          the baseline: TRL's DPOTrainer in its standard setup, WITH a reference model (its
                   no-grad reference forward is part of its cost), on the same pairs with the reasoning
                   prefix folded into the prompt, plus a separate NLL pass (forward + backward of the
                   reference paths, as a user adds for SRPO's anchor term L_ref: each question's path
                   once per batch, weighted by its rows, so the objective matches SRPO's)

on two models built from srpo_trl.tiny: a tiny-but-proportioned VLM (Qwen2.5-VL architecture; a
448x448 image per question = 256 merged image tokens; the vision tower costs about half of what the
decoder spends on the image's 256 tokens) and a Qwen2 text model (~120-token prompts). Each question
has 4-8 branch points (one row each) and steps of 30-60 tokens; a batch is 12 rows = 2 whole questions.

Printed per model, as ratios to DPOTrainer + NLL: tokens through the model (every forward, padding
included), median step time, peak memory and images encoded, next to the ideal (each unique token
once), and where a step's time goes. Absolute numbers go to the JSON file (--json).

Measurement: warm-up steps are not timed; a step is the wall time between the ends of two optimizer
steps (collate + forwards + backward + optimizer step); the median over the timed steps is reported.
Memory on CPU: growth of the resident set size during `train()` (sampled every 2 ms from
/proc/self/statm in the child, minus the RSS just before `train()`); on CUDA:
torch.cuda.max_memory_allocated minus what was allocated before `train()`. Each child runs with one
torch thread by default (--threads): on a shared 2-core machine, two threads stall on every small
kernel whenever another process holds a core, which distorts the ratios.

Run from the repository root (about 6 minutes on 2 CPU cores; the smoke run about 1.5 minutes):

    python benchmarks/step_pairs.py
    python benchmarks/step_pairs.py --quick

On a GPU every configuration runs on CUDA. `--preset qwen2_5_vl_7b` gives both models Qwen2.5-VL-7B's
text-decoder shape (hidden 3584, 28 heads, 4 KV heads, intermediate 18944, vocabulary 152064) with
--layers layers and random weights, in bf16; `--lora` trains LoRA adapters instead of every weight.
The table then adds mean step time, model TFLOP/s, MFU against --peak-tflops and FlexAttention
compile counts (model FLOPs: see _count_tokens). benchmarks/gpu_check.sh runs the GPU preset:

    python benchmarks/step_pairs.py --preset qwen2_5_vl_7b --layers 4 --models vlm --warmup 3 --steps 5
    python benchmarks/step_pairs.py --preset qwen2_5_vl_7b --layers 4 --models vlm --lora

Per model family (--families, issue 20): packed against unpacked SRPO on every architecture prefix
sharing allows (srpo_trl.architectures), each a small random model of the family (text: its config
class at --hidden-size / --layers, sliding windows of 128 tokens; vision-language: the
srpo_trl.tiny model, its processor scaling the images down to a few tokens). It prints the
packed/unpacked step-time and token ratios per family and writes benchmarks/results/step_pairs_families.json:

    python benchmarks/step_pairs.py --families all --hidden-size 128 --layers 2 --steps 3

See docs/speed.md for what prefix sharing does and the tables as measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

CONFIGS = {
    "srpo_packed": "SRPO, prefix sharing",
    "srpo_unpacked": "SRPO, no prefix sharing",
    "srpo_packed_ref": "SRPO Step-DPO (+ref), sharing",
    "dpo_nll": "DPOTrainer (+ref model) + NLL",
}
BASELINE = "dpo_nll"
IMAGE_SIDE = 448  # 448x448 pixels -> 32x32 patches of 14 -> 16x16 = 256 merged image tokens
WINDOW_SIZE = 112  # Qwen2.5-VL's own vision window (tiny.py uses 56); see build_model
# Question sizes (branch points = rows) in pairs that fill a batch of 12 rows exactly.
QUESTION_SIZES = [4, 8, 5, 7, 6, 6, 7, 5, 8, 4, 6, 6]

# =================================================================================================
# Data: identical step pairs for every configuration
# =================================================================================================


FAMILY_WINDOW = 128  # --families: sliding window of the windowed families (GPT-OSS's own), shorter than the rows


def data_kind(kind: str) -> str:
    """ "vlm" or "text": which data a model kind (vlm, text or a family's model type) trains on."""
    if kind in ("vlm", "text"):
        return kind
    from srpo_trl.architectures import VLM_TYPES

    return "vlm" if kind in VLM_TYPES else "text"


def family_model(family: str, seed: int, hidden_size: int, num_layers: int, window: int = FAMILY_WINDOW):
    """(model, processing class) of a family on the allow-list: a text family's config class at this
    width and depth (sliding windows cut to `window`, at most 4 experts), or srpo_trl.tiny's model of a
    vision-language family with this text width and depth. Random weights, fp32."""
    from transformers import CONFIG_MAPPING

    from srpo_trl import tiny
    from srpo_trl.architectures import VLM_TYPES
    from srpo_trl.prefix_check import _build_model, small_config

    if family in VLM_TYPES:
        extra = {"sliding_window": window} if family == "gemma3" else {}
        build = getattr(tiny, f"tiny_{family}")
        return build(seed=seed, hidden_size=hidden_size, num_hidden_layers=num_layers, **extra)
    tok = tiny.build_tokenizer()
    head_dim = hidden_size // 4
    width = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
    )
    config = small_config(CONFIG_MAPPING[family], tok, num_hidden_layers=num_layers, window=window, width=width)
    model, _ = _build_model(config, seed, None)
    return model, tok


def build_processing_class(kind: str, image_side: int = IMAGE_SIDE):
    """The tokenizer (text) or the image-only Qwen2.5-VL processor that makes an image_side x image_side
    image (448: 256 merged image tokens) for the vlm; a family's own (see `family_model`)."""
    from srpo_trl.tiny import Qwen2_5_VLImageOnlyProcessor, build_tokenizer

    if kind not in ("vlm", "text"):
        return family_model(kind, 0, 32, 1)[1]

    tok = build_tokenizer()
    if kind == "text":
        return tok
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_side * image_side
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return Qwen2_5_VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template
    )


# A real model's text decoder with fewer layers (random weights): per-token compute as in training it.
PRESETS = {
    "qwen2_5_vl_7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        layers=4,
        mrope_section=[16, 24, 24],
        rope_theta=1000000.0,
        # Qwen2.5-VL-7B's vision width, with its 32 blocks scaled down like the decoder's 28 layers
        vision=dict(hidden_size=1280, intermediate_size=3420, num_heads=16, depth=4),
    ),
}


def build_model(kind: str, seed: int, hidden_size: int, num_layers: int, preset: str | None = None, device=None):
    """tiny.py's Qwen2 / Qwen2.5-VL, or with `preset` a model of that preset's decoder shape (built on
    `device`, random weights). The VLM's vision windows are set to Qwen2.5-VL's 112 pixels (8x8
    patches, 16 windows per 448x448 image). On CPU, sdpa runs one attention call per window, and tiny.py's
    56 (4x4 patches, 64 windows per image) would add per-window overhead the real model does not have."""
    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm, tiny_qwen2_5_vl

    if kind not in ("vlm", "text"):
        return family_model(kind, seed, hidden_size, num_layers)[0].to(device or "cpu")
    if preset:
        return _preset_model(kind, seed, PRESETS[preset], num_layers, device)
    if kind == "text":
        return tiny_causal_lm(build_tokenizer(), seed=seed, hidden_size=hidden_size, num_hidden_layers=num_layers)
    model, _ = tiny_qwen2_5_vl(seed=seed, hidden_size=hidden_size, num_hidden_layers=num_layers)
    model.config.vision_config.window_size = WINDOW_SIZE
    model.model.visual.window_size = WINDOW_SIZE  # no weights depend on it: only how patches are grouped
    return model


def _preset_model(kind: str, seed: int, shape: dict, num_layers: int, device):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    from srpo_trl.tiny import IM_END, IMAGE_PAD, PAD, VIDEO_PAD, VISION_END, VISION_START, build_tokenizer

    tok = build_tokenizer()
    text = dict(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=32768,
        bos_token_id=tok.convert_tokens_to_ids(PAD),
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        tie_word_embeddings=False,
    )
    if kind == "text":
        config = Qwen2Config(**text, rope_theta=shape["rope_theta"], attn_implementation="sdpa")
        cls = Qwen2ForCausalLM
    else:
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": shape["rope_theta"],
            "mrope_section": shape["mrope_section"],
        }
        vision = dict(
            shape["vision"],
            depth=num_layers,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            out_hidden_size=shape["hidden_size"],
            window_size=WINDOW_SIZE,
            fullatt_block_indexes=[num_layers - 1],
        )
        ids = {
            name: tok.convert_tokens_to_ids(t)
            for name, t in [
                ("image_token_id", IMAGE_PAD),
                ("video_token_id", VIDEO_PAD),
                ("vision_start_token_id", VISION_START),
                ("vision_end_token_id", VISION_END),
            ]
        }
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, attn_implementation="sdpa", tie_word_embeddings=False, **ids
        )
        cls = Qwen2_5_VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        return cls(config).eval()


def _words() -> list[str]:
    from srpo_trl.tiny import CORPUS

    return sorted(set(re.findall(r"[A-Za-z]+", " ".join(CORPUS))))


def _text_of_length(rng: random.Random, tokenizer, words: list[str], lo: int, hi: int, first: str = "") -> str:
    """Words from the tokenizer's corpus until the text is `lo`..`hi` tokens long (a target drawn in between)."""
    target = rng.randint(lo, hi)
    out = [first] if first else []

    def length(ws):
        return len(tokenizer(" ".join(ws), add_special_tokens=False)["input_ids"])

    while length(out) < target:
        out.append(rng.choice(words))
    while length(out) > hi:
        out.pop()
    return " ".join(out)


def build_rows(
    kind: str, processing_class, num_questions: int, seed: int = 0, step_tokens=(30, 60), image_side: int = IMAGE_SIDE
) -> list[dict]:
    """Step-pair rows, question after question: question q has `QUESTION_SIZES[q % 12]` branch points.

    Each question: a prompt (vlm: one 448x448 image + a short question; text: a ~120-token question), a
    reference path of (branch points + 1) steps, and at every branch point k a row with prefix =
    reference[:k], a favorable and an unfavorable continuation (both new text, not the reference
    step: the harder case for sharing). Every step is `step_tokens` tokens long.
    """
    from srpo_trl.rows import tokenizer_of
    from srpo_trl.tiny import make_image

    tokenizer = tokenizer_of(processing_class)
    words = _words()
    rng = random.Random(seed)
    lo, hi = step_tokens
    rows = []
    for q in range(num_questions):
        branch_points = QUESTION_SIZES[q % len(QUESTION_SIZES)]
        if kind == "vlm":
            question = _text_of_length(rng, tokenizer, words, 10, 25)
            prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + "?"}]}]
            images = [make_image(seed * 1000 + q, size=(image_side, image_side))]
        else:
            question = _text_of_length(rng, tokenizer, words, 100, 140)
            prompt = [{"role": "user", "content": question + "?"}]
            images = None
        reference = [
            _text_of_length(rng, tokenizer, words, lo, hi, first=f"Step {i + 1}:") for i in range(branch_points)
        ]
        reference.append(_text_of_length(rng, tokenizer, words, lo, hi, first="Answer:"))
        for k in range(branch_points):
            row = {
                "id": f"q{q}",
                "prompt": prompt,
                "prefix": reference[:k],
                "chosen": _text_of_length(rng, tokenizer, words, lo, hi, first=f"Step {k + 1}:"),
                "rejected": _text_of_length(rng, tokenizer, words, lo, hi, first=f"Step {k + 1}:"),
                "reference": reference,
                "branch_point": k,
            }
            if images is not None:
                row["images"] = images
            rows.append(row)
    return rows


def dpo_rows(rows: list[dict], processing_class) -> list[dict]:
    """The same pairs for DPOTrainer: the reasoning prefix folded into a standard (rendered) prompt."""
    from srpo_trl.rows import continuation_prefix_text, render_prompt

    out = []
    for row in rows:
        images = row.get("images") or []
        prompt = render_prompt(processing_class, row["prompt"], images) + continuation_prefix_text(row["prefix"])
        dpo = {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"], "question": row["id"]}
        if images:
            dpo["images"] = images
        out.append(dpo)
    return out


def reference_paths(rows: list[dict], processing_class) -> dict:
    """Per question: the rendered prompt, its images and the reference path's token ids (closed),
    encoded exactly as SRPOTrainer encodes them."""
    from srpo_trl.rows import encode_text_segments, normalize_row, render_prompt

    paths = {}
    for i, row in enumerate(rows):
        if row["id"] in paths:
            continue
        canon = normalize_row(row, i)
        seg = encode_text_segments(canon, processing_class)
        paths[row["id"]] = {
            "text": render_prompt(processing_class, row["prompt"], canon["images"]),
            "images": canon["images"],
            "reference_ids": seg["reference_ids"],
        }
    return paths


def batches(rows: list[dict], batch_size: int) -> list[list[dict]]:
    return [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def sharing_stats(rows: list[dict], processing_class, batch_size: int) -> dict:
    """Per batch, the tokens of the 3B sequences SRPO scores (chosen, rejected, reference of each row,
    each on its own, no padding) and the unique ones (a token trie per question)."""
    from srpo_trl.collator import DataCollatorForStepPairs

    collator = DataCollatorForStepPairs(processing_class=processing_class)
    total, unique = [], []
    for batch in batches(rows, batch_size):
        out = collator([dict(r) for r in batch])
        n = len(batch)
        ids, mask = out["input_ids"], out["attention_mask"].bool()
        tries: dict[str, dict] = {}
        nodes = 0
        for s in range(3 * n):
            node = tries.setdefault(batch[s % n]["id"], {})
            for tok in ids[s][mask[s]].tolist():
                if tok not in node:
                    node[tok] = {}
                    nodes += 1
                node = node[tok]
        total.append(int(mask.sum()))
        unique.append(nodes)
    return {"total_tokens": total, "unique_tokens": unique}


def describe_rows(rows: list[dict], processing_class) -> dict:
    """Proportions of the data: image tokens per prompt, branch points per question, step lengths."""
    from srpo_trl.rows import tokenizer_of

    tokenizer = tokenizer_of(processing_class)
    per_question: dict[str, int] = {}
    steps = []
    for row in rows:
        per_question[row["id"]] = per_question.get(row["id"], 0) + 1
        for text in (row["chosen"], row["rejected"]):
            steps.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    for path in {r["id"]: r["reference"] for r in rows}.values():
        steps += [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in path]
    image_tokens = None
    if hasattr(processing_class, "image_processor"):
        first = rows[0]
        paths = reference_paths([first], processing_class)[first["id"]]
        ids = processing_class(text=[paths["text"]], images=paths["images"], return_tensors="pt")["input_ids"][0]
        image_tokens = int((ids == tokenizer.convert_tokens_to_ids(tokenizer.image_token)).sum())
    return {
        "rows": len(rows),
        "questions": len(per_question),
        "branch_points": sorted(set(per_question.values())),
        "step_tokens": (min(steps), max(steps), statistics.mean(steps)),
        "image_tokens_per_prompt": image_tokens,
    }


# =================================================================================================
# Child: one configuration, measured
# =================================================================================================


class _RSSSampler(threading.Thread):
    """Peak resident set size of this process, read from /proc/self/statm every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, self.rss())
        return self.peak


def _trainer_classes():
    """SRPOTrainer / DPOTrainer subclasses that (1) feed rows in dataset order, so every configuration
    sees identical batches, and (2) time collate, the loss forwards and the whole training step."""
    import torch
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    from srpo_trl import SRPOTrainer

    class Timed:
        timings: dict
        current_batch: dict

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.current_batch.clear()  # the batch being trained on (the dataloader collates one ahead)
            self.current_batch.update(inputs)
            t0 = time.perf_counter()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.timings["loss_forward"].append(time.perf_counter() - t0)
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            t0 = time.perf_counter()
            nll = inputs.pop("nll", None)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if nll is not None:
                t1 = time.perf_counter()
                loss = loss + self._nll_step(model, nll)
                self.timings["nll_pass"].append(time.perf_counter() - t1)
            self.timings["training_step"].append(time.perf_counter() - t0)
            return loss

    class BenchSRPOTrainer(Timed, SRPOTrainer):
        pass

    class BenchDPOTrainer(Timed, DPOTrainer):
        """DPOTrainer + the NLL anchor on the reference paths, as a separate forward + backward."""

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "question" not in self._signature_columns:
                self._signature_columns.append("question")

        def _nll_step(self, model, nll):
            nll = self._prepare_inputs(nll)  # onto the model's device, like the batch the Trainer moved
            weights = nll.pop("weights")
            labels = nll.pop("labels")
            with self.compute_loss_context_manager():
                logps = model(**nll, labels=labels, fused_lm_head=True, use_cache=False).log_probs
                mask = (labels[:, 1:] != -100).to(logps.dtype)
                per_path = (logps * mask).sum(1) / mask.sum(1)
                loss = -(per_path * weights).sum()
            self.accelerator.backward(loss)
            return loss.detach()

    return BenchSRPOTrainer, BenchDPOTrainer, torch


class NLLCollator:
    """TRL's DPO collator plus, under "nll", the batch's unique reference paths (prompt + path + end)."""

    def __init__(self, dpo_collator, paths: dict, processing_class, pad_id: int, timings: dict):
        self.dpo_collator, self.paths, self.processing_class, self.pad_id = (
            dpo_collator,
            paths,
            processing_class,
            pad_id,
        )
        self.timings = timings

    def __call__(self, examples):
        import torch

        t0 = time.perf_counter()
        questions = [ex.pop("question") for ex in examples]
        out = self.dpo_collator(examples)
        unique = list(dict.fromkeys(questions))
        paths = [self.paths[q] for q in unique]
        if hasattr(self.processing_class, "image_processor"):
            images = [p["images"] for p in paths]
            processed = self.processing_class(
                text=[p["text"] for p in paths],
                images=images,
                padding=True,
                padding_side="left",
                return_tensors="pt",
                add_special_tokens=False,
            )
            keep = processed["attention_mask"].bool()
            prompts = [processed["input_ids"][j][keep[j]].tolist() for j in range(len(paths))]
            mm = [processed["mm_token_type_ids"][j][keep[j]].tolist() for j in range(len(paths))]
            extra = {k: v for k, v in processed.items() if k in ("pixel_values", "image_grid_thw")}
        else:
            tok = self.processing_class
            prompts = [tok(p["text"], add_special_tokens=False)["input_ids"] for p in paths]
            mm, extra = None, {}
        seqs = [pr + p["reference_ids"] for pr, p in zip(prompts, paths)]
        length = max(len(s) for s in seqs)
        nll = {
            "input_ids": torch.tensor([s + [self.pad_id] * (length - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs]),
            "labels": torch.tensor(
                [
                    [-100] * len(pr) + p["reference_ids"] + [-100] * (length - len(s))
                    for pr, p, s in zip(prompts, paths, seqs)
                ]
            ),
            # SRPO's L_ref is a mean over rows: each path weighs as many rows as it has in the batch
            "weights": torch.tensor([questions.count(q) / len(questions) for q in unique]),
            **extra,
        }
        if mm is not None:
            nll["mm_token_type_ids"] = torch.tensor([m + [0] * (length - len(m)) for m in mm])
        out["nll"] = nll
        self.timings["collate"].append(time.perf_counter() - t0)
        return out


class TimedCollator:
    def __init__(self, collator, timings: dict):
        self.collator, self.timings = collator, timings

    def __call__(self, examples):
        t0 = time.perf_counter()
        out = self.collator(examples)
        self.timings["collate"].append(time.perf_counter() - t0)
        return out

    def __getattr__(self, name):  # prefix_sharing, dense_mask, ... set by SRPOTrainer on the real collator
        return getattr(self.collator, name)

    def __setattr__(self, name, value):
        if name in ("collator", "timings"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.collator, name, value)


def _count_tokens(model, counters: dict, current_batch: dict, lora: bool = False):
    """Forward pre-hooks on the text decoder (tokens through it, padding included; real tokens; model
    FLOPs) and the vision tower (images encoded). Counts every forward: policy, reference model and
    NLL pass.

    Model FLOPs (for TFLOP/s and MFU): per forward, 2 x (decoder + LM-head parameters) x tokens (padding
    included: the kernels process it; TRL's fused head projects every position), 4 x layers x attention width per attended (query, key) pair (ancestors in a tree, the
    causal past otherwise: the useful pairs, not those a dense mask computes), 2 x vision parameters x
    patches. A pass with gradients costs 3x its forward (full fine-tuning) or 2x for the matmuls under
    LoRA (input gradients only); gradient-checkpointing recomputation is not counted."""
    import torch

    # PEFT: the decoder and vision tower are the base model's (the hooks see every call through the wrapper)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = model.get_decoder()
    config = model.config.get_text_config()
    embed = decoder.get_input_embeddings()
    n_decoder = sum(p.numel() for p in decoder.parameters()) - sum(p.numel() for p in embed.parameters())
    head = model.get_output_embeddings()
    n_head = sum(p.numel() for p in head.parameters()) if head is not None else 0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_width = config.num_attention_heads * head_dim
    layers = config.num_hidden_layers
    visual = getattr(getattr(model, "model", None), "visual", None)
    n_visual = sum(p.numel() for p in visual.parameters()) if visual is not None else 0

    def multiplier():
        return (2 if lora else 3) if torch.is_grad_enabled() else 1

    def on_decoder(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        tokens = int(x.shape[0] * x.shape[1])
        counters["tokens"] += tokens
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2) and "packed_length" not in current_batch:
            mask = current_batch["attention_mask"]  # unpacked Gemma3: its wrapper hands the decoder a dict of masks
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            lengths = mask.sum(-1)
            counters["real_tokens"] += int(lengths.sum())
            pairs = int((lengths * (lengths + 1) // 2).sum())
        else:  # packed rows (a 4D tree mask or a FlexAttention BlockMask): the real tokens are the packed lengths
            counters["real_tokens"] += int(current_batch["packed_length"].sum())
            depth, length = current_batch["position_ids"], current_batch["packed_length"]
            real = torch.arange(depth.shape[1], device=depth.device)[None, :] < length.to(depth.device)[:, None]
            pairs = int(((depth + 1) * real).sum())  # a token attends to its depth + 1 ancestors (itself included)
        m = multiplier()
        flops = 2 * (n_decoder + n_head) * tokens * m
        flops += 4 * layers * attn_width * pairs * (3 if m > 1 else 1)  # attention backward is never frozen
        counters["flops"] += flops

    def on_visual(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counters["images"] += int(grid.shape[0])
        counters["flops"] += 2 * n_visual * int(grid.prod(-1).sum()) * multiplier()

    decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)
    if visual is not None:
        visual.register_forward_pre_hook(on_visual, with_kwargs=True)


def _versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _attn_name(model) -> str:
    from srpo_trl.attention import text_attn_implementation

    return str(text_attn_implementation(model))


def _window(model) -> int | None:
    from srpo_trl.architectures import attention_windows

    windows = [w for w in attention_windows(model.config.get_text_config()).values() if w]
    return windows[0] if windows else None


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_child(args) -> dict:
    from transformers import TrainerCallback

    BenchSRPOTrainer, BenchDPOTrainer, torch = _trainer_classes()
    from datasets import Dataset
    from trl import DPOConfig

    from srpo_trl import SRPOConfig, StepPairDataset
    from srpo_trl.collator import DataCollatorForStepPairs
    from srpo_trl.rows import tokenizer_of

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    if args.attention != "auto":
        os.environ["SRPO_TRL_TREE_ATTENTION"] = args.attention
    processing_class = build_processing_class(args.model, args.image_side)
    tokenizer = tokenizer_of(processing_class)
    steps = args.warmup + args.steps
    total = steps + (1 if args.profile else 0)  # --profile: one more step, profiled and not timed
    rows = build_rows(
        data_kind(args.model), processing_class, num_questions=2 * total, seed=args.seed, image_side=args.image_side
    )
    assert len(rows) == total * args.batch_size, (len(rows), total, args.batch_size)

    def new_model():
        m = build_model(args.model, args.seed, args.hidden_size, args.layers, preset=args.preset, device=device)
        return m.to(torch.bfloat16) if args.dtype == "bf16" else m

    model = new_model()
    peft_config = None
    if args.lora:  # the text decoder's linear layers; the vision tower stays frozen
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
        )
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="step-pairs-"),
        per_device_train_batch_size=args.batch_size,
        max_steps=total,
        learning_rate=1e-4,
        max_length=None,
        use_cpu=not cuda,
        bf16=args.dtype != "fp32",
        gradient_checkpointing=args.gradient_checkpointing,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    timings = {k: [] for k in ("collate", "loss_forward", "training_step", "nll_pass")}
    counters = {"tokens": 0, "real_tokens": 0, "images": 0, "flops": 0}
    current_batch: dict = {}

    if args.config.startswith("srpo"):
        packed = args.config in ("srpo_packed", "srpo_packed_ref")
        ref_model = None
        if args.config == "srpo_packed_ref":  # Step-DPO: the frozen reference scores the packed trees too
            ref_model = None if args.lora else new_model()  # LoRA: the base model with adapters disabled
            loss = dict(align_loss="sigmoid", beta=0.1)
        else:
            loss = dict(align_loss="odds_ratio")
        config = SRPOConfig(**common, prefix_sharing=packed, srpo_lambda=0.3, **loss)
        inner = DataCollatorForStepPairs(processing_class=processing_class)
        collator = TimedCollator(inner, timings)
        trainer = BenchSRPOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=processing_class,
            data_collator=inner,
            peft_config=peft_config,
        )
        assert trainer.prefix_sharing == packed
        trainer.data_collator = collator
        if ref_model is not None:
            _count_tokens(trainer.ref_model, counters, current_batch)
        attention = ("tree (FlexAttention)" if not inner.dense_mask else "dense mask") if packed else "causal"
    else:
        from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference

        ref_model = None if args.lora else new_model()  # LoRA: the base model with adapters disabled
        config = DPOConfig(**common, beta=0.1)
        pad_id = tokenizer.pad_token_id
        dpo_collator = (
            DataCollatorForVisionPreference(processor=processing_class)
            if data_kind(args.model) == "vlm"
            else DataCollatorForPreference(pad_token_id=pad_id)
        )
        paths = reference_paths(rows, processing_class)
        collator = NLLCollator(dpo_collator, paths, processing_class, pad_id, timings)
        trainer = BenchDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            train_dataset=Dataset.from_list(dpo_rows(rows, processing_class)),
            processing_class=processing_class,
            data_collator=collator,
            peft_config=peft_config,
        )
        if trainer.ref_model is not None:
            _count_tokens(trainer.ref_model, counters, current_batch)
        attention = "causal"
    trainer.timings, trainer.current_batch = timings, current_batch
    _count_tokens(trainer.model, counters, current_batch, lora=args.lora)

    step_ends: list[float] = []
    marks: list[dict] = []
    profiling: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            step_ends.append(time.perf_counter())

        def on_step_begin(self, *a, **k):
            if args.profile and len(step_ends) == steps + 1:  # every timed step is done
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                profiling["profiler"] = torch.profiler.profile(activities=activities)
                profiling["profiler"].__enter__()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            marks.append(dict(counters))
            if "profiler" in profiling and "summary" not in profiling:
                profiling["profiler"].__exit__(None, None, None)
                profiling["summary"] = profile_summary(profiling["profiler"], cuda)

    trainer.add_callback(Clock())
    gc.collect()
    sampler = _RSSSampler()
    rss_before = sampler.rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    sampler.start()
    trainer.train()
    peak_rss = sampler.stop()
    if cuda:
        peak_memory = torch.cuda.max_memory_allocated() - allocated_before
    else:
        peak_memory = peak_rss - rss_before

    assert len(step_ends) == total + 1, len(step_ends)
    step_times = [b - a for a, b in zip(step_ends, step_ends[1:])][:steps]  # the profiled step is not timed
    timed = slice(args.warmup, steps)
    per_step = [dict(zip(marks[0], (b[k] - (a[k] if a else 0) for k in b))) for a, b in zip([None] + marks, marks)]
    per_step = per_step[:steps]
    flops_timed = sum(s["flops"] for s in per_step[timed])
    tflops = flops_timed / sum(step_times[timed]) / 1e12
    from srpo_trl.attention import compile_count

    def timed_sum(key):  # per-step sums of a timing list, over the timed steps (one entry per step)
        values = timings[key]
        return statistics.median(values[args.warmup : steps]) if len(values) >= steps else None

    return {
        "model": args.model,
        "config": args.config,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": _versions(),
        "preset": args.preset,
        "dtype": args.dtype,
        "lora": args.lora,
        "attention": attention,
        "attn_implementation": _attn_name(trainer.model),
        "window": _window(trainer.model),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_times_s": step_times,
        "median_step_s": statistics.median(step_times[timed]),
        "mean_step_s": statistics.mean(step_times[timed]),
        "tokens_per_step": [s["tokens"] for s in per_step],
        "real_tokens_per_step": [s["real_tokens"] for s in per_step],
        "images_per_step": [s["images"] for s in per_step],
        "tokens_timed": sum(s["tokens"] for s in per_step[timed]),
        "real_tokens_timed": sum(s["real_tokens"] for s in per_step[timed]),
        "images_timed": sum(s["images"] for s in per_step[timed]),
        "peak_memory_bytes": peak_memory,
        "model_flops_timed": flops_timed,
        "tflops_per_s": tflops,
        "mfu": tflops / args.peak_tflops if cuda else None,
        "peak_tflops": args.peak_tflops,
        "flex_compiles": compile_count(),
        "dynamo_unique_graphs": int(_dynamo_graphs()),
        "rss_before_bytes": rss_before,
        "median_collate_s": timed_sum("collate"),
        "median_loss_forward_s": timed_sum("loss_forward"),
        "median_training_step_s": timed_sum("training_step"),
        "median_nll_pass_s": timed_sum("nll_pass"),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "profile": profiling.get("summary"),
    }


# Where a step's time goes, by self time of torch ops (self times do not overlap, so they add up).
PROFILE_GROUPS = [
    ("attention", ("flex_attention", "scaled_dot_product", "_efficient_attention", "_flash_attention", "attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "gemm", "cutlass", "sm90")),
    ("optimizer", ("adam", "_foreach", "optimizer")),
    ("copies_and_indexing", ("copy", "aten::to", "aten::cat", "index", "gather", "scatter", "aten::slice", "memcpy")),
    ("loss_and_softmax", ("log_softmax", "softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("norm_and_activations", ("rms_norm", "layer_norm", "silu", "gelu", "aten::mul", "aten::add", "aten::pow")),
]


def profile_summary(profiler, cuda: bool, top: int = 25) -> dict:
    """Top ops of one profiled training step by self time (device time on CUDA, CPU time otherwise),
    and the share of each group in PROFILE_GROUPS."""
    key = "self_device_ms" if cuda else "self_cpu_ms"
    ops = []
    for event in profiler.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:  # older torch
            device_us = getattr(event, "self_cuda_time_total", 0)
        ops.append(
            {
                "name": event.key,
                "calls": event.count,
                "self_cpu_ms": event.self_cpu_time_total / 1e3,
                "self_device_ms": device_us / 1e3,
            }
        )
    ops.sort(key=lambda op: -op[key])
    total = sum(op[key] for op in ops)
    groups: dict[str, float] = {}
    for op in ops:
        name = op["name"].lower()
        group = next((g for g, needles in PROFILE_GROUPS if any(n.lower() in name for n in needles)), "other")
        groups[group] = groups.get(group, 0.0) + op[key]
    return {
        "sorted_by": key,
        "total_ms": total,
        "group_share": {g: (v / total if total else None) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": ops[:top],
    }


# =================================================================================================
# Parent: one subprocess per configuration, then the table
# =================================================================================================


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base else "-"


def table(results: list[dict], stats: dict, kind: str) -> str:
    """Ratios to the baseline: tokens through the model, median and mean step time, peak memory, images
    encoded; then each configuration's absolute model TFLOP/s, MFU (CUDA) and FlexAttention compiles."""
    by = {r["config"]: r for r in results if r["model"] == kind}
    base = by[BASELINE]
    unique, total = sum(stats["unique_tokens"]), sum(stats["total_tokens"])
    lines = [
        f"{'configuration':32s} {'tokens':>8s} {'median':>8s} {'mean':>8s} {'peak mem':>9s} {'images':>7s} "
        f"{'TFLOP/s':>8s} {'MFU':>6s} {'compiles':>8s}  attention"
    ]
    for name, label in CONFIGS.items():
        if name in by:
            r = by[name]
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(
                f"{label:32s} {_ratio(r['tokens_timed'], base['tokens_timed']):>8s} "
                f"{_ratio(r['median_step_s'], base['median_step_s']):>8s} "
                f"{_ratio(r['mean_step_s'], base['mean_step_s']):>8s} "
                f"{_ratio(r['peak_memory_bytes'], base['peak_memory_bytes']):>9s} "
                f"{_ratio(r['images_timed'], base['images_timed']):>7s} "
                f"{r['tflops_per_s']:8.3g} {mfu:>6s} {r['flex_compiles']:>8d}  {r['attention']}"
            )
    lines.append(f"{'ideal: each unique token once':32s} {_ratio(unique, base['tokens_timed']):>8s}")
    lines.append(
        f"unique / total tokens of the scored sequences (3 per row, unpadded): {unique / total:.3f}; "
        f"baseline per step: {base['tokens_timed'] / base['timed_steps']:.0f} tokens, "
        f"{base['median_step_s']:.2f} s, +{base['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    return "\n".join(lines)


def breakdown(results: list[dict], kind: str) -> str:
    """Where a step's time goes (medians over the timed steps, seconds)."""
    lines = [
        f"{'  seconds per step':32s} {'collate':>8s} {'forwards':>9s} {'NLL pass':>9s} {'bwd+rest':>9s} {'step':>7s}"
    ]
    for r in results:
        if r["model"] != kind:
            continue
        collate, fwd = r["median_collate_s"] or 0.0, r["median_loss_forward_s"] or 0.0
        nll = r["median_nll_pass_s"] or 0.0
        rest = r["median_step_s"] - collate - fwd - nll
        lines.append(
            f"  {CONFIGS[r['config']]:30s} {collate:8.2f} {fwd:9.2f} {nll if r['median_nll_pass_s'] else float('nan'):9.2f} "
            f"{rest:9.2f} {r['median_step_s']:7.2f}"
        )
    return "\n".join(lines).replace("nan", "  -")


FAMILY_CONFIGS = ["srpo_packed", "srpo_unpacked"]


def families_table(results: list[dict], families: list[str]) -> str:
    """Per family: median step times of packed and unpacked SRPO, their ratio, and the token ratio."""
    lines = [
        f"{'family':12s} {'attention':10s} {'windows':>8s} {'packed s':>9s} {'unpacked s':>10s} "
        f"{'step ratio':>10s} {'token ratio':>11s}"
    ]
    for family in families:
        by = {r["config"]: r for r in results if r["model"] == family}
        if not set(FAMILY_CONFIGS) <= set(by):
            continue
        packed, plain = by["srpo_packed"], by["srpo_unpacked"]
        lines.append(
            f"{family:12s} {packed['attn_implementation']:10s} {str(packed['window'] or '-'):>8s} "
            f"{packed['median_step_s']:9.3f} {plain['median_step_s']:10.3f} "
            f"{_ratio(packed['median_step_s'], plain['median_step_s']):>10s} "
            f"{_ratio(packed['tokens_timed'], plain['tokens_timed']):>11s}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 warm-up + 1 timed step, a 2-layer hidden-64 model, 224x224 images (64 image tokens)",
    )
    parser.add_argument("--models", default="vlm,text", help="comma-separated: vlm, text")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--batch-size", type=int, default=12, help="rows per batch (12 = 2 whole questions)")
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=256,
        help="text hidden size of both models (256: the tiny vision tower then costs about half the decoder's cost "
        "of the image's 256 tokens, as in Qwen2.5-VL-7B where it is about a third)",
    )
    parser.add_argument("--layers", type=int, default=4, help="text decoder layers of both models")
    parser.add_argument(
        "--image-side", type=int, default=IMAGE_SIDE, help="image width = height in pixels (448: 256 tokens)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TRL's DPOConfig default (on) for every configuration",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per configuration; 0 = torch's default. 1 keeps ratios stable on a shared machine: with "
        "2 threads on 2 busy cores every small kernel waits for a descheduled thread (the vision tower's per-window "
        "attention calls ran 10x slower), which penalizes the configurations that encode more images",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even where CUDA is available")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a real model's text-decoder shape with --layers layers and random weights (qwen2_5_vl_7b: hidden 3584, "
        "28 heads, 4 KV heads, intermediate 18944, vocabulary 152064; its VLM has Qwen2.5-VL-7B's vision width); "
        "implies --dtype bf16 unless given",
    )
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "bf16-autocast"],
        default=None,
        help="fp32 (default without --preset); bf16: bf16 weights and autocast; bf16-autocast: fp32 weights, bf16 autocast",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="LoRA (r=16) on the decoder's linear layers; the reference is the base model",
    )
    parser.add_argument(
        "--attention",
        choices=["auto", "flex", "dense"],
        default="auto",
        help="packed SRPO's attention (SRPO_TRL_TREE_ATTENTION): auto = tree attention on CUDA in bf16, else a dense mask",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak for MFU (H100/H200 SXM: 989)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed steps, one more step under torch.profiler (not timed): top ops by self time and the "
        "share of attention, matmuls, optimizer, copies, ... in each configuration's JSON (`profile`)",
    )
    parser.add_argument(
        "--families",
        default=None,
        help="comma-separated model types on the prefix-sharing allow-list, or 'all': packed vs unpacked SRPO per "
        "family (replaces --models and --configs; JSON default benchmarks/results/step_pairs_families.json)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the configurations one after another in this process instead of a subprocess each (saves the "
        "imports, ~8 s a run; peak memory then includes earlier runs', so only step times and tokens are comparable)",
    )
    parser.add_argument("--json", default="benchmarks/results/step_pairs.json", help="where absolute numbers go")
    # internal: run one configuration in this process and write its result
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.hidden_size, args.layers, args.image_side = 1, 1, 64, 2, 224
    if args.dtype is None:
        args.dtype = "bf16" if args.preset else "fp32"

    if args.child:
        result = run_child(args)
        Path(args.out).write_text(json.dumps(result))
        return

    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    families = None
    if args.families:
        from srpo_trl.architectures import TEXT_TYPES, VLM_TYPES

        allowed = sorted(TEXT_TYPES) + sorted(VLM_TYPES)
        families = allowed if args.families == "all" else [f for f in args.families.split(",") if f]
        unknown = sorted(set(families) - set(allowed))
        if unknown:
            parser.error(f"--families: {unknown} are not on the prefix-sharing allow-list ({allowed})")
        models, configs = families, FAMILY_CONFIGS
        if args.json == parser.get_default("json"):
            args.json = "benchmarks/results/step_pairs_families.json"
    elif BASELINE not in configs:
        parser.error(f"--configs must include the baseline {BASELINE}")
    common = (
        [
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--hidden-size",
            str(args.hidden_size),
            "--layers",
            str(args.layers),
            "--seed",
            str(args.seed),
            "--image-side",
            str(args.image_side),
            "--threads",
            str(args.threads),
            "--dtype",
            args.dtype,
            "--attention",
            args.attention,
            "--peak-tflops",
            str(args.peak_tflops),
            "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
        ]
        + (["--cpu"] if args.cpu else [])
        + (["--lora"] if args.lora else [])
        + (["--profile"] if args.profile else [])
    )
    common += ["--preset", args.preset] if args.preset else []
    results, stats, proportions = [], {}, {}
    started = time.time()
    for kind in models:
        processing_class = build_processing_class(kind, args.image_side)
        steps = args.warmup + args.steps
        rows = build_rows(
            data_kind(kind), processing_class, num_questions=2 * steps, seed=args.seed, image_side=args.image_side
        )
        timed_rows = rows[args.warmup * args.batch_size :]
        stats[kind] = sharing_stats(timed_rows, processing_class, args.batch_size)
        proportions[kind] = describe_rows(rows, processing_class)
        print(f"[{kind}] data: {proportions[kind]}", flush=True)
        for config in configs:
            child = ["--child", "--model", kind, "--config", config, *common]
            t0 = time.time()
            if args.in_process:
                result = run_child(parser.parse_args(child))
            else:
                result = _run_subprocess(child, args.threads, f"{kind}/{config}")
            results.append(result)
            print(
                f"[{kind}] {config:14s} median step {result['median_step_s']:.3f} s, "
                f"{result['tokens_timed'] // args.steps} tokens/step, "
                f"peak +{result['peak_memory_bytes'] / 2**20:.0f} MiB ({time.time() - t0:.0f} s)",
                flush=True,
            )
            if result["profile"]:
                shares = result["profile"]["group_share"]
                print(
                    f"[{kind}] {config:14s} profiled step ({result['profile']['sorted_by']}): "
                    + ", ".join(f"{g} {v:.0%}" for g, v in shares.items() if v),
                    flush=True,
                )
        if families:  # every family's numbers are kept as soon as it is done (a time limit may stop the run)
            _write_json(args, results, proportions, stats, {"families": family_summary(results)}, quiet=True)

    if families:
        print(
            f"\nPacked / unpacked SRPO per family (text hidden {args.hidden_size}, {args.layers} layers, {args.dtype}, "
            f"sliding windows {FAMILY_WINDOW}); batch {args.batch_size} rows = 2 questions x 4-8 branch points; median "
            f"of {args.steps} steps after {args.warmup} warm-up; {results[0]['device']}, "
            f"{results[0]['torch_threads']} threads"
        )
        print(families_table(results, families))
        print(f"\n(total {time.time() - started:.0f} s)")
        _write_json(args, results, proportions, stats, {"families": family_summary(results)})
        return
    width = PRESETS[args.preset]["hidden_size"] if args.preset else args.hidden_size
    shape = f"text hidden {width}, {args.layers} layers" + (f", preset {args.preset}" if args.preset else "")
    shape += f", {args.dtype}" + (", LoRA" if args.lora else "")
    titles = {
        "vlm": lambda p: (
            f"VLM: Qwen2.5-VL architecture ({shape}), {p['image_tokens_per_prompt']} image tokens per question"
        ),
        "text": lambda p: f"Text: Qwen2 ({shape}), ~120-token prompts",
    }
    print()
    print(
        f"Ratios to DPOTrainer (+ref model) + NLL; batch {args.batch_size} rows = 2 questions x 4-8 branch points; "
        f"median of {args.steps} steps after {args.warmup} warm-up; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {results[0]['device']}, {results[0]['torch_threads']} threads"
    )
    for kind in models:
        print(f"\n{titles[kind](proportions[kind])}")
        print(table(results, stats[kind], kind))
        print(breakdown(results, kind))
    print(f"\n(total {time.time() - started:.0f} s)")
    _write_json(args, results, proportions, stats)


def _run_subprocess(child: list[str], threads: int, name: str) -> dict:
    """One configuration in a fresh interpreter (its peak memory is its own)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, __file__, *child, "--out", out], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def family_summary(results: list[dict]) -> dict:
    """Per family with both runs done: step-time and token ratios of packed to unpacked SRPO."""
    summary = {}
    for family in dict.fromkeys(r["model"] for r in results):
        by = {r["config"]: r for r in results if r["model"] == family}
        if set(FAMILY_CONFIGS) <= set(by):
            packed, plain = by["srpo_packed"], by["srpo_unpacked"]
            summary[family] = {
                "step_time_ratio": packed["median_step_s"] / plain["median_step_s"],
                "token_ratio": packed["tokens_timed"] / plain["tokens_timed"],
                "packed_median_step_s": packed["median_step_s"],
                "unpacked_median_step_s": plain["median_step_s"],
                "attn_implementation": packed["attn_implementation"],
                "attention": packed["attention"],
                "window": packed["window"],
            }
    return summary


def _write_json(args, results, proportions, stats, extra: dict | None = None, quiet: bool = False) -> None:
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "versions": _versions(),
            "device": results[0]["device"],
            "argv": sys.argv[1:],
            "cpu_count": os.cpu_count(),
            "proportions": proportions,
            "sharing": stats,
            **(extra or {}),
            "results": results,
        }
        path.write_text(json.dumps(payload, indent=1))
        if not quiet:
            print(f"absolute numbers: {path}")


if __name__ == "__main__":
    main()
