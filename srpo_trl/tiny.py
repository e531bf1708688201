"""Tiny tokenizers, models and processors built entirely in code (no model hub).

Tests, the demo and CI cannot download anything, so every model family SRPO supports has a
miniature here: a byte-level BPE tokenizer with a ChatML template, a Qwen2 causal LM, Qwen2.5-VL,
Qwen2-VL and LLaVA-NeXT. They are real transformers classes with real configs, just a few thousand
parameters, so they exercise the same code paths (processors, vision towers, rope) as the full
models. Seeds make weights reproducible; building never touches the global RNG.

The traps behind the numbers (torchvision, rope sections, image sizes) are noted where each model is built.
"""

from __future__ import annotations

import functools
import json

import torch
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .processors import (  # noqa: F401
    IMAGE_ONLY_PROCESSORS,
    Qwen2_5_VLImageOnlyProcessor,
    Qwen2VLImageOnlyProcessor,
    Qwen3VLImageOnlyProcessor,
)


# --- tokenizer ------------------------------------------------------------------------------------

PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
LLAVA_IMAGE = "<image>"
# Gemma3's image tokens: the prompt's placeholder (begin of image), the soft tokens the processor
# expands it into, and the end of image. Added after the BPE's own specials (gemma style only), so
# every other style keeps its ids.
BOI, IMAGE_SOFT, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD, LLAVA_IMAGE]

# A little English about images, safety and step-by-step answers, so common words become single
# tokens and test sequences stay short.
CORPUS = [
    "The image shows a bottle of bleach on a shelf next to a cleaner.",
    "What is in the image? What should I do with this? Is this safe?",
    "The user wants to clean the kitchen. The picture shows a knife and a plant.",
    "Mixing bleach with acid cleaners makes toxic gas. Never mix them in a closed room.",
    "I cannot help with that, but here is a safe way to do it.",
    "Step 1: look at the picture. Step 2: think about the risk. Step 3: answer the question.",
    "Answer: store it safely, keep it away from children, and use it alone.",
    "Yes, it is safe to water the plant. No, it is poisonous, do not eat it.",
    "Can these two go together? How do I clean the toilet fastest?",
    "The assistant explains the reason step by step and then gives a final answer.",
    "A red square, a blue circle and a green triangle are in the photo.",
    "You are a helpful and harmless assistant. Please describe the scene.",
    "The model should refuse harmful requests and help with safe ones.",
    "There is a person, a car, a dog, a cat, a tree, a house and a road.",
    "First, second, third, then, because, so, therefore, however, finally.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000, one two three four five.",
]

# ChatML as Qwen renders it. Structured content: text parts verbatim, image parts as the model
# family's placeholder. Message content is never stripped: the trainer relies on
# template(prompt + [assistant X]) == template(prompt, add_generation_prompt=True) + X + "<|im_end|>\n".
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- elif part['type'] in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "{{- IMAGE -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- VIDEO -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

IMAGE_STYLES = {
    # style: (image placeholder in the template, video placeholder, tokenizer's image token)
    "qwen": (VISION_START + IMAGE_PAD + VISION_END, VISION_START + VIDEO_PAD + VISION_END, IMAGE_PAD),
    # LLaVA-NeXT's own templates put a newline after each <image>; it also keeps the placeholder
    # runs of consecutive images apart.
    "llava": (LLAVA_IMAGE + "\n", LLAVA_IMAGE + "\n", LLAVA_IMAGE),
    # Gemma3: the template writes <start_of_image>; the processor expands it to
    # "\n\n<start_of_image><image_soft_token>...<end_of_image>\n\n".
    "gemma": (BOI, BOI, IMAGE_SOFT),
}


def chat_template(image_style: str = "qwen") -> str:
    """The ChatML Jinja template with image parts rendered for ``image_style`` ("qwen" or "llava")."""
    image, video, _ = IMAGE_STYLES[image_style]
    return _CHAT_TEMPLATE.replace("IMAGE", repr(image)).replace("VIDEO", repr(video))


