"""Sampling many continuations of one prompt from one prefill (the in-process backend's decode loop).

``model.generate`` prefills every sample of a prompt on its own: at a branch point with N samples,
prompt + image + prefix are computed N times, and a batch keeps decoding rows that already stopped.
:func:`sample_shared_prefix` instead

1. prefills each distinct request once (several requests per batch, left padded, images included),
2. copies the cache rows to the samples (``Cache.reorder_cache`` with repeated indices),
3. decodes all samples of the batch together, one token per step, and drops a row from the batch
   (its cache rows included) as soon as it stops (a stop token or ``max_new_tokens``).

What is sampled is what ``generate`` samples: the logits of the last position, the generation
config's repetition penalty, then temperature, top-k, top-p and min-p (the warpers ``generate``
applies, in its order), then one token drawn from the resulting distribution. Only how the random
number is drawn differs: each sample draws by inverse CDF from its own stream of uniforms, a
counter-based hash of (seed, request, sample, step) (:func:`uniforms`), so a sample depends only
on the seed and its place among the requests, not on the batch size, on which other rows share its
batch or on when they stop. A generation config asking for anything else (beam search,
``no_repeat_ngram_size``, bad words, ...) is not supported here: :func:`unsupported_settings`
names it, and the backend falls back to ``generate``.

Positions follow ``generate``: real positions (left padding skipped) for 1-D RoPE models; Qwen-VL
style 3-D RoPE models (an inner model with ``rope_deltas``) compute their own positions at prefill
when images are present, and decode at ``position + rope_delta`` as ``generate`` does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


__all__ = ["SharedPrefixResult", "sample_shared_prefix", "uniforms", "inverse_cdf", "unsupported_settings"]

# Settings of a GenerationConfig that the loop implements; any other field must keep its default.
_IMPLEMENTED = {
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "do_sample",
    "max_new_tokens",
    "max_length",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "decoder_start_token_id",
    "use_cache",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
    "num_return_sequences",
    "cache_implementation",
    "transformers_version",
}
_CHECKED = (
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "bad_words_ids",
    "sequence_bias",
    "guidance_scale",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "renormalize_logits",
    "remove_invalid_values",
    "stop_strings",
    "max_time",
    "watermarking_config",
    "assistant_model",
    "prompt_lookup_num_tokens",
)


def unsupported_settings(generation_config: Any) -> list[str]:
    """The generation-config fields this loop does not implement that differ from their defaults
    (empty: the loop samples exactly what ``generate`` samples)."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    out = []
    for name in _CHECKED:
        value = getattr(generation_config, name, None)
        base = getattr(default, name, None)
        if value != base and not (name == "min_length" and not value):
            out.append(f"{name}={value!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Random numbers: one uniform stream per (seed, request, sample)
# ----------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays (wrap-around arithmetic is defined for numpy uint64)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _stream_keys(seed: int, request: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """One key per (request, sample) pair: the seed of its stream of uniforms."""
    h = _splitmix(np.full(np.shape(request), np.uint64(seed % 2**64)))
    h = _splitmix(h ^ np.asarray(request, dtype=np.uint64))
    return _splitmix(h ^ np.asarray(sample, dtype=np.uint64))


def _step_uniforms(keys: np.ndarray, step) -> np.ndarray:
    """``step``: an int, or an array broadcasting against ``keys`` (every step of every key at once)."""
    h = _splitmix(keys ^ np.asarray(step, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def uniforms(seed: int, request: np.ndarray, sample: np.ndarray, step: int) -> np.ndarray:
    """Uniforms in [0, 1) (53 bits), one per (request, sample) pair, for decode step ``step``: a
    hash of (seed, request, sample, step), so the same sample draws the same numbers whatever
    batch it is decoded in."""
    return _step_uniforms(_stream_keys(seed, request, sample), step)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] for the uniforms ``u`` [B]: the first index whose
    cumulative probability exceeds ``u`` times the row's total (tokens of probability 0 are never
    drawn). Computed in float64, so rounding of the cumulative sum stays far below 1 / V."""
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass
class SharedPrefixResult:
    """Token ids per request and sample (stop token excluded), and what it cost."""

    tokens: list[list[list[int]]]
    prefill_tokens: int
    generated_tokens: int
    prefills: int


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rope_holder(model):
    """The module that keeps ``rope_deltas`` (Qwen2-VL / Qwen2.5-VL style 3-D RoPE), or None."""
    base = _base_model(model)
    for candidate in (getattr(base, "model", None), base):
        if candidate is not None and hasattr(candidate, "rope_deltas"):
            return candidate
    return None


def _forward_params(model):
    # The class's forward: a trainer may have put a wrapper with another signature on the instance.
    return inspect.signature(type(_base_model(model)).forward).parameters


def _cache_kwarg(model) -> str:
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _logits_to_keep(model) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}


# Config fields that make a model's logits more than its output layer's (the check below would miss
# them on a random model whose logits are all near 0).
_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _head_modifiers(config) -> list[str]:
    configs = [config, getattr(config, "text_config", None)] if config is not None else []
    return [
        name for c in configs if c is not None for name in _HEAD_FIELDS if getattr(c, name, None) not in (None, 1, 1.0)
    ]


class _Decoder:
    """One decode step: the whole model, or, once checked equal on a first step, its text decoder and
    output head directly, or (a step without a mask, every layer full attention) the decoder's own
    parts in its order: embedding, rotary embedding, layers, norm. A decode step of a small model is
    mostly Python overhead: the wrapper of a vision-language model (vision inputs, position
    bookkeeping) and the decoder's (mask creation, output capturing, argument checks) are a good part
    of it. A model whose head does more than a linear layer (soft-capping, scaling) or whose decoder
    does more than its parts (Gemma's embedding scale) fails its check and keeps the longer way.
    Sliding-window or hybrid layers never take the shortest way: what they attend to changes with the
    position, which a check on one step cannot see."""

    def __init__(self, model, state: dict | None):
        self.model = model
        self.state = state if state is not None else {}
        self.cache_kw = _cache_kwarg(model)
        base = _base_model(model)
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        usable = decoder is not None and decoder is not base and isinstance(head, torch.nn.Linear)
        usable = usable and not _head_modifiers(getattr(base, "config", None))
        self.decoder, self.head = (decoder, head) if usable else (None, None)
        if self.decoder is not None:
            params = inspect.signature(type(self.decoder).forward).parameters
            self.decoder_cache_kw = "cache" if "cache" in params else "past_key_values"
        if not usable:
            self.state["direct"] = False
        self.layers = self._layers_plan()
        if self.layers is None:
            self.state["layers"] = False

    def _layers_plan(self):
        """The decoder's layers and the cache keyword they take, when its forward is only
        embedding -> rotary embedding -> full-attention layers -> norm (the parts exist, no layer
        slides or keeps a recurrent state); else None."""
        dec = self.decoder
        if dec is None or not all(hasattr(dec, n) for n in ("embed_tokens", "rotary_emb", "layers", "norm")):
            return None
        config = getattr(dec, "config", None)
        types = getattr(config, "layer_types", None)
        if types is not None and any(t != "full_attention" for t in types):
            return None
        # Without layer_types (Mistral, Mixtral), a set window slides on every layer.
        if types is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return None
        layers = list(dec.layers)
        if not layers:
            return None
        params = inspect.signature(type(layers[0]).forward).parameters
        if "position_embeddings" not in params:
            return None
        return layers, ("cache" if "cache" in params else "past_key_values")

    def rotary_table(self, positions: torch.Tensor):
        """(cos, sin) of a batch's every decode position at once ([rows, steps, dim]), for the
        layers' way to slice per step; None where that way is off, or where the rotary embedding is
        not the plain one (dynamic or long-context scaling depends on the positions seen). Each
        entry is one product and a cos / sin, as a step computes it alone."""
        if self.layers is None or self.state.get("direct") is False or self.state.get("layers") is False:
            return None
        rotary = self.decoder.rotary_emb
        if getattr(rotary, "rope_type", "default") != "default":
            return None
        cos, sin = rotary(self.decoder.embed_tokens.weight[:0], positions)  # under sample_shared_prefix's no_grad
        rows, steps = positions.shape[-2:]
        return (cos, sin) if cos.shape[:2] == (rows, steps) and sin.shape == cos.shape else None

    def _by_layers(self, inputs: dict, cache, rotary=None):
        layers, cache_kw = self.layers
        dec, pos = self.decoder, inputs["position_ids"]
        hidden = dec.embed_tokens(inputs["input_ids"])
        rotary = rotary if rotary is not None else dec.rotary_emb(hidden, pos)
        layer_pos = None if pos.ndim == 3 else pos  # 3-D (M-RoPE) positions stay with the rotary embedding
        for layer in layers:
            out = layer(
                hidden,
                attention_mask=None,
                position_embeddings=rotary,
                position_ids=layer_pos,
                use_cache=True,
                **{cache_kw: cache},
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return self.head(dec.norm(hidden)[:, -1, :]).float(), cache

    def _full(self, inputs: dict, cache):
        out = self.model(**inputs, use_cache=True, **{self.cache_kw: cache})
        return out.logits[:, -1, :].float(), getattr(out, "cache", None) or getattr(out, "past_key_values", None)

    def _direct(self, inputs: dict, cache):
        out = self.decoder(**inputs, use_cache=True, **{self.decoder_cache_kw: cache})
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return self.head(out.last_hidden_state[:, -1, :]).float(), new_cache

    def _check(self, key: str, longer, shorter, cache):
        """Run a step both ways on copies of the cache; ``state[key]``: whether they agree. The same
        kernels in the same order agree up to float32 rounding (~1e-6 of logits of size ~10); anything
        the skipped code adds (soft-capping, scaling) differs by far more than 1e-4."""
        import copy

        want, new_cache = longer(copy.deepcopy(cache))
        got, _ = shorter(copy.deepcopy(cache))
        self.state[key] = bool(torch.allclose(want, got, rtol=1e-4, atol=1e-4))
        return want, new_cache

    def __call__(self, inputs: dict, cache, rotary=None):
        """``rotary``: this step's slice of :meth:`rotary_table`, used by the layers' way only."""
        direct = self.state.get("direct")
        if direct is None:  # first step ever: the model and its decoder + head must agree
            return self._check("direct", lambda c: self._full(inputs, c), lambda c: self._direct(inputs, c), cache)
        if not direct:
            return self._full(inputs, cache)
        if inputs.get("attention_mask") is not None:  # left padding: the decoder builds the mask
            return self._direct(inputs, cache)
        layers = self.state.get("layers")
        if layers is None:  # first step without a mask: the decoder and its parts must agree
            return self._check(
                "layers", lambda c: self._direct(inputs, c), lambda c: self._by_layers(inputs, c, rotary), cache
            )
        return self._by_layers(inputs, cache, rotary) if layers else self._direct(inputs, cache)


def _processors(generation_config, do_sample: bool) -> list:
    """The logits processors ``generate`` would apply for the implemented settings, in its order
    (a plain list: ``LogitsProcessorList`` inspects every processor's signature on every call)."""
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = []
    gc = generation_config
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(gc.repetition_penalty))
    if do_sample:
        if gc.temperature is not None and gc.temperature != 1.0:
            out.append(TemperatureLogitsWarper(gc.temperature))
        if gc.top_k is not None and gc.top_k != 0:
            out.append(TopKLogitsWarper(top_k=gc.top_k, min_tokens_to_keep=1))
        if gc.top_p is not None and gc.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=gc.top_p, min_tokens_to_keep=1))
        if gc.min_p is not None:
            out.append(MinPLogitsWarper(min_p=gc.min_p, min_tokens_to_keep=1))
    return out


