"""Tree attention: packed step-pair trees through transformers' public `AttentionInterface`.

SRPO registers its own attention function, `"srpo_tree"`. With a FlexAttention `BlockMask` (built
from the tree's pre-order subtree ends by `packing.tree_block_mask`, never an [L, L] tensor) it runs
FlexAttention, block-sparse; with anything else (a padding mask, no mask) it is transformers' sdpa,
and the registered mask function is sdpa's, so unpacked forwards, evaluation and generation behave
exactly as under `attn_implementation="sdpa"`. A 4D mask (a BlockMask is one) is passed through by
transformers' mask creation untouched, so the model never replaces the tree mask. Models with
sliding-window layers get one BlockMask per layer type (a dict, as transformers' decoders take
their per-layer masks), each with the window counted along every token's own path. FlexAttention
here has no attention-logit softcapping or attention sinks: Gemma2 and GPT-OSS keep the dense mask.

Only the text decoder is switched (`set_attn_implementation({"text_config": "srpo_tree"})` for
vision-language models): the vision tower keeps its own attention. This works for every model whose
attention layers call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` (Qwen2/2.5, Qwen2-VL/2.5-VL's
decoder, LLaVA-NeXT's language model, Llama, Mistral, ...), including models that transformers
does not let use `"flex_attention"` (Qwen2.5-VL).

When it is used (`choose_tree_attention`): on CUDA, for packed batches, when the attention runs in
bf16 or fp16 (weights or autocast) and the model's attention is sdpa (or unset). Otherwise the
packed path gives the model a dense [L, L] float mask through sdpa / eager, with one warning saying
why: PyTorch has no FlexAttention backward on CPU; fp32 FlexAttention failed to compile on CUDA
(torch 2.11, `NoValidChoicesError`); eager attention was asked for. `SRPO_TRL_TREE_ATTENTION`
(`auto`, `flex`, `dense`) overrides the choice.

Compilation: FlexAttention is only fast compiled. Packed lengths are bucketed to multiples of the
block size (128) by the collator, and on CUDA the kernel is compiled with automatic dynamic shapes,
so a run compiles a few times during warm-up, not once per batch. `compile_count()` says how many
graphs were compiled.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)

TREE_ATTENTION = "srpo_tree"
_ENV_CHOICE = "SRPO_TRL_TREE_ATTENTION"
_ENV_COMPILE = "SRPO_TRL_FLEX_COMPILE"

_compiled: dict = {}
_compiles = 0
_registered = False


def compile_count() -> int:
    """Graphs compiled so far by the tree attention's FlexAttention (forward graphs; each includes
    its backward). Stays at 0 where FlexAttention runs uncompiled."""
    return _compiles


def _counting_inductor(gm, example_inputs):
    global _compiles
    _compiles += 1
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _should_compile(device: torch.device) -> bool:
    value = os.environ.get(_ENV_COMPILE)
    if value is not None:
        return value not in ("0", "false", "False", "")
    return device.type == "cuda"  # on CPU a compile takes ~10 s per shape and only serves no-grad forwards


def flex_attention_fn(device: torch.device, compile: bool | None = None, dynamic: bool | None = None):
    """FlexAttention, compiled once per (device type, dynamic) where compilation is on.

    `dynamic=None` (CUDA default) lets dynamo make the length and batch dimensions symbolic after
    the first new shape. On CPU, torch 2.13's inductor fails to build dynamic-shape FlexAttention
    (a C++ error), so CPU compiles are static: one per (rows, bucketed length)."""
    from torch.nn.attention.flex_attention import flex_attention

    if compile is None:
        compile = _should_compile(device)
    if not compile:
        return flex_attention
    if dynamic is None and device.type == "cpu":
        dynamic = False
    key = (device.type, dynamic)
    if key not in _compiled:
        # dynamo's default of 8 compiled variants per function would leave later buckets (and every
        # variant of a static CPU compile) to uncompiled FlexAttention, which materializes L x L
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, name, max(getattr(config, name), 64))
        _compiled[key] = torch.compile(flex_attention, backend=_counting_inductor, dynamic=dynamic)
    return _compiled[key]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _dense_from_block_mask(block_mask, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The boolean [B, 1, Lq, Lk] mask a BlockMask's mask function describes (CPU backward only)."""
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(block_mask.mask_mod, query.shape[0], None, query.shape[2], key.shape[2], device=query.device)


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
):
    """transformers attention function: FlexAttention for a BlockMask, sdpa for anything else."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            "SRPO's tree attention has no attention-logit softcapping or attention sinks (Gemma2, GPT-OSS); "
            "use the dense tree mask (SRPO_TRL_TREE_ATTENTION=dense or auto) or the model's own flex_attention."
        )
    if dropout > 0:
        raise ValueError("SRPO's tree attention (FlexAttention) has no attention dropout; set attention_dropout=0.")
    # Under autocast, rotary embeddings leave q/k in the weights' dtype and v in the autocast dtype;
    # sdpa casts them itself, FlexAttention needs one dtype.
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if device_type == "cpu" and needs_grad:
        # PyTorch has no FlexAttention backward on CPU: the same mask function, evaluated densely.
        dense = _dense_from_block_mask(attention_mask, query, key)
        return sdpa_attention_forward(module, query, key, value, dense, dropout=0.0, scaling=scaling, is_causal=False)
    groups = query.shape[1] // key.shape[1]
    enable_gqa = groups > 1
    if enable_gqa and groups & (groups - 1):  # as transformers' flex path: GQA groups that are not a power of 2
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
        enable_gqa = False
    flex = flex_attention_fn(query.device)
    out = flex(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register `"srpo_tree"` with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)  # non-tree forwards: sdpa's own masks
    _registered = True


def text_attn_implementation(model) -> str | None:
    config = model.config
    text_config = config.get_text_config()
    return getattr(text_config, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)


def use_tree_attention(model) -> None:
    """Switch `model`'s text decoder to `"srpo_tree"`; a vision tower keeps its attention."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.get_text_config() is base.config:
        base.set_attn_implementation(TREE_ATTENTION)
    else:
        base.set_attn_implementation({"text_config": TREE_ATTENTION})


