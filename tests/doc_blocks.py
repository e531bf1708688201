"""The code blocks of README.md and docs/*.md, with the doc-test marker each one carries
(docs/writing-docs.md explains the convention; tests/test_docs.py runs and parses the blocks).

Every fenced or indented code block is preceded by one HTML comment, invisible on GitHub::

    <!-- doc-test run [NAME] -->               tests/test_docs.py runs it (NAME: its scenario there)
    <!-- doc-test test tests/FILE.py::TEST -->  that test runs it (or mirrors it, step by step)
    <!-- doc-test parse: WHY NOT RUN -->       too big to run (a GPU, hours, 8 GPUs, external data): parsed only
    <!-- doc-test text: WHAT IT IS -->         not code: a diagram, a formula, sample output

Whatever the kind, code is parsed: Python compiled, shell commands' flags checked against the
command's own argument parser, JSON and YAML loaded.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
KINDS = ("run", "test", "parse", "text")
SHELL_LANGS = ("bash", "sh", "shell", "console")
_MARKER = re.compile(r"^<!--\s*doc-test\b(?P<body>.*?)-->\s*$", re.DOTALL)


def doc_files() -> list[Path]:
    """README.md and every page of docs/ (not the generated docs/study/ outputs)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository, e.g. "docs/recipes.md"
    line: int  # 1-based line of the block's first line (the fence)
    lang: str  # the fence's language ("" for none, and for indented blocks)
    text: str
    kind: str | None  # run / test / parse / text; None: no marker (an error)
    arg: str  # run: the scenario name (may be ""); test: the test id
    note: str  # parse / text: why it is not run, what it is
    marker_error: str = ""

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def name(self) -> str:
        """The name tests refer to it by: the run scenario's name, else path:line."""
        return self.arg if self.kind == "run" and self.arg else self.id

    @property
    def language(self) -> str:
        if self.lang:
            return self.lang
        return "bash" if looks_like_shell(self.text) else ""


def looks_like_shell(text: str) -> bool:
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
    return bool(re.match(r"(srpo-trl|python|accelerate|make|bash|for|pip|git)\b", first))


def _parse_marker(content: str) -> tuple[str | None, str, str, str]:
    m = _MARKER.match(content.strip())
    if m is None:
        return None, "", "", ""
    body = m.group("body").strip()
    head, sep, note = body.partition(": ")
    if not sep and head.endswith(":"):
        head = head[:-1]
    words = head.split()
    if not words or words[0] not in KINDS:
        return None, "", "", f"unknown kind in {content.strip()!r}: use one of {', '.join(KINDS)}"
    kind, arg = words[0], " ".join(words[1:])
    note = note.strip()
    if kind in ("parse", "text") and not note:
        return kind, arg, note, f"'{kind}' needs a reason after a colon, e.g. <!-- doc-test {kind}: needs a GPU -->"
    if kind == "test" and not re.fullmatch(r"tests/\w+\.py(::\w+)?( tests/\w+\.py(::\w+)?)*", arg):
        return kind, arg, note, f"'test' needs test ids, e.g. tests/test_x.py::test_y; got {arg!r}"
    if kind == "run" and arg and not re.fullmatch(r"[\w-]+", arg):
        return kind, arg, note, f"a run scenario name is one word ([A-Za-z0-9_-]); got {arg!r}"
    return kind, arg, note, ""


@lru_cache(maxsize=None)
def _blocks_of(path: Path) -> tuple[Block, ...]:
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8"))
    rel = str(path.relative_to(REPO))
    out = []
    for i, tok in enumerate(tokens):
        if tok.type not in ("fence", "code_block"):
            continue
        kind, arg, note, error = None, "", "", ""
        prev = tokens[i - 1] if i else None
        if prev is not None and prev.type == "html_block" and "doc-test" in prev.content:
            kind, arg, note, error = _parse_marker(prev.content)
            if kind is None and not error:
                error = f"malformed marker {prev.content.strip()!r}"
        lang = tok.info.split()[0] if tok.type == "fence" and tok.info.strip() else ""
        out.append(Block(rel, tok.map[0] + 1, lang, tok.content, kind, arg, note, error))
    return tuple(out)


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in _blocks_of(path)]


def block(name: str) -> Block:
    """A block by its run-scenario name or its `path:line` id (for tests that run a doc's block)."""
    found = [b for b in all_blocks() if b.name == name or b.id == name]
    if len(found) != 1:
        raise LookupError(f"{len(found)} doc blocks are named {name!r}")
    return found[0]


def blocks_run_by(test_id: str) -> list[Block]:
    """The blocks whose marker says `doc-test test <test_id>`."""
    return [b for b in all_blocks() if b.kind == "test" and b.arg == test_id]


def inline_code(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span of a page."""
    from markdown_it import MarkdownIt

    out = []
    for tok in MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8")):
        if tok.type == "inline":
            out += [(tok.map[0] + 1, c.content) for c in tok.children or [] if c.type == "code_inline"]
    return out


# ---- shell commands ---------------------------------------------------------------------------------

_KEYWORDS = {"do", "then", "else", "done", "fi"}


def shell_commands(text: str, keep_optional: bool = True) -> list[list[str]]:
    """The simple commands of a shell snippet, as argv lists: continuation lines joined, comments
    dropped, split at `;`, `&&`, `||`, `|` and `&`, `for X in ...` headers and `do` / `done` dropped,
    leading `VAR=value` assignments dropped, a `...` word (an elision) dropped. `[--flag VALUE]` is an
    optional flag, as usage lines write it: kept without its brackets (`keep_optional`, to check
    it), or left out (to run the command)."""
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for word in [*lexer, ";"]:
            if set(word) <= set(";&|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    out = []
    for argv in commands:
        while argv and (argv[0] in _KEYWORDS or re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0])):
            argv = argv[1:]
        if not argv or argv[0] == "for":
            continue
        words, optional = [], False
        for word in argv:
            opens, closes = word.startswith("["), word.endswith("]")
            optional = optional or opens
            if keep_optional or not optional:
                words.append(word[1:] if opens else word)
                words[-1] = words[-1][:-1] if closes else words[-1]
            optional = optional and not closes
        out.append([w for w in words if w not in ("...", "")])
    return out
