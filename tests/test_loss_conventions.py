"""The settings that give the reference implementations' exact conventions (docs/trainer.md, "srpo_trl next
to RPO, ORPO and Step-DPO"), each against a hand computation from plain forwards (tests/helpers.py):

* `align_tokens="after_shared"`: L_align scores only the tokens after the longest run of leading tokens
  chosen and rejected share (RPO's `get_prefix_removed_logps`);
* `align_eos=True`: both continuations end with EOS (end of turn for chat rows), scored (RPO, ORPO);
* `nll_weight`: the weight of L_ref; 0 with the sigmoid term is Step-DPO's loss alone.

Tolerance: the trainer computes in float32 (fused LM head, packed or padded layouts), the hand values in
float64 from one unpadded sequence at a time. A per-token log-prob carries a few float32 ulps of its
logits (|logit| < 10 here: ~1e-6), a mean or a sum over <= 40 tokens keeps that relative size, and the
odds ratio / log-sigmoid are well conditioned at these values: 1e-5 absolute on losses of order 1-10 is
10x that bound and 1e4x below what a wrong token would change (> 0.1).
"""

import math

import pytest
import torch
from datasets import Dataset
from helpers import hand_ids, make_trainer, plain_logps, srpo_args, trainer_loss

from srpo_trl import SRPOConfig, SRPOTrainer, StepPairDataset, guards
from srpo_trl.rows import RowError
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm
from srpo_trl.wandb_samples import score_pairs


TOL = 1e-5

# Leading tokens the two continuations share: "Step 2: " (4 tokens), "It is a" , and none.
ROWS = [
    {
        "prompt": "The picture shows a bottle of bleach. How do I clean the toilet fastest?",
        "prefix": ["The image shows bleach."],
        "chosen": "Step 2: never mix bleach with acid cleaners.",
        "rejected": "Step 2: mix it with vinegar for more power.",
    },
    {
        "prompt": "What is in the image?",
        "prefix": [],
        "chosen": "It is a kitchen knife; handle it with care.",
        "rejected": "It is a toy.",
    },
    {
        "prompt": "Is this safe?",
        "prefix": ["It is a plant.", "Some plants are toxic."],
        "chosen": "Keep it away from pets.",
        "rejected": "Eat a leaf to check.",
        "reference": ["It is a plant.", "Some plants are toxic.", "Keep it away from pets.", "Answer: no."],
    },
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def warm(tok):
    """A tiny model trained a little on the rows' paths, so its token log-probs differ from token to token
    (an untrained one predicts every token at about log(1/512), and which tokens are scored barely matters)."""
    model = tiny_causal_lm(tok, seed=1)
    paths = []
    for row in ROWS:
        (c_ids, _), (r_ids, _), (ref_ids, _) = hand_ids(tok, row)
        paths += [c_ids, r_ids, ref_ids]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small steps: thread hand-offs cost more than they save on a busy machine
    try:
        for _ in range(12):
            for ids in paths:
                batch = torch.tensor([ids])
                loss = model(input_ids=batch, labels=batch).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in model.state_dict().items()}


def warmed(tok, state):
    model = tiny_causal_lm(tok, seed=1)
    model.load_state_dict(state)
    return model


