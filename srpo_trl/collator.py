"""The step-level collator: one batch of step-pair rows -> three groups of sequences.

For a batch of B rows it returns 3B right-padded sequences, in this order:

    [prompt + prefix + chosen]   x B     loss on the chosen tokens only
    [prompt + prefix + rejected] x B     loss on the rejected tokens only
    [prompt + reference + end]   x B     loss on the whole reference path, end of answer included

`loss_mask` marks the tokens each sequence is scored on; prompt and prefix tokens are context only.
Vision inputs (pixel values, `image_grid_thw`, `image_sizes`, ...) come from one processor call on
the B prompts and are repeated for the three groups, in sequence order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .rows import (
    DEFAULT_STEP_SEPARATOR,
    RowError,
    encode_prompt_text,
    encode_text_segments,
    normalize_row,
    render_prompt,
    tokenizer_of,
)

NON_MODEL_KEYS = {"loss_mask", "ref_chosen_logps", "ref_rejected_logps", "branch_point"}


def load_images(images: list, index: Any = "?") -> list:
    """Open image paths with PIL (RGB); images that are already PIL pass through."""
    out = []
    for image in images:
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            try:
                with Image.open(image) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as e:
                raise RowError(index, "images", f"cannot read image file {image!s}: {e}") from e
        elif isinstance(image, dict) and ("bytes" in image or "path" in image):  # an undecoded datasets Image
            import io

            source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
            image = Image.open(source).convert("RGB")
        out.append(image)
    return out


def _pad(seqs: list[list[int]], value: int, multiple: int | None) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    if multiple:
        length = -(-length // multiple) * multiple
    return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


@dataclass
class DataCollatorForStepPairs:
    """Collates step-pair rows for [`SRPOTrainer`].

    Accepts rows already encoded by `SRPOTrainer._prepare_dataset` (`prompt_ids`, `prefix_ids`,
    `chosen_ids`, `rejected_ids`, `reference_ids`) or raw rows (`prompt`, `images`, `prefix`,
    `chosen`, `rejected`, `reference`), which it encodes itself: vision datasets are processed on
    the fly, as in TRL, because pixel values are too large to store.

    Args:
        processing_class: tokenizer (text models) or processor (vision-language models).
        step_separator: joins reasoning steps.
        max_length: sequences longer than this are cut at the end (`keep_start`); a row whose
            continuation or reference would be cut away entirely raises (the trainer filters such
            rows out before training and reports them).
        fallback_reference_eos: close the fallback reference `prefix + chosen` with EOS.
        pad_to_multiple_of: pad the sequence length to a multiple of this value.
    """

    processing_class: Any
    step_separator: str = DEFAULT_STEP_SEPARATOR
    max_length: int | None = None
    fallback_reference_eos: bool = True
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokenizer = tokenizer_of(self.processing_class)
        extra: dict[str, torch.Tensor] = {}
        token_keys: dict[str, list[list[int]]] = {}
        if "prompt_ids" in examples[0]:
            prompts = [list(ex["prompt_ids"]) for ex in examples]
            segments = examples
        else:
            rows = [normalize_row(ex, ex.get("_row", f"{i} of the batch")) for i, ex in enumerate(examples)]
            segments = [
                encode_text_segments(r, self.processing_class, self.step_separator, self.fallback_reference_eos)
                for r in rows
            ]
            if hasattr(self.processing_class, "tokenizer"):  # processor: images and expanded image tokens
                prompts, token_keys, extra = self._process_prompts(rows)
            else:
                prompts = [encode_prompt_text(r, tokenizer) for r in rows]

        sequences, masks = [], []
        for part in ("chosen_ids", "rejected_ids"):
            for prompt, seg in zip(prompts, segments):
                sequences.append(prompt + list(seg["prefix_ids"]) + list(seg[part]))
                masks.append([0] * (len(prompt) + len(seg["prefix_ids"])) + [1] * len(seg[part]))
        for prompt, seg in zip(prompts, segments):
            sequences.append(prompt + list(seg["reference_ids"]))
            masks.append([0] * len(prompt) + [1] * len(seg["reference_ids"]))

        if self.max_length is not None:
            for i, mask in enumerate(masks):
                if sum(mask[: self.max_length]) == 0:
                    group = ("chosen", "rejected", "reference")[i // len(examples)]
                    raise RowError(
                        examples[i % len(examples)].get("_row", i % len(examples)),
                        group,
                        f"is cut away entirely by max_length={self.max_length}; raise max_length or shorten the row",
                    )
            sequences = [s[: self.max_length] for s in sequences]
            masks = [m[: self.max_length] for m in masks]

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = {
            "input_ids": _pad(sequences, pad_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(s) for s in sequences], 0, self.pad_to_multiple_of),
            "loss_mask": _pad(masks, 0, self.pad_to_multiple_of),
        }
        # Per-token processor outputs (mm_token_type_ids, token_type_ids): prompt values, zeros after.
        for key, per_row in token_keys.items():
            rows3 = [v + [0] * (len(s) - len(v)) for v, s in zip(per_row * 3, sequences)]
            output[key] = _pad([r[: len(s)] for r, s in zip(rows3, sequences)], 0, self.pad_to_multiple_of)
        for key, value in extra.items():
            output[key] = torch.cat([value] * 3, dim=0)
        for key in ("ref_chosen_logps", "ref_rejected_logps", "branch_point"):
            if key in examples[0] and examples[0][key] is not None:
                output[key] = torch.tensor([ex[key] for ex in examples])
        return output

    def _process_prompts(self, rows: list[dict[str, Any]]):
        """One processor call on the B prompts: token ids with image tokens expanded, and vision tensors."""
        processor = self.processing_class
        images = [load_images(r["images"], r.get("_row", i)) for i, r in enumerate(rows)]
        texts = [render_prompt(processor, r["prompt"], imgs) for r, imgs in zip(rows, images)]
        kwargs = {"images": images} if any(images) else {}
        processed = processor(
            text=texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False, **kwargs
        )
        keep = processed["attention_mask"].bool()
        prompts = [ids[k].tolist() for ids, k in zip(processed["input_ids"], keep)]
        token_keys, extra = {}, {}
        for key, value in processed.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if isinstance(value, torch.Tensor) and value.shape == processed["input_ids"].shape:
                token_keys[key] = [v[k].tolist() for v, k in zip(value, keep)]
            elif isinstance(value, torch.Tensor):
                extra[key] = value
        return prompts, token_keys, extra
