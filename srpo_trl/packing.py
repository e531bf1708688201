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

Trees are laid out in plain Python / numpy on token ids; the masks built from them (`additive_mask`,
`tree_block_mask`) are made on the device of the tensors they are given.
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
    """[B, L, L] booleans -> [B, 1, L, L] additive float mask (0 allowed, dtype min elsewhere), on
    `allowed`'s device.

    A float mask, not a boolean one: eager attention silently mishandles 4D boolean masks.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


FLEX_BLOCK_SIZE = 128  # FlexAttention's default sparse block size; packed lengths are bucketed to it


def bucket_length(length: int, multiple: int = FLEX_BLOCK_SIZE) -> int:
    """`length` rounded up to a multiple of `multiple`: packed rows of nearby lengths share one shape,
    so a compiled attention kernel is reused instead of compiled again for every new length."""
    return -(-length // multiple) * multiple


def tree_block_masks(tree_end: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) tiles of the tree mask are partial and which are full.

    Returns two boolean [B, L/block, L/block] tensors (tiles, not tokens), on `tree_end`'s device.
    Key k is visible from the queries k..end[k] (an interval: pre-order), so the queries a key block
    reaches run from the block itself to the largest end in it: the tiles touched. A tile is full
    when it lies below the diagonal and every key in it reaches past the tile's last query. Padding
    (end -1) sees only itself, which makes its diagonal tile partial.
    """
    rows, length = tree_end.shape
    blocks = -(-length // block_size)
    padded = tree_end.new_full((rows, blocks * block_size), -1)
    padded[:, :length] = tree_end
    pos = torch.arange(blocks * block_size, device=tree_end.device)
    reach = torch.maximum(padded, pos).view(rows, blocks, block_size).amax(-1)  # [B, key block]
    least = padded.view(rows, blocks, block_size).amin(-1)
    q_block = torch.arange(blocks, device=tree_end.device)[:, None]  # [query block, 1]
    k_block = q_block.view(1, blocks)
    touched = (k_block <= q_block) & (q_block <= (reach // block_size)[:, None, :])
    full = (k_block < q_block) & (least[:, None, :] >= (q_block + 1) * block_size - 1)
    return touched & ~full, full


def _kv_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Q, K] tile booleans -> FlexAttention's (kv_num_blocks, kv_indices) with a head axis of 1."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def tree_block_mask(tree_end: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE):
    """A FlexAttention BlockMask for packed rows: q sees kv iff kv is q's ancestor or q itself.

    Built from the pre-order subtree ends alone, on their device: O(L) work per row plus one
    boolean per (block x block) tile; no [L, L] tensor is ever made (`create_block_mask` without
    compilation would evaluate the mask at every pair). Tiles outside every subtree interval are
    skipped by the kernel, full tiles skip the mask function.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows, length = tree_end.shape
    blocks = -(-length // block_size)
    ends = tree_end.new_full((rows, blocks * block_size), -1)  # the mask function may read past L
    ends[:, :length] = tree_end

    def mask_mod(b, h, q, kv):
        return ((kv <= q) & (q <= ends[b, kv])) | (q == kv)

    partial, full = tree_block_masks(tree_end, block_size)
    kv_num, kv_idx = _kv_blocks(partial)
    full_num, full_idx = _kv_blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length)
    )
