"""Tiny text models of many families, built from their configs (no hub), sized for a tokenizer.

Used by the architecture tests (prefix sharing allow-list, MoE auxiliary loss). Every model is
2 layers of hidden size 32, seeded, fp32; family-specific knobs are set so that each family's
distinctive layer (sliding window, MoE router, Mamba, convolution) is present. Sliding windows are
WINDOW tokens, shorter than the test sequences, so that the windows shape the results.
"""

import torch
import transformers


COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)

WINDOW = 8
SLIDING_FULL = {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}

# model_type -> (config class, model class, family-specific config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", SLIDING_FULL),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", SLIDING_FULL),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", SLIDING_FULL),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", SLIDING_FULL),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            **SLIDING_FULL,
        },
    ),
    # hybrids: never packed
    "lfm2": (
        "Lfm2Config",
        "Lfm2ForCausalLM",
        {"layer_types": ["conv", "full_attention"], "block_dim": 32, "block_ff_dim": 64, "conv_L_cache": 3},
    ),
    "nemotron_h": (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        {
            "layers_block_type": ["mamba", "attention"],
            "mamba_num_heads": 4,
            "mamba_head_dim": 8,
            "ssm_state_size": 8,
            "n_groups": 1,
            "mamba_n_groups": 1,
            "use_mamba_kernels": False,
            "chunk_size": 8,
            "expand": 1,
        },
    ),
}
MOE_TYPES = ("qwen3_moe", "mixtral", "gpt_oss")


def tiny_model(model_type: str, tok, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    config_name, model_name, extra = FAMILIES[model_type]
    pad = tok.pad_token_id
    kwargs = dict(COMMON, vocab_size=len(tok), pad_token_id=pad, bos_token_id=pad, eos_token_id=tok.eos_token_id)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    return model.float().eval()
