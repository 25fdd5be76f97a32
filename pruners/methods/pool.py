"""`pool`: 2-D average pooling of each image's patch grid down to the budget (baseline).

Plain pooling is a strong baseline (DESIGN.md), and it is what LLaVA-NeXT-style models use to
shrink visual tokens. It acts once, on the projected features of each image (VISION_OUTPUT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..base import ModelInfo, Pruner, Stage, TokenState
from ..registry import register


def pool_grids(budget: int, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Every output grid (h, w) with h * w == budget that fits in `grid` (h <= rows, w <= cols)."""
    rows, cols = grid
    return [(h, budget // h) for h in range(1, rows + 1) if budget % h == 0 and budget // h <= cols]


def choose_grid(budget: int, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The fitting grid whose aspect ratio is closest (in log scale) to `grid`'s; None if none fits.

    Ties (h/w and w/h equally far from a square input) go to the grid with more rows.
    """
    rows, cols = grid
    target = math.log(rows / cols)
    fits = pool_grids(budget, grid)
    return min(fits, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - target), -hw[0]), default=None)


def windows(size: int, out: int) -> list[tuple[int, int]]:
    """[start, end) of each of `out` windows of adaptive pooling over `size` (PyTorch's rule)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


@register
class PoolPruner(Pruner):
    """Adaptive 2-D average pooling of the patch grid to exactly `budget` tokens per image.

    Args:
        budget: tokens per image. It must factor as h * w with h <= rows and w <= cols; the
            output grid is the factorisation with the aspect ratio closest to the input grid's.
            None: 2x2 pooling, (rows // 2) * (cols // 2) tokens (144 = 12x12 for LLaVA-1.5).

    Each pooled token is the mean of its window (`adaptive_avg_pool2d`: windows overlap when the
    grid does not divide evenly), takes the patch index of the window's top-left patch as its
    position, and gets the window's area as its size.
    """

    name = "pool"
    stages = frozenset({Stage.VISION_OUTPUT})
    needs = frozenset({"grid"})  # pools the full patch grid

    def __init__(self, budget: int | None = None) -> None:
        super().__init__(budget)
        self.out_grid: tuple[int, int] | None = None

    def setup(self, info: ModelInfo) -> None:
        super().setup(info)
        rows, cols = info.grid
        if self.budget is None:
            self.budget = max(1, rows // 2) * max(1, cols // 2)
        self.out_grid = choose_grid(self.budget, info.grid)
        if self.out_grid is None:
            below = next(b for b in range(self.budget - 1, 0, -1) if pool_grids(b, info.grid))
            above = next((b for b in range(self.budget + 1, rows * cols + 1) if pool_grids(b, info.grid)), None)
            near = f"{below} or {above}" if above is not None else f"{below}"
            raise ValueError(
                f"pool: budget {self.budget} cannot be laid out as an h x w grid with h <= {rows} and "
                f"w <= {cols} (the {rows}x{cols} patch grid); nearest budgets that work: {near}"
            )

    def vision_output(self, state: TokenState) -> TokenState:
        rows, cols = state.grid
        bsz, n, dim = state.hidden.shape
        patches = torch.arange(n, device=state.hidden.device)
        if n != rows * cols or not state.valid.all() or not (state.positions == patches).all():
            raise ValueError(f"pool: needs the full {rows}x{cols} patch grid in patch order, got {n} tokens")
        h, w = self.out_grid  # chosen in setup for this model's grid
        # Pool in float32 so low-precision features are averaged without extra rounding.
        image = state.hidden.float().view(bsz, rows, cols, dim).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(image, (h, w)).flatten(2).transpose(1, 2).to(state.hidden.dtype)
        row_win, col_win = windows(rows, h), windows(cols, w)
        # Top-left patch of each window, row-major: strictly increasing, so patch order holds.
        corner = [r0 * cols + c0 for r0, _ in row_win for c0, _ in col_win]
        area = [(r1 - r0) * (c1 - c0) for r0, r1 in row_win for c0, c1 in col_win]
        index = torch.tensor(corner, device=state.hidden.device).expand(bsz, -1)
        sizes = torch.tensor(area, dtype=state.sizes.dtype, device=state.hidden.device).expand(bsz, -1)
        return state.keep(index, hidden=pooled, sizes=sizes)

    def extra_repr(self) -> str:
        return f"budget={self.budget}, out_grid={self.out_grid}"
