"""SRPOTrainer on vision-language models: Qwen2.5-VL, Qwen2-VL, Qwen3-VL, Gemma3, LLaVA-NeXT, LLaVA-1.5.

The loss equals an independent computation (each sequence scored alone, plain logits, float64),
and the model receives exactly the vision inputs the processor produced.
"""

import math

import pytest
import torch
from helpers import srpo_args
from trl.data_utils import prepare_multimodal_messages

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.tiny import (
    make_image,
    tiny_gemma3,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)


def vlm_rows():
    red, blue, green = make_image(0), make_image(1), make_image(2)
    return [
        {
            "prompt": [{"role": "user", "content": "What should I do with this?"}],
            "images": [red],
            "prefix": ["The image shows a bottle."],
            "chosen": "It is bleach, keep it away from acids.",
            "rejected": "Drink it.",
            "reference": [
                "The image shows a bottle.",
                "It is bleach, keep it away from acids.",
                "Answer: store it safely.",
            ],
        },
        {  # two images, no prefix, no reference
            "prompt": [{"role": "user", "content": "Can these two go together?"}],
            "images": [blue, green],
            "prefix": [],
            "chosen": "No, never combine them.",
            "rejected": "Yes, mix them in a closed room to get a stronger cleaner.",
        },
    ]


def vlm_plain_means(model, processor, row, reduce="mean"):
    """Mean log-probs of chosen / rejected / reference for one row, each sequence scored alone."""
    tok = processor.tokenizer

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    if isinstance(row["prompt"], str):
        text = row["prompt"]
    else:
        text = processor.apply_chat_template(
            prepare_multimodal_messages(row["prompt"], row["images"]), tokenize=False, add_generation_prompt=True
        )
    prompt = processor(text=[text], images=[row["images"]], return_tensors="pt", add_special_tokens=False)
    prompt_ids = prompt["input_ids"][0].tolist()
    prefix = [i for s in row["prefix"] for i in enc(s + "\n")]
    end = enc("<|im_end|>\n") if not isinstance(row["prompt"], str) else [tok.eos_token_id]
    if row.get("reference"):
        ref = [i for s in row["reference"][:-1] for i in enc(s + "\n")] + enc(row["reference"][-1]) + end
    else:
        ref = prefix + enc(row["chosen"]) + end
    return _score_three(model, prompt, prompt_ids, prefix, enc(row["chosen"]), enc(row["rejected"]), ref, reduce)


def _score_three(model, prompt, prompt_ids, prefix, chosen, rejected, ref, reduce="mean"):
    """Score chosen / rejected / reference, each sequence alone, from plain logits in float64."""
    means = []
    for rest, start in (
        (prefix + chosen, len(prompt_ids) + len(prefix)),
        (prefix + rejected, len(prompt_ids) + len(prefix)),
        (ref, len(prompt_ids)),
    ):
        ids = prompt_ids + rest
        per_token = ("mm_token_type_ids", "token_type_ids")  # prompt values, text (0) after
        kwargs = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask", *per_token)}
        for key in per_token:
            if key in prompt:
                kwargs[key] = torch.tensor([prompt[key][0].tolist() + [0] * len(rest)])
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs
            ).logits
        logp = logits[0].double().log_softmax(-1)
        token_logps = logp[start - 1 : len(ids) - 1].gather(1, torch.tensor(ids[start:])[:, None])
        means.append(token_logps.mean().item() if reduce == "mean" else token_logps.sum().item())
    return means


BUILDERS = {
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen2_5_vl_standard": tiny_qwen2_5_vl,
    "qwen2_vl": tiny_qwen2_vl,
    "llava_next": tiny_llava_next,
    "llava": tiny_llava,
    "gemma3": tiny_gemma3,
    "qwen3_vl": tiny_qwen3_vl,
}


def standard_rows():
    """Standard (non-chat) prompts: the image placeholders are written by the user."""
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    return [
        {
            "prompt": f"{pad}Describe the risk.",
            "images": [make_image(2)],
            "prefix": ["A green square."],
            "chosen": "There is none.",
            "rejected": "Fire everywhere.",
        },
        {
            "prompt": f"{pad}{pad}Same colour?",
            "images": [make_image(3), make_image(4)],
            "prefix": [],
            "chosen": "No.",
            "rejected": "Yes, both red.",
            "reference": ["No.", "Answer: they differ."],
        },
    ]


def _rows_for(family):
    return standard_rows() if family == "qwen2_5_vl_standard" else vlm_rows()


@pytest.mark.parametrize("sharing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize(
    "family", ["qwen2_5_vl", "qwen2_5_vl_standard", "qwen2_vl", "llava_next", "llava", "gemma3", "qwen3_vl"]
)
def test_vlm_loss_matches_plain_forward(tmp_path, family, sharing):
    model, processor = BUILDERS[family](seed=1)
    rows = _rows_for(family)
    trainer = SRPOTrainer(
        model=model,
        args=srpo_args(tmp_path, per_device_train_batch_size=len(rows), srpo_lambda=0.7, prefix_sharing=sharing),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=processor,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    nll, align = [], []
    for row in rows:
        c, d, r = vlm_plain_means(model, processor, row)
        nll.append(-r)
        log_odds = (c - d) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(d)))
        align.append(math.log1p(math.exp(-log_odds)))
    assert got == pytest.approx(sum(nll) / len(rows) + 0.7 * sum(align) / len(rows), abs=1e-5)


