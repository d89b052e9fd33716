"""One request as the scheduler sees it: its tokens, how many are in the KV cache, its state."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional


class Status(Enum):
    WAITING = "waiting"    # queued, or preempted (its K/V dropped, to be recomputed)
    RUNNING = "running"    # holds KV blocks, decodes every step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]          # prompt, then every token generated so far
    num_prompt_tokens: int
    max_tokens: int               # prompt + generated never exceeds this
    status: Status = Status.WAITING
    num_computed: int = 0         # leading tokens whose K/V are in the cache
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    payload: Any = None           # the engine's per-request state (sampling, detokenizer)
    session_id: Optional[int] = None  # interactive mode: the sequence outlives its turn
    last_active: float = 0.0      # time.monotonic() of the end of its last turn

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
