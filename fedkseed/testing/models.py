"""A small model for the ZO tests: Linear -> LayerNorm -> bias-free Linear head, so under
``decay="auto"`` the two matrices decay and the bias and the norm's tensors do not."""

from __future__ import annotations

import torch


class SmallNet(torch.nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(inputs, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lin(x)))


def small_net(inputs: int, hidden: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> SmallNet:
    """A SmallNet in eval mode with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return SmallNet(inputs, hidden).to(dtype).eval()
