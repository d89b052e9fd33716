"""Turns "these sequences need these tokens computed" into one forward pass over the paged cache.

The scheduler says what runs; the block manager says where each sequence's K/V
lives; the runner builds the tensors the model reads — token ids, positions,
slot mapping, block tables, context lengths — and returns the logits of each
row's last new token. Rows with one new token each (decode, or a prefill whose
prefix was cached up to its last token) take the decode-attention kernel;
otherwise the rows are padded to the longest and go through SDPA (pad tokens
get slot -1, which the store kernel skips).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.kv_cache import PagedKVCache
from ..models import ForwardContext, LlamaModel


@dataclass(frozen=True)
class Row:
    """One sequence's share of a forward pass: compute `token_ids` at positions start, start+1, ..."""

    token_ids: list[int]
    start: int
    block_table: list[int]


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.device = model.embed.weight.device

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write copies, made before the forward that writes into the copies."""
        if copies:
            self.cache.copy_blocks(copies)
            if hasattr(self.model, "copy_blocks"):  # tensor parallel: the workers' caches too
                self.model.copy_blocks(copies)

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> torch.Tensor:
        """float32 logits [len(rows), vocab] of each row's last new token."""
        if not rows:
            raise ValueError("nothing to run: no rows")
        block_size = self.cache.block_size
        width = max(len(r.token_ids) for r in rows)
        max_blocks = max(len(r.block_table) for r in rows)
        ids, positions, slots, tables, lens = [], [], [], [], []
        for r in rows:
            n = len(r.token_ids)
            if n == 0 or r.start + n > len(r.block_table) * block_size:
                raise ValueError(f"row of {n} tokens from position {r.start} does not fit its "
                                 f"{len(r.block_table)} blocks of {block_size}")
            pos = list(range(r.start, r.start + n))
            ids.append(r.token_ids + [0] * (width - n))
            positions.append(pos + [pos[-1]] * (width - n))  # pads repeat the last position
            slots.extend([r.block_table[p // block_size] * block_size + p % block_size for p in pos]
                         + [-1] * (width - n))
            tables.append(r.block_table + [0] * (max_blocks - len(r.block_table)))
            lens.append(r.start + n)
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        ctx = ForwardContext(positions=as_tensor(positions, torch.long), kv_len=max(lens),
                             slots=as_tensor(slots, torch.long), block_tables=as_tensor(tables, torch.int32),
                             context_lens=as_tensor(lens, torch.int32))
        hidden = self.model(as_tensor(ids, torch.long), ctx, self.cache)  # [batch, width, hidden]
        last = as_tensor([len(r.token_ids) - 1 for r in rows], torch.long)
        return self.model.logits(hidden[torch.arange(len(rows), device=self.device), last])
