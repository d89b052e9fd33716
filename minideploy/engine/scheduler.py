"""Who runs next: continuous batching over the paged KV cache.

Every step is either a prefill step or a decode step (as in nano-vllm):

- prefill: admit waiting sequences first come, first served, while the batch has
  room (`max_batch_size`), the step's new tokens stay within
  `max_prefill_tokens`, and the block manager can hold their prompts (prefix hits
  count as free). New requests join while others are mid-answer: that is what
  makes the batching continuous.
- decode: every running sequence gets room for one more token. When blocks run
  out, the most recently admitted sequence is **preempted by recompute**: its
  blocks are freed (full ones stay Cached, so its prefix often comes back for
  free) and it goes back to the front of the queue.

Finished sequences release their blocks at once (`finish`); a session's turn
keeps them (`park`) and its next turn is admitted by growing its blocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..cache.block_manager import BlockManager
from .model_runner import Row
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the forward

    def rows(self, manager: BlockManager) -> list[Row]:
        """What the model runner computes: the uncomputed tail of each sequence."""
        return [Row(s.token_ids[s.num_computed:], s.num_computed, manager.block_table(s.seq_id))
                for s in self.seqs]


class Scheduler:
    def __init__(self, manager: BlockManager, max_batch_size: int, max_prefill_tokens: int = 4096):
        self.manager = manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted = 0

    @property
    def capacity_tokens(self) -> int:
        """The longest sequence the cache can ever hold (all blocks)."""
        return self.manager.num_blocks * self.manager.block_size

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens == 0:
            raise ValueError(f"sequence {seq.seq_id} has no tokens")
        if seq.num_tokens >= self.capacity_tokens:
            raise ValueError(f"sequence {seq.seq_id} has {seq.num_tokens} prompt tokens; the KV cache holds "
                             f"{self.capacity_tokens} tokens in all, leaving no room to generate")
        seq.max_tokens = min(seq.max_tokens, self.capacity_tokens)  # a lone sequence always fits
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._admit()
        if batch:
            return ScheduledBatch(batch, is_prefill=True)
        return self._decode() if self.running else None

    def _admit(self) -> list[Sequence]:
        admitted, tokens = [], 0
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if admitted and tokens + seq.num_tokens > self.max_prefill_tokens:
                break
            if seq.seq_id in self.manager.allocations:  # a session's next turn: its blocks are kept
                if not self.manager.can_append(seq.seq_id, seq.num_tokens):
                    break
                self.waiting.popleft()
                self.manager.append(seq.seq_id, seq.num_tokens)
            else:
                if not self.manager.can_allocate(seq.token_ids):
                    break
                self.waiting.popleft()
                seq.num_computed = self.manager.allocate(seq.seq_id, seq.token_ids)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += seq.num_tokens - seq.num_computed
        return admitted

    def _decode(self) -> ScheduledBatch:
        batch = ScheduledBatch([], is_prefill=False)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted while making room for an earlier sequence
            while not self.manager.can_append(seq.seq_id, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.copies += self.manager.append(seq.seq_id, seq.num_tokens)
                batch.seqs.append(seq)
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Drop the sequence's K/V (recomputed when it is admitted again)."""
        self.manager.free(seq.seq_id)
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preempted += 1

    def computed(self, batch: ScheduledBatch) -> None:
        """The forward pass wrote K/V for every token the batch scheduled."""
        for seq in batch.seqs:
            seq.num_computed = seq.num_tokens
            self.manager.commit(seq.seq_id, seq.token_ids)

    def park(self, seq: Sequence, reason: str) -> None:
        """A session's turn is done: it leaves the batch but keeps its blocks for the next turn."""
        self.running.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def finish(self, seq: Sequence, reason: str) -> None:
        """Done (stop, length or abort): its blocks go back (full ones as Cached)."""
        if seq.status is Status.RUNNING:
            self.manager.free(seq.seq_id)
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
