"""Static batching: prefill every prompt, then decode the whole batch together.

The simplest correct engine: one contiguous KV row per request, preallocated
for the longest request; the batch runs until its last member finishes.
Chapter 6 replaces this loop with continuous batching over the paged cache;
the sampling, stopping and detokenizing logic stays.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from ..config import GenerationConfig, ModelConfig
from ..models import ForwardContext, KVCache, LlamaModel
from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingState, sample


@dataclass
class SequenceState:
    """One request while it generates."""

    index: int
    prompt_ids: list[int]
    gen_config: GenerationConfig
    max_new_tokens: int
    detokenizer: IncrementalDetokenizer
    sampling: SamplingState
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta: str = ""  # text added by the latest step
    finish_reason: Optional[str] = None  # "stop" | "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0


class Generator:
    def __init__(self, model: LlamaModel, tokenizer, config: ModelConfig, session_len: int):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.session_len = min(session_len, model.cos_sin.shape[0])
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.stats = GenerationStats()

    def stop_ids(self, gen_config: GenerationConfig) -> set[int]:
        ids = set(gen_config.stop_token_ids or ())
        if not gen_config.ignore_eos:
            ids |= set(self.config.eos_token_ids)
            if self.tokenizer.eos_token_id is not None:
                ids.add(self.tokenizer.eos_token_id)
        return ids

    def new_sequence(self, index: int, prompt_ids: Sequence[int],
                     gen_config: GenerationConfig) -> SequenceState:
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError(f"prompt {index} is empty: give at least one token")
        if len(prompt_ids) >= self.session_len:
            raise ValueError(f"prompt {index} has {len(prompt_ids)} tokens; session_len is "
                             f"{self.session_len}, leaving no room to generate")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary "
                             f"[0, {self.config.vocab_size}): {bad[:5]}")
        max_new = min(gen_config.max_new_tokens, self.session_len - len(prompt_ids))
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, gen_config.skip_special_tokens,
                                       gen_config.stop_words or ())
        return SequenceState(index, prompt_ids, gen_config, max_new, detok,
                             SamplingState(gen_config, self.stop_ids(gen_config), self.device))

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]],
               gen_configs: Sequence[GenerationConfig]) -> Iterator[list[SequenceState]]:
        """Yield the batch's states after every step (each with its new `delta` text)."""
        seqs = [self.new_sequence(i, p, g) for i, (p, g) in enumerate(zip(prompts, gen_configs))]
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
                self.advance(seq, token)
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

    def advance(self, seq: SequenceState, token: int) -> None:
        """Record one sampled token and decide whether the sequence is done."""
        seq.delta = ""
        if seq.finished:
            return
        if token in seq.sampling.stop_ids:
            seq.finish_reason = "stop"
        else:
            seq.output_ids.append(token)
            seq.delta = seq.detokenizer.add(token)
            if seq.detokenizer.stopped:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.max_new_tokens:
                seq.finish_reason = "length"
        if seq.finished:
            seq.delta += seq.detokenizer.flush()
        seq.text += seq.delta
