"""TurboMind-style entry: `TurboMind.from_pretrained(path).create_instance().stream_infer(...)`.

A thin facade over the same generator as `pipeline`. Each call re-prefills
the ids it is given; chapter 6 makes `session_id` keep its KV blocks between
turns so that only new tokens are prefilled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from ..config import EngineConfig, GenerationConfig
from .pipeline import Pipeline


@dataclass
class EngineOutput:
    status: str  # "ok" while generating, "finish" at the end
    token_ids: list[int]  # all tokens generated so far
    num_token: int
    finish_reason: Optional[str] = None


class TurboMind:
    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Optional[Union[str, os.PathLike]] = None,
                        engine_config: Optional[EngineConfig] = None) -> "TurboMind":
        return cls(Pipeline(pretrained_model_name_or_path, engine_config))

    def create_instance(self) -> "TurboMindInstance":
        return TurboMindInstance(self)


class TurboMindInstance:
    def __init__(self, engine: TurboMind):
        self.engine = engine

    def stream_infer(self, session_id: int, input_ids: Sequence[int],
                     gen_config: Optional[GenerationConfig] = None) -> Iterator[EngineOutput]:
        if not isinstance(session_id, int) or session_id < 0:
            raise ValueError(f"session_id must be a non-negative int, got {session_id!r}")
        generator = self.engine.pipe.generator
        for seqs in generator.stream([list(input_ids)], [gen_config or GenerationConfig()]):
            seq = seqs[0]
            yield EngineOutput("finish" if seq.finished else "ok", list(seq.output_ids),
                               len(seq.output_ids), seq.finish_reason)
