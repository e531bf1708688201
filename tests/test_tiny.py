"""Tiny offline models (srpo_trl.tiny) and local loading (srpo_trl.loading).

Everything else builds on these: the tokenizer must be deterministic and its chat template must
split exactly where the trainer cuts; every VLM family must get from its processor the vision
inputs its vision tower turns into exactly one feature per image token; saved folders must reload
to identical logits, with or without an adapter.
"""

import json

import pytest
import torch
from trl.data_utils import prepare_multimodal_messages

from srpo_trl.loading import load_model_and_processor, load_processing_class, save_model_and_processor
from srpo_trl.tiny import (
    CORPUS,
    SPECIAL_TOKENS,
    build_tokenizer,
    make_image,
    tiny_causal_lm,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)


VLM_BUILDERS = {
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen2_vl": tiny_qwen2_vl,
    "llava_next": tiny_llava_next,
    "llava": tiny_llava,
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module", params=list(VLM_BUILDERS))
def vlm(request):
    model, processor = VLM_BUILDERS[request.param](seed=1)
    return request.param, model, processor


def chat_text(processor, images, question="What is it?"):
    messages = prepare_multimodal_messages([{"role": "user", "content": question}], images)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_follows_its_inputs(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) == 512
    assert len(build_tokenizer(vocab_size=300)) == 300
    # a word repeated in the extra corpus becomes one token; it is several without it
    extra = build_tokenizer(corpus=["zyxwvut zyxwvut zyxwvut"] * 50)
    assert len(extra("zyxwvut", add_special_tokens=False)["input_ids"]) < len(
        tok("zyxwvut", add_special_tokens=False)["input_ids"]
    )
    # the built-in corpus makes common words short, and every text decodes back exactly
    assert len(tok(" bleach")["input_ids"]) == 1
    for text in CORPUS + ["  spaces\n\n\ttabs ÜñíçØdé 😀 don't"]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_special_tokens(tok):
    for token in SPECIAL_TOKENS:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]  # no BOS/EOS added
    assert tok.image_token == "<|image_pad|>" and tok.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.video_token == "<|video_pad|>"
    llava = build_tokenizer(image_style="llava")
    assert llava.image_token == "<image>" and llava.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="image_style"):
        build_tokenizer(image_style="nope")


PROMPTS = [
    [{"role": "user", "content": "Is this safe?"}],
    [{"role": "system", "content": "Be safe."}, {"role": "user", "content": " spaced \n"}],
    prepare_multimodal_messages([{"role": "user", "content": "Two images?"}], [make_image(0), make_image(1)]),
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "and this?"}, {"type": "image"}]},
    ],
]
COMPLETIONS = ["Yes.", " leading space", "trailing newline\n", "\n\nStep 1: look.\nStep 2: answer.  ", ""]


@pytest.mark.parametrize("image_style", ["qwen", "llava"])
def test_chat_template_splits_exactly_at_the_generation_prompt(image_style):
    """template(prompt + [assistant X]) == template(prompt, add_generation_prompt=True) + X + <|im_end|>\\n"""
    tok = build_tokenizer(image_style=image_style)
    for prompt in PROMPTS:
        head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert head.endswith("<|im_start|>assistant\n")
        for x in COMPLETIONS:
            for content in (x, [{"type": "text", "text": x}]):
                full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": content}], tokenize=False)
                assert full == head + x + "<|im_end|>\n"


def test_chat_template_renders_images_per_family():
    prompt = PROMPTS[2]
    qwen = build_tokenizer().apply_chat_template(prompt, tokenize=False)
    assert qwen == "<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "Two images?<|im_end|>\n"
    llava = build_tokenizer(image_style="llava").apply_chat_template(prompt, tokenize=False)
    assert llava == "<|im_start|>user\n<image>\n<image>\nTwo images?<|im_end|>\n"


def test_chat_template_continues_a_final_assistant_message(tok):
    prompt = PROMPTS[0]
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    cont = tok.apply_chat_template(
        prompt + [{"role": "assistant", "content": "Step 1: it is bleach."}],
        tokenize=False,
        continue_final_message=True,
    )
    assert cont == head + "Step 1: it is bleach."


# --- text model -----------------------------------------------------------------------------------


