"""Continuous batching: admission limits, preemption by recompute under a tight cache, and
greedy outputs equal to running each request alone — with every block back at the end."""
import pytest
import torch

from minideploy.cache.block_manager import FREE, BlockManager
from minideploy.cache.kv_cache import PagedKVCache
from minideploy.engine.model_runner import ModelRunner
from minideploy.engine.scheduler import Scheduler
from minideploy.engine.sequence import Sequence, Status
from minideploy.models import random_model

from test_paged_cache import TINY, contiguous_greedy


def greedy_loop(model, prompts, new_tokens, num_blocks, block_size=4, max_batch_size=8, max_prefill_tokens=64):
    """Drive scheduler + runner to completion; returns outputs, the steps taken and the scheduler."""
    manager = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(manager, max_batch_size, max_prefill_tokens)
    runner = ModelRunner(model, PagedKVCache(TINY, num_blocks, block_size, torch.float32, "cpu"))
    seqs = [Sequence(i, list(p), len(p), len(p) + new_tokens) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    steps = []
    while scheduler.has_work():
        batch = scheduler.schedule()
        assert batch is not None and batch.seqs, "work left but nothing scheduled"
        assert len(scheduler.running) <= max_batch_size
        runner.cache.copy_blocks(batch.copies)
        logits = runner.forward(batch.rows(manager))
        scheduler.computed(batch)
        steps.append((batch.is_prefill, [s.seq_id for s in batch.seqs]))
        for seq, token in zip(batch.seqs, logits.argmax(-1).tolist()):
            seq.token_ids.append(token)
            if seq.num_tokens >= seq.max_tokens:
                scheduler.finish(seq, "length")
        manager.check()
    return [s.output_ids for s in seqs], steps, scheduler


def test_continuous_batching_matches_one_at_a_time():
    model = random_model(TINY, dtype=torch.float32, seed=5)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5], [8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2], [2, 7]]
    outputs, steps, scheduler = greedy_loop(model, prompts, new_tokens=6, num_blocks=64, max_batch_size=3)
    assert outputs == [contiguous_greedy(model, p, 6) for p in prompts]
    # the fourth request waits for a batch slot and joins while the others are mid-answer
    assert steps[0] == (True, [0, 1, 2])
    joined = next(i for i, (prefill, ids) in enumerate(steps) if prefill and ids == [3])
    assert 1 < joined < len(steps) - 1
    assert scheduler.num_preempted == 0
    assert all(s.status is Status.FINISHED for s in scheduler.running + list(scheduler.waiting)) or \
        not scheduler.has_work()


def test_preemption_by_recompute_keeps_outputs_and_leaks_nothing():
    model = random_model(TINY, dtype=torch.float32, seed=6)
    prompts = [[i + 1, i + 2, i + 3, i + 4, i + 5] for i in range(0, 40, 8)]
    # 5 sequences growing to 17 tokens need 25 blocks; 12 force preemptions
    outputs, steps, scheduler = greedy_loop(model, prompts, new_tokens=12, num_blocks=12)
    assert scheduler.num_preempted > 0
    assert outputs == [contiguous_greedy(model, p, 12) for p in prompts]
    manager = scheduler.manager
    assert manager.num_active == 0
    assert all(manager.state(b) in (FREE, "Cached") for b in range(manager.num_blocks))


def test_prefill_token_budget_splits_admission():
    model = random_model(TINY, dtype=torch.float32, seed=7)
    prompts = [list(range(1, 21)), list(range(21, 41)), list(range(41, 61))]
    _, steps, _ = greedy_loop(model, prompts, new_tokens=2, num_blocks=64, max_prefill_tokens=45)
    assert steps[0] == (True, [0, 1]) and steps[1] == (True, [2])


def test_prompts_that_can_never_fit_are_rejected():
    scheduler = Scheduler(BlockManager(4, 4), max_batch_size=2)
    with pytest.raises(ValueError, match="the KV cache holds 16 tokens in all"):
        scheduler.add(Sequence(0, list(range(16)), 16, 40))
    seq = Sequence(1, [1, 2, 3], 3, 1000)
    scheduler.add(seq)
    assert seq.max_tokens == 16  # capped: alone it always fits, so it can never be preempted forever
