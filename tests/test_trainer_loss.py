"""The SRPO loss on a batch equals an independent computation from plain model forwards.

The reference numbers here never go through the collator, the fused LM head or the trainer: each
sequence is built by hand from the tokenizer, scored alone (no padding) with the model's ordinary
logits in float64, and the formulas of docs/method.md are applied by hand.
"""

import math

import pytest
from helpers import ROWS, hand_ids, make_trainer, plain_logps, trainer_loss

from srpo_trl import SRPOConfig, SRPOTrainer, StepPairDataset
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("sharing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("lam", [0.3, 1.7])
def test_odds_ratio_loss_matches_plain_forward(tmp_path, tok, lam, sharing):
    model = tiny_causal_lm(tok, seed=1)
    trainer = make_trainer(tmp_path, model, tok, ROWS, srpo_lambda=lam, prefix_sharing=sharing)
    assert trainer.prefix_sharing is sharing
    assert trainer.ref_model is None  # reference-free: nothing loaded or run
    got = trainer_loss(trainer, ROWS)

    nll, align = [], []
    for row in ROWS:
        (c_ids, c0), (r_ids, r0), (ref_ids, f0) = hand_ids(tok, row)
        c = plain_logps(model, c_ids, c0).mean().item()
        d = plain_logps(model, r_ids, r0).mean().item()
        nll.append(-plain_logps(model, ref_ids, f0).mean().item())
        log_odds = (c - d) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(d)))
        align.append(math.log1p(math.exp(-log_odds)))  # -log sigmoid
    expected = sum(nll) / len(nll) + lam * sum(align) / len(align)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("sharing", [True, False], ids=["packed", "unpacked"])
def test_lambda_zero_is_exactly_reference_nll(tmp_path, tok, sharing):
    model = tiny_causal_lm(tok, seed=2)
    trainer = make_trainer(tmp_path, model, tok, ROWS, srpo_lambda=0.0, prefix_sharing=sharing)
    got = trainer_loss(trainer, ROWS)
    expected = sum(-plain_logps(model, *hand_ids(tok, r)[2]).mean().item() for r in ROWS) / len(ROWS)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("sharing", [True, False], ids=["packed", "unpacked"])
def test_sigmoid_loss_matches_plain_forward(tmp_path, tok, sharing):
    model = tiny_causal_lm(tok, seed=3)
    ref_model = tiny_causal_lm(tok, seed=4)  # a different reference, so the ratios are not trivially 0
    args = SRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=3,
        max_length=None,
        align_loss="sigmoid",
        beta=0.25,
        srpo_lambda=0.5,
        prefix_sharing=sharing,
    )
    trainer = SRPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    got = trainer_loss(trainer, ROWS)

    nll, align = [], []
    for row in ROWS:
        (c_ids, c0), (r_ids, r0), (ref_ids, f0) = hand_ids(tok, row)
        s_c, s_r = plain_logps(model, c_ids, c0).sum().item(), plain_logps(model, r_ids, r0).sum().item()
        q_c, q_r = plain_logps(ref_model, c_ids, c0).sum().item(), plain_logps(ref_model, r_ids, r0).sum().item()
        z = 0.25 * ((s_c - q_c) - (s_r - q_r))
        align.append(math.log1p(math.exp(-z)))
        nll.append(-plain_logps(model, ref_ids, f0).mean().item())
    expected = sum(nll) / 3 + 0.5 * sum(align) / 3
    assert got == pytest.approx(expected, abs=1e-5)


def test_continuations_are_not_closed_and_prefix_is_context_only(tmp_path, tok):
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok), tok, ROWS[:1], prefix_sharing=False)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    chosen_scored = batch["input_ids"][0][batch["loss_mask"][0].bool()].tolist()
    rejected_scored = batch["input_ids"][1][batch["loss_mask"][1].bool()].tolist()
    reference_scored = batch["input_ids"][2][batch["loss_mask"][2].bool()].tolist()
    assert tok.decode(chosen_scored) == ROWS[0]["chosen"]  # no prefix, no EOS
    assert tok.decode(rejected_scored) == ROWS[0]["rejected"]
    assert reference_scored[-1] == tok.eos_token_id and tok.eos_token_id not in chosen_scored + rejected_scored
    assert tok.decode(reference_scored[:-1]) == "\n".join(ROWS[0]["reference"])


def test_fallback_reference_without_eos(tmp_path, tok):
    trainer = make_trainer(
        tmp_path, tiny_causal_lm(tok), tok, ROWS[1:2], fallback_reference_eos=False, prefix_sharing=False
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    reference_scored = batch["input_ids"][2][batch["loss_mask"][2].bool()].tolist()
    assert tok.decode(reference_scored) == ROWS[1]["chosen"]
