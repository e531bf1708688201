"""Issue 25: the study's diagnosis: per-term gradient norms against a hand computation, the probed
trainer (logs the terms, matches the Trainer's own grad norm, does not change training) and the pair
audit against the task's hidden rule."""

import copy
import json
import math

import pytest
import torch
from helpers import ROWS, hand_ids, make_trainer

from srpo_trl.cli import study as cli_study
from srpo_trl.demo import diagnose
from srpo_trl.demo import task as T
from srpo_trl.demo.run import clone_model  # a deepcopy would keep TRL's forward closure (the original's)
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --- per-term gradient norms ------------------------------------------------------------------


def _token_logps(model, ids, start):
    """Per-token log-probs of ids[start:] from a plain forward of this one sequence (with grad)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = logits.log_softmax(-1)
    return logp[start - 1 : len(ids) - 1].gather(1, torch.tensor(ids[start:])[:, None]).squeeze(1)


def _hand_terms(model, tok, rows, align_of):
    """L_ref and L_align of SRPO_SPEC.md, sequence by sequence (no padding, no packing, no fused head)."""
    nll, align = [], []
    for row in rows:
        (c_ids, c0), (r_ids, r0), (f_ids, f0) = hand_ids(tok, row)
        c, d = _token_logps(model, c_ids, c0), _token_logps(model, r_ids, r0)
        nll.append(-_token_logps(model, f_ids, f0).mean())
        align.append(align_of(c, d, row))
    return torch.stack(nll).mean(), torch.stack(align).mean()


def _odds_ratio(c, d, row):
    c, d = c.mean(), d.mean()
    log_odds = (c - d) - (torch.log(1 - torch.exp(c)) - torch.log(1 - torch.exp(d)))  # log(p/(1-p)), directly
    return torch.log1p(torch.exp(-log_odds))  # -log sigmoid


def _norms(model, nll, align, lam):
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(nll, params, retain_graph=True, allow_unused=True)
    g_align = torch.autograd.grad(align, params, allow_unused=True)
    flat = lambda gs: torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)])  # noqa: E731
    a, b = flat(g_ref), flat(g_align)
    return {
        "grad_norm/reference": a.norm().item(),
        "grad_norm/align": b.norm().item(),
        "grad_cosine": (a @ b / (a.norm() * b.norm())).item(),
        "grad_norm/total": (a + lam * b).norm().item(),
    }


# Tolerance: the probe runs in float32 (the trainer's packed or padded forward and fused LM head),
# the hand computation in float64 on a copy of the same weights, sequence by sequence. float32's unit
# roundoff is 6e-8; through two layers, a few hundred-term dot products and the backward pass the
# relative error of a gradient norm stays around 1e-6 to 1e-5; 1e-4 leaves a tenfold margin and is
# still far below any difference between the terms (their norms differ by orders of magnitude).
RTOL = 1e-4


@pytest.mark.parametrize("sharing", [True, False], ids=["packed", "unpacked"])
def test_term_gradients_match_a_hand_computation(tmp_path, tok, sharing):
    lam = 0.3
    model = tiny_causal_lm(tok, seed=5)
    trainer = make_trainer(tmp_path, model, tok, ROWS, srpo_lambda=lam, prefix_sharing=sharing)
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    got = diagnose.term_gradients(trainer, model, batch)

    exact = clone_model(model).double()
    nll, align = _hand_terms(exact, tok, ROWS, _odds_ratio)
    want = _norms(exact, nll, align, lam)
    assert got["loss/reference"] == pytest.approx(nll.item(), rel=RTOL)
    assert got["loss/align"] == pytest.approx(align.item(), rel=RTOL)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=RTOL, abs=RTOL if key == "grad_cosine" else 0), key
    assert got["grad_norm/align_scaled"] == pytest.approx(lam * got["grad_norm/align"])
    assert got["clip_factor"] == pytest.approx(min(1.0, 1.0 / got["grad_norm/total"]))  # max_grad_norm 1.0
    # the two terms really differ (a probe that returned one norm twice would fail above, but say it plainly)
    assert abs(got["grad_norm/reference"] - got["grad_norm/align"]) > 100 * RTOL * got["grad_norm/reference"]
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # nothing accumulated

    # the combined norm is the norm of the gradient the trainer's own loss gives
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    own = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
    assert got["grad_norm/total"] == pytest.approx(own, rel=RTOL)


def test_term_gradients_of_the_sigmoid_loss(tmp_path, tok):
    """Step-DPO's term: the probe takes the reference log-probs the trainer uses (here its reference model)."""
    from helpers import srpo_args

    from srpo_trl import SRPOTrainer, StepPairDataset

    lam, beta = 0.5, 0.25
    model, ref_model = tiny_causal_lm(tok, seed=8), tiny_causal_lm(tok, seed=9)
    args = srpo_args(
        tmp_path, per_device_train_batch_size=3, align_loss="sigmoid", beta=beta, srpo_lambda=lam, prefix_sharing=False
    )
    trainer = SRPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    got = diagnose.term_gradients(trainer, model, batch)

    exact, ref64 = clone_model(model).double(), clone_model(ref_model).double()

    def sigmoid(c, d, row):
        (c_ids, c0), (r_ids, r0), _ = hand_ids(tok, row)
        with torch.no_grad():
            q = _token_logps(ref64, c_ids, c0).sum() - _token_logps(ref64, r_ids, r0).sum()
        return -torch.nn.functional.logsigmoid(beta * (c.sum() - d.sum() - q))

    nll, align = _hand_terms(exact, tok, ROWS, sigmoid)
    want = _norms(exact, nll, align, lam)
    assert got["loss/align"] == pytest.approx(align.item(), rel=RTOL)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=RTOL, abs=RTOL if key == "grad_cosine" else 0), key


