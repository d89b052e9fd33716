"""Batched sampling: one row of logits per sequence, each with its own settings.

Order as in transformers' logits processors: repetition penalty, then
min_new_tokens (stop tokens masked), then greedy argmax or temperature → top-k
→ top-p → a draw. A request with `random_seed` draws from its own generator,
so its output does not depend on what else is in the batch.
"""
from __future__ import annotations

import torch

from ..config import GenerationConfig


class SamplingState:
    """Per-sequence sampling inputs that live across steps."""

    def __init__(self, gen_config: GenerationConfig, stop_ids: set[int], device: torch.device):
        self.config = gen_config
        self.stop_ids = sorted(stop_ids)
        self.generator = None
        if gen_config.random_seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(gen_config.random_seed)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """CTRL-style penalty on tokens already in prompt or output (in place on one row)."""
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Return logits with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; never the top one
        # (a top_p that rounds to 0 in float32 would otherwise drop everything)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (first maximum; NaN counts as the maximum). float32 logits on a CPU
    go through NumPy, whose argmax is vectorised: 5 us for the default model's 49152-token
    vocabulary on 2 cores, against 110 us for torch's (~1% of a 4-bit decode step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(-1)


def sample(logits: torch.Tensor, states: list[SamplingState], token_ids: list[list[int]],
           num_generated: list[int]) -> torch.Tensor:
    """logits [batch, vocab] float32 → next token per row [batch] (int64, on logits' device).

    token_ids[b] holds prompt + output so far (for the repetition penalty).
    """
    if any(s.config.repetition_penalty != 1.0 or s.config.min_new_tokens for s in states):
        logits = logits.clone()  # penalties and masks write into it: the caller's stays as it was
    sampled_rows = []
    for b, state in enumerate(states):
        cfg = state.config
        if cfg.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(token_ids[b])), device=logits.device, dtype=torch.long)
            apply_repetition_penalty(logits[b], seen, cfg.repetition_penalty)
        if cfg.min_new_tokens and num_generated[b] < cfg.min_new_tokens and state.stop_ids:
            logits[b, state.stop_ids] = float("-inf")
        if not cfg.greedy:
            sampled_rows.append(b)
    next_tokens = greedy_tokens(logits)
    for b in sampled_rows:
        state = states[b]
        cfg = state.config
        row = filter_top_k_top_p(logits[b] / cfg.temperature, cfg.top_k, cfg.top_p)
        probs = row.softmax(-1)
        next_tokens[b] = torch.multinomial(probs, 1, generator=state.generator)[0]
    return next_tokens