def test_causal_lm_config_seed_and_loss(tok):
    rng_before = torch.random.get_rng_state()
    model = tiny_causal_lm(tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not move the global RNG"
    cfg = model.config
    assert (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    ) == (512, 32, 2, 4, 2)
    assert cfg._attn_implementation == "sdpa" and model.dtype == torch.float32
    im_end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert cfg.eos_token_id == im_end and cfg.pad_token_id == pad
    assert model.generation_config.eos_token_id == [im_end, pad]

    same, other = tiny_causal_lm(tok, seed=3), tiny_causal_lm(tok, seed=4)
    for (name, p), q, r in zip(model.named_parameters(), same.parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters()))

    ids = torch.tensor([tok("The image shows a bottle.")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and 5.0 < loss.item() < 8.0  # about log(512) = 6.2 for random weights

    bigger = tiny_causal_lm(tok, hidden_size=64, num_hidden_layers=3)
    assert (bigger.config.hidden_size, bigger.config.num_hidden_layers) == (64, 3)
    assert bigger(input_ids=ids).logits.shape == (1, ids.shape[1], 512)


def test_generation_stops_at_end_of_turn(tok):
    model = tiny_causal_lm(tok, seed=0)
    ids = torch.tensor([tok("hi")["input_ids"]])
    other = tok.convert_tokens_to_ids("<|im_start|>")
    for stop in ("<|im_end|>", "<|endoftext|>"):
        stop_id = tok.convert_tokens_to_ids(stop)
        step = []

        def push(module, args, logits):
            # first step: a non-stop token, then the stop token; both made overwhelmingly likely
            logits = logits.clone()
            logits[..., other if not step else stop_id] += 1e4
            step.append(1)
            return logits

        handle = model.lm_head.register_forward_hook(push)
        try:
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
        finally:
            handle.remove()
        assert out[0, ids.shape[1] :].tolist() == [other, stop_id], stop


# --- vision-language models -----------------------------------------------------------------------


def vision_inputs(family, batch):
    if family == "llava":  # LLaVA-1.5: fixed-size images, no size tensor
        return {"pixel_values": batch["pixel_values"]}
    key = "image_sizes" if family == "llava_next" else "image_grid_thw"
    return {"pixel_values": batch["pixel_values"], key: batch[key]}


def placeholder_runs(ids, token_id):
    """Lengths of the consecutive runs of ``token_id`` in a 1-d id list: one run per image."""
    runs, count = [], 0
    for i in ids + [None]:
        if i == token_id:
            count += 1
        elif count:
            runs, count = runs + [count], 0
    return runs


@pytest.mark.parametrize("sizes", [[(28, 28)], [(56, 28), (28, 84)]], ids=["one_image", "two_images"])
def test_vlm_processor_output_reaches_the_model(vlm, sizes):
    family, model, processor = vlm
    images = [make_image(i, size) for i, size in enumerate(sizes)]
    text = chat_text(processor, images)
    batch = processor(text=[text + "It is bleach.<|im_end|>\n"], images=[images], return_tensors="pt")
    key = {"llava_next": "image_sizes", "llava": "pixel_values"}.get(family, "image_grid_thw")
    assert batch[key].shape[0] == len(images)
    if family == "llava_next":
        assert batch["image_sizes"].tolist() == [[h, w] for w, h in sizes]  # (height, width) per image

    # The vision tower yields exactly one feature per placeholder token, image by image.
    ids = batch["input_ids"][0].tolist()
    with torch.no_grad():
        features = model.get_image_features(**vision_inputs(family, batch)).pooler_output
    runs = placeholder_runs(ids, processor.image_token_id)
    assert runs == [f.shape[0] for f in features]
    assert len(runs) == len(images)
    if len(images) == 2:  # different aspect ratios give different token counts (LLaVA-1.5 crops to one size)
        assert (runs[0] == runs[1] == 4) if family == "llava" else (runs[0] != runs[1])

    # The model's forward gets the processor's tensors unchanged.
    seen = {}
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        out = model(**batch, labels=batch["input_ids"])
    finally:
        handle.remove()
    for name, value in batch.items():
        assert torch.equal(seen[name], value), name
    assert torch.isfinite(out.loss) and out.loss.item() > 0

    # The pixels matter: another image changes the logits after it.
    other = processor(text=[text], images=[[make_image(9, size) for size in sizes]], return_tensors="pt")
    assert torch.equal(other["input_ids"], processor(text=[text], images=[images], return_tensors="pt")["input_ids"])
    with torch.no_grad():
        a = model(**processor(text=[text], images=[images], return_tensors="pt")).logits[0, -1]
        b = model(**other).logits[0, -1]
    assert not torch.allclose(a, b)


def test_vlm_config_matches_tokenizer(vlm):
    family, model, processor = vlm
    tok = processor.tokenizer
    cfg = model.config
    text = cfg.text_config
    assert text.vocab_size == len(tok) and model.get_input_embeddings().weight.shape[0] == len(tok)
    if family in ("llava_next", "llava"):
        assert cfg.image_token_index == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
        assert cfg.vision_feature_select_strategy == "default"
        if family == "llava_next":
            assert processor.image_processor.image_grid_pinpoints == cfg.image_grid_pinpoints
        else:  # 28x28 crops of 14x14 patches: 4 image tokens per image
            batch = processor(
                text=[chat_text(processor, [make_image(0)])], images=[[make_image(0)]], return_tensors="pt"
            )
            assert (batch["input_ids"] == processor.image_token_id).sum().item() == 4
    else:
        assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
        assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
        assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        # a 28x28 image is exactly one merged image token
        batch = processor(text=[chat_text(processor, [make_image(0)])], images=[[make_image(0)]], return_tensors="pt")
        assert batch["image_grid_thw"].tolist() == [[1, 2, 2]]
        assert (batch["input_ids"] == processor.image_token_id).sum().item() == 1
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]


def test_vlm_seeds_and_size_knobs():
    a, _ = tiny_qwen2_5_vl(seed=5)
    b, _ = tiny_qwen2_5_vl(seed=5)
    c, _ = tiny_qwen2_5_vl(seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    big, processor = tiny_qwen2_vl(hidden_size=64, num_hidden_layers=3)
    assert (big.config.text_config.hidden_size, big.config.text_config.num_hidden_layers) == (64, 3)
    batch = processor(text=[chat_text(processor, [make_image(0)])], images=[[make_image(0)]], return_tensors="pt")
    assert torch.isfinite(big(**batch, labels=batch["input_ids"]).loss)


def test_vlm_with_a_task_tokenizer_sizes_itself_to_it():
    """A tokenizer trained on a task's corpus (the demo's) sets the model's vocabulary and ids."""
    task_tok = build_tokenizer(
        corpus=["The image shows a red triangle. The request is near fire."] * 20, vocab_size=640
    )
    model, processor = tiny_qwen2_5_vl(tokenizer=task_tok)
    assert processor.tokenizer is task_tok and len(task_tok) != len(build_tokenizer())
    assert model.config.text_config.vocab_size == len(task_tok) == model.get_output_embeddings().weight.shape[0]
    assert model.config.image_token_id == task_tok.convert_tokens_to_ids("<|image_pad|>")
    batch = processor(
        text=[chat_text(processor, [make_image(0)], "Is it near fire?")], images=[[make_image(0)]], return_tensors="pt"
    )
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


def test_make_image():
    assert make_image(3).size == (28, 28) and make_image(3, (56, 28)).size == (56, 28)
    assert make_image(3).tobytes() == make_image(3).tobytes()
    assert make_image(3).tobytes() != make_image(4).tobytes()
    assert make_image("red").getpixel((0, 0)) == (255, 0, 0)
    assert make_image((1, 2, 3)).getpixel((5, 5)) == (1, 2, 3)


# --- save / load ----------------------------------------------------------------------------------


def test_text_round_trip(tok, tmp_path):
    model = tiny_causal_lm(tok, seed=2)
    save_model_and_processor(model, tok, tmp_path / "text")
    loaded, loaded_tok = load_model_and_processor(tmp_path / "text")
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.training
    texts = CORPUS + ["<|im_start|>user\nÜñí 😀 don't<|im_end|>\n"]
    for text in texts:  # the reloaded tokenizer splits text exactly as the built one
        assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.chat_template == tok.chat_template and loaded_tok.eos_token == "<|im_end|>"
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    half, _ = load_model_and_processor(tmp_path / "text", dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_vlm_round_trip(vlm, tmp_path):
    family, model, processor = vlm
    folder = save_model_and_processor(model, processor, tmp_path / family)
    loaded, loaded_processor = load_model_and_processor(folder)
    assert type(loaded) is type(model)
    assert type(loaded_processor).__name__ == type(processor).__name__
    if family not in (
        "llava_next",
        "llava",
    ):  # the folder names the stock class, loadable by AutoProcessor with torchvision
        assert (
            json.loads((folder / "processor_config.json").read_text())["processor_class"]
            == type(processor).stock_class.__name__
        )
    images = [make_image(1, (56, 28)), make_image(2)]
    text = chat_text(processor, images)
    batch = processor(text=[text], images=[images], return_tensors="pt")
    again = loaded_processor(text=[text], images=[images], return_tensors="pt")
    assert batch.keys() == again.keys()
    for name in batch:
        assert torch.equal(batch[name], again[name]), name
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)


def test_adapter_round_trip(tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_causal_lm(tok, seed=4)
    save_model_and_processor(base, tok, tmp_path / "base")
    peft_model = get_peft_model(
        tiny_causal_lm(tok, seed=4), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok("Is this safe?")["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        assert not torch.allclose(want, base(input_ids=ids).logits)  # the adapter changes something
        for kwargs in ({"adapter": tmp_path / "adapter"}, {"adapter": tmp_path / "adapter", "merge_adapter": True}):
            loaded, _ = load_model_and_processor(tmp_path / "base", **kwargs)
            assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)
        alone, alone_tok = load_model_and_processor(tmp_path / "adapter")  # base named in adapter_config.json
        assert torch.allclose(alone(input_ids=ids).logits, want, atol=1e-5)
        assert alone_tok.get_vocab() == tok.get_vocab()


def test_missing_paths_fail_at_once_naming_what_was_looked_for(tok, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*does not exist.*config\.json"):
        load_model_and_processor(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*has no config\.json"):
        load_model_and_processor(tmp_path / "empty")
    save_model_and_processor(tiny_causal_lm(tok), tok, tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"no-adapter.*adapter_config\.json"):
        load_model_and_processor(tmp_path / "model", adapter=tmp_path / "no-adapter")
    with pytest.raises(FileNotFoundError, match=r"tokenizer or processor"):
        load_processing_class(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_processor(tmp_path / "model", dtype="float33")