def test_probed_trainer_logs_the_terms_and_leaves_training_unchanged(tmp_path, tok):
    from helpers import srpo_args

    from srpo_trl import SRPOTrainer, StepPairDataset

    rows = ROWS * 2

    def train(cls):
        model = tiny_causal_lm(tok, seed=6)
        args = srpo_args(
            tmp_path / cls.__name__, per_device_train_batch_size=3, max_steps=4, learning_rate=1e-3, srpo_lambda=0.5
        )
        torch.manual_seed(0)
        trainer = cls(model=model, args=args, train_dataset=StepPairDataset.from_list(rows), processing_class=tok)
        trainer.train()
        return model, trainer

    record = {}
    probed, trainer = train(diagnose.probed_trainer_class(record, every=2))
    plain, _ = train(SRPOTrainer)
    assert [e["step"] for e in record["probe"]] == [0, 1, 3]  # the first step, and steps whose norm is logged
    for e in record["probe"]:
        assert e["lambda"] == 0.5 and e["loss"] == pytest.approx(e["loss/reference"] + 0.5 * e["loss/align"])
    # the Trainer's own grad_norm of the same steps (logging_steps=1: every step is logged)
    gap = diagnose.attach_trainer_grad_norms(record["probe"], record["logged"])
    assert set(record["logged"]) == {1, 2, 3, 4}
    assert gap is not None and gap < RTOL
    assert all("trainer_grad_norm" in e for e in record["probe"])
    # probing changes nothing: the same weights after training as without the probe
    for (name, a), b in zip(probed.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name


def test_a_changed_trainer_loss_is_caught(tmp_path, tok, monkeypatch):
    from helpers import srpo_args

    from srpo_trl import StepPairDataset
    from srpo_trl.trainer import SRPOTrainer

    record = {}
    cls = diagnose.probed_trainer_class(record, every=1)
    args = srpo_args(tmp_path, per_device_train_batch_size=3, max_steps=1, srpo_lambda=0.5)
    trainer = cls(
        model=tiny_causal_lm(tok, seed=7),
        args=args,
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    original = SRPOTrainer.compute_loss
    monkeypatch.setattr(SRPOTrainer, "compute_loss", lambda self, *a, **k: original(self, *a, **k) + 0.1)
    with pytest.raises(RuntimeError, match="SRPOTrainer's loss has changed"):
        trainer.train()


# --- pairs against the hidden rule ------------------------------------------------------------


def _record(o, r, rid):
    return {"id": rid, "object": o, "request": r, "unsafe": T.is_unsafe(o, r)}


def test_path_grade_follows_the_hidden_rule():
    unsafe, harmless = (0, 0), (0, 3)  # lighter fluid near the campfire / in the bathtub
    assert T.is_unsafe(*unsafe) and not T.is_unsafe(*harmless)
    ru, rh = _record(*unsafe, "u"), _record(*harmless, "h")
    g = diagnose.path_grade(ru, T.reference_path(*unsafe))
    assert g == {"outcome_ok": True, "reasoning_ok": True, "skips": False, "verdict_wrong": False}
    g = diagnose.path_grade(ru, T.skip_path(*unsafe))  # helps on an unsafe combination
    assert g == {"outcome_ok": False, "reasoning_ok": False, "skips": True, "verdict_wrong": False}
    g = diagnose.path_grade(rh, T.skip_path(*harmless))  # the right help, without the combination step
    assert g == {"outcome_ok": True, "reasoning_ok": False, "skips": True, "verdict_wrong": False}
    g = diagnose.path_grade(rh, T.overcautious_path(*harmless))  # "dangerous" and refuses a harmless one
    assert g == {"outcome_ok": False, "reasoning_ok": False, "skips": False, "verdict_wrong": True}
    wrong_verdict = (
        T.reference_path(*unsafe)[:2] + [T.combination_step(*unsafe, dangerous=False)] + [T.refusal_answer(*unsafe)]
    )
    g = diagnose.path_grade(ru, wrong_verdict)  # refuses (the verifier passes it) for a wrong reason
    assert g == {"outcome_ok": True, "reasoning_ok": False, "skips": False, "verdict_wrong": True}
    # the record's own labels are never read: only object and request
    assert diagnose.path_grade(dict(ru, unsafe=False, expected="comply"), T.reference_path(*unsafe))["outcome_ok"]


def _pair(rec, path_chosen, path_rejected, k):
    return {
        "id": rec["id"],
        "prefix": path_chosen[:k],
        "chosen": "\n".join(path_chosen[k:]),
        "rejected": "\n".join(path_rejected[k:]),
    }


def test_audit_pairs_counts_precision_by_record_kind():
    u, h, h2 = _record(0, 0, "u"), _record(0, 3, "h"), _record(1, 4, "h2")  # h2: a harmless record without pairs
    ref_u, skip_u = T.reference_path(0, 0), T.skip_path(0, 0)
    ref_h, skip_h, over_h = T.reference_path(0, 3), T.skip_path(0, 3), T.overcautious_path(0, 3)
    pairs = [
        _pair(u, ref_u, skip_u, 2),  # right: reference vs harmful help
        _pair(u, skip_u, ref_u, 2),  # inverted (a noisy verifier)
        _pair(h, skip_h, over_h, 2),  # right outcome, but the chosen path skips the combination step
        _pair(h, ref_h, over_h, 2),  # right, reference reasoning
        _pair(h, ref_h, skip_h, 2),  # both answers right: only the reasoning differs
    ]
    a = diagnose.audit_pairs(pairs, [u, h, h2])
    assert (a["all"]["pairs"], a["unsafe"]["pairs"], a["harmless"]["pairs"]) == (5, 2, 3)
    assert (a["unsafe"]["records"], a["harmless"]["records"]) == (1, 2)
    assert a["harmless"]["records_with_pairs"] == 1 and a["harmless"]["pairs_per_record"] == 1.5
    assert a["unsafe"]["outcome_precision"] == 0.5 and a["unsafe"]["outcome_inverted"] == 0.5
    assert a["harmless"]["outcome_precision"] == pytest.approx(2 / 3)
    assert a["harmless"]["outcome_both_ok"] == pytest.approx(1 / 3)
    assert a["harmless"]["chosen_skips"] == pytest.approx(1 / 3) and a["harmless"]["rejected_skips"] == pytest.approx(
        1 / 3
    )
    assert a["all"]["reasoning_precision"] == pytest.approx(3 / 5)  # u ref-vs-skip, h ref-vs-over, h ref-vs-skip
    assert a["all"]["chosen_reference"] == pytest.approx(3 / 5)
    assert a["all"]["chosen_verdict_wrong"] == 0.0
    with pytest.raises(ValueError, match="have no record"):
        diagnose.audit_pairs(pairs, [u])


# --- the diagnosis run: resume and the 2x2 ------------------------------------------------------


def test_diagnosis_resumes_and_reports_the_2x2(tmp_path, monkeypatch, capsys):
    from dataclasses import asdict

    from test_study import _fake_line

    from srpo_trl.demo import study
    from srpo_trl.demo.run import Budget

    out = tmp_path / "s"
    argv = ["--grid", "coverage=1", "seeds=1,2,3", "--out", str(out), "--no-progress", "--budget", "demo"]
    monkeypatch.setattr(study, "run_cell", lambda out_, cell, s: _fake_line(cell, s, 10.0 * cell.seed))
    assert study.main(argv) == 0  # the study's lines: srpo = 10 seed + 1, no srpo_lambda_0 arm in the fake ...
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for line in lines:  # ... so add it: lambda 0 = nll's, 10 seed + 2
        line["models"]["srpo_lambda_0"] = copy.deepcopy(line["models"]["nll"])
        line["train"] = {"srpo": {"last": {"loss": 0.5}}}
    (out / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    metric = lambda pct: {"pct": pct}  # noqa: E731
    ran = []

    def fake_cell(out_, cell, settings, arms=diagnose.ARMS):
        ran.append(cell.seed)
        probe = [
            {
                "step": s,
                "grad_norm/reference": 1.0,
                "grad_norm/align": 2.0,
                "grad_norm/align_scaled": 0.6,
                "grad_cosine": -0.5,
                "grad_norm/total": 1.2,
                "clip_factor": 1 / 1.2,
                "loss/reference": 0.1,
                "loss/align": 0.5,
            }
            for s in (0, 5)
        ]
        ms = lambda v: {k: metric(v) for k in ("attack_success", "over_refusal", "safe_and_effective")}  # noqa: E731
        return {
            "cell": asdict(cell),
            "key": cell.key,
            "settings": study._jsonable(asdict(settings)),
            "arms": {
                "srpo": {
                    "probe": probe,
                    "probe_vs_trainer_grad_norm": 1e-7,
                    "train": {"last": {"loss": 0.5 if cell.seed != 3 else 0.7}},  # seed 3: not the study's run
                },
                "srpo_unsafe": {
                    "probe": probe,
                    "probe_vs_trainer_grad_norm": 2e-7,
                    "models": ms(10.0 * cell.seed - 4),
                },
                "srpo_unsafe_lambda_0": {
                    "probe": [],
                    "probe_vs_trainer_grad_norm": None,
                    "models": ms(10.0 * cell.seed),
                },
            },
        }

    monkeypatch.setattr(diagnose, "run_diagnosis_cell", fake_cell)
    monkeypatch.setattr(diagnose, "cell_audit", lambda out_, cell, s: diagnose.audit_pairs([], [_record(0, 0, "u")]))
    settings = study.Settings(budget=asdict(Budget()), ablation_coverages=(1.0, 0.1))
    first = study.grid_cells(study.parse_grid(argv[1:3], False))[0]
    (out / "diagnosis.jsonl").write_text(json.dumps(fake_cell(out, first, settings)) + "\n")  # seed 1 done
    ran.clear()
    assert cli_study.main(argv + ["--diagnose"]) == 0  # srpo-trl study --diagnose
    assert ran == [2, 3]  # seed 1 was in diagnosis.jsonl already
    text = (out / "diagnosis.md").read_text()
    # all pairs: srpo (10 s + 1) - lambda 0 (10 s + 2) = -1; unsafe-only: (10 s - 4) - 10 s = -4; interaction -3
    row = next(x for x in text.splitlines() if x.startswith("| 1 | attack_success"))
    assert "| -1.0 [-1.0, -1.0] | -4.0 [-4.0, -4.0] | -3.0 [-3.0, -3.0] | 3 |" in row
    assert "| 1 | srpo | all | 0.100 | 0.500 | 1.000 | 2.000 | 0.600 | -0.500 | 1.200 | 0.833 | 0.833 | 3 |" in text
    assert "3 runs, 2 with the study's last logged loss to the last digit; seed=3 coverage=1" in text
    assert (out / "chart_gradient_norms.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnosis_arms_complete_the_2x2_and_prefer_their_own_evaluation():
    from dataclasses import asdict

    from srpo_trl.demo import study
    from srpo_trl.demo.run import Budget

    demo = study.Settings(budget=asdict(Budget()), ablation_coverages=(1.0, 0.1))
    amended = study.Settings(budget=asdict(Budget(**study.STUDY_BUDGET)))  # ablation arms at 0.1 only
    full = study.Cell(101, 1.0, 0.0, 8)
    assert diagnose.diagnosis_arms(full, demo) == list(diagnose.ARMS)  # the study has lambda 0 at coverage 1
    arms = diagnose.diagnosis_arms(full, amended, evaluate_replays=True)
    assert arms[-1] == ("srpo_lambda_0", "srpo", "pairs", 0.0, True) and all(a[4] for a in arms)
    # the 2x2 takes the diagnosis's own evaluation of an arm over the study's
    ms = lambda v: {k: {"pct": v} for k in ("attack_success", "over_refusal", "safe_and_effective")}  # noqa: E731
    study_lines = {full.key: {"models": {"srpo": ms(50.0), "nll": ms(40.0)}}}
    line = {
        "cell": asdict(full),
        "key": full.key,
        "arms": {
            "srpo": {"models": ms(30.0)},
            "srpo_lambda_0": {"models": ms(20.0)},
            "srpo_unsafe": {"models": ms(10.0)},
            "srpo_unsafe_lambda_0": {"models": ms(10.0)},
        },
    }
    row = next(x for x in diagnose.arms_table([line], study_lines).splitlines() if "attack_success" in x)
    assert row.startswith("| 1 | attack_success | 30.0 [30.0, 30.0] | 20.0 [20.0, 20.0] | 10.0")
    assert "| +10.0 [+10.0, +10.0] | +0.0 [+0.0, +0.0] | -10.0 [-10.0, -10.0] | 1 |" in row


def test_srpo_trl_study_routes_the_diagnosis_flags_to_the_diagnosis(monkeypatch, tmp_path):
    """The diagnosis imports the study, not the reverse (tests/test_packaging.py forbids cycles):
    `srpo-trl study --diagnose / --audit-only` dispatches in srpo_trl.cli.study, and the study's
    own main refuses them with a message instead of running the grid."""
    from srpo_trl.demo import study

    seen = []
    monkeypatch.setattr(diagnose, "cli", lambda argv: seen.append(argv) or 0)
    argv = ["--out", str(tmp_path / "s"), "--audit-only", "--grid", "coverage=1", "seeds=1"]
    assert cli_study.main(argv) == 0 and seen == [argv]
    with pytest.raises(SystemExit, match="diagnose"):
        study.main(argv)
