"""Several questions about one image in one training sequence, each blind to the others.

A training conversation is packed as `prefix turn_1 turn_2 ...`: the prefix holds the image (or its
scene words), each turn one question with its answer. With the plain causal mask a later turn sees
the earlier answers, and answers leak across turns ("what color is the star ? red" then "is there a
red star ?"): the decoder learns to copy from the conversation instead of reading the image, so its
training loss falls while the first-turn answer, the only one evaluation asks, stays at chance. Here
every turn sees the prefix and itself only, at the positions it would have right after the prefix:
each turn is exactly the single-question prompt the model answers at evaluation, and the image is
still paid for once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def isolated_turns(attention_mask: Tensor, turn_lengths: list[list[int]]) -> tuple[Tensor, Tensor]:
    """The 4-D boolean attention mask (B, 1, L, L; True = may attend) and position ids (B, L) of
    left-padded sequences whose last `sum(turn_lengths[b])` tokens are turns of those lengths.

    A padding query attends to itself only, so no row of the mask is empty (SDPA would give NaN).
    """
    bsz, length = attention_mask.shape
    segment = torch.full((bsz, length), -1, dtype=torch.long)  # -1: the shared prefix; k: turn k
    positions = torch.zeros((bsz, length), dtype=torch.long)
    valid = attention_mask.bool()
    for b, lengths in enumerate(turn_lengths):
        prefix_start = length - int(valid[b].sum())
        turn_start = length - sum(lengths)
        if turn_start < prefix_start:
            raise ValueError(f"row {b}: turns of {sum(lengths)} tokens do not fit its {int(valid[b].sum())} tokens")
        positions[b, prefix_start:turn_start] = torch.arange(turn_start - prefix_start)
        start = turn_start
        for k, n in enumerate(lengths):
            segment[b, start : start + n] = k
            positions[b, start : start + n] = torch.arange(turn_start - prefix_start, turn_start - prefix_start + n)
            start += n
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == -1)
    mask = causal & same & valid[:, None, :]
    mask |= torch.eye(length, dtype=torch.bool) & ~valid[:, :, None]
    return mask[:, None], positions


def drop_tokens(keep: Tensor, mask: Tensor, positions: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """The sequences with only the tokens where `keep` (B, L) holds, left-padded to the longest: the
    4-D mask (B, 1, L', L') and positions of `isolated_turns` and any (B, L, ...) `rows`, gathered.

    Kept tokens keep their position ids, so a shortened sequence reads like a pruned one; padding
    attends to itself only, as in `isolated_turns`."""
    counts = keep.sum(1)
    bsz, length = keep.shape[0], int(counts.max())
    valid = torch.arange(length) >= length - counts[:, None]
    index = torch.zeros(bsz, length, dtype=torch.long)
    for b in range(bsz):
        index[b, length - int(counts[b]) :] = keep[b].nonzero().flatten()
    index = index.to(keep.device)
    valid = valid.to(keep.device)
    square = mask[:, 0].gather(1, index[:, :, None].expand(-1, -1, mask.shape[-1]))
    square = square.gather(2, index[:, None, :].expand(-1, length, -1))
    square = square & valid[:, None, :] & valid[:, :, None]
    square |= torch.eye(length, dtype=torch.bool, device=keep.device) & ~valid[:, :, None]
    gathered = [r.gather(1, index.view(bsz, length, *[1] * (r.dim() - 2)).expand(-1, -1, *r.shape[2:])) for r in rows]
    return (square[:, None], positions.gather(1, index), *gathered)
