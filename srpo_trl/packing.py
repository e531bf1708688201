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
    pred_pos: int = -1  # packed position whose hidden state predicts this token
    children: dict = field(default_factory=dict)


@dataclass
class PackedRow:
    """One question laid out as a tree, in pre-order.

    tokens / depth / parent: per packed position (parent -1 for the first prompt token).
    end: per position, the last position of its subtree; pre-order makes "k is an ancestor of q"
        the interval test `k <= q <= end[k]`, so masks need O(L) state, not O(L^2).
    shift_labels: per position, the token its hidden state is scored against (-100 for none).
    scored: per input sequence, the packed positions that predict its scored tokens.
    """

    tokens: list[int]
    depth: list[int]
    parent: list[int]
    end: list[int]
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
    # 1. The trie of everything after the prompt, hanging off the last prompt token.
    root = _Node(token=prompt[-1], depth=len(prompt) - 1)
    paths = []
    for seq, _ in sequences:
        node, path = root, []
        for tok in seq:
            node = node.children.setdefault(tok, _Node(token=tok, depth=node.depth + 1))
            path.append(node)
        paths.append(path)

    # 2. Pre-order layout. A node's first child is predicted from the node; every later child from a
    #    copy of the node (a sibling of it: same token, depth and parent), laid out after the node's
    #    subtree. Iterative, since paths can be thousands of tokens deep.
    tokens, depth = list(prompt[:-1]), list(range(len(prompt) - 1))
    parent = list(range(-1, len(prompt) - 2))  # a chain: each prompt token's parent is the one before
    shift_labels = [-100] * (len(prompt) - 1)  # prompt tokens are context only: never scored

    def emit(token: int, node_depth: int, parent_pos: int) -> int:
        tokens.append(token)
        depth.append(node_depth)
        parent.append(parent_pos)
        shift_labels.append(-100)
        return len(tokens) - 1

    stack = [("node", root, len(prompt) - 2, None)]
    while stack:
        kind, node, parent_pos, extra = stack.pop()
        if kind == "node":
            pos = emit(node.token, node.depth, parent_pos)
            if extra is not None:  # predicted by `extra`
                node.pred_pos, shift_labels[extra] = extra, node.token
            children = list(node.children.values())
            for child in reversed(children[1:]):
                stack.append(("copy", node, parent_pos, child))
            if children:
                stack.append(("node", children[0], pos, pos))
        else:  # a copy of `node` that predicts `extra`
            pos = emit(node.token, node.depth, parent_pos)
            stack.append(("node", extra, pos, pos))

    end = list(range(len(tokens)))
    for q in range(len(tokens) - 1, 0, -1):
        if parent[q] >= 0 and end[q] > end[parent[q]]:
            end[parent[q]] = end[q]
    scored = [[n.pred_pos for n in path[start:]] for path, (_, start) in zip(paths, sequences)]
    return PackedRow(tokens, depth, parent, end, shift_labels, scored, len(prompt))


def allowed_matrix(end: list[int], length: int) -> np.ndarray:
    """Boolean [length, length]: row q is True at q's ancestors and q itself (the tree's causal mask),
    from the pre-order intervals `k <= q <= end[k]`.

    Positions past the row's end (padding) attend to themselves only, so no softmax row is empty.
    """
    n = len(end)
    q = np.arange(length)[:, None]
    k = np.arange(length)[None, :]
    ends = np.full(length, -1)
    ends[:n] = end
    allowed = (k <= q) & (q <= ends[None, :])
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


def tree_block_mask(tree_end: torch.Tensor):
    """A FlexAttention BlockMask for packed rows: q sees kv iff kv is q's ancestor or q itself.

    Built from the pre-order subtree ends alone (O(L) per row), so the L x L mask never exists;
    blocks outside every subtree interval are skipped.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    ends = tree_end

    def mask_mod(b, h, q, kv):
        return ((kv <= q) & (q <= ends[b, kv])) | (q == kv)

    rows, length = tree_end.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=tree_end.device)
