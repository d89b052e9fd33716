"""Decode steps captured as CUDA graphs, one per batch-size bucket.

At batch 1 a 7B decode step is ~500 small kernel launches; launched one by one
from Python the GPU idles between them, and the step takes longer than
streaming the 13 GB of weights. A CUDA graph records the launches once and
replays them with one call. Graphs need static shapes and addresses, so:
inputs live in preallocated buffers (token ids, positions, and the attention
metadata: cache slots, block tables, context lengths), decode attention's
launch depends only on the buffers' shapes (each sequence's length is read on
the device), and a batch of B runs in the smallest captured bucket >= B; the
bucket's spare rows store nothing (slot -1) and their outputs are ignored.

`DecodeGraphs` holds the buffers and the graphs. Two users fill the buffers:
the engine's model runner, from the block manager's tables each step (paged
cache); and `CUDAGraphDecoder`, chapter 2's greedy loop over a contiguous cache,
which advances them on the device and feeds each step's argmax straight back:
no host synchronisation until the end.
"""
from __future__ import annotations

import torch

from ..models import ForwardContext, KVCache, LlamaModel

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class DecodeGraphs:
    """One decode step (one new token per row) over static buffers, per bucket; eager until `capture`."""

    def __init__(self, model: LlamaModel, cache, max_batch: int, max_blocks: int, kv_len: int,
                 buckets=DEFAULT_BUCKETS):
        self.model, self.cache, self.kv_len = model, cache, kv_len
        self.buckets = sorted(b for b in buckets if b <= max_batch) or [max_batch]
        if self.buckets[-1] < max_batch:
            self.buckets.append(max_batch)
        device = model.device
        self.input_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)  # -1: store nothing
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.next_tokens = torch.zeros(max_batch, dtype=torch.long, device=device)  # greedy callers read it
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _step(self, bucket: int) -> torch.Tensor:
        ctx = ForwardContext(self.positions[:bucket], kv_len=self.kv_len, slots=self.slots[:bucket],
                             block_tables=self.block_tables[:bucket], context_lens=self.context_lens[:bucket])
        hidden = self.model(self.input_ids[:bucket], ctx, self.cache)
        logits = self.model.logits(hidden[:, -1])  # [bucket, vocab] float32
        self.next_tokens[:bucket] = logits.argmax(-1)
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first so smaller ones reuse its memory pool.

        Warm-up and capture run on the buffers as they are: with slots -1 they store nothing."""
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

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    def run(self, bucket: int) -> torch.Tensor:
        """Logits [bucket, vocab] of the step the buffers describe: replayed if captured, else eager
        (the reference the graphs must match). The tensor is overwritten by the next run."""
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.logits[bucket]
        return self._step(bucket)


class CUDAGraphDecoder:
    """Chapter 2's greedy decode over a contiguous cache: row b of every buffer is cache row b."""

    def __init__(self, model: LlamaModel, cache: KVCache, buckets=DEFAULT_BUCKETS):
        max_batch = cache.k.shape[1]
        self.model, self.cache = model, cache
        self.graphs = DecodeGraphs(model, cache, max_batch, 1, cache.max_seq_len, buckets)
        g = self.graphs
        # A row is a block. Invariant, kept by _set_positions and _advance:
        # slots = b * max_seq_len + positions, context_lens = positions + 1.
        rows = torch.arange(max_batch, device=g.slots.device)
        self.row_starts = rows * cache.max_seq_len
        g.block_tables.copy_(rows[:, None])

    def capture(self) -> None:
        self.graphs.capture()

    def bucket_for(self, batch: int) -> int:
        return self.graphs.bucket_for(batch)

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
        g = self.graphs
        g.positions[:rows, 0].copy_(positions)
        torch.add(self.row_starts[:rows], g.positions[:rows, 0], out=g.slots[:rows])
        g.context_lens[:rows].copy_(g.positions[:rows, 0] + 1)

    def _advance(self, rows: int) -> None:
        """Rows 0..rows-1 move on by one token."""
        g = self.graphs
        for buffer in (g.positions, g.slots, g.context_lens):
            buffer[:rows].add_(1)

    @torch.inference_mode()
    def greedy(self, first_tokens: torch.Tensor, first_positions: torch.Tensor,
               new_tokens: int) -> torch.Tensor:
        """Greedy-decode `new_tokens` more tokens for every row → [batch, new_tokens].

        Each replay's argmax is the next replay's input, entirely on the GPU.
        Rows of the bucket beyond `batch` decode padding into unused cache rows.
        """
        g = self.graphs
        batch = first_tokens.shape[0]
        bucket = self.bucket_for(batch)
        if int(first_positions.max()) + new_tokens > self.cache.max_seq_len:
            raise ValueError(f"{new_tokens} new tokens from position {int(first_positions.max())} "
                             f"overflow the cache's {self.cache.max_seq_len} slots")
        out = torch.empty(batch, new_tokens, dtype=torch.long, device=first_tokens.device)
        g.input_ids[:batch, 0].copy_(first_tokens)
        padded = torch.zeros(bucket, dtype=torch.long, device=first_positions.device)
        padded[:batch] = first_positions  # rows past `batch` decode padding from position 0
        self._set_positions(bucket, padded)
        for i in range(new_tokens):
            g.run(bucket)
            out[:, i] = g.next_tokens[:batch]
            g.input_ids[:bucket, 0].copy_(g.next_tokens[:bucket])
            self._advance(bucket)
        return out
