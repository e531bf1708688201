"""Prefix sharing: score every sequence of a question in one packed row, each shared token once.

The sequences of a question (for every row: prompt + prefix + chosen, prompt + prefix + rejected,
prompt + reference) are inserted into a token trie hanging off the prompt. The trie is laid out
depth-first in one row, and an attention mask lets every token see exactly its own ancestors, with
position ids equal to the token's depth, so each token's hidden state is the one it has in its own
sequence (arXiv 2410.20305).

A position predicts one next token (the fused LM head scores `shift_labels[p]` from the hidden
state at p). Where a node has several children (a branch point), the first child is predicted from
the node itself and each further child from a *copy* of the node: same token, same position id,
same ancestors, so the same hidden state. That costs one token per extra branch and keeps the
scoring one label per position.

Everything here is plain Python / numpy on token ids; `PackedBatch` is what the collator returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Node:
    token: int
    depth: int
    pos: int = -1  # packed position
    pred_pos: int = -1  # packed position whose hidden state predicts this token
    children: dict = field(default_factory=dict)


@dataclass
class PackedRow:
    """One question laid out as a tree.

    tokens / depth / parent: per packed position (parent -1 for the first prompt token).
    shift_labels: per position, the token its hidden state is scored against (-100 for none).
    scored: per input sequence, the packed positions that predict its scored tokens.
    """

    tokens: list[int]
    depth: list[int]
    parent: list[int]
    shift_labels: list[int]
    scored: list[list[int]]
    prompt_length: int


def pack_question(prompt: list[int], sequences: list[tuple[list[int], int]]) -> PackedRow:
    """Pack `prompt` and the sequences that continue it into one tree-shaped row.

    Each sequence is `(tokens after the prompt, start)`: tokens[start:] are scored, tokens[:start]
    are context only (a reasoning prefix). The first scored token may be the first token after the
    prompt, which the last prompt token predicts.
    """
    if not prompt:
        raise ValueError("pack_question needs a non-empty prompt (the tokens every sequence continues)")
    tokens, depth, parent = list(prompt), list(range(len(prompt))), [-1] + list(range(len(prompt) - 1))
    shift_labels = [-100] * len(prompt)  # prompt tokens are context only: never scored
    root = _Node(token=prompt[-1], depth=len(prompt) - 1, pos=len(prompt) - 1)

    def place(node: _Node, parent_pos: int, predicted_by: int) -> None:
        node.pos = len(tokens)
        node.pred_pos = predicted_by
        tokens.append(node.token)
        depth.append(node.depth)
        parent.append(parent_pos)
        shift_labels.append(-100)
        shift_labels[predicted_by] = node.token

    def copy_of(node: _Node) -> int:
        """A stand-in for `node` (same token, depth and ancestors) to predict one more child."""
        pos = len(tokens)
        tokens.append(node.token)
        depth.append(node.depth)
        parent.append(parent[node.pos])
        shift_labels.append(-100)
        return pos

    # Build the trie, placing each node as soon as it is created: a node's first child is predicted
    # from the node, every later child from a copy of it.
    paths = []
    for seq, _ in sequences:
        node, path = root, []
        for tok in seq:
            child = node.children.get(tok)
            if child is None:
                child = _Node(token=tok, depth=node.depth + 1)
                predictor = node.pos if not node.children else copy_of(node)
                node.children[tok] = child
                place(child, predictor, predictor)
            node = child
            path.append(node)
        paths.append(path)

    scored = [[n.pred_pos for n in path[start:]] for path, (_, start) in zip(paths, sequences)]
    return PackedRow(tokens, depth, parent, shift_labels, scored, len(prompt))


def allowed_matrix(parent: list[int], length: int) -> np.ndarray:
    """Boolean [length, length]: row q is True at q's ancestors and q itself (the tree's causal mask).

    Positions past the row's end (padding) attend to themselves only, so no softmax row is empty.
    """
    n = len(parent)
    allowed = np.zeros((length, length), dtype=bool)
    for q in range(n):  # parents always come before their children in the layout
        if parent[q] >= 0:
            allowed[q] = allowed[parent[q]]
        allowed[q, q] = True
    idx = np.arange(n, length)
    allowed[idx, idx] = True
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, L] booleans -> [B, 1, L, L] additive float mask (0 allowed, dtype min elsewhere).

    A float mask, not a boolean one: eager attention silently mishandles 4D boolean masks.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
