"""Turns "these sequences need these tokens computed" into one forward pass over the paged cache.

The scheduler says what runs; the block manager says where each sequence's K/V
lives; the runner builds the tensors the model reads — token ids, positions,
slot mapping, block tables, context lengths — and returns the logits of each
row's last new token. Rows with one new token each (decode, or a prefill whose
prefix was cached up to its last token) take the decode-attention kernel, and
on a GPU replay a captured CUDA graph (`DecodeGraphs`, one per batch bucket).
Otherwise the rows' tokens are flattened into one ragged batch (no padding): the
linears see every token once, and attention runs per sequence over its blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..cache.kv_cache import PagedKVCache
from ..models import ForwardContext, LlamaModel
from .cuda_graphs import DecodeGraphs


@dataclass(frozen=True)
class Row:
    """One sequence's share of a forward pass: compute `token_ids` at positions start, start+1, ..."""

    token_ids: list[int]
    start: int
    block_table: list[int]


def graph_buckets(max_batch: int) -> list[int]:
    """Decode batch sizes to capture: small powers of two, then every 16 (a batch runs in the
    smallest bucket that holds it, so the padding stays under 16 rows)."""
    return [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, graphs: DecodeGraphs | None = None):
        """`graphs`: decode buffers over this model and cache, captured or not (None: always eager)."""
        self.model, self.cache, self.graphs = model, cache, graphs
        self.device = model.device

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write copies, made before the forward that writes into the copies."""
        if copies:
            self.cache.copy_blocks(copies)
            if hasattr(self.model, "copy_blocks"):  # tensor parallel: the workers' caches too
                self.model.copy_blocks(copies)

    def _slot(self, row: Row, position: int) -> int:
        return row.block_table[position // self.cache.block_size] * self.cache.block_size \
            + position % self.cache.block_size

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> torch.Tensor:
        """float32 logits [len(rows), vocab] of each row's last new token."""
        if not rows:
            raise ValueError("nothing to run: no rows")
        for r in rows:
            n = len(r.token_ids)
            if n == 0 or r.start + n > len(r.block_table) * self.cache.block_size:
                raise ValueError(f"row of {n} tokens from position {r.start} does not fit its "
                                 f"{len(r.block_table)} blocks of {self.cache.block_size}")
        decode = all(len(r.token_ids) == 1 for r in rows) and kernels.decode_attention_fits(
            self.model.config.head_dim)
        g = self.graphs
        if decode and g is not None and len(rows) <= g.buckets[-1]:
            return self._decode_in_buffers(rows)
        max_blocks = max(len(r.block_table) for r in rows)
        positions = [list(range(r.start, r.start + len(r.token_ids))) for r in rows]
        kv_lens = tuple(r.start + len(r.token_ids) for r in rows)
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        ctx = ForwardContext(
            positions=as_tensor(positions if decode else [[p for pos in positions for p in pos]], torch.long),
            kv_len=max(kv_lens),
            slots=as_tensor([self._slot(r, p) for r, pos in zip(rows, positions) for p in pos], torch.long),
            block_tables=as_tensor([r.block_table + [0] * (max_blocks - len(r.block_table)) for r in rows],
                                   torch.int32),
            context_lens=as_tensor(kv_lens, torch.int32),
            query_lens=None if decode else tuple(len(r.token_ids) for r in rows),
            kv_lens=None if decode else kv_lens)
        ids = [r.token_ids for r in rows] if decode else [[t for r in rows for t in r.token_ids]]
        hidden = self.model(as_tensor(ids, torch.long), ctx, self.cache)  # [batch, 1, H] or [1, tokens, H]
        if decode:
            return self.model.logits(hidden[:, 0])
        last = torch.tensor([len(r.token_ids) for r in rows]).cumsum(0) - 1
        return self.model.logits(hidden[0, last.to(self.device)])

    def _decode_in_buffers(self, rows: list[Row]) -> torch.Tensor:
        """One token per row through the graph buffers: rows past len(rows) in the bucket store
        nothing (slot -1) and attend to one key of block 0; their logits are dropped."""
        g = self.graphs
        batch, max_blocks = len(rows), g.block_tables.shape[1]
        bucket = g.bucket_for(batch)
        if any(len(r.block_table) > max_blocks for r in rows):
            raise ValueError(f"a block table is longer than the {max_blocks} blocks the decode buffers hold "
                             "(session_len / cache_block_seq_len)")
        pad = bucket - batch
        # One tensor from nested lists: a tensor per row cost ~20 us each (5 ms at batch 256).
        tables = torch.tensor([r.block_table + [0] * (max_blocks - len(r.block_table)) for r in rows]
                              + [[0] * max_blocks] * pad, dtype=torch.int32)
        g.input_ids[:bucket, 0].copy_(torch.tensor([r.token_ids[0] for r in rows] + [0] * pad))
        g.positions[:bucket, 0].copy_(torch.tensor([r.start for r in rows] + [0] * pad))
        g.slots[:bucket].copy_(torch.tensor([self._slot(r, r.start) for r in rows] + [-1] * pad))
        g.context_lens[:bucket].copy_(torch.tensor([r.start + 1 for r in rows] + [1] * pad, dtype=torch.int32))
        g.block_tables[:bucket].copy_(tables)
        return g.run(bucket)[:batch]
