"""Which architectures prefix sharing is exact for, and why the others are scored unpacked.

The packed (tree) forward gives each token exactly its own ancestors through a 4D attention mask and
depth position ids. That reproduces separate scoring only where every token mixer is softmax
attention that honours the mask:

- state-space / Mamba, convolution and linear-attention layers mix tokens in layout order and never
  see the mask: branches leak into each other (measured: 0.2-0.4 nats on NemotronH, LFM2);
- chunked attention (Llama 4) restarts at chunk boundaries of the layout, not of each sequence.

Sliding-window layers are exact: each kind of attention layer gets its own tree mask, in which a
token sees an ancestor only within the window counted along its own path (`attention_windows`,
`packing.layer_allowed`). Gemma3's image tokens see their whole image (`BIDIRECTIONAL_IMAGE_TYPES`).

So prefix sharing is an allow-list of transformers' model types, each verified packed == unpacked
(log-probs and gradients) by `srpo_trl.check_prefix_sharing` on a 2-layer random model in
tests/test_architectures.py, which runs the check for every entry. Anything else is scored unpacked
(same results, more tokens), with one warning saying how to run the check on it;
`srpo_trl.allow_prefix_sharing` runs it and, if it passes, allows that config class.
"""

from __future__ import annotations

import contextlib

import torch


# Text backbones whose decoder layers are all softmax attention driven by `position_ids` and a 4D mask
# (or one 4D mask per layer type). Each is checked by tests/test_architectures.py.
TEXT_TYPES = frozenset(
    {
        "cohere2",
        "gemma",
        "gemma2",
        "gemma3_text",
        "glm4_moe",
        "gpt_oss",
        "llama",
        "mistral",
        "mixtral",
        "olmo2",
        "olmo3",
        "qwen2",
        "qwen3",
        "qwen3_moe",
    }
)
# Vision-language wrappers verified with their text backbone (mRoPE positions for the Qwen VL family,
# DeepStack for Qwen3-VL, bidirectional image attention for Gemma3; `llava` is LLaVA-1.5).
VLM_TYPES = frozenset({"gemma3", "llava", "llava_next", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"})
# Text backbones inside the VLM types above that are named after the wrapper.
_VLM_TEXT_TYPES = frozenset({"qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text"})
# Wrappers whose image tokens attend to every token of their image, both ways (`token_type_ids` == 1).
BIDIRECTIONAL_IMAGE_TYPES = frozenset({"gemma3"})

# (config class, text config class) pairs allowed in this process by `srpo_trl.allow_prefix_sharing`
# (after their check passed): a LLaVA allowed with one text backbone is not allowed with another.
_ALLOWED_CLASSES: set[tuple[type, type]] = set()


def config_key(config) -> tuple[type, type]:
    """The (config class, text config class) pair the runtime allow-list is keyed by."""
    return type(config), type(config.get_text_config())


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
    if getattr(text_config, "use_bidirectional_attention", False):
        return "its attention is bidirectional (an encoder): there is no causal prefix to share"
    return None


def attention_windows(text_config) -> dict[str, int | None]:
    """The sliding window of each kind of attention layer, as the model's own masks apply it.

    Models with `layer_types` build one mask per layer type (`{"full_attention": None,
    "sliding_attention": 4096}` for Gemma2); a model whose layers are all full attention gets one
    mask. Models without `layer_types` (Mistral, Mixtral, Qwen3-MoE) use one mask for every layer,
    windowed when `sliding_window` is set; they come back under the key `""`.
    """
    window = getattr(text_config, "sliding_window", None) or None
    layer_types = getattr(text_config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        kinds = list(dict.fromkeys(str(k) for k in layer_types))
        if "sliding_attention" not in kinds:
            return {"": None}
        return {k: window if k == "sliding_attention" else None for k in kinds}
    return {"": window}


def _how_to_check(config) -> str:
    name = type(config).__name__
    vlm = config.get_text_config() is not config
    processor = ", processor" if vlm else ""
    return (
        f"to verify it, run `srpo_trl.check_prefix_sharing(model.config{processor})`, which compares packed and "
        f"unpacked log-probs and gradients on a 2-layer random {name} model; "
        f"`srpo_trl.allow_prefix_sharing(model.config{processor})` runs the same check and, if it passes, turns "
        f"prefix sharing on for {name} in this process"
    )


def architecture_problem(config) -> str | None:
    """Why the packed tree forward would not equal separate scoring for this model config, or None."""
    text_config = config.get_text_config()
    is_vlm = text_config is not config
    model_type = config.model_type
    mixer = token_mixer_problem(text_config)
    if mixer:
        return f"model type {model_type!r}: {mixer}"
    if config_key(config) in _ALLOWED_CLASSES:
        return None
    if not type(config).__module__.startswith("transformers."):
        return (
            f"config class {type(config).__name__} (model type {model_type!r}) is not transformers' own (remote "
            f"code: its modeling may differ from the verified one); {_how_to_check(config)}"
        )
    if is_vlm and model_type not in VLM_TYPES:
        return (
            f"vision-language model type {model_type!r} is not verified for prefix sharing (verified: "
            f"{sorted(VLM_TYPES)}); {_how_to_check(config)}"
        )
    text_type = text_config.model_type
    if text_type not in TEXT_TYPES and text_type not in _VLM_TEXT_TYPES:
        return (
            f"model type {text_type!r} is not verified for prefix sharing (verified: {sorted(TEXT_TYPES)} "
            f"and the VLMs {sorted(VLM_TYPES)}); {_how_to_check(config)}"
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
