"""Static batching: prefill every prompt, then decode the whole batch together.

The simplest correct engine: one contiguous KV row per request, preallocated
for the longest request; the batch runs until its last member finishes.
Chapter 6 replaces this loop with continuous batching over the paged cache;
the sampling, stopping and detokenizing logic stays.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..config import GenerationConfig, ModelConfig
from ..models import ForwardContext, KVCache, LlamaModel
from ..quant import tile_linears_
from .request import SequenceState, new_request
from .sampling import sample


@dataclass
class GenerationStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0


class Generator:
    def __init__(self, model: LlamaModel, tokenizer, config: ModelConfig, session_len: int):
        self.model, self.tokenizer, self.config = tile_linears_(model), tokenizer, config
        self.session_len = min(session_len, model.cos_sin.shape[0])
        self.device, self.dtype = model.device, model.dtype
        self.stats = GenerationStats()

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]],
               gen_configs: Sequence[GenerationConfig]) -> Iterator[list[SequenceState]]:
        """Yield the batch's states after every step (each with its new `delta` text)."""
        seqs = [new_request(self.tokenizer, self.config, self.session_len, self.device, i, p, g)
                for i, (p, g) in enumerate(zip(prompts, gen_configs))]
        max_len = max(len(s.prompt_ids) + s.max_new_tokens for s in seqs)
        cache = KVCache(self.config, len(seqs), max_len, self.dtype, self.device)
        self.stats = GenerationStats()

        start = time.perf_counter()
        logits = torch.cat([self.prefill(s, row, cache) for row, s in enumerate(seqs)])
        self.stats.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        while True:
            next_tokens = sample(logits, [s.sampling for s in seqs],
                                 [s.prompt_ids + s.output_ids for s in seqs],
                                 [len(s.output_ids) for s in seqs]).tolist()
            for seq, token in zip(seqs, next_tokens):
                seq.advance(token)
            yield seqs
            if all(s.finished for s in seqs):
                break
            logits = self.decode_step(seqs, next_tokens, cache)
            self.stats.decode_steps += 1
        self.stats.decode_seconds = time.perf_counter() - start

    def prefill(self, seq: SequenceState, row: int, cache: KVCache) -> torch.Tensor:
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        ctx = ForwardContext(positions=torch.arange(len(seq.prompt_ids), device=self.device)[None],
                             kv_len=len(seq.prompt_ids), first_row=row)
        hidden = self.model(ids, ctx, cache)
        return self.model.logits(hidden[:, -1])  # [1, vocab]

    def decode_step(self, seqs: list[SequenceState], tokens: list[int], cache: KVCache) -> torch.Tensor:
        # Finished rows keep decoding (static batching) at a clamped position; their output is ignored.
        lengths = [min(len(s.prompt_ids) + len(s.output_ids), cache.max_seq_len) - 1 for s in seqs]
        ctx = ForwardContext(positions=torch.tensor(lengths, device=self.device)[:, None],
                             kv_len=max(lengths) + 1)
        hidden = self.model(torch.tensor(tokens, device=self.device)[:, None], ctx, cache)
        return self.model.logits(hidden[:, -1])  # [batch, vocab]