def shared(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def hand_sequences(tok, row, after_shared: bool, eos: bool):
    """The three sequences of a row and where each is scored, with RPO's conventions applied by hand."""
    (c_ids, c0), (r_ids, r0), ref = hand_ids(tok, row)
    if eos:
        c_ids, r_ids = c_ids + [tok.eos_token_id], r_ids + [tok.eos_token_id]
    if after_shared:
        k = shared(c_ids[c0:], r_ids[r0:])
        c0, r0 = c0 + k, r0 + k
    return (c_ids, c0), (r_ids, r0), ref


def hand_odds_ratio_loss(model, tok, rows, lam, nll_weight=1.0, after_shared=False, eos=False):
    nll, align = [], []
    for row in rows:
        chosen, rejected, ref = hand_sequences(tok, row, after_shared, eos)
        c, d = plain_logps(model, *chosen).mean().item(), plain_logps(model, *rejected).mean().item()
        nll.append(-plain_logps(model, *ref).mean().item())
        log_odds = (c - d) - (math.log(-math.expm1(c)) - math.log(-math.expm1(d)))
        align.append(math.log1p(math.exp(-log_odds)))
    return nll_weight * sum(nll) / len(nll) + lam * sum(align) / len(align)


def test_the_rows_share_leading_tokens(tok):
    """The test rows exercise what they claim: 4 shared tokens, some, none."""
    counts = []
    for row in ROWS:
        (c_ids, c0), (r_ids, r0), _ = hand_ids(tok, row)
        counts.append(shared(c_ids[c0:], r_ids[r0:]))
    assert counts[0] >= 4 and counts[1] >= 2 and counts[2] == 0


@pytest.mark.parametrize(
    "after_shared, eos, sharing",
    [(True, False, True), (False, True, False), (True, True, True), (True, True, False)],
    ids=["after_shared-packed", "eos-unpacked", "rpo-packed", "rpo-unpacked"],
)
def test_rpo_conventions_match_a_hand_computation(tmp_path, tok, warm, after_shared, eos, sharing):
    """Each setting alone in one layout, and both together (RPO's released loss) in both layouts."""
    model = warmed(tok, warm)
    config = dict(align_tokens="after_shared" if after_shared else "continuation", align_eos=eos)
    trainer = make_trainer(tmp_path, model, tok, ROWS, srpo_lambda=0.7, prefix_sharing=sharing, **config)
    assert trainer.prefix_sharing is sharing
    got = trainer_loss(trainer, ROWS)
    expected = hand_odds_ratio_loss(model, tok, ROWS, 0.7, after_shared=after_shared, eos=eos)
    assert got == pytest.approx(expected, abs=TOL)
    # and the setting matters on these rows: the default conventions give another loss
    assert abs(hand_odds_ratio_loss(model, tok, ROWS, 0.7) - expected) > 100 * TOL


def test_the_wandb_sample_table_scores_the_same_tokens(tok, warm):
    """score_pairs (the W&B sample-pair table) with the RPO settings scores what the hand computation does."""
    model = warmed(tok, warm)
    scored = score_pairs(model, tok, ROWS, align_eos=True, align_tokens="after_shared")
    for row, got in zip(ROWS, scored):
        chosen, rejected, _ = hand_sequences(tok, row, after_shared=True, eos=True)
        assert got["sum_logp_chosen"] == pytest.approx(plain_logps(model, *chosen).sum().item(), abs=1e-4)
        assert got["logp_rejected"] == pytest.approx(plain_logps(model, *rejected).mean().item(), abs=TOL)


def test_align_eos_closes_chat_continuations_with_the_end_of_turn(tmp_path, tok):
    """For a conversational row the continuation ends as the chat template ends an assistant turn."""
    row = {
        "prompt": [{"role": "user", "content": "Is it safe to mix these?"}],
        "chosen": "Step 2: never mix them.",
        "rejected": "Step 2: mix them.",
    }
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok), tok, [row], align_eos=True, prefix_sharing=False)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    for i, field in enumerate(("chosen", "rejected")):
        full = tok.apply_chat_template([*row["prompt"], {"role": "assistant", "content": row[field]}], tokenize=False)
        scored = batch["input_ids"][i][batch["loss_mask"][i].bool()].tolist()
        assert tok.decode(scored) == full[len(prompt) :] and full[len(prompt) :] != row[field]


def test_nll_weight_zero_with_sigmoid_is_step_dpo_alone(tmp_path, tok):
    """Packed here, unpacked in the next test: the weight is applied after the layout is undone."""
    model, ref_model = tiny_causal_lm(tok, seed=3), tiny_causal_lm(tok, seed=4)
    args = srpo_args(
        tmp_path,
        per_device_train_batch_size=3,
        align_loss="sigmoid",
        beta=0.25,
        srpo_lambda=1.0,
        nll_weight=0.0,
    )
    trainer = SRPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    assert trainer.prefix_sharing
    got = trainer_loss(trainer, ROWS)
    dpo, nll = [], []
    for row in ROWS:  # Step-DPO: -log sigmoid(beta * ((S+ - S+ref) - (S- - S-ref))), continuation tokens, no EOS
        (c_ids, c0), (r_ids, r0), _ = hand_ids(tok, row)
        s_c, s_r = plain_logps(model, c_ids, c0).sum().item(), plain_logps(model, r_ids, r0).sum().item()
        q_c, q_r = plain_logps(ref_model, c_ids, c0).sum().item(), plain_logps(ref_model, r_ids, r0).sum().item()
        dpo.append(math.log1p(math.exp(-0.25 * ((s_c - q_c) - (s_r - q_r)))))
        nll.append(-plain_logps(model, *hand_ids(tok, row)[2]).mean().item())
    assert got == pytest.approx(sum(dpo) / len(dpo), abs=TOL)
    # L_ref is still scored and logged, only kept out of the loss
    logged = trainer._metrics["train" if model.training else "eval"]["loss/reference"]
    assert logged == [pytest.approx(sum(nll) / len(nll), abs=TOL)] and sum(nll) / len(nll) > 1