@torch.no_grad()
def sample_shared_prefix(
    model: Any,
    encoded: list[dict],
    stop_ids: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    generation_config: Any,
    do_sample: bool,
    seed: int,
    batch_size: int,
    collate: Callable[[list[dict]], dict],
    device: Any,
    on_batch: Callable[[], None] | None = None,
    trace: list | None = None,
    decode_state: dict | None = None,
) -> SharedPrefixResult:
    """``num_samples`` continuations of each encoded request (see the module docstring).

    ``encoded``: per request, ``{"per_token": {...}, "rest": {...}}`` as the backend encodes it;
    ``collate`` left-pads a list of them into model inputs. A batch holds
    ``max(1, batch_size // num_samples)`` requests (a request's samples are never split, so that it
    is prefilled once). ``trace`` (tests): receives ``(request, sample, step, log_probs)`` of every
    row at every step, the distribution the token was drawn from. ``decode_state``: a dict kept by
    the caller across calls, remembering whether decode steps may call the text decoder directly.
    """
    per_batch = max(1, batch_size // num_samples)
    tokens: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in encoded]
    prefill_tokens = generated = prefills = 0
    processors = _processors(generation_config, do_sample)
    needs_history = bool(generation_config.repetition_penalty not in (None, 1.0))
    step_fn = _Decoder(model, decode_state)
    keep = _logits_to_keep(model)
    rope = _rope_holder(model)
    for start in range(0, len(encoded), per_batch):
        group = list(range(start, min(start + per_batch, len(encoded))))
        batch = collate([encoded[r] for r in group])
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        mask = batch["attention_mask"]
        real = mask.sum(-1)  # real (unpadded) prompt lengths
        prefill_tokens += int(real.sum())
        prefills += len(group)
        positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        has_vision = any(k in batch for k in ("image_grid_thw", "video_grid_thw"))
        kwargs = dict(batch)
        if rope is not None:
            rope.rope_deltas = None  # never a stale value of an earlier call
        if not (rope is not None and has_vision):  # 3-D RoPE with images: the model computes its positions
            kwargs["position_ids"] = positions
        out = model(**kwargs, use_cache=True, **keep)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        deltas = None
        if rope is not None:
            deltas = rope.rope_deltas if rope.rope_deltas is not None else torch.zeros_like(real).unsqueeze(-1)
            deltas = deltas.reshape(-1).to(device)

        # Copy every request's row to its samples.
        rows = torch.arange(len(group), device=device).repeat_interleave(num_samples)
        cache.reorder_cache(rows)
        logits = out.logits[:, -1, :].float().index_select(0, rows)
        mask = mask.index_select(0, rows)
        real = real.index_select(0, rows)
        deltas = deltas.index_select(0, rows) if deltas is not None else None
        ids = batch["input_ids"].index_select(0, rows)
        # History for the repetition penalty: pad positions hold the row's first real token (a
        # repeated index changes nothing in a gather / scatter), so padding is never penalized.
        first = ids.gather(1, (ids.shape[1] - real).clamp(max=ids.shape[1] - 1).unsqueeze(-1))
        history = torch.where(mask.bool(), ids, first)
        req = np.asarray([group[i] for i in rows.tolist()], dtype=np.uint64)
        smp = np.tile(np.arange(num_samples, dtype=np.uint64), len(group))
        keys = _stream_keys(seed, req, smp)
        stops = [set(stop_ids[group[i]]) for i in rows.tolist()]
        alive = list(range(len(req)))  # index into req/smp/stops of each row still decoding
        # Without left padding (one request per batch, or prompts of one length) a decode step
        # needs no mask: building one every step costs as much as a small model's layer.
        padded = bool((mask == 0).any())

        # Every decode step's positions (a step's own: real length + step, plus the row's M-RoPE
        # delta) and, for the layers' way, their rotary embedding at once.
        steps = torch.arange(max_new_tokens, device=device)
        table = real.unsqueeze(-1) + steps
        if rope is not None:
            table = (table + deltas.unsqueeze(-1)).unsqueeze(0).expand(3, -1, -1)
        rotary = step_fn.rotary_table(table)

        # Each row's uniforms for every step at once (a hash per row and step: see `uniforms`).
        steps_u = np.arange(max_new_tokens, dtype=np.uint64)
        draws = torch.from_numpy(_step_uniforms(keys[:, None], steps_u[None, :])) if do_sample else None
        for step in range(max_new_tokens):
            scores = logits
            for processor in processors:
                scores = processor(history, scores)
            if do_sample:
                probs = torch.softmax(scores, dim=-1)
                u = draws[:, step]  # the rows still decoding (draws leaves the batch with them)
                chosen = inverse_cdf(probs, u)
            else:
                chosen = scores.argmax(dim=-1)
            if trace is not None:
                log_probs = torch.log_softmax(scores, dim=-1).cpu()
                for i, a in enumerate(alive):
                    trace.append((int(req[a]), int(smp[a]), step, log_probs[i]))
            generated += len(alive)
            keep_rows = []
            for i, (a, tok) in enumerate(zip(alive, chosen.tolist())):
                if tok in stops[a]:
                    continue
                tokens[int(req[a])][int(smp[a])].append(tok)
                keep_rows.append(i)
            if step == max_new_tokens - 1 or not keep_rows:
                break
            if len(keep_rows) < len(alive):  # finished rows leave the batch
                index = torch.tensor(keep_rows, device=device)
                cache.reorder_cache(index)
                mask, history, chosen = (t.index_select(0, index) for t in (mask, history, chosen))
                table = table.index_select(-2, index)
                draws = draws[keep_rows] if draws is not None else None  # on the CPU, as the hash made them
                rotary = tuple(t.index_select(0, index) for t in rotary) if rotary is not None else None
                alive = [alive[i] for i in keep_rows]
                padded = padded and bool((mask == 0).any())
            if padded:  # without padding no mask is passed (see above): nothing to extend
                mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            if needs_history:  # only the repetition penalty reads the history
                history = torch.cat([history, chosen.unsqueeze(-1)], dim=1)
            inputs = {"input_ids": chosen.unsqueeze(-1), "attention_mask": mask if padded else None}
            inputs["position_ids"] = table[..., step : step + 1]
            here = tuple(t[:, step : step + 1] for t in rotary) if rotary is not None else None
            logits, cache = step_fn(inputs, cache, here)
        del cache
        if on_batch is not None:
            on_batch()
    return SharedPrefixResult(tokens, prefill_tokens, generated, prefills)
