"""One set of flags with the same names in every command; the old spellings work for one release and warn."""

from __future__ import annotations

import pytest

from srpo_trl.cli.evaluate import build_parser as evaluate_parser
from srpo_trl.cli.explore import build_parser as explore_parser
from srpo_trl.records import build_generate_parser


def _parse(parser, argv):
    return parser.parse_args(argv)


@pytest.mark.parametrize("parser", [explore_parser, evaluate_parser, build_generate_parser])
def test_shared_flags_have_the_same_names(parser):
    p = parser()
    base = ["--records", "r.jsonl", "--out", "o.jsonl"] if parser is explore_parser else []
    args = _parse(
        p,
        [
            *base,
            "--endpoint",
            "http://h/v1",
            "--served-model",
            "m",
            "--temperature",
            "0.25",
            "--max-new-tokens",
            "7",
            "--timeout",
            "5",
            "--http-retries",
            "4",
            "--seed",
            "3",
        ],
    )
    assert (args.endpoint, args.served_model, args.temperature, args.max_new_tokens) == ("http://h/v1", "m", 0.25, 7)
    assert (args.timeout, args.http_retries, args.seed) == (5.0, 4, 3)
    assert _parse(p, base).seed == 0  # the same default everywhere
    if parser is not build_generate_parser:  # the agents sample one answer per call
        args = _parse(p, [*base, "--model", "folder", "--num-samples", "5"])
        assert (args.model, args.num_samples) == ("folder", 5)


@pytest.mark.parametrize(
    "parser, old, new, dest, value",
    [
        (evaluate_parser, "--generation-url", "--endpoint", "endpoint", "http://h"),
        (evaluate_parser, "--samples", "--num-samples", "num_samples", 2),
        (build_generate_parser, "--chat-url", "--endpoint", "endpoint", "http://h/v1"),
        (explore_parser, "--max-retries", "--http-retries", "http_retries", 1),
    ],
)
def test_old_spellings_warn_and_set_the_new_flag(parser, old, new, dest, value):
    base = ["--records", "r.jsonl", "--out", "o.jsonl"] if parser is explore_parser else []
    with pytest.warns(FutureWarning, match=rf"{old} is deprecated .* use {new}"):
        args = _parse(parser(), [*base, old, str(value)])
    assert getattr(args, dest) == value


def test_max_retries_is_deprecated_in_both_meanings_and_the_new_names_say_which():
    """`--max-retries` meant HTTP retries in explore and agent re-asks in generate-records; each
    command now has its own name for it, and the old one warns where it still works."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = build_generate_parser().parse_args(["--agent-retries", "5", "--http-retries", "1"])
    assert (args.agent_retries, args.http_retries) == (5, 1)
    with pytest.warns(FutureWarning, match=r"--max-retries is deprecated .* use --agent-retries"):
        args = build_generate_parser().parse_args(["--max-retries", "4"])
    assert (args.agent_retries, args.http_retries) == (4, 3)  # the old meaning here: agent re-asks, not HTTP
    assert not hasattr(args, "max_retries")


def test_every_command_has_its_module():
    import importlib

    from srpo_trl.cli import COMMANDS

    for name, (module, func, _) in COMMANDS.items():
        assert module == "srpo_trl.cli." + name.replace("-", "_")
        assert callable(getattr(importlib.import_module(module), func))
