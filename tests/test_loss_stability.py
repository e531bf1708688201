"""The odds-ratio loss has no NaN for any finite log-probs, and a memorized continuation trains.

`log1mexp` is a `torch.where` of two formulas; autograd differentiates both. Before the fix, a
float32 mean log-prob in about [-2.6e-8, -1e-12] sent the unused branch to log1p(-1) = -inf and its
gradient 0 x inf = NaN into the sum. The sweep below goes through that band in every dtype; values
and gradients are compared with closed forms evaluated in Python floats (float64, by hand).
"""

import math

import pytest
import torch
from helpers import srpo_args

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm
from srpo_trl.trainer import log1mexp, odds_ratio_loss


# -50 .. 0 on a log scale near 0 (where the odds blow up) and linearly elsewhere, 0 itself included.
SWEEP = sorted(
    {0.0, -50.0, -20.0, -5.0, -1.0, -0.6931471805599453, -0.5, -0.1}
    | {-(10.0**e) for e in range(-14, 2)}
    | {-(2.0**e) for e in range(-30, -20)}
    | {-x / 4 for x in range(1, 200, 7)}
)
# Machine epsilon of the dtype the loss is computed in (bf16 inputs are computed in float32).
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7, torch.bfloat16: 1.2e-7}
# A gradient is returned in its input's dtype: the final cast rounds it (half an ulp, relative).
CAST = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-8}


def ref_log1mexp(x: float, clamp_at: float = -1e-12) -> float:
    x = min(x, clamp_at)  # the clamp of the implementation: the odds of a certain continuation stay finite
    return math.log(-math.expm1(x))


def ref_loss_and_grads(c: float, d: float, clamp_at: float = -1e-12) -> tuple[float, float, float]:
    """-log sigmoid(log odds ratio) and its derivatives in c and d, from the closed form. `clamp_at`
    is the implementation's -1e-12 as the compute dtype holds it."""
    log_odds = (c - d) - (ref_log1mexp(c, clamp_at) - ref_log1mexp(d, clamp_at))
    loss = math.log1p(math.exp(-log_odds)) if log_odds > -30 else -log_odds
    one_minus_sigma = 1 / (1 + math.exp(log_odds)) if log_odds < 700 else 0.0
    # d log_odds / dx = 1 + e^x / (1 - e^x) = -1 / expm1(x); where x is clamped only the first
    # term (x itself) is left.
    dc = -1 / math.expm1(c) if c <= clamp_at else 1.0
    dd = -1 / math.expm1(d) if d <= clamp_at else 1.0
    return loss, -one_minus_sigma * dc, one_minus_sigma * dd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_loss_and_gradient_are_finite_and_exact_over_the_whole_range(dtype):
    grid = torch.tensor([(c, d) for c in SWEEP for d in SWEEP], dtype=torch.float64)
    c = grid[:, 0].to(dtype).requires_grad_(True)
    d = grid[:, 1].to(dtype).requires_grad_(True)
    loss, log_odds = odds_ratio_loss(c, d)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(log_odds).all()
    assert torch.isfinite(c.grad).all(), c.detach()[~torch.isfinite(c.grad)]
    assert torch.isfinite(d.grad).all(), d.detach()[~torch.isfinite(d.grad)]

    # Reference values on the inputs as the dtype holds them.
    held = list(zip(c.detach().double().tolist(), d.detach().double().tolist()))
    clamp_at = torch.tensor(-1e-12, dtype=torch.float64 if dtype == torch.float64 else torch.float32).item()
    want = torch.tensor([ref_loss_and_grads(ci, di, clamp_at) for ci, di in held], dtype=torch.float64)
    terms = torch.tensor([abs(ci) + abs(di) + abs(ref_log1mexp(ci)) + abs(ref_log1mexp(di)) + 1 for ci, di in held])
    eps = EPS[dtype]
    # log1mexp(x) is well conditioned (condition number <= ~1 / |log|x|| away from -log 2) and is a
    # few correctly-rounded ops: a few eps relative to each of its terms. The loss adds four such
    # terms, so its error is bounded by ~8 eps times their magnitudes (|log1mexp| <= 27.7 after the
    # clamp, |c|, |d| <= 50), plus the relative error of the final log1p(exp(.)).
    got = torch.stack([loss.detach().double(), c.grad.double(), d.grad.double()], dim=1)
    loss_err = (got[:, 0] - want[:, 0]).abs() - (8 * eps * terms + 8 * eps * want[:, 0].abs())
    assert (loss_err <= 0).all(), [held[i] for i in torch.nonzero(loss_err > 0).flatten().tolist()]
    # The gradients are products of a few such quantities: a relative error of a few tens of eps,
    # plus the rounding of the cast back to the input's dtype.
    for col in (1, 2):
        grad_err = (got[:, col] - want[:, col]).abs() - (64 * eps + CAST[dtype]) * (want[:, col].abs() + 1)
        assert (grad_err <= 0).all(), [held[i] for i in torch.nonzero(grad_err > 0).flatten().tolist()]


