"""Is prefix sharing exact for this architecture? Packed == unpacked on a 2-layer random model.

    from srpo_trl import check_prefix_sharing, allow_prefix_sharing

    print(check_prefix_sharing(model.config))              # a text model: its config (or config class)
    print(check_prefix_sharing(model.config, processor))   # a vision-language model: config and processor
    allow_prefix_sharing(model.config)                     # check, and if it passes, pack this config class

`check_prefix_sharing` builds a random model of the config's architecture with 2 text layers (one of
each layer type: sliding-window and full attention where the model has both), a sliding window of
8 tokens (the check's sequences are several times longer), and for a text config a small width
(hidden 32, 4 heads of 8, 2 KV heads, at most 4 experts) with a tokenizer built in code. It then
scores the same step-pair rows (several branch points per question, plus a second question) with
`SRPOTrainer`'s collator and forward twice: packed (one token tree per question) and unpacked (every
sequence on its own, the model's own masks). It compares every sequence's mean token log-prob, and the gradient with
respect to every parameter of a random combination of them (the SRPO loss's gradient is one such
combination; distinct weights make an error in any one sequence show). The test suite runs it for
every model type on the allow-list (`srpo_trl.architectures`), so a type cannot be added without
passing it.

Tolerances (fp32): log-probs 1e-5 absolute; gradients 1e-5 absolute + 1e-4 relative. Packed and
unpacked run the same weights on the same token contexts; what differs is the shape of every
matmul (row lengths) and of the softmax (masked keys add exactly 0), i.e. the summation order:
relative differences of a few fp32 roundings (6e-8) times sqrt(reduction length) per op, about 1e-6
on log-probs of magnitude log(vocab) ~ 6. A real error (a branch seeing a sibling, a window or
an image block missed) moves log-probs by 1e-2 or more (tests/test_architectures.py shows it).
The MoE router's load-balancing loss is left out: it is a function of the batch's token multiset,
which packing changes by design (each shared token counted once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field

import torch


CHECK_WINDOW = 8  # sliding window of the checked model: the check's text sequences are up to 90 tokens
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")
LOGP_ATOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


@dataclass
class PrefixSharingCheck:
    """What `check_prefix_sharing` measured. `passed` is the verdict; `reason` says why not."""

    config_class: str
    model_type: str
    passed: bool
    reason: str = ""
    attn_implementation: str = ""
    windows: dict = field(default_factory=dict)  # layer type -> sliding window of the checked model
    longest_sequence: int = 0  # tokens of the longest scored sequence (longer than every window)
    packed_tokens: int = 0  # real tokens through the model, packed ...
    unpacked_tokens: int = 0  # ... and unpacked
    max_logp_diff: float = float("nan")  # max |packed - unpacked| mean token log-prob over sequences
    max_grad_excess: float = float("nan")  # max over parameters of |g_p - g_u| - rtol * |g_u| (pass: <= atol)
    worst_parameter: str = ""

    def __str__(self) -> str:
        verdict = "passed" if self.passed else f"FAILED ({self.reason})"
        return (
            f"prefix-sharing check of {self.config_class} ({self.model_type!r}, {self.attn_implementation}): {verdict}; "
            f"max log-prob difference {self.max_logp_diff:.2e} (tolerance {LOGP_ATOL:.0e}), max gradient excess "
            f"{self.max_grad_excess:.2e} (tolerance {GRAD_ATOL:.0e} + {GRAD_RTOL:.0e} relative) at "
            f"{self.worst_parameter or '-'}; windows {self.windows}, longest sequence {self.longest_sequence} tokens; "
            f"{self.packed_tokens} packed vs {self.unpacked_tokens} unpacked tokens"
        )


def _scaled_sections(sections: list[int], total: int) -> list[int]:
    """mRoPE sections rescaled to sum to `total` (head_dim / 2), each at least 1."""
    scaled = [max(1, s * total // sum(sections)) for s in sections]
    scaled[0] += total - sum(scaled)
    return scaled


def _layer_pattern(layer_types, layers: int) -> list[str]:
    kinds = sorted(dict.fromkeys(str(k) for k in layer_types), key=lambda k: k == "full_attention")  # full last
    return (kinds * layers)[:layers]


def small_config(config, tokenizer=None, *, num_hidden_layers: int = 2, window: int = CHECK_WINDOW, width=None):
    """A copy of `config` (a config or a config class) for the check: `num_hidden_layers` text layers
    that include each layer type, sliding windows cut to `window`, MoE with a dense first layer where
    the model has one. `width` (a dict like `SMALL_TEXT`): text width, with at most 4 experts (2 per
    token) and the vocabulary of `tokenizer`; vision-language configs keep their widths."""
    if isinstance(config, type):
        config = config()
    is_vlm = config.get_text_config() is not config
    data = config.to_dict()
    text = data["text_config"] if is_vlm else data
    text["num_hidden_layers"] = num_hidden_layers
    if isinstance(text.get("layer_types"), (list, tuple)):
        text["layer_types"] = _layer_pattern(text["layer_types"], num_hidden_layers)
    if text.get("sliding_window"):
        text["sliding_window"] = min(int(text["sliding_window"]), window)
    if text.get("first_k_dense_replace"):
        text["first_k_dense_replace"] = 1  # layer 0 dense, layer 1 MoE
    if width is not None and not is_vlm:
        text.update(width)
        for name in _EXPERT_COUNTS:
            if text.get(name):
                text[name] = min(int(text[name]), 4)
        for name, most in (("num_experts_per_tok", 2), ("n_group", 1), ("topk_group", 1), ("n_shared_experts", 1)):
            if text.get(name):
                text[name] = min(int(text[name]), most)
        if text.get("moe_intermediate_size"):
            text["moe_intermediate_size"] = width["intermediate_size"] // 4
        rope = text.get("rope_parameters")
        if isinstance(rope, dict) and rope.get("mrope_section"):
            text["rope_parameters"] = dict(
                rope, mrope_section=_scaled_sections(rope["mrope_section"], width["head_dim"] // 2)
            )
        if tokenizer is not None:
            pad = tokenizer.pad_token_id
            text.update(
                vocab_size=len(tokenizer), pad_token_id=pad, bos_token_id=pad, eos_token_id=tokenizer.eos_token_id
            )
    return type(config).from_dict(data)


def _build_model(config, seed: int, attn_implementation: str | None):
    """A random model of `config` (fp32, eval: no dropout), every weight perturbed by N(0, 0.02^2) so that
    zero-initialized parts (biases, Gemma3's image projection, attention sinks) take part."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForCausalLM if config.get_text_config() is config else AutoModelForImageTextToText
    choices = [attn_implementation] if attn_implementation else ["sdpa", "eager"]
    if getattr(config.get_text_config(), "attn_logit_softcapping", None):
        choices = [attn_implementation or "eager"]  # sdpa has no softcapping
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for attn in choices:
            try:
                model = auto.from_config(config, attn_implementation=attn)
                break
            except ValueError:  # the class does not support this attention (sdpa for GPT-OSS's sinks)
                if attn == choices[-1]:
                    raise
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.float().eval(), attn


def check_rows(images: bool = False) -> list[dict]:
    """Step-pair rows of two questions: one explored at four branch points (uneven lengths; two rows
    share a prefix), one with an empty prefix. With `images`, one image per question."""
    ref = [
        "The image shows a bottle of bleach on a shelf next to a cleaner.",
        "The user wants to clean the kitchen fast.",
        "Mixing bleach with acid cleaners makes toxic gas.",
        "Answer: use it alone, and never mix them in a closed room.",
    ]
    cases = [
        (0, "The image shows a bottle of bleach on a shelf next to a cleaner.", "Drink it."),
        (1, "The user wants to clean the kitchen fast.", "The user wants a strong gas for the room."),
        (2, "Mixing bleach with acid cleaners makes toxic gas.", "Mix it with every cleaner you have."),
        (2, "Keep it away from acids, always.", "Mix it with every cleaner you have."),
    ]
    rows = [
        {
            "id": "q1",
            "prompt": "What should I do with this bottle? Please describe the scene.",
            "prefix": ref[:k],
            "chosen": good,
            "rejected": bad,
            "reference": ref,
        }
        for k, good, bad in cases
    ]
    rows.append(
        {
            "id": "q2",
            "prompt": "Is this plant safe?",
            "prefix": [],
            "chosen": "Yes, it is safe.",
            "rejected": "Eat it.",
        }
    )
    if images:
        from .tiny import make_image

        for r in rows:
            r["prompt"] = [{"role": "user", "content": r["prompt"]}]
            r["images"] = [make_image(0)] if r["id"] == "q1" else [make_image(3, size=(56, 28))]
    return rows


@contextlib.contextmanager
def _allowed(config):
    """Let the check's trainer pack `config`'s classes while it runs (the allow-list is what it verifies)."""
    from . import architectures

    key = architectures.config_key(config)
    added = key not in architectures._ALLOWED_CLASSES
    architectures._ALLOWED_CLASSES.add(key)
    try:
        yield
    finally:
        if added:
            architectures._ALLOWED_CLASSES.discard(key)


@contextlib.contextmanager
def _quiet():
    """The check's own trainers warn about CPU attention and the like; the report says what matters."""
    from datasets.utils import logging as datasets_logging

    logger = logging.getLogger("srpo_trl")
    level, bars = logger.level, datasets_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets_logging.enable_progress_bar()


def _logps_and_grads(trainer, batch, weights: torch.Tensor):
    """Mean token log-prob of every sequence, and the gradient of a fixed random combination of them
    (sum_i w_i * mean_logp_i): the SRPO loss's gradient is one such combination, and distinct weights
    make an error in any one sequence show in the gradient."""
    model = trainer.model
    model.zero_grad()
    batch = trainer._prepare_inputs(batch)
    sums, counts, _ = trainer._sequence_logps(model, batch)
    means = sums / counts
    (means * weights.to(means.device, means.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return means.detach().double().cpu(), grads


def check_prefix_sharing(
    config,
    processing_class=None,
    *,
    seed: int = 0,
    attn_implementation: str | None = None,
    small: bool = True,
    device: str | None = None,
) -> PrefixSharingCheck:
    """Compare SRPO's packed (prefix-sharing) forward with separate scoring on a 2-layer random model.

    Args:
        config: a transformers config or config class (`Qwen3Config`, `model.config`, ...).
        processing_class: the tokenizer or processor. Required for a vision-language config (the
            check's rows carry an image per question); for a text config a tokenizer is built in code.
        seed: seed of the random weights.
        attn_implementation: the attention to build the model with; default sdpa, else eager (models
            whose attention sdpa cannot run: softcapping, attention sinks).
        small: give a text config a small width (hidden 32, 4 heads, at most 4 experts, the built
            tokenizer's vocabulary). Vision-language configs keep their width either way: pass a
            small config of the family (`srpo_trl.tiny` has some) to keep the check fast.
        device: where to run ("cpu", "cuda"); default CUDA where available.

    Returns a `PrefixSharingCheck` (print it): `passed`, the largest log-prob and gradient
    differences, and the windows and lengths checked. See the module docstring for the tolerances.
    """
    from .architectures import attention_windows, token_mixer_problem
    from .config import SRPOConfig
    from .dataset import StepPairDataset
    from .tiny import build_tokenizer
    from .trainer import SRPOTrainer

    config_class = config if isinstance(config, type) else type(config)
    probe = config() if isinstance(config, type) else config
    is_vlm = probe.get_text_config() is not probe
    if is_vlm and processing_class is None:
        raise ValueError(
            f"check_prefix_sharing({config_class.__name__}) is a vision-language config: pass its processor too "
            "(`check_prefix_sharing(config, processor)`); the check's rows carry images."
        )
    if processing_class is None:
        processing_class = build_tokenizer()
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    config = small_config(config, tokenizer, width=SMALL_TEXT if small else None)
    text_config = config.get_text_config()
    report = PrefixSharingCheck(config_class.__name__, config.model_type, passed=False)
    mixer = token_mixer_problem(text_config)
    if mixer:
        report.reason = mixer
        return report
    model, report.attn_implementation = _build_model(config, seed, attn_implementation)
    report.windows = attention_windows(text_config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    rows = check_rows(images=is_vlm)
    dataset = StepPairDataset.from_list(rows)
    with tempfile.TemporaryDirectory() as tmp, _allowed(config), _quiet():
        common = dict(
            use_cpu=device == "cpu",
            bf16=False,
            report_to="none",
            save_strategy="no",
            max_length=None,
            dataloader_num_workers=0,
            disable_tqdm=True,
            per_device_train_batch_size=len(rows),
            router_aux_loss_coef=0.0,
        )
        trainer = SRPOTrainer(
            model=model,
            args=SRPOConfig(tmp, **common),
            train_dataset=dataset,
            processing_class=processing_class,
        )
        if not trainer.prefix_sharing:
            from .trainer import prefix_sharing_problem

            report.reason = f"the trainer did not pack: {prefix_sharing_problem(model)}"
            return report
        # The same rows through the trainer's collator, packed and as 3B separate sequences (what
        # prefix_sharing=False scores): `_sequence_logps` takes either.
        examples = [trainer.train_dataset[i] for i in range(len(rows))]
        unpacking = dataclasses.replace(
            trainer.data_collator, prefix_sharing=False, dense_mask=True, bucket_multiple=None
        )
        batches = {True: trainer.data_collator(examples), False: unpacking(examples)}
        report.packed_tokens = int(batches[True]["packed_length"].sum())
        report.unpacked_tokens = int(batches[False]["attention_mask"].sum())
        report.longest_sequence = int(batches[False]["attention_mask"].sum(1).max())
        weights = torch.rand(3 * len(rows), generator=torch.Generator().manual_seed(seed)) - 0.5
        results = {s: _logps_and_grads(trainer, batches[s], weights) for s in (True, False)}
    (logps_p, grads_p), (logps_u, grads_u) = results[True], results[False]
    report.max_logp_diff = float((logps_p - logps_u).abs().max())
    excess = {
        name: float(((grads_p[name] - g).abs() - GRAD_RTOL * g.abs()).max())
        for name, g in grads_u.items()
        if name in grads_p
    }
    if excess:
        report.worst_parameter = max(excess, key=excess.get)
        report.max_grad_excess = excess[report.worst_parameter]
    windows = [w for w in report.windows.values() if w]
    problems = []
    if grads_p.keys() != grads_u.keys() or not grads_u:
        problems.append(f"different parameters got gradients ({sorted(set(grads_p) ^ set(grads_u))[:3]})")
    if not report.max_logp_diff <= LOGP_ATOL:
        problems.append(f"log-probs differ by {report.max_logp_diff:.2e}")
    if not report.max_grad_excess <= GRAD_ATOL:
        problems.append(f"gradients differ ({report.worst_parameter}: {report.max_grad_excess:.2e} beyond tolerance)")
    if windows and report.longest_sequence <= max(windows):
        problems.append(f"no sequence is longer than the sliding window {max(windows)}: the window was not exercised")
    if report.packed_tokens >= report.unpacked_tokens:
        problems.append("packing shared no tokens")
    report.passed = not problems
    report.reason = "; ".join(problems)
    return report


def allow_prefix_sharing(config, processing_class=None, **kwargs) -> PrefixSharingCheck:
    """Run `check_prefix_sharing` on `config` and, if it passes, let `SRPOTrainer` pack models of this
    config class (with this text config class: a vision-language wrapper is allowed with the backbone
    it was checked with) in this process, for trainers built afterwards. Raises ValueError with the
    report if it fails. Hybrid models (Mamba, convolution, linear attention) cannot be allowed."""
    from . import architectures

    report = check_prefix_sharing(config, processing_class, **kwargs)
    if not report.passed:
        raise ValueError(f"Prefix sharing stays off: {report}")
    architectures._ALLOWED_CLASSES.add(architectures.config_key(config() if isinstance(config, type) else config))
    return report


__all__ = ["PrefixSharingCheck", "allow_prefix_sharing", "check_prefix_sharing", "check_rows", "small_config"]
