"""The block manager: unit cases, then a hypothesis state machine that simulates the
cache's contents and checks, after every step, the invariants and that every block a
sequence reads holds exactly that sequence's tokens (prefix hits and copy-on-write included)."""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minideploy.cache.block_manager import ACTIVE, CACHED, FREE, BlockManager, OutOfBlocks


def test_states_walk():
    m = BlockManager(num_blocks=4, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert m.allocate("a", prompt) == 0
    assert [m.state(b) for b in m.block_table("a")] == [ACTIVE] * 3
    m.commit("a", prompt)
    first, second, third = m.block_table("a")
    m.free("a")
    assert (m.state(first), m.state(second), m.state(third)) == (CACHED, CACHED, FREE)
    # the same system prompt again: the two full blocks are revived, not recomputed
    assert m.allocate("b", prompt[:8] + [99, 98]) == 8
    assert m.block_table("b")[:2] == [first, second]
    m.check()
    # evicting needs Cached blocks with ref 0: none now
    assert m.evict(5) == 0
    m.free("b")
    assert m.evict(1) == 1 and m.num_cached == 1
    m.check()


def test_decode_commits_chain_from_the_last_named_block():
    """Committing token by token (as decode steps do) names the same blocks as one commit of
    the whole sequence, after a prefix hit too, so a later prompt finds them."""
    m = BlockManager(num_blocks=12, block_size=4)
    tokens = list(range(5))
    m.allocate("a", tokens)
    m.commit("a", tokens)
    for t in range(5, 14):  # decode: one token a step
        tokens.append(t)
        m.append("a", len(tokens))
        m.commit("a", tokens)
    m.free("a")
    assert m.allocate("b", tokens[:12] + [99]) == 12  # all three full blocks are hits
    for t in range(100, 106):  # b goes on past its hits: its own blocks chain on from them
        tokens_b = tokens[:12] + [99] + list(range(100, t + 1))
        m.append("b", len(tokens_b))
        m.commit("b", tokens_b)
    m.free("b")
    assert m.allocate("c", tokens_b + [7]) == 16
    m.check()


def test_last_token_is_always_computed():
    m = BlockManager(num_blocks=4, block_size=4)
    m.allocate("a", list(range(8)))
    m.commit("a", list(range(8)))
    m.free("a")
    # both blocks are cached, but the logits need the last token's forward pass
    assert m.allocate("b", list(range(8))) == 4
    m.check()


def test_out_of_blocks_changes_nothing():
    m = BlockManager(num_blocks=3, block_size=2)
    m.allocate("a", [1, 2, 3, 4])
    before = (list(m.free_ids), dict(m.allocations), [b.ref_count for b in m.blocks])
    with pytest.raises(OutOfBlocks, match="needs 3 blocks for 5 tokens"):
        m.allocate("b", [5, 6, 7, 8, 9])
    with pytest.raises(OutOfBlocks, match="needs 2 more blocks"):
        m.append("a", 8)
    assert before == (list(m.free_ids), dict(m.allocations), [b.ref_count for b in m.blocks])
    m.check()


def test_fork_copies_shared_partial_block_on_write():
    m = BlockManager(num_blocks=6, block_size=4)
    m.allocate("p", [1, 2, 3, 4, 5])
    m.fork("p", "c")
    assert m.block_table("c") == m.block_table("p")
    copies = m.append("c", 6)
    assert copies == [(m.block_table("p")[1], m.block_table("c")[1])]
    assert m.append("p", 6) == []  # the parent now owns its block alone
    m.check()


def test_bad_calls():
    with pytest.raises(ValueError, match="num_blocks >= 1"):
        BlockManager(0, 4)
    m = BlockManager(2, 4)
    with pytest.raises(ValueError, match="no tokens"):
        m.allocate("a", [])
    m.allocate("a", [1])
    with pytest.raises(ValueError, match="already has blocks"):
        m.allocate("a", [1])
    with pytest.raises(ValueError, match="cannot shrink"):
        m.append("a", 0)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / evict against a simulated cache."""

    def __init__(self):
        super().__init__()
        self.m = BlockManager(num_blocks=12, block_size=4)
        self.content: dict[int, list] = {b: [None] * 4 for b in range(12)}  # what each slot holds
        self.tokens: dict[int, list[int]] = {}  # each live sequence's tokens
        self.next_id = 0

    def _write(self, seq, start):
        """The model writes K/V (here: the token ids) of tokens start.. into their slots."""
        for pos in range(start, len(self.tokens[seq])):
            block = self.m.block_table(seq)[pos // 4]
            self.content[block][pos % 4] = self.tokens[seq][pos]
        self.m.commit(seq, self.tokens[seq])

    @rule(prefix=st.sampled_from([[], [7, 7, 7, 7], [7, 7, 7, 7, 8, 8, 8, 8]]),
          rest=st.lists(st.integers(0, 3), min_size=1, max_size=9))
    def allocate(self, prefix, rest):
        seq, tokens = self.next_id, prefix + rest
        self.next_id += 1
        can = self.m.can_allocate(tokens)
        try:
            cached = self.m.allocate(seq, tokens)
        except OutOfBlocks:
            assert not can
            return
        assert can and cached % 4 == 0 and cached < len(tokens)
        self.tokens[seq] = tokens
        self._write(seq, cached)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), count=st.integers(1, 6))
    def append(self, data, count):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        new = data.draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
        start = len(self.tokens[seq])
        can = self.m.can_append(seq, start + count)
        try:
            copies = self.m.append(seq, start + count)
        except OutOfBlocks:
            assert not can
            return
        assert can
        for src, dst in copies:
            self.content[dst] = list(self.content[src])
        self.tokens[seq] = self.tokens[seq] + new
        self._write(seq, start)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.next_id
        self.next_id += 1
        self.m.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(seq)
        del self.tokens[seq]

    @rule(count=st.integers(1, 4))
    def evict(self, count):
        cached = self.m.num_cached
        assert self.m.evict(count) == min(count, cached)

    @invariant()
    def consistent(self):
        self.m.check()

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        for seq, tokens in self.tokens.items():
            table = self.m.block_table(seq)
            assert len(table) == -(-len(tokens) // 4)
            held = [self.content[table[p // 4]][p % 4] for p in range(len(tokens))]
            assert held == tokens, f"sequence {seq} reads {held}, wrote {tokens}"

    @invariant()
    def cached_blocks_hold_their_hashed_tokens(self):
        for block_id in self.m.cached_ids:
            assert tuple(self.content[block_id]) == self.m.blocks[block_id].token_ids

    @invariant()
    def states_partition_the_blocks(self):
        states = [self.m.state(b) for b in range(self.m.num_blocks)]
        assert states.count(FREE) == self.m.num_free and states.count(CACHED) == self.m.num_cached


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