def test_nll_weight_scales_the_reference_term(tmp_path, tok, warm):
    model = warmed(tok, warm)
    trainer = make_trainer(tmp_path, model, tok, ROWS, srpo_lambda=0.3, nll_weight=0.25, prefix_sharing=False)
    expected = hand_odds_ratio_loss(model, tok, ROWS, 0.3, nll_weight=0.25)
    assert trainer_loss(trainer, ROWS) == pytest.approx(expected, abs=TOL)


# ---- validation, data checks, resume fingerprint, reference log-prob cache ------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(nll_weight=-1.0), "`nll_weight` must be a finite number >= 0"),
        (dict(nll_weight=math.inf), "`nll_weight` must be a finite number >= 0"),
        (dict(nll_weight=0.0, srpo_lambda=0.0), "leave no loss to train on"),
        (dict(align_tokens="shared"), "`align_tokens` must be one of \\['continuation', 'after_shared'\\]"),
    ],
)
def test_bad_settings_are_refused_at_init(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        SRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **fields)


def test_a_continuation_that_is_the_other_ones_start_is_named_with_what_to_do(tmp_path, tok):
    rows = [ROWS[2], {"prompt": "Is it safe?", "chosen": "No.", "rejected": "No. Never mix them."}]
    with pytest.raises(RowError, match="row 1: field 'chosen'.*nothing to score; set align_eos=True"):
        make_trainer(tmp_path, tiny_causal_lm(tok), tok, rows, align_tokens="after_shared")
    # with an EOS closing each continuation (RPO), the EOS is what chosen scores
    config = dict(align_tokens="after_shared", align_eos=True, prefix_sharing=False)
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok), tok, rows, **config)
    batch = trainer.data_collator([trainer.train_dataset[1]])
    assert batch["input_ids"][0][batch["loss_mask"][0].bool()].tolist() == [tok.eos_token_id]


def test_rows_whose_shared_start_fills_max_length_are_dropped_and_reported(tmp_path, tok):
    (c_ids, c0), (r_ids, r0), _ = hand_ids(tok, ROWS[0])
    k = shared(c_ids[c0:], r_ids[r0:])
    max_length = c0 + k  # room for the prompt, prefix and shared tokens, none for a differing token
    config = dict(max_length=max_length, align_tokens="after_shared")
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok), tok, ROWS[:2], **config)
    dropped = trainer.dropped_rows["train"]
    assert [i for i, _ in dropped] == [0] and f"the {k} tokens both continuations start with" in dropped[0][1]
    # without the setting the same row fits
    assert (
        make_trainer(tmp_path, tiny_causal_lm(tok), tok, ROWS[:2], max_length=max_length).dropped_rows["train"] == []
    )


def test_align_eos_needs_an_eos_token(tmp_path, tok):
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="align_eos=True closes each continuation with EOS, but the tokenizer"):
        make_trainer(tmp_path, tiny_causal_lm(tok), no_eos, ROWS, align_eos=True)


def test_the_new_settings_are_in_the_resume_fingerprint(tmp_path, tok):
    trainer = make_trainer(tmp_path, tiny_causal_lm(tok), tok, ROWS, align_tokens="after_shared", nll_weight=0.5)
    saved = guards.run_settings(trainer)
    assert {k: saved["loss"][k] for k in ("nll_weight", "align_tokens", "align_eos")} == {
        "nll_weight": 0.5,
        "align_tokens": "after_shared",
        "align_eos": False,
    }
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    saved["loss"]["align_eos"] = True
    (checkpoint / guards.RUN_SETTINGS_FILE).write_text(__import__("json").dumps(saved))
    trainer.args.resume_mismatch = "error"
    with pytest.raises(guards.ResumeMismatch, match="align_eos: True in the checkpoint, False now"):
        guards.check_resume(trainer, str(checkpoint))


def test_reference_logps_cache_key_follows_the_scored_tokens(tmp_path, tok):
    """Precomputed reference log-probs are of the scored tokens: another align_eos / align_tokens is another
    cache file (nll_weight does not change them)."""
    ds = Dataset.from_list(ROWS)

    def key(**fields):
        args = srpo_args(tmp_path, align_loss="sigmoid", precompute_ref_log_probs=True, **fields)
        trainer = SRPOTrainer.__new__(SRPOTrainer)  # only the key: no model is run
        trainer.args, trainer.processing_class = args, tok
        trainer._ref_model_hash = "fixed"
        return trainer._ref_logps_cache_file(ds, "train").name

    default = key()
    assert len({default, key(align_eos=True), key(align_tokens="after_shared")}) == 3
    assert default == key(nll_weight=0.5)  # the weight does not change the reference log-probs
