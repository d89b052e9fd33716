"""Vocabulary-parallel embedding and LM head: the two largest matrices of a small model.

Each rank holds `ceil(vocab / tp)` rows (the last shard zero-padded). The
embedding looks up the ids that fall in its rows, writes zeros for the rest,
and an all-reduce assembles every token's vector. The LM head multiplies by
its rows and an all-gather concatenates the logits. With tied embeddings both
use the same shard.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import kernels


class VocabParallelEmbedding(nn.Module):
    def __init__(self, rows: int, hidden_size: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))
        self.start = rank * rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        h = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        h = h * mine[..., None].to(h.dtype)  # [num_tokens, hidden]: zeros for other ranks' ids
        dist.all_reduce(h)
        return h


class VocabParallelLMHead(nn.Module):
    def __init__(self, rows: int, hidden_size: int, vocab_size: int, tp: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = kernels.linear(x, self.weight)  # [num_tokens, rows]
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]  # drop the last shard's padding