@functools.lru_cache(maxsize=16)
def _trained_bpe(corpus: tuple[str, ...], vocab_size: int) -> tuple[str, str]:
    """Train a byte-level BPE once per (corpus, vocab_size): its (vocab JSON, merges JSON).

    Trained with exactly Qwen2's normalizer and pre-tokenizer, because a saved folder reloads as
    ``Qwen2Tokenizer`` (``AutoTokenizer`` follows the model type), which rebuilds that pipeline
    around the vocabulary: any other pipeline would tokenize differently after a round trip.
    """
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import Qwen2Tokenizer

    template = Qwen2Tokenizer().backend_tokenizer  # Qwen2's normalizer, pre-tokenizer and decoder
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = template.pre_tokenizer
    tok.decoder = template.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..7, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return json.dumps(model["vocab"]), json.dumps(model["merges"])


def build_tokenizer(
    corpus: list[str] | None = None, vocab_size: int = 512, image_style: str = "qwen"
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with Qwen's ChatML special tokens and template.

    Trained on the built-in ``CORPUS`` plus ``corpus``; the same inputs give the same vocabulary.
    It is a ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``), the class a saved folder reloads
    as. ``eos`` is ``<|im_end|>`` (a chat turn ends with it), ``pad`` is ``<|endoftext|>``, there
    is no BOS (like Qwen). ``image_style="llava"`` renders image parts as ``<image>\\n`` and makes
    ``<image>`` the tokenizer's ``image_token``; the default renders ``<|vision_start|><|image_pad|><|vision_end|>``.
    """
    if image_style not in IMAGE_STYLES:
        raise ValueError(f"image_style must be one of {sorted(IMAGE_STYLES)}, got {image_style!r}")
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _trained_bpe(tuple(CORPUS) + tuple(corpus or ()), vocab_size)
    _, _, image_token = IMAGE_STYLES[image_style]
    extra = {"image_token": image_token}
    if image_style == "qwen":  # the names Qwen VL processors look up
        extra.update(video_token=VIDEO_PAD, vision_start_token=VISION_START, vision_end_token=VISION_END)
    if image_style == "gemma":  # the names Gemma3's processor looks up
        extra.update(boi_token=BOI, eoi_token=EOI)
    tok = Qwen2Tokenizer(
        vocab=json.loads(vocab),
        merges=[tuple(pair) for pair in json.loads(merges)],
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=extra,
        chat_template=chat_template(image_style),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    # Never split a special token, whichever style names it.
    specials = SPECIAL_TOKENS + ([BOI, IMAGE_SOFT, EOI] if image_style == "gemma" else [])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    return tok


# --- models ---------------------------------------------------------------------------------------


def _seeded(seed: int, build):
    """Call ``build()`` with the torch RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_kwargs(tok, hidden_size: int, num_hidden_layers: int) -> dict:
    """Qwen2-style text settings shared by every family: 4 heads of ``hidden_size // 4``."""
    pad, im_end = tok.convert_tokens_to_ids(PAD), tok.convert_tokens_to_ids(IM_END)
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=pad,
        eos_token_id=im_end,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )


