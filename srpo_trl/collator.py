"""The step-level collator: one batch of step-pair rows -> three groups of sequences.

For a batch of B rows it returns 3B right-padded sequences, in this order:

    [prompt + prefix + chosen]   x B     loss on the chosen tokens only
    [prompt + prefix + rejected] x B     loss on the rejected tokens only
    [prompt + reference + end]   x B     loss on the whole reference path, end of answer included

`loss_mask` marks the tokens each sequence is scored on; prompt and prefix tokens are context only
(and, with `align_tokens="after_shared"`, the leading tokens chosen and rejected share).
Vision inputs (pixel values, `image_grid_thw`, `image_sizes`, ...) come from one processor call on
the B prompts and are repeated for the three groups, in sequence order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .images import open_image
from .packing import allowed_matrix, bucket_length, pack_question
from .rows import (
    DEFAULT_STEP_SEPARATOR,
    RowError,
    align_start,
    encode_prompt_text,
    encode_text_segments,
    normalize_row,
    render_row,
    tokenizer_of,
)


NON_MODEL_KEYS = {"loss_mask", "ref_chosen_logps", "ref_rejected_logps", "branch_point"}
# Keys of a packed (prefix-sharing) batch that the trainer turns into model inputs itself.
PACKED_KEYS = {"tree_mask", "tree_end", "shift_labels", "score_pos", "score_seq", "prompt_length", "packed_length"}


def load_images(images: list, index: Any = "?") -> list:
    """Open a row's images (:func:`srpo_trl.images.open_image`: RGB, the rule of every stage); an
    unreadable one raises :class:`RowError` naming the row."""
    out = []
    for image in images:
        try:
            out.append(open_image(image))
        except (OSError, ValueError) as e:
            raise RowError(index, "images", f"cannot read image file {image!s}: {e}") from e
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
        align_eos: close both continuations with EOS (end of turn for chat rows) and score it (raw rows;
            rows encoded by the trainer already carry it).
        align_tokens: `"continuation"` scores every continuation token, `"after_shared"` only those after
            the leading tokens chosen and rejected share (RPO's released loss).
        pad_to_multiple_of: pad the sequence length to a multiple of this value.
        prefix_sharing: instead of 3B sequences, return one packed row per question (rows with the
            same prompt and images): a token tree with `tree_mask` (ancestors only; left out when
            `dense_mask=False`) and `tree_end` (pre-order subtree ends, from which FlexAttention
            builds a block mask), depth `position_ids`, `shift_labels`, and `score_seq` /
            `score_pos` telling which packed positions score which of the 3B sequences. See
            `srpo_trl.packing`.
        bucket_multiple: pad packed rows to a multiple of this many tokens (set by the trainer to
            FlexAttention's block size, 128, so that a compiled kernel serves every length in a bucket).
    """

    processing_class: Any
    step_separator: str = DEFAULT_STEP_SEPARATOR
    max_length: int | None = None
    fallback_reference_eos: bool = True
    align_eos: bool = False
    align_tokens: str = "continuation"
    pad_to_multiple_of: int | None = None
    prefix_sharing: bool = False
    dense_mask: bool = True  # False for FlexAttention, which builds its block mask from `tree_end`
    bucket_multiple: int | None = None  # packed rows padded to a multiple of this (tree attention: 128)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokenizer = tokenizer_of(self.processing_class)
        extra: dict[str, torch.Tensor] = {}
        token_keys: dict[str, list[list[int]]] = {}
        if "prompt_ids" in examples[0]:
            prompts = [list(ex["prompt_ids"]) for ex in examples]
            segments = examples
            keys = [tuple(p) for p in prompts]
        else:
            rows = [normalize_row(ex, ex.get("_row", f"{i} of the batch")) for i, ex in enumerate(examples)]
            segments = [
                encode_text_segments(
                    r, self.processing_class, self.step_separator, self.fallback_reference_eos, self.align_eos
                )
                for r in rows
            ]
            if hasattr(self.processing_class, "tokenizer"):  # processor: images and expanded image tokens
                prompts, token_keys, extra, keys = self._process_prompts(rows)
            else:
                prompts = [encode_prompt_text(r, tokenizer) for r in rows]
                keys = [tuple(p) for p in prompts]

        n = len(examples)
        starts = [
            len(seg["prefix_ids"]) + align_start(seg, self.align_tokens, ex.get("_row", f"{i} of the batch"))
            for i, (seg, ex) in enumerate(zip(segments, examples))
        ]
        seqs: list[tuple[list[int], int]] = []  # (tokens after the prompt, first scored index), 3n of them
        for part in ("chosen_ids", "rejected_ids"):
            for seg, start in zip(segments, starts):
                seqs.append((list(seg["prefix_ids"]) + list(seg[part]), start))
        seqs += [(list(seg["reference_ids"]), 0) for seg in segments]
        if self.max_length is not None:
            seqs = self._truncate(examples, prompts * 3, seqs)

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.prefix_sharing:
            output = self._packed(prompts, keys, seqs, token_keys, extra, pad_id)
        else:
            output = self._unpacked(prompts, seqs, token_keys, extra, pad_id)
        for key in ("ref_chosen_logps", "ref_rejected_logps", "branch_point"):
            if key in examples[0] and examples[0][key] is not None:
                output[key] = torch.tensor([ex[key] for ex in examples])
        assert len(seqs) == 3 * n
        return output

    def _truncate(self, examples, prompts, seqs):
        """Cut each sequence to max_length (keep_start); a sequence with nothing left to score raises."""
        out = []
        for i, ((tokens, start), prompt) in enumerate(zip(seqs, prompts)):
            room = self.max_length - len(prompt)
            if room <= start:
                group = ("chosen", "rejected", "reference")[i // len(examples)]
                raise RowError(
                    examples[i % len(examples)].get("_row", i % len(examples)),
                    group,
                    f"is cut away entirely by max_length={self.max_length}; raise max_length or shorten the row",
                )
            out.append((tokens[:room], start))
        return out

    def _unpacked(self, prompts, seqs, token_keys, extra, pad_id):
        """3B right-padded sequences with a loss mask: the layout every model supports."""
        prompts3 = prompts * 3
        sequences = [p + t for p, (t, _) in zip(prompts3, seqs)]
        masks = [[0] * (len(p) + start) + [1] * (len(t) - start) for p, (t, start) in zip(prompts3, seqs)]
        multiple = self.pad_to_multiple_of
        output = {
            "input_ids": _pad(sequences, pad_id, multiple),
            "attention_mask": _pad([[1] * len(s) for s in sequences], 0, multiple),
            "loss_mask": _pad(masks, 0, multiple),
        }
        # Per-token processor outputs (mm_token_type_ids, token_type_ids): prompt values, zeros after.
        for key, per_row in token_keys.items():
            output[key] = _pad([v + [0] * (len(s) - len(v)) for v, s in zip(per_row * 3, sequences)], 0, multiple)
        for key, value in extra.items():
            output[key] = torch.cat([value] * 3, dim=0)
        return output

    def _packed(self, prompts, keys, seqs, token_keys, extra, pad_id):
        """One tree-shaped row per question (rows with the same prompt and images)."""
        n = len(prompts)
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        rows, owners = [], []
        for members in groups.values():
            owned = [i + g * n for g in range(3) for i in members]  # chosen, rejected, reference of each row
            rows.append(pack_question(prompts[members[0]], [seqs[j] for j in owned]))
            owners.append(owned)
        length = max(len(r.tokens) for r in rows)
        for multiple in (self.pad_to_multiple_of, self.bucket_multiple):
            if multiple:
                length = bucket_length(length, multiple)
        score_seq, score_pos = [], []
        for g, (row, owned) in enumerate(zip(rows, owners)):
            for seq_id, positions in zip(owned, row.scored):
                score_seq += [seq_id] * len(positions)
                score_pos += [g * length + p for p in positions]
        output = {
            "input_ids": _pad([r.tokens for r in rows], pad_id, length),
            "position_ids": _pad([r.depth for r in rows], 0, length),
            "shift_labels": _pad([r.shift_labels for r in rows], -100, length),
            "tree_end": _pad([r.end for r in rows], -1, length),
            "score_seq": torch.tensor(score_seq, dtype=torch.long),
            "score_pos": torch.tensor(score_pos, dtype=torch.long),
            "prompt_length": torch.tensor([r.prompt_length for r in rows]),
            "packed_length": torch.tensor([len(r.tokens) for r in rows]),
        }
        if self.dense_mask:
            output["tree_mask"] = torch.from_numpy(np.stack([allowed_matrix(r.end, length) for r in rows]))
        first = [members[0] for members in groups.values()]
        for key, per_row in token_keys.items():
            output[key] = _pad([per_row[i] for i in first], 0, None)
            output[key] = torch.nn.functional.pad(output[key], (0, length - output[key].size(1)))
        for key, value in extra.items():  # vision tensors: one image set per question
            output[key] = value
        return output

    def _process_prompts(self, rows: list[dict[str, Any]]):
        """Prompt token ids (image tokens expanded), per-token processor outputs and vision tensors.

        Without prefix sharing the B prompts go through the processor once and the vision tensors
        are later repeated for the three sequence groups. With it, rows that share prompt and images
        (the same question) are processed once: the vision tensors hold one image set per question.
        """
        processor = self.processing_class
        images = [load_images(r["images"], r.get("_row", i)) for i, r in enumerate(rows)]
        texts = [render_row(processor, r, imgs)["prompt"] for r, imgs in zip(rows, images)]
        keys = [(t, tuple(_image_digest(im) for im in imgs)) for t, imgs in zip(texts, images)]
        if self.prefix_sharing:
            unique = list(dict.fromkeys(keys))
            first = [keys.index(k) for k in unique]
        else:
            first = list(range(len(rows)))
        kwargs = {"images": [images[i] for i in first]} if any(images) else {}
        processed = processor(
            text=[texts[i] for i in first],
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,
            **kwargs,
        )
        keep = processed["attention_mask"].bool()
        by_key = {keys[i]: j for j, i in enumerate(first)}
        slot = [by_key[k] for k in keys]  # which processed prompt each row uses
        prompts = [processed["input_ids"][j][keep[j]].tolist() for j in slot]
        token_keys, extra = {}, {}
        for key, value in processed.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if isinstance(value, torch.Tensor) and value.shape == processed["input_ids"].shape:
                token_keys[key] = [value[j][keep[j]].tolist() for j in slot]
            elif isinstance(value, torch.Tensor):
                extra[key] = value
        return prompts, token_keys, extra, keys


def _image_digest(image) -> str:
    """Content hash of a PIL image: rows of one question share their images only if the pixels match."""
    return hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + f"{image.size}{image.mode}"
