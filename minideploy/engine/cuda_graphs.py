"""Decode steps captured as CUDA graphs, one per batch-size bucket.

At batch 1 a 7B decode step is ~500 small kernel launches; launched one by one
from Python the GPU idles between them, and the step takes longer than
streaming the 13 GB of weights. A CUDA graph records the launches once and
replays them with one call. Graphs need static shapes and addresses, so:
inputs live in preallocated buffers (token ids, positions, and the attention
metadata derived from them: cache slots and context lengths, updated in place
together), decode attention's launch depends only on the cache's shape (each
sequence's length is read on the device), and a batch of B runs in the
smallest captured bucket >= B. The greedy loop feeds each step's argmax
straight back on the device: no host synchronisation until the end.
"""
from __future__ import annotations

import torch

from ..models import ForwardContext, KVCache, LlamaModel

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class CUDAGraphDecoder:
    def __init__(self, model: LlamaModel, cache: KVCache, buckets=DEFAULT_BUCKETS):
        max_batch = cache.k.shape[1]
        self.model, self.cache = model, cache
        self.buckets = sorted(b for b in buckets if b <= max_batch) or [max_batch]
        if self.buckets[-1] < max_batch:
            self.buckets.append(max_batch)
        device = cache.k.device
        self.input_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.next_tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        # Row b of every buffer is cache row b. Invariant, kept by _set_positions and
        # _advance: slots = b * max_seq_len + positions, context_lens = positions + 1.
        rows = torch.arange(max_batch, device=device)
        self.row_starts = rows * cache.max_seq_len
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.slots = self.row_starts.clone()
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = rows[:, None].to(torch.int32)  # [max_batch, 1]: a row is a block
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @torch.inference_mode()
    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """Prefill equal-length prompts [batch, len] into rows 0..batch-1 (eagerly: shapes vary).

        Returns each row's first greedy token [batch].
        """
        batch, length = prompts.shape
        positions = torch.arange(length, device=prompts.device).expand(batch, -1)
        hidden = self.model(prompts, ForwardContext(positions, length), self.cache)
        return self.model.logits(hidden[:, -1]).argmax(-1)

    def _set_positions(self, rows: int, positions: torch.Tensor) -> None:
        """Rows 0..rows-1 decode next at `positions` [rows]."""
        self.positions[:rows, 0].copy_(positions)
        torch.add(self.row_starts[:rows], self.positions[:rows, 0], out=self.slots[:rows])
        self.context_lens[:rows].copy_(self.positions[:rows, 0] + 1)

    def _advance(self, rows: int) -> None:
        """Rows 0..rows-1 move on by one token."""
        for buffer in (self.positions, self.slots, self.context_lens):
            buffer[:rows].add_(1)

    def _step(self, bucket: int) -> torch.Tensor:
        ctx = ForwardContext(self.positions[:bucket], kv_len=self.cache.max_seq_len,
                             slots=self.slots[:bucket], block_tables=self.block_tables[:bucket],
                             context_lens=self.context_lens[:bucket])
        hidden = self.model(self.input_ids[:bucket], ctx, self.cache)
        logits = self.model.logits(hidden[:, -1])  # [bucket, vocab] float32
        self.next_tokens[:bucket] = logits.argmax(-1)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first so smaller ones reuse its memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: kernel builds, cuBLAS workspaces
                self._step(self.buckets[-1])
        torch.cuda.current_stream().wait_stream(stream)
        for bucket in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bucket] = self._step(bucket)
            self.pool = graph.pool()
            self.graphs[bucket] = graph
        # Warm-up and capture wrote garbage K/V at the buffers' positions; callers prefill afterwards.

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens, positions [batch] on the device → logits [batch, vocab]."""
        batch = tokens.shape[0]
        bucket = self.bucket_for(batch)
        self.input_ids[:batch, 0].copy_(tokens)
        self._set_positions(batch, positions)
        self.graphs[bucket].replay()
        return self.logits[bucket][:batch]

    @torch.inference_mode()
    def greedy(self, first_tokens: torch.Tensor, first_positions: torch.Tensor,
               new_tokens: int) -> torch.Tensor:
        """Greedy-decode `new_tokens` more tokens for every row → [batch, new_tokens].

        Each replay's argmax is the next replay's input, entirely on the GPU.
        Rows of the bucket beyond `batch` decode padding into unused cache rows.
        """
        batch = first_tokens.shape[0]
        bucket = self.bucket_for(batch)
        if int(first_positions.max()) + new_tokens > self.cache.max_seq_len:
            raise ValueError(f"{new_tokens} new tokens from position {int(first_positions.max())} "
                             f"overflow the cache's {self.cache.max_seq_len} slots")
        out = torch.empty(batch, new_tokens, dtype=torch.long, device=first_tokens.device)
        self.input_ids[:batch, 0].copy_(first_tokens)
        padded = torch.zeros(bucket, dtype=torch.long, device=first_positions.device)
        padded[:batch] = first_positions  # rows past `batch` decode padding from position 0
        self._set_positions(bucket, padded)
        # Without capture() the same loop runs eagerly: the reference the graphs must match.
        run = self.graphs[bucket].replay if bucket in self.graphs else lambda: self._step(bucket)
        for i in range(new_tokens):
            run()
            out[:, i] = self.next_tokens[:batch]
            self.input_ids[:bucket, 0].copy_(self.next_tokens[:bucket])
            self._advance(bucket)
        return out
