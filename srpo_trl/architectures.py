"""Which architectures prefix sharing is exact for, and why the others are scored unpacked.

The packed (tree) forward gives each token exactly its own ancestors through a 4D attention mask and
depth position ids. That reproduces separate scoring only where every token mixer is softmax
attention that honours the mask:

- state-space / Mamba, convolution and linear-attention layers mix tokens in layout order and never
  see the mask: branches leak into each other (measured: 0.2-0.4 nats on NemotronH, LFM2);
- a custom 4D mask replaces the model's sliding-window mask, so sliding-window layers are exact only
  while no scored sequence is longer than the window (guaranteed by `max_length <= window`);
- chunked attention (Llama 4) restarts at chunk boundaries of the layout, not of each sequence.

So prefix sharing is an allow-list: model types verified packed == unpacked by a test in
tests/test_architectures.py. Anything else is scored unpacked (same results, more tokens).
"""

from __future__ import annotations

import contextlib

import torch


# Text backbones whose decoder layers are all softmax attention driven by `position_ids` and a 4D mask.
# Each entry has a packed == unpacked test (tests/test_architectures.py).
TEXT_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "qwen3_moe", "mixtral", "gpt_oss"}
)
# Vision-language wrappers verified with their text backbone (mRoPE positions for the Qwen VL family;
# `llava` is LLaVA-1.5). Tests: tests/test_prefix_sharing.py, tests/test_tree_attention.py.
VLM_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "llava_next", "llava"})
# Text backbones inside the VLM types above (their configs name them after the wrapper).
_VLM_TEXT_TYPES = frozenset({"qwen2_vl_text", "qwen2_5_vl_text"})

_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def _layer_kinds(text_config) -> list[str]:
    kinds = []
    for name in ("layer_types", "layers_block_type"):
        value = getattr(text_config, name, None)
        if isinstance(value, (list, tuple)):
            kinds += [str(v) for v in value]
    pattern = getattr(text_config, "hybrid_override_pattern", None)  # NemotronH: "M" Mamba, "*" attention, "-" MLP
    if isinstance(pattern, str) and "M" in pattern:
        kinds.append("mamba")
    return kinds


def token_mixer_problem(text_config) -> str | None:
    """Why this text backbone's layers do not all honour a tree mask, or None when nothing is seen."""
    mixers = sorted({k for k in _layer_kinds(text_config) if k not in _ATTENTION_LAYERS and k not in ("mlp", "moe")})
    if mixers:
        return (
            f"it has non-attention or chunked token-mixing layers ({', '.join(mixers)}) that do not see the tree mask"
        )
    if any(getattr(text_config, name, None) for name in ("mamba_d_ssm", "mamba_num_heads", "ssm_cfg", "conv_L_cache")):
        return "it has state-space / convolution token-mixing layers that do not see the tree mask"
    if getattr(text_config, "attention_chunk_size", None):
        return "chunked attention restarts at chunk boundaries of the packed layout"
    return None


def sliding_window(text_config) -> int | None:
    """The window of the model's sliding-window layers, or None when it has none."""
    window = getattr(text_config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(text_config, "use_sliding_window", True) else None


def architecture_problem(config, max_length: int | None) -> str | None:
    """Why the packed tree forward would not equal separate scoring for this model config, or None."""
    text_config = config.get_text_config()
    is_vlm = text_config is not config
    model_type = config.model_type
    mixer = token_mixer_problem(text_config)
    if mixer:
        return f"model type {model_type!r}: {mixer}"
    if is_vlm and model_type not in VLM_TYPES:
        return f"vision-language model type {model_type!r} is not verified for prefix sharing (verified: {sorted(VLM_TYPES)})"
    text_type = text_config.model_type
    if text_type not in TEXT_TYPES and text_type not in _VLM_TEXT_TYPES:
        return (
            f"model type {text_type!r} is not verified for prefix sharing (verified: {sorted(TEXT_TYPES)} "
            f"and the VLMs {sorted(VLM_TYPES)})"
        )
    window = sliding_window(text_config)
    if window is not None and (max_length is None or max_length > window):
        return (
            f"model type {text_type!r} has sliding-window layers (window {window}) and max_length={max_length} lets a "
            f"sequence outgrow the window, which the tree mask does not express; set max_length <= {window} to share"
        )
    return None


@contextlib.contextmanager
def packed_router_mask(inputs: dict):
    """Let the MoE load-balancing loss of a packed forward count the real (non-padding) tokens.

    TRL's fused LM head computes the router auxiliary loss with Mixtral's `load_balancing_loss_func`
    and the `attention_mask` the model was given. A packed batch's mask is the 4D tree mask (or a
    FlexAttention BlockMask), which that function cannot read; for the duration of the forward it
    gets the 2D mask of the packed rows' real tokens instead. Unpacked batches are left alone.
    """
    if "packed_length" not in inputs:
        yield
        return
    from transformers.models.mixtral import modeling_mixtral

    lengths = inputs["packed_length"]
    width = inputs["input_ids"].size(1)
    real = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()
    original = modeling_mixtral.load_balancing_loss_func

    def load_balancing_loss_func(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            attention_mask = real
        return original(gate_logits, num_experts, top_k, attention_mask)

    modeling_mixtral.load_balancing_loss_func = load_balancing_loss_func
    try:
        yield
    finally:
        modeling_mixtral.load_balancing_loss_func = original