def ensure_tree_attention(model) -> None:
    """Before a forward with a tree BlockMask: switch `model` (a reference model, say, which the
    trainer did not set up) to `"srpo_tree"` unless it takes a BlockMask already."""
    if text_attn_implementation(model) not in (TREE_ATTENTION, "flex_attention"):
        use_tree_attention(model)


def _tree_attention_gap(model) -> str | None:
    """What the model's attention does that `tree_attention_forward`'s FlexAttention call does not."""
    if getattr(model.config.get_text_config(), "attn_logit_softcapping", None):
        return "attention-logit softcapping (Gemma2)"
    if any(name.endswith(".sinks") for name, _ in model.named_parameters()):
        return "attention sinks (GPT-OSS)"
    return None


@dataclass
class TreeAttentionChoice:
    block_mask: bool  # True: FlexAttention BlockMask from subtree ends; False: dense [L, L] mask
    switch_to_tree: bool  # set the text decoder's attention to "srpo_tree"
    why: str  # why the dense mask is used (empty when block_mask)


def choose_tree_attention(model, device_type: str, compute_dtype: torch.dtype) -> TreeAttentionChoice:
    """How packed (tree) batches attend, for this model, device and attention dtype."""
    attn = text_attn_implementation(model)
    forced = os.environ.get(_ENV_CHOICE, "auto")
    if forced not in ("auto", "flex", "dense"):
        raise ValueError(f"{_ENV_CHOICE}={forced!r}: use 'auto', 'flex' or 'dense'.")
    if attn == "flex_attention":  # the model's own FlexAttention takes the BlockMask as it is
        return TreeAttentionChoice(True, False, "")
    unsupported = _tree_attention_gap(model)
    if unsupported:
        return TreeAttentionChoice(False, False, f"SRPO's tree attention has no {unsupported}")
    if forced == "dense":
        return TreeAttentionChoice(False, False, f"{_ENV_CHOICE}=dense")
    if forced == "flex":
        return TreeAttentionChoice(True, True, "")
    if attn == "eager":
        return TreeAttentionChoice(
            False, False, "attn_implementation='eager' was asked for; use 'sdpa' for tree attention on CUDA"
        )
    if attn not in (None, "sdpa", TREE_ATTENTION):
        return TreeAttentionChoice(False, False, f"attention implementation {attn!r}")
    if device_type != "cuda":
        return TreeAttentionChoice(False, False, f"PyTorch has no FlexAttention backward on {device_type}")
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return TreeAttentionChoice(
            False,
            False,
            "fp32 FlexAttention does not compile on CUDA (torch 2.11: NoValidChoicesError); train with bf16=True for tree attention",
        )
    return TreeAttentionChoice(True, True, "")


__all__ = [
    "TREE_ATTENTION",
    "TreeAttentionChoice",
    "choose_tree_attention",
    "compile_count",
    "ensure_tree_attention",
    "flex_attention_fn",
    "register",
    "tree_attention_forward",
    "use_tree_attention",
]
