"""The paged KV cache under the native model: same greedy tokens as the contiguous cache,
prefix-cache hits that skip recomputation, copy-on-write, and LMDeploy-style sizing."""
import pytest
import torch

from minideploy.cache.block_manager import BlockManager
from minideploy import kernels
from minideploy.cache.kv_cache import (PagedKVCache, free_memory_bytes, key_calibration_windows, key_rotation,
                                      kv_bytes_per_token, mean_keys, num_blocks_for)
from minideploy.config import EngineConfig, ModelConfig
from minideploy.engine.cuda_graphs import DecodeGraphs
from minideploy.engine.model_runner import ModelRunner, Row, graph_buckets
from minideploy.models import ForwardContext, KVCache, NoTokenizer, random_model

TINY = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=256)


def contiguous_greedy(model, prompt, steps):
    """The reference: one contiguous row, prefill then one token at a time."""
    config, device = model.config, model.embed.weight.device
    cache = KVCache(config, 1, len(prompt) + steps, model.embed.weight.dtype, device)
    ids = torch.tensor([prompt], device=device)
    ctx = ForwardContext(positions=torch.arange(len(prompt), device=device)[None], kv_len=len(prompt))
    out = []
    logits = model.logits(model(ids, ctx, cache)[:, -1])
    for step in range(steps):
        out.append(int(logits.argmax()))
        if step == steps - 1:
            break
        pos = len(prompt) + step
        ctx = ForwardContext(positions=torch.tensor([[pos]], device=device), kv_len=pos + 1)
        logits = model.logits(model(torch.tensor([[out[-1]]], device=device), ctx, cache)[:, -1])
    return out


