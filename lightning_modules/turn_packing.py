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
