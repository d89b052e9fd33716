"""The one tensor-parallel linear that needs a class: row-parallel, with its all-reduce.

A column-parallel linear (q/k/v, gate/up) is an ordinary `Linear` (or
`W4A16Linear`) holding its rank's output rows: nothing to communicate, because
its consumer (attention per head, SwiGLU per feature) only needs that slice.
A row-parallel linear (o, down) holds a block of input columns, so its product
is a partial sum; `RowParallel` wraps the local linear and adds the partial
sums of all ranks. That all-reduce of [num_tokens, hidden] is the whole cost
of tensor parallelism inside a layer: two per layer.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks of the default process group, in place."""
    dist.all_reduce(x)
    return x


class RowParallel(nn.Module):
    """y = reduce(local(x_r)): `local` holds in_features / tp columns of the full weight.

    `reduce` is `all_reduce_sum` in a running group; tests pass a function that
    sums partials computed in one process.
    """

    def __init__(self, local: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum):
        super().__init__()
        self.local, self.reduce = local, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.local(x))