def paged_greedy(model, prompts, steps, block_size, num_blocks, quant_policy=0, decode="eager",
                 key_means=None):
    """Prefill one prompt at a time (later ones hit earlier ones' blocks), then decode all together.

    decode: "eager" (padded rows), "buffers" (the CUDA-graph buffers, run eagerly; 4 rows in a
    bucket of 8) or "graphs" (the same, captured and replayed)."""
    cache = PagedKVCache(model.config, num_blocks, block_size, model.embed.weight.dtype,
                         model.embed.weight.device, quant_policy, key_means)
    graphs = None
    if decode != "eager":
        max_blocks = -(-64 // block_size)
        graphs = DecodeGraphs(model, cache, 8, max_blocks, max_blocks * block_size, buckets=(1, 3, 8))
        if decode == "graphs":
            graphs.capture()
    manager, runner = BlockManager(num_blocks, block_size), ModelRunner(model, cache, graphs)
    tokens, hits = [], []
    for i, prompt in enumerate(prompts):
        cached = manager.allocate(i, prompt)
        hits.append(cached)
        logits = runner.forward([Row(prompt[cached:], cached, manager.block_table(i))])
        manager.commit(i, prompt)
        tokens.append(list(prompt) + [int(logits.argmax())])
    for _ in range(steps - 1):
        rows = []
        for i, seq in enumerate(tokens):
            cache.copy_blocks(manager.append(i, len(seq)))
            rows.append(Row([seq[-1]], len(seq) - 1, manager.block_table(i)))
        logits = runner.forward(rows)
        for i, seq in enumerate(tokens):
            manager.commit(i, seq)
            seq.append(int(logits[i].argmax()))
    manager.check()
    return [seq[len(p):] for seq, p in zip(tokens, prompts)], hits, manager


CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("device,decode", [("cpu", "eager"), ("cpu", "buffers"),
                                           pytest.param("cuda", "eager", marks=CUDA_MARKS),
                                           pytest.param("cuda", "graphs", marks=CUDA_MARKS)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_greedy_equals_contiguous_on_a_tiny_model(block_size, device, decode):
    model = random_model(TINY, dtype=torch.float32, device=device, seed=3)
    system = [5, 17, 33, 2, 8, 61, 40, 9, 11, 12, 70, 3, 4, 90, 1, 6, 7]  # shared prefix
    prompts = [system + [20, 21], system + [22], [50, 51, 52], system + [20, 21, 23, 24, 25]]
    paged, hits, _ = paged_greedy(model, prompts, steps=12, block_size=block_size, num_blocks=160,
                                  decode=decode)
    assert paged == [contiguous_greedy(model, p, 12) for p in prompts]
    assert hits[0] == 0 and hits[2] == 0
    # the second prompt reuses the system prompt's full blocks, the fourth the first's too
    assert hits[1] == len(system) // block_size * block_size
    assert hits[3] == (len(system) + 2) // block_size * block_size


def test_paged_greedy_equals_contiguous_on_the_default_model(default_model):
    tok = default_model.tokenizer
    system = "You are a helpful assistant that answers in one short sentence. "
    prompts = [tok.encode(system + q) for q in ("What is a cache?", "Why is the sky blue?")]
    paged, hits, _ = paged_greedy(default_model.model, prompts, steps=8, block_size=8, num_blocks=32)
    assert paged == [contiguous_greedy(default_model.model, p, 8) for p in prompts]
    assert hits[1] >= 8


def test_mean_keys_is_the_mean_of_the_keys_a_paged_cache_stores():
    model = random_model(TINY, dtype=torch.float32, seed=4)
    windows = key_calibration_windows(NoTokenizer(), TINY.vocab_size, 24)[:3]
    cache = PagedKVCache(TINY, 3 * 6, 4, torch.float32, "cpu")
    manager, runner = BlockManager(3 * 6, 4), ModelRunner(model, cache)
    for i, ids in enumerate(windows.tolist()):
        manager.allocate(i, ids)
        runner.forward([Row(ids, 0, manager.block_table(i))])
    stored = cache.k.reshape(TINY.num_layers, -1, TINY.num_kv_heads, TINY.head_dim)  # every slot is used
    torch.testing.assert_close(mean_keys(model, windows), stored.mean(1))


def test_int8_cache_without_the_mean_key_gives_the_float_greedy_tokens(default_model):
    """Each key loses its layer's and head's mean: every score of a query moves by the same
    q.mean, which softmax ignores (applied to some keys and not to others, or to the
    queries, it would change the tokens)."""
    tok, model = default_model.tokenizer, default_model.model
    means = mean_keys(model, key_calibration_windows(tok, default_model.config.vocab_size, 128)[:1])
    assert means.shape == (model.config.num_layers, model.config.num_kv_heads, model.config.head_dim)
    assert means.norm(dim=-1).max() > 1.0  # a real offset (the default model's is ~16 at most)
    prompts = [tok.encode(q) for q in ("What is a cache?", "Why is the sky blue? Explain it briefly.")]
    paged, _, _ = paged_greedy(model, prompts, steps=8, block_size=8, num_blocks=32, quant_policy=8,
                               key_means=means)
    assert paged == [contiguous_greedy(model, p, 8) for p in prompts]


def test_key_means_need_a_quantized_cache_and_the_models_shape():
    with pytest.raises(ValueError, match="num_layers, num_kv_heads, head_dim"):
        PagedKVCache(TINY, 4, 4, torch.float32, "cpu", 8, key_means=torch.zeros(2, 6, 8))
    with pytest.raises(ValueError, match="quantized cache"):
        PagedKVCache(TINY, 4, 4, torch.float32, "cpu", 0, key_means=torch.zeros(2, 2, 8))


@pytest.mark.parametrize("quant_policy", [0, 8])
def test_a_ragged_prefill_batch_equals_one_sequence_at_a_time(quant_policy):
    """Rows of 1, 5 and 9 new tokens, one after a cached prefix of 8: flattened into one
    forward, each row's logits are those of running it alone."""
    model = random_model(TINY, dtype=torch.float32, seed=2)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6]
    rows_of = {"a": [7], "b": [10, 11, 12, 13, 14], "c": [20, 21, 22, 23, 24, 25, 26, 27, 28],
               "d": prefix + [30, 31, 32]}
    logits = {}
    for together in (False, True):
        cache = PagedKVCache(TINY, 32, 4, torch.float32, "cpu", quant_policy)
        manager, runner = BlockManager(32, 4), ModelRunner(model, cache)
        manager.allocate("p", prefix)
        runner.forward([Row(prefix, 0, manager.block_table("p"))])
        manager.commit("p", prefix)
        rows = []
        for name, ids in rows_of.items():
            cached = manager.allocate(name, ids)
            rows.append(Row(ids[cached:], cached, manager.block_table(name)))
        assert rows[-1].start == len(prefix)  # the prefix's blocks are shared
        out = runner.forward(rows) if together else torch.cat([runner.forward([r]) for r in rows])
        logits[together] = out
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_copy_on_write_keeps_the_parent_intact():
    model = random_model(TINY, dtype=torch.float32, seed=1)
    cache = PagedKVCache(TINY, 8, 4, torch.float32, "cpu")
    manager, runner = BlockManager(8, 4), ModelRunner(model, cache)
    prompt = [1, 2, 3, 4, 5, 6]
    manager.allocate("p", prompt)
    runner.forward([Row(prompt, 0, manager.block_table("p"))])
    manager.fork("p", "c")
    parent_block = manager.block_table("p")[1]
    before = cache.k[:, parent_block].clone()
    cache.copy_blocks(manager.append("c", 7))
    child_block = manager.block_table("c")[1]
    assert child_block != parent_block and torch.equal(cache.k[:, child_block], before)
    runner.forward([Row([9], 6, manager.block_table("c"))])  # the child writes position 6
    assert torch.equal(cache.k[:, parent_block], before)
    assert not torch.equal(cache.k[:, child_block], before)


def test_runner_rejects_rows_that_overflow_their_blocks():
    model = random_model(TINY, dtype=torch.float32)
    runner = ModelRunner(model, PagedKVCache(TINY, 4, 4, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="does not fit its 1 blocks of 4"):
        runner.forward([Row([1, 2, 3, 4, 5], 0, [0])])
    with pytest.raises(ValueError, match="no rows"):
        runner.forward([])


def test_decode_buffers_reject_a_block_table_longer_than_they_hold():
    model = random_model(TINY, dtype=torch.float32)
    cache = PagedKVCache(TINY, 8, 4, torch.float32, "cpu")
    runner = ModelRunner(model, cache, DecodeGraphs(model, cache, 2, 2, 8, buckets=(2,)))
    with pytest.raises(ValueError, match="longer than the 2 blocks the decode buffers hold"):
        runner.forward([Row([1], 8, [0, 1, 2])])


def test_graph_buckets_cover_every_batch_with_little_padding():
    assert graph_buckets(1) == [1]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    buckets = graph_buckets(256)
    assert buckets[-1] == 256 and all(b - a <= 16 for a, b in zip(buckets, buckets[1:]))


def test_sizing_by_count_and_by_fraction():
    per_token = kv_bytes_per_token(TINY, torch.float16)
    assert per_token == 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 2
    # int8 halves the codes and adds (scale, zero) float32 per token and head
    assert kv_bytes_per_token(TINY, torch.float16, 8) == per_token // 2 + 2 * 2 * 2 * 8
    cpu = torch.device("cpu")
    assert num_blocks_for(TINY, EngineConfig(cache_max_entry_count=7), torch.float16, cpu) == 7
    capped = num_blocks_for(TINY, EngineConfig(cache_max_entry_count=0.5, cache_block_seq_len=64),
                            torch.float16, cpu, max_tokens=1000)
    assert capped == 16  # ceil(1000 / 64): a CPU cache never needs more
    huge = ModelConfig(vocab_size=10, hidden_size=8192, intermediate_size=8, num_layers=10**6, num_heads=64,
                       num_kv_heads=64, head_dim=128)
    with pytest.raises(ValueError, match="the KV cache gets no block"):
        num_blocks_for(huge, EngineConfig(cache_max_entry_count=0.01), torch.float16, cpu)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sizing_counts_memory_torch_holds_unused():
    """Blocks torch's allocator keeps after a tensor is freed are free memory for the cache."""
    device = torch.device("cuda", torch.cuda.current_device())
    held = 1 << 30
    torch.empty(held, dtype=torch.uint8, device=device)  # freed at once, kept in torch's cache
    driver_free = torch.cuda.mem_get_info(device)[0]
    assert torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= held
    assert free_memory_bytes(device) >= driver_free + held


def test_paged_cache_needs_runner_metadata():
    cache = PagedKVCache(TINY, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="needs slots, block_tables and context_lens"):
        cache.prepare(ForwardContext(positions=torch.zeros(1, 1, dtype=torch.long), kv_len=1))


@pytest.mark.parametrize("dim", [64, 128, 80])
def test_key_rotation_is_orthogonal_and_keeps_scores(dim):
    r = key_rotation(dim, torch.float64, "cpu")
    torch.testing.assert_close(r @ r.T, torch.eye(dim, dtype=torch.float64))
    q, k = torch.randn(5, dim, dtype=torch.float64), torch.randn(7, dim, dtype=torch.float64)
    torch.testing.assert_close((q @ r) @ (k @ r).T, q @ k.T)


def test_rotated_int4_keys_lose_less_than_plain_ones():
    """Keys with a few outlier channels (as after RoPE): after the rotation, per-token int4
    codes reproduce the attention scores more closely."""
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(256, 64, generator=gen)
    k[:, [3, 17]] *= 20  # outlier channels set every token's range
    q = torch.randn(16, 64, generator=gen)
    r = key_rotation(64, torch.float32, "cpu")

    def score_error(keys, queries):
        codes, params = kernels.quantize_kv(keys, 4)
        return (queries @ kernels.dequantize_kv(codes, params, 64).T - queries @ keys.T).abs().mean()

    assert score_error(k @ r, q @ r) < 0.5 * score_error(k, q)
