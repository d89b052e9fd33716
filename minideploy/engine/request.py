"""One request's sampling, stopping and detokenizing state — the same in both engines
(chapter 2's static batch and chapter 6's continuous batching)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..config import GenerationConfig, ModelConfig
from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingState


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
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def advance(self, token: int) -> None:
        """Record one sampled token and decide whether the request is done."""
        self.delta = ""
        if self.finished:
            return
        if token in self.sampling.stop_ids:
            self.finish_reason = "stop"
        else:
            self.output_ids.append(token)
            self.delta = self.detokenizer.add(token)
            if self.detokenizer.stopped:
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        if self.finished:
            self.delta += self.detokenizer.flush()
        self.text += self.delta


def stop_ids(tokenizer, config: ModelConfig, gen_config: GenerationConfig) -> set[int]:
    ids = set(gen_config.stop_token_ids or ())
    if not gen_config.ignore_eos:
        ids |= set(config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
    return ids


def new_request(tokenizer, config: ModelConfig, session_len: int, device: torch.device, index: int,
                prompt_ids: Sequence[int], gen_config: GenerationConfig) -> SequenceState:
    """Check a prompt and set up its state; errors name the prompt and the limit it breaks."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError(f"prompt {index} is empty: give at least one token")
    if len(prompt_ids) >= session_len:
        raise ValueError(f"prompt {index} has {len(prompt_ids)} tokens; session_len is "
                         f"{session_len}, leaving no room to generate")
    bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"prompt {index} has token ids outside the vocabulary "
                         f"[0, {config.vocab_size}): {bad[:5]}")
    max_new = min(gen_config.max_new_tokens, session_len - len(prompt_ids))
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, gen_config.skip_special_tokens,
                                   gen_config.stop_words or ())
    return SequenceState(index, prompt_ids, gen_config, max_new, detok,
                         SamplingState(gen_config, stop_ids(tokenizer, config, gen_config), device))
