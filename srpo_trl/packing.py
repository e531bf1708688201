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


def image_groups(token_type_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] group ids for bidirectional image attention: each run of image tokens (`token_type_ids`
    == 1) gets its own id (0, 1, ... per row), every other token -1. As Gemma3's
    `get_block_sequence_ids_for_mask`: tokens of one image attend to each other both ways."""
    is_image = token_type_ids == 1
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    ids = torch.cumsum((is_image & ~previous).long(), dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1))


def layer_allowed(
    tree: torch.Tensor, depth: torch.Tensor, window: int | None, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, L, L] booleans of one kind of attention layer, from the tree's [B, L, L] ancestor mask.

    `groups` (see `image_groups`): tokens of one image also see each other both ways. `window`: a
    sliding-window layer sees a key only within the window counted along the query's own path, i.e.
    on depths (logical positions): `depth[kv] > depth[q] - window`, transformers'
    `sliding_window_overlay` on the positions the tokens have in their own sequences. The window
    applies after the image rule, as in Gemma3's AND(window, OR(causal, image)). A token always sees
    itself (padding included), so no softmax row is empty.
    """
    allowed = tree
    if groups is not None:
        allowed = allowed | ((groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0))
    if window is not None:
        allowed = allowed & (depth[:, None, :] > depth[:, :, None] - window)
    eye = torch.eye(tree.shape[-1], dtype=torch.bool, device=tree.device)
    return allowed | eye


def tree_block_masks(
    tree_end: torch.Tensor,
    block_size: int = FLEX_BLOCK_SIZE,
    depth: torch.Tensor | None = None,
    window: int | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) tiles of the tree mask are partial and which are full.

    Returns two boolean [B, L/block, L/block] tensors (tiles, not tokens), on `tree_end`'s device.
    Key k is visible from the queries k..end[k] (an interval: pre-order), so the queries a key block
    reaches run from the block itself to the largest end in it: the tiles touched. A tile is full
    when it lies below the diagonal and every key in it reaches past the tile's last query. Padding
    (end -1) sees only itself, which makes its diagonal tile partial.

    With `groups` (bidirectional images), tiles whose blocks hold tokens of a common image are touched
    too (never full). With a sliding `window` on `depth`, a tile stays touched only if some key in it
    can be within the window of some query (the largest key depth against the smallest query depth),
    and stays full only if every key is (the smallest key depth against the largest query depth).
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
    if groups is not None:
        g = groups.new_full((rows, blocks * block_size), -1)
        g[:, :length] = groups
        g = g.view(rows, blocks, block_size)
        big = torch.iinfo(g.dtype).max
        lo = torch.where(g >= 0, g, torch.full_like(g, big)).amin(-1)  # [B, block]: smallest image id in it
        hi = g.amax(-1)  # largest image id (-1: none)
        touched = touched | ((lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None]))
    if window is not None:
        d = depth.new_zeros((rows, blocks * block_size))
        d[:, :length] = depth
        d = d.view(rows, blocks, block_size)
        d_lo, d_hi = d.amin(-1), d.amax(-1)
        diagonal = k_block == q_block  # a token sees itself: diagonal tiles are always touched
        touched = touched & ((d_hi[:, None, :] > d_lo[:, :, None] - window) | diagonal)
        full = full & (d_lo[:, None, :] > d_hi[:, :, None] - window)
    return touched & ~full, full


def _kv_blocks(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Q, K] tile booleans -> FlexAttention's (kv_num_blocks, kv_indices) with a head axis of 1."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def tree_block_mask(
    tree_end: torch.Tensor,
    block_size: int = FLEX_BLOCK_SIZE,
    depth: torch.Tensor | None = None,
    window: int | None = None,
    groups: torch.Tensor | None = None,
):
    """A FlexAttention BlockMask for packed rows: q sees kv iff kv is q's ancestor or q itself.

    Built from the pre-order subtree ends alone, on their device: O(L) work per row plus one
    boolean per (block x block) tile; no [L, L] tensor is ever made (`create_block_mask` without
    compilation would evaluate the mask at every pair). Tiles outside every subtree interval are
    skipped by the kernel, full tiles skip the mask function.

    `depth` and `window`: a sliding-window layer's mask (keys within `window` along the query's own
    path); `groups`: tokens of one image see each other both ways (see `layer_allowed`, the dense
    equivalent).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if window is not None and depth is None:
        raise ValueError("a sliding-window tree mask needs the tokens' depths")
    rows, length = tree_end.shape
    blocks = -(-length // block_size)
    size = blocks * block_size  # the mask function may read past L

    def extend(values, fill):
        out = values.new_full((rows, size), fill)
        out[:, :length] = values
        return out

    ends = extend(tree_end, -1)
    depths = extend(depth, 0) if depth is not None else None
    ids = extend(groups, -1) if groups is not None else None

    def mask_mod(b, h, q, kv):
        allowed = (kv <= q) & (q <= ends[b, kv])
        if ids is not None:
            allowed = allowed | ((ids[b, q] == ids[b, kv]) & (ids[b, q] >= 0))
        if depths is not None and window is not None:
            allowed = allowed & (depths[b, kv] > depths[b, q] - window)
        return allowed | (q == kv)

    partial, full = tree_block_masks(tree_end, block_size, depth, window, groups)
    kv_num, kv_idx = _kv_blocks(partial)
    full_num, full_idx = _kv_blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(length, length)
    )


def packed_attention_mask(inputs: dict, windows: dict[str, int | None], dtype: torch.dtype, groups=None):
    """The attention mask of a packed batch: one per kind of attention layer.

    `windows` maps each layer type to its sliding window (None: full attention), as
    `architectures.attention_windows` gives it; the key `""` stands for a model that takes one mask
    for all its layers. Dense batches (`tree_mask`) get additive float masks (0 / dtype min; eager
    attention mishandles 4D booleans), others (`tree_end`) FlexAttention BlockMasks. A model with
    several layer types gets a dict keyed by layer type, which transformers' decoders take as their
    per-layer masks (`causal_mask_mapping`).
    """
    depth = inputs["position_ids"]
    masks = {}
    for kind, window in windows.items():
        if "tree_mask" in inputs:
            masks[kind] = additive_mask(layer_allowed(inputs["tree_mask"], depth, window, groups), dtype)
        else:
            masks[kind] = tree_block_mask(inputs["tree_end"], depth=depth, window=window, groups=groups)
    return masks[""] if "" in masks else masks