@pytest.mark.parametrize("sharing", [True, False], ids=["packed", "unpacked"])
def test_vlm_sigmoid_loss_matches_plain_forward(tmp_path, sharing):
    model, processor = tiny_qwen2_5_vl(seed=1)
    ref_model, _ = tiny_qwen2_5_vl(seed=2)
    rows = vlm_rows()
    trainer = SRPOTrainer(
        model=model,
        ref_model=ref_model,
        processing_class=processor,
        train_dataset=StepPairDataset.from_list(rows),
        args=srpo_args(
            tmp_path,
            per_device_train_batch_size=2,
            srpo_lambda=0.4,
            align_loss="sigmoid",
            beta=0.3,
            prefix_sharing=sharing,
        ),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch).item()
    nll, align = [], []
    for row in rows:
        s_c, s_r, _ = vlm_plain_means(model, processor, row, reduce="sum")
        q_c, q_r, _ = vlm_plain_means(ref_model, processor, row, reduce="sum")
        nll.append(-vlm_plain_means(model, processor, row)[2])
        z = 0.3 * ((s_c - q_c) - (s_r - q_r))
        align.append(math.log1p(math.exp(-z)))
    assert got == pytest.approx(sum(nll) / 2 + 0.4 * sum(align) / 2, abs=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_model_receives_what_the_processor_produced_and_trains(tmp_path, family):
    model, processor = BUILDERS[family](seed=2)
    rows = _rows_for(family)
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SRPOTrainer(
        model=model,
        args=srpo_args(
            tmp_path, per_device_train_batch_size=len(rows), max_steps=2, learning_rate=1e-2, prefix_sharing=False
        ),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=processor,
    )
    trainer.train()

    texts = [
        r["prompt"]
        if isinstance(r["prompt"], str)
        else processor.apply_chat_template(
            prepare_multimodal_messages(r["prompt"], r["images"]), tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]
    direct = processor(text=texts, images=[r["images"] for r in rows], return_tensors="pt", padding=True)
    got = seen[0]
    assert torch.equal(got["pixel_values"], torch.cat([direct["pixel_values"]] * 3))
    key = "image_grid_thw" if family == "qwen2_5_vl" else "image_sizes"
    assert torch.equal(got[key], torch.cat([direct[key]] * 3))
    n_images = sum(len(r["images"]) for r in rows)
    assert got[key].shape[0] == 3 * n_images  # every image of the batch, once per sequence group
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_seq = (got["input_ids"] == image_token_id).sum(1)
    expected = (direct["input_ids"] == image_token_id).sum(1)
    assert per_seq.tolist() == expected.tolist() * 3
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("visual" in n or "vision" in n for n in changed), "the vision tower got no gradient"


def test_standard_vlm_prompt_with_wrong_image_count_is_refused(tmp_path):
    model, processor = tiny_qwen2_5_vl(seed=3)
    rows = [
        {
            "prompt": "<|vision_start|><|image_pad|><|vision_end|> What is it?",
            "images": [make_image(0), make_image(1)],
            "chosen": "a",
            "rejected": "b",
        }
    ]
    with pytest.raises(ValueError, match="row 0: field 'images': the prompt has 1 image placeholder"):
        SRPOTrainer(
            model=model,
            args=srpo_args(tmp_path),
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=processor,
        )


def test_text_model_with_image_rows_is_refused(tmp_path):
    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm

    tok = build_tokenizer()
    rows = vlm_rows()[:1]
    with pytest.raises(ValueError, match="pass the model's processor"):
        SRPOTrainer(
            model=tiny_causal_lm(tok),
            args=srpo_args(tmp_path),
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=tok,
        )


def test_plain_question_with_images_is_rendered_as_a_user_message(tmp_path):
    """Records carry a plain-text question plus images (no placeholder): it is trained exactly as
    the same question in one user message."""
    model, processor = tiny_qwen2_5_vl(seed=4)
    chat_rows = vlm_rows()
    plain_rows = [{**r, "prompt": r["prompt"][0]["content"]} for r in chat_rows]
    losses = []
    for i, rows in enumerate((chat_rows, plain_rows)):
        trainer = SRPOTrainer(
            model=model,
            args=srpo_args(tmp_path / str(i), per_device_train_batch_size=2),
            train_dataset=StepPairDataset.from_list(rows),
            processing_class=processor,
        )
        batch = trainer.data_collator([trainer.train_dataset[j] for j in range(2)])
        with torch.no_grad():
            losses.append(trainer.compute_loss(model, batch).item())
        assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).any()
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