def _old_log1mexp(x):  # the implementation before the fix, kept here to show the sweep reaches its bug
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def test_the_sweep_covers_the_band_where_the_old_formula_gave_nan():
    x = torch.tensor([-1e-9, -2e-8, -1e-11], requires_grad=True)
    _old_log1mexp(x).sum().backward()
    assert torch.isnan(x.grad).all()  # the defect of the old code, on values the sweep contains
    assert all(v in SWEEP for v in (-1e-9, -1e-11))
    x.grad = None
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def _memorize(model, ids: list[int], steps: int = 150) -> None:
    """Plain NLL on one sequence (no trainer involved) until every token is the model's argmax by a
    wide margin."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    batch = torch.tensor([ids])
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sharpen_into_the_band(trainer, model, batch) -> float:
    """Raise the final-norm gain (the logits scale with it) until the chosen mean log-prob lies in
    the band where the old formula's gradient was NaN. In float32 a token's log-prob is 0 or at
    least about one ulp of its logit, so the band is reached when a few of the continuation's ~400
    tokens are not yet exactly certain: the mean then sits at a few 1e-8 (as a long fine-tune on a
    few records leaves it)."""
    gain = model.model.norm.weight.detach().clone()
    factor = 1.0
    while factor < 8:
        with torch.no_grad():
            model.model.norm.weight.copy_(gain * factor)
            sums, counts, _ = trainer._sequence_logps(model, dict(batch))
        chosen_mean = (sums / counts)[0].item()
        if -2.6e-8 <= chosen_mean < -1e-12:
            return chosen_mean
        factor *= 1.02
    raise AssertionError("the chosen mean log-prob never entered the band")


ROW = {
    "prompt": "Is it safe to mix these?",
    "prefix": ["The image shows bleach."],
    "chosen": " ".join(["No, never mix bleach with acid."] * 30),  # a long memorized continuation
    "rejected": "Yes, mix them in a closed room.",
}


def _trainer(tmp_path, model, tok, lam):
    args = srpo_args(
        tmp_path,
        per_device_train_batch_size=1,
        max_steps=3,
        learning_rate=1e-4,
        srpo_lambda=lam,
        prefix_sharing=False,  # row 0 of a batch is the chosen path alone, memorized below
    )
    return SRPOTrainer(model=model, args=args, train_dataset=StepPairDataset.from_list([ROW]), processing_class=tok)


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """A tiny model that predicts ROW's chosen continuation with a mean log-prob in the band where the
    old formula's gradient was NaN (trained once for the module: the state dict is copied per test)."""
    tok = build_tokenizer()
    model = tiny_causal_lm(tok, seed=5)
    trainer = _trainer(tmp_path_factory.mktemp("memorize"), model, tok, 0.3)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 150 small steps: thread hand-offs cost more than they save (20x on a busy machine)
    try:
        _memorize(model, batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist())  # prompt + prefix + chosen
        chosen_mean = _sharpen_into_the_band(trainer, model, batch)
    finally:
        torch.set_num_threads(threads)
    return tok, {k: v.clone() for k, v in model.state_dict().items()}, chosen_mean


@pytest.mark.parametrize("lam", [0.3, 0.0])
def test_a_memorized_continuation_trains(tmp_path, memorized, lam):
    """The end-to-end case of the issue: the chosen continuation is predicted with mean log-prob in
    the band where the old loss gave a NaN gradient (with lambda 0 too); training now goes on."""
    tok, state, chosen_mean = memorized
    probe = torch.tensor(chosen_mean, requires_grad=True)
    _old_log1mexp(probe).backward()
    assert torch.isnan(probe.grad)  # the precondition: at this mean the old formula's gradient is NaN

    model = tiny_causal_lm(tok, seed=5)
    model.load_state_dict(state)
    trainer = _trainer(tmp_path, model, tok, lam)
    trainer.train()  # raised TrainingDiverged ("lower the learning rate") before the fix
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(norms) == len(losses) == 3
    assert all(math.isfinite(v) for v in norms + losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
