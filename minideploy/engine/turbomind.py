"""TurboMind-style entry: `TurboMind.from_pretrained(path).create_instance().stream_infer(...)`.

A thin facade over the same engine as `pipeline`, in interactive mode: a
`session_id` keeps its KV blocks between calls, so each call sends (and
prefills) only its new tokens; `sequence_end=True` or `end(session_id)` releases
them.
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
                     gen_config: Optional[GenerationConfig] = None, sequence_start: bool = True,
                     sequence_end: bool = False) -> Iterator[EngineOutput]:
        """Generate after `input_ids`; `sequence_start` begins a new session (dropping an old
        one with this id), otherwise the ids continue the session's history."""
        if not isinstance(session_id, int) or session_id < 0:
            raise ValueError(f"session_id must be a non-negative int, got {session_id!r}")
        pipe = self.engine.pipe
        if sequence_start:
            pipe.end_session(session_id)
        elif session_id not in pipe.engine.sessions:
            raise ValueError(f"session {session_id} does not exist: pass sequence_start=True to begin it")
        seqs = pipe.submit([list(input_ids)], [gen_config or GenerationConfig()], session_id)
        output_ids: list[int] = []
        try:
            for response in pipe.stream_sequences(seqs):
                output_ids += response.token_ids
                yield EngineOutput("finish" if response.finish_reason else "ok", list(output_ids),
                                   len(output_ids), response.finish_reason)
        finally:
            if sequence_end:
                pipe.end_session(session_id)

    def end(self, session_id: int) -> bool:
        """Release the session's KV blocks."""
        return self.engine.pipe.end_session(session_id)
