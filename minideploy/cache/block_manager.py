"""Who owns which KV block: TurboMind's Free / Active / Cached states, with prefix caching.

The cache is `num_blocks` blocks of `block_size` token slots. Every block is in
exactly one state:

    Free    unused; taken first when a sequence needs room.
    Active  held by one or more running sequences (ref_count >= 1).
    Cached  ref_count 0 but holding a full block of known tokens: a later
            sequence with the same prefix revives it (Cached -> Active); when
            Free runs out, the least recently used is evicted (Cached -> Free).

Transitions: allocate/append take Free (or evicted Cached) blocks and prefix
hits revive Cached ones; free() drops one reference from each block of a
sequence, and a block whose count reaches 0 becomes Cached if its tokens are
known (hashed), else Free; evict() turns Cached into Free.

Prefix caching: a full block is named by a chained hash of (parent block's
hash, its token ids), so equal hashes mean equal prefixes. A block is hashed
only by `commit`, after the model has written its K/V: a block that was merely
allocated holds garbage and must never be found by another sequence. Shared
blocks are read-only: a sequence that would write into a block someone else
also holds gets a private copy first (copy-on-write; `append` returns the
copies for the model runner to make).

Running out of blocks never corrupts state: every operation checks first and
raises `OutOfBlocks` (the scheduler's signal to wait or preempt) before it
changes anything.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

FREE, ACTIVE, CACHED = "Free", "Active", "Cached"


class OutOfBlocks(RuntimeError):
    """Not enough Free + Cached blocks for the request; nothing was changed."""


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: Optional[int] = None  # set once the block is full and its K/V computed
    token_ids: tuple[int, ...] = ()  # the tokens behind `hash`, checked on every hit


@dataclass
class Allocation:
    """One sequence's blocks: `blocks[i]` holds its tokens i*block_size .. (i+1)*block_size-1."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens the blocks have room reserved for
    num_hashed: int = 0  # leading blocks whose hash is known (committed or prefix hits)
    last_hash: Optional[int] = None  # chained hash of block num_hashed - 1 (None: no block yet)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached_ids: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.hash_to_block: dict[int, int] = {}
        self.allocations: dict[object, Allocation] = {}
        self.prefix_hit_tokens = 0  # tokens served from the cache since start (for reports)

    # ---- what is where -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_cached(self) -> int:
        return len(self.cached_ids)

    @property
    def num_active(self) -> int:
        return self.num_blocks - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Blocks a new request can get: Free plus evictable Cached."""
        return self.num_free + self.num_cached

    def state(self, block_id: int) -> str:
        block = self.blocks[block_id]
        if block.ref_count > 0:
            return ACTIVE
        return CACHED if block_id in self.cached_ids else FREE

    def block_table(self, seq_id) -> list[int]:
        return self.allocations[seq_id].blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slot(self, seq_id, position: int) -> int:
        """The cache slot of token `position` of the sequence."""
        blocks = self.allocations[seq_id].blocks
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    # ---- prefix matching -----------------------------------------------------------------
    def _chain(self, token_ids: Sequence[int], num_blocks: int, start: int = 0,
               parent: Optional[int] = None):
        """(hash, tokens) of full blocks start .. num_blocks - 1 of `token_ids`; `parent` is
        the hash of block start - 1."""
        for i in range(start, num_blocks):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = hash((parent, tokens))
            yield parent, tokens

    def _prefix_hits(self, token_ids: Sequence[int]) -> list[int]:
        """Blocks already holding the longest cached prefix. The block of the last token is
        never a hit: the model must compute at least one token to produce logits."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h, tokens in self._chain(token_ids, (len(token_ids) - 1) // self.block_size):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    # ---- allocation ----------------------------------------------------------------------
    def _take(self) -> int:
        """A Free block, evicting the least recently used Cached block if none is Free."""
        if not self.free_ids:
            self.evict(1)
        block_id = self.free_ids.popleft()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _hold(self, block_id: int) -> None:
        if self.blocks[block_id].ref_count == 0:
            del self.cached_ids[block_id]  # Cached -> Active
        self.blocks[block_id].ref_count += 1

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        return self._missing_blocks(token_ids) <= 0

    def _missing_blocks(self, token_ids: Sequence[int]) -> int:
        hits = self._prefix_hits(token_ids)
        revived = sum(self.blocks[b].ref_count == 0 for b in hits)
        return self.blocks_for(len(token_ids)) - len(hits) - (self.num_available - revived)

    def allocate(self, seq_id, token_ids: Sequence[int]) -> int:
        """Blocks for a new sequence's tokens; returns how many leading tokens are already
        in the cache (prefix hits), which the model need not compute again."""
        if seq_id in self.allocations:
            raise ValueError(f"sequence {seq_id!r} already has blocks: free it first")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r} has no tokens to allocate blocks for")
        missing = self._missing_blocks(token_ids)
        if missing > 0:
            raise OutOfBlocks(f"sequence {seq_id!r} needs {self.blocks_for(len(token_ids))} blocks for "
                              f"{len(token_ids)} tokens; {missing} more than are Free or Cached "
                              f"({self.num_free} Free, {self.num_cached} Cached of {self.num_blocks})")
        hits = self._prefix_hits(token_ids)
        for block_id in hits:
            self._hold(block_id)
        blocks = hits + [self._take() for _ in range(self.blocks_for(len(token_ids)) - len(hits))]
        last_hash = self.blocks[hits[-1]].hash if hits else None
        self.allocations[seq_id] = Allocation(blocks, len(token_ids), len(hits), last_hash)
        cached_tokens = len(hits) * self.block_size
        self.prefix_hit_tokens += cached_tokens
        return cached_tokens

    def can_append(self, seq_id, num_tokens: int) -> bool:
        grow, copy = self._append_plan(seq_id, num_tokens)
        return grow + copy <= self.num_available

    def _append_plan(self, seq_id, num_tokens: int) -> tuple[int, bool]:
        """(new blocks, whether the last block must be copied on write) to reach num_tokens."""
        alloc = self.allocations[seq_id]
        if num_tokens < alloc.num_tokens:
            raise ValueError(f"sequence {seq_id!r} already holds {alloc.num_tokens} tokens, "
                             f"cannot shrink to {num_tokens}")
        grow = max(self.blocks_for(num_tokens) - len(alloc.blocks), 0)
        # A partly filled last block receives the next token; if others hold it too, copy it.
        copy = (num_tokens > alloc.num_tokens and alloc.num_tokens % self.block_size != 0
                and self.blocks[alloc.blocks[-1]].ref_count > 1)
        return grow, copy

    def append(self, seq_id, num_tokens: int) -> list[tuple[int, int]]:
        """Grow the sequence to hold `num_tokens` tokens. Returns (src, dst) block copies to
        make before the next write: a shared, partly filled last block is copied on write."""
        alloc = self.allocations[seq_id]
        grow, copy = self._append_plan(seq_id, num_tokens)
        if grow + copy > self.num_available:
            raise OutOfBlocks(f"sequence {seq_id!r} needs {grow + copy} more blocks to reach {num_tokens} "
                              f"tokens; {self.num_available} are Free or Cached")
        copies = []
        if copy:
            shared = alloc.blocks[-1]
            self.blocks[shared].ref_count -= 1  # still held by the others: stays Active
            alloc.blocks[-1] = self._take()
            copies.append((shared, alloc.blocks[-1]))
        alloc.blocks.extend(self._take() for _ in range(grow))
        alloc.num_tokens = num_tokens
        return copies

    def commit(self, seq_id, token_ids: Sequence[int]) -> None:
        """The model has written K/V for `token_ids` (the sequence so far): name its newly
        full blocks by their chained hash, so later sequences can share them. The chain goes
        on from the last named block: a decode step hashes a block once, when it fills."""
        if not self.enable_prefix_caching:
            return
        alloc = self.allocations[seq_id]
        full = min(len(token_ids) // self.block_size, len(alloc.blocks))
        chain = self._chain(token_ids, full, alloc.num_hashed, alloc.last_hash)
        for i, (h, tokens) in enumerate(chain, start=alloc.num_hashed):
            block = self.blocks[alloc.blocks[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
            alloc.num_hashed, alloc.last_hash = i + 1, h

    def fork(self, parent_id, child_id) -> None:
        """The child shares every block of the parent (parallel sampling): copy-on-write later."""
        if child_id in self.allocations:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        parent = self.allocations[parent_id]
        for block_id in parent.blocks:
            self._hold(block_id)
        self.allocations[child_id] = Allocation(list(parent.blocks), parent.num_tokens, parent.num_hashed,
                                                parent.last_hash)

    def free(self, seq_id) -> None:
        """Release a finished, aborted or preempted sequence's blocks (last block first, so
        the LRU evicts a prefix's tail before its head)."""
        alloc = self.allocations.pop(seq_id)
        for block_id in reversed(alloc.blocks):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.cached_ids[block_id] = None  # Active -> Cached (most recently used)
                else:
                    self.free_ids.append(block_id)  # Active -> Free

    def evict(self, count: int) -> int:
        """Turn up to `count` least recently used Cached blocks into Free ones."""
        evicted = 0
        while evicted < count and self.cached_ids:
            block_id, _ = self.cached_ids.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
            self.free_ids.append(block_id)
            evicted += 1
        return evicted

    # ---- invariants ----------------------------------------------------------------------
    def check(self) -> None:
        """Raise AssertionError unless the bookkeeping is consistent (tests call it often)."""
        refs = [0] * self.num_blocks
        for alloc in self.allocations.values():
            assert len(set(alloc.blocks)) == len(alloc.blocks), "a sequence holds a block twice"
            assert len(alloc.blocks) == self.blocks_for(alloc.num_tokens), "blocks do not match tokens"
            for block_id in alloc.blocks:
                refs[block_id] += 1
        free, cached = set(self.free_ids), set(self.cached_ids)
        assert len(free) == len(self.free_ids), "a block is on the free list twice"
        assert not free & cached, "a block is both Free and Cached"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], \
                f"block {block.block_id}: ref_count {block.ref_count}, held {refs[block.block_id]} times"
            in_free, in_cached = block.block_id in free, block.block_id in cached
            assert (block.ref_count > 0) + in_free + in_cached == 1, \
                f"block {block.block_id} is in {(block.ref_count > 0) + in_free + in_cached} states"
            if in_cached:
                assert block.hash is not None, f"Cached block {block.block_id} has no hash"
            if block.hash is not None:
                assert self.hash_to_block.get(block.hash) == block.block_id, \
                    f"block {block.block_id}'s hash is not indexed"
            if in_free:
                assert block.hash is None, f"Free block {block.block_id} still has a hash"
        assert len(self.hash_to_block) == sum(b.hash is not None for b in self.blocks), "stale hash index"