def _set_generation(model, tok):
    """Generation stops at the end of a chat turn (``<|im_end|>``) or at ``<|endoftext|>``."""
    pad, im_end = tok.convert_tokens_to_ids(PAD), tok.convert_tokens_to_ids(IM_END)
    model.generation_config.eos_token_id = [im_end, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = pad
    return model


def tiny_causal_lm(tokenizer, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2):
    """A ``Qwen2ForCausalLM`` sized for ``tokenizer`` (fp32, sdpa attention, seeded weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_text_kwargs(tokenizer, hidden_size, num_hidden_layers), attn_implementation="sdpa")
    model = _seeded(seed, lambda: Qwen2ForCausalLM(config))
    return _set_generation(model.float().eval(), tokenizer)


def _qwen_image_processor():
    """28x28 pixels is one merged image token; images are scaled to at most 56x56 (4 tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def _qwen_vl(family: str, seed: int, hidden_size: int, num_hidden_layers: int, tokenizer=None):
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    head_dim = hidden_size // 4
    quarter = head_dim // 2 // 4
    # mrope splits head_dim/2 rotary frequencies over (time, height, width).
    mrope = [head_dim // 2 - 2 * quarter, quarter, quarter]
    text = _text_kwargs(tok, hidden_size, num_hidden_layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    ids = {
        "image_token_id": tok.convert_tokens_to_ids(IMAGE_PAD),
        "video_token_id": tok.convert_tokens_to_ids(VIDEO_PAD),
        "vision_start_token_id": tok.convert_tokens_to_ids(VISION_START),
        "vision_end_token_id": tok.convert_tokens_to_ids(VISION_END),
    }
    common_vision = dict(
        depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            common_vision,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=hidden_size,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(common_vision, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
    config = Config(
        text_config=text, vision_config=vision, attn_implementation="sdpa", tie_word_embeddings=False, **ids
    )
    model = _seeded(seed, lambda: Model(config))
    processor = IMAGE_ONLY_PROCESSORS[family](
        image_processor=_qwen_image_processor(), tokenizer=tok, chat_template=tok.chat_template
    )
    return _set_generation(model.float().eval(), tok), processor


def tiny_qwen2_5_vl(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2, tokenizer=None):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` and its image-only processor.

    ``tokenizer``: one from :func:`build_tokenizer` (e.g. trained on a task's own corpus); the
    model's vocabulary and special-token ids follow it. Default: the built-in corpus."""
    return _qwen_vl("qwen2_5_vl", seed, hidden_size, num_hidden_layers, tokenizer)


def tiny_qwen2_vl(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2):
    """A tiny ``Qwen2VLForConditionalGeneration`` and its image-only processor."""
    return _qwen_vl("qwen2_vl", seed, hidden_size, num_hidden_layers)


LLAVA_GRID_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]


def _tiny_llava_family(next_: bool, seed: int, hidden_size: int, num_hidden_layers: int):
    """LLaVA-NeXT (``next_``) or LLaVA-1.5: the same CLIP tower (28x28 inputs, 2x2 patches of 14),
    Qwen2 text and tokenizer; they differ in the image processor (NeXT: crops on a grid of
    pinpoints, so token counts follow the aspect ratio) and the classes."""
    import transformers
    from transformers import CLIPVisionConfig

    tok = build_tokenizer(image_style="llava")
    text = dict(_text_kwargs(tok, hidden_size, num_hidden_layers), model_type="qwen2")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    name = "LlavaNext" if next_ else "Llava"
    extra = {"image_grid_pinpoints": LLAVA_GRID_PINPOINTS} if next_ else {}
    config = getattr(transformers, f"{name}Config")(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(28 // 14) ** 2,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
        **extra,
    )
    model_class = getattr(transformers, f"{name}ForConditionalGeneration")
    model = _seeded(seed, lambda: model_class(config))
    if next_:
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil as image_cls,
        )
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as image_cls
    image_processor = image_cls(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, **extra)
    processor = getattr(transformers, f"{name}Processor")(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return _set_generation(model.float().eval(), tok), processor


def tiny_llava_next(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2):
    """A tiny ``LlavaNextForConditionalGeneration`` (CLIP vision tower, Qwen2 text) and its processor.

    The vision tower sees 28x28 crops (2x2 patches of 14); an image is resized to the best of
    ``LLAVA_GRID_PINPOINTS`` for its aspect ratio and cut into crops, so images of different shapes
    give different token counts, and ``image_sizes`` tells the model how to unpad them.
    """
    return _tiny_llava_family(True, seed, hidden_size, num_hidden_layers)


def tiny_llava(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2):
    """A tiny ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP vision tower, Qwen2 text) and its
    processor. Every image is resized and centre-cropped to 28x28: 2x2 patches of 14, so 4 image
    tokens per image whatever its shape (unlike LLaVA-NeXT's crops)."""
    return _tiny_llava_family(False, seed, hidden_size, num_hidden_layers)


def tiny_gemma3(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2, sliding_window: int = 8):
    """A tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower, Gemma3 text) and its processor.

    Every image is resized to 28x28: 2x2 SigLIP patches of 14, pooled to 4 soft tokens
    (``mm_tokens_per_image``), which attend to each other both ways. The text layers alternate
    sliding-window (``sliding_window`` tokens, small so that test sequences outgrow it) and full
    attention. Gemma3 initializes its image projection to zeros; here it is random, so that image
    tokens carry image features in tests.
    """
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = build_tokenizer(image_style="gemma")
    text = dict(
        _text_kwargs(tok, hidden_size, num_hidden_layers),
        head_dim=hidden_size // 4,
        query_pre_attn_scalar=hidden_size // 4,
        sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)],
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids(BOI),
        eoi_token_index=tok.convert_tokens_to_ids(EOI),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_SOFT),
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )

    def build():
        model = transformers.Gemma3ForConditionalGeneration(config)
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            projection.normal_(std=0.2)
        return model

    model = _seeded(seed, build)
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template, image_seq_length=4
    )
    return _set_generation(model.float().eval(), tok), processor


def tiny_qwen3_vl(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2, moe: bool = False):
    """A tiny ``Qwen3VLForConditionalGeneration`` (``moe``: ``Qwen3VLMoeForConditionalGeneration``,
    4 experts, 2 per token) and its image-only processor.

    Qwen3-VL: interleaved M-RoPE (``mrope_interleaved``; the sections split head_dim/2 frequencies
    over time, height and width), patches of 16 pixels (32x32 pixels is one merged image token,
    images are scaled to at most 64x64 = 4 tokens), and DeepStack: features of the vision blocks in
    ``deepstack_visual_indexes`` are added to the image tokens' hidden states after the first decoder
    layers (one decoder layer per index)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    name = "Qwen3VLMoe" if moe else "Qwen3VL"
    Qwen3VLConfig = getattr(transformers, f"{name}Config")
    Qwen3VLForConditionalGeneration = getattr(transformers, f"{name}ForConditionalGeneration")

    tok = build_tokenizer()
    head_dim = hidden_size // 4
    quarter = head_dim // 2 // 4
    text = dict(
        _text_kwargs(tok, hidden_size, num_hidden_layers),
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
            "mrope_interleaved": True,
        },
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size // 2)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        out_hidden_size=hidden_size,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    model = _seeded(seed, lambda: Qwen3VLForConditionalGeneration(config))
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32, max_pixels=64 * 64, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    processor = IMAGE_ONLY_PROCESSORS["qwen3_vl"](  # Qwen3-VL-MoE uses Qwen3-VL's processor
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template
    )
    return _set_generation(model.float().eval(), tok), processor


def tiny_qwen3_vl_moe(seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 2):
    """A tiny ``Qwen3VLMoeForConditionalGeneration`` and its processor (see :func:`tiny_qwen3_vl`)."""
    return tiny_qwen3_vl(seed, hidden_size, num_hidden_layers, moe=True)


# --- images ---------------------------------------------------------------------------------------


def make_image(color_or_seed=0, size: tuple[int, int] = (28, 28)):
    """A small RGB PIL image: an int gives seeded random pixels (distinct images per seed), a color
    (name or RGB tuple) a solid image. ``size`` is (width, height) as PIL has it."""
    from PIL import Image

    if isinstance(color_or_seed, int) and not isinstance(color_or_seed, bool):
        gen = torch.Generator().manual_seed(color_or_seed)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy(), "RGB")
    return Image.new("RGB", size, color_or_seed)


__all__ = [
    "build_tokenizer",
    "chat_template",
    "make_image",
    "tiny_causal_lm",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_gemma3",
    "tiny_qwen3_vl",
    "tiny_qwen3_vl_moe",
    "Qwen2_5_VLImageOnlyProcessor",
    "Qwen2VLImageOnlyProcessor",
    "Qwen3VLImageOnlyProcessor",
    "IMAGE_ONLY_PROCESSORS",
]
