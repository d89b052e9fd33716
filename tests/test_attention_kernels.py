"""KV-cache writes, paged decode attention and SwiGLU's activation: kernels against the reference.

The public functions run with MINIDEPLOY_KERNELS=compiled, so a kernel that does
not build fails here instead of silently falling back to the reference. The
reference itself is checked against a naive per-sequence softmax(q K^T) V.
"""
from __future__ import annotations

import math

import pytest
import torch

from minideploy import kernels
from minideploy.kernels import reference

CUDA = pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
])
DEVICES = ["cpu", CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Both sides compute in float32 and round once to the dtype: at most about one ulp apart.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# One batch mixing a single key, ragged tails, block and partition (512) boundaries, long contexts.
LENS = [1, 7, 64, 65, 700, 3000]
BIG = 0  # block_size 0 in a parametrization: one block holds a whole sequence


@pytest.fixture(autouse=True)
def _compiled(kernel_mode):
    kernel_mode("compiled")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def paged(lens, block_size, kv_heads, group, head_dim, dtype, device, seed=0, spare_blocks=3):
    """Random q and a paged cache holding sequences of `lens` tokens in shuffled blocks.

    Table entries past a sequence's last block are -1: the kernels must never read them.
    """
    gen = torch.Generator().manual_seed(seed)
    block_size = block_size or max(max(lens), 1)
    used = [math.ceil(n / block_size) for n in lens]
    max_blocks = max(used) + 1
    num_blocks = sum(used) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(used):
        tables[b, :n] = ids[start:start + n].int()
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, tables, lens)]


def naive_decode(q, k_cache, v_cache, tables, lens, scale):
    """Per sequence, per head, gather the keys in order and softmax(q K^T) V in float64."""
    batch, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        rows = [(int(tables[b, t // block_size]), t % block_size) for t in range(n)]
        keys = torch.stack([k_cache[blk, off] for blk, off in rows]).double()  # [n, kv_heads, hd]
        values = torch.stack([v_cache[blk, off] for blk, off in rows]).double()
        for h in range(num_heads):
            kvh = h // (num_heads // kv_heads)
            probs = torch.softmax(keys[:, kvh] @ q[b, h].double() * scale, dim=0)
            out[b, h] = probs @ values[:, kvh]
    return out


# ---------------------------------------------------------------------------
# The reference is the textbook computation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [16, 5, BIG])
@pytest.mark.parametrize("group", [1, 3])
def test_reference_decode_attention_is_naive_softmax(block_size, group):
    q, k, v, tables, lens = paged([1, 7, 33, 0, 130], block_size, 2, group, 16, torch.float32, "cpu")
    scale = 0.3
    out = reference.decode_attention(q, k, v, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.allclose(out.double(), naive_decode(q, k, v, tables, lens, scale), atol=1e-6)
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # no keys: zeros


def test_reference_store_kv_is_indexed_assignment():
    k = torch.randn(5, 2, 8)
    v = torch.randn(5, 2, 8)
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    slots = torch.tensor([0, 11, -1, 5, -7])
    reference.store_kv(k, v, k_cache, v_cache, slots)
    expect_k, expect_v = torch.zeros(12, 2, 8), torch.zeros(12, 2, 8)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s], expect_v[s] = k[i], v[i]
    assert torch.equal(k_cache.view(12, 2, 8), expect_k) and torch.equal(v_cache.view(12, 2, 8), expect_v)


# ---------------------------------------------------------------------------
# decode_attention: kernels against the reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 64, BIG])
def test_decode_attention_matches_reference(device, dtype, head_dim, group, block_size):
    q, k, v, tables, lens = paged(LENS, block_size, 2, group, head_dim, dtype, device,
                                  seed=head_dim + group + block_size)
    scale = head_dim ** -0.5
    out = kernels.decode_attention(q, k, v, tables, lens, scale)
    ref = reference.decode_attention(q, k, v, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert rel_err(out, ref) <= RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lens", [[1, 7, 64, 65, 511, 512], [512, 513, 1024, 1025, 1536, 2047]],
                         ids=["one-partition", "partition-edges"])
@pytest.mark.parametrize("block_size", [16, BIG])
def test_decode_attention_short_and_partition_boundaries(device, lens, block_size):
    """Capacity <= 512 is the single-kernel path on CUDA; lengths at 512k +- 1 test the split."""
    q, k, v, tables, lens = paged(lens, block_size, 2, 4, 128, torch.float16, device, seed=3,
                                  spare_blocks=0)
    out = kernels.decode_attention(q, k, v, tables, lens, 0.125)
    ref = reference.decode_attention(q, k, v, tables, lens, 0.125)
    assert rel_err(out, ref) <= RTOL[torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads,group,head_dim",
                         [(1, 8, 64), (2, 12, 128), (1, 5, 72), (3, 2, 256), (2, 1, 8), (4, 7, 32)])
def test_decode_attention_other_shapes(device, dtype, kv_heads, group, head_dim):
    """Groups beyond 8 (several blocks per kv head), odd pack counts, the largest head_dim."""
    q, k, v, tables, lens = paged([3, 600, 129, 1], 32, kv_heads, group, head_dim, dtype, device, seed=7)
    out = kernels.decode_attention(q, k, v, tables, lens, 0.1)
    ref = reference.decode_attention(q, k, v, tables, lens, 0.1)
    assert rel_err(out, ref) <= RTOL[dtype]



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [4, 5, 8, 16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_cuda_tensor_core_gqa_matches_reference(dtype, group, block_size):
    """head_dim 128 and groups of 4..16 take the tensor-core kernel: ragged lengths across
    16-token tiles and partitions, a single key, empty sequences. Its softmax weights are
    rounded to the dtype before multiplying V, within RTOL (two roundings, one ulp)."""
    lens = [0, 1, 15, 16, 17, 63, 700, 3000, 511, 513]
    q, k, v, tables, lens = paged(lens, block_size, 2, group, 128, dtype, "cuda", seed=group + block_size)
    out = kernels.decode_attention(q, k, v, tables, lens, 0.09)
    ref = reference.decode_attention(q, k, v, tables, lens, 0.09)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert rel_err(out, ref) <= RTOL[dtype]
    for b in range(1, len(lens)):  # no sequence hides behind a small overall error
        assert rel_err(out[b], ref[b]) <= RTOL[dtype], int(lens[b])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("lens,kv_heads", [([1000], 1), ([130], 3), ([0, 700], 1), ([64, 1, 200], 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_decode_attention_splits_few_sequences_over_threads(threads, lens, kv_heads, dtype, torch_threads):
    """Fewer (sequence, kv head) pairs than twice the threads: each sequence's keys in ranges,
    merged after (a range may hold no keys, a sequence none at all)."""
    q, k, v, tables, lens = paged(lens, 16, kv_heads, 3, 64, dtype, "cpu", seed=threads)
    torch_threads(threads)
    out = kernels.decode_attention(q, k, v, tables, lens, 0.125)
    ref = reference.decode_attention(q, k, v, tables, lens, 0.125)
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        assert rel_err(out[b], ref[b]) <= RTOL[dtype], n


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_empty_sequences_and_batches(device):
    q, k, v, tables, lens = paged([0, 5, 0], 4, 2, 2, 64, torch.float32, device)
    out = kernels.decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
    assert rel_err(out[1], reference.decode_attention(q, k, v, tables, lens, 0.125)[1]) <= 1e-5
    empty = kernels.decode_attention(q[:0], k, v, tables[:0], lens[:0], 0.125)
    assert empty.shape == (0, 4, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_reads_only_the_sequences_blocks(device):
    """Poisoned blocks outside the tables and NaN tails past each length change nothing."""
    q, k, v, tables, lens = paged([9, 40], 8, 2, 2, 64, torch.float16, device, spare_blocks=4)
    ref = reference.decode_attention(q, k, v, tables, lens, 0.125)
    listed = set(tables[tables >= 0].tolist())
    for blk in range(k.shape[0]):
        if blk not in listed:
            k[blk], v[blk] = float("nan"), float("nan")
    for b, n in enumerate(lens.tolist()):  # the slots after the last token of each sequence
        last = int(tables[b, (n - 1) // 8])
        k[last, n % 8 or 8:], v[last, n % 8 or 8:] = float("nan"), float("nan")
    out = kernels.decode_attention(q, k, v, tables, lens, 0.125)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= RTOL[torch.float16]


def test_contiguous_cache_is_one_block_per_row():
    """KVCache's layer [max_batch, max_seq_len, ...] with block table [[row]] and len = pos + 1."""
    max_batch, max_seq, kv_heads, hd = 3, 50, 2, 64
    k = torch.randn(max_batch, max_seq, kv_heads, hd)
    v = torch.randn_like(k)
    q = torch.randn(2, 4, hd)
    tables = torch.tensor([[1], [2]], dtype=torch.int32)  # first_row = 1
    lens = torch.tensor([17, 50], dtype=torch.int32)
    out = kernels.decode_attention(q, k, v, tables, lens, 0.125)
    for b, (row, n) in enumerate([(1, 17), (2, 50)]):
        keys = k[row, :n].repeat_interleave(2, dim=1).transpose(0, 1)  # [heads, n, hd]
        values = v[row, :n].repeat_interleave(2, dim=1).transpose(0, 1)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], keys, values, scale=0.125)
        assert torch.allclose(out[b], sdpa[:, 0], atol=1e-5)


# ---------------------------------------------------------------------------
# store_kv
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (3, 128), (1, 6)])
def test_store_kv_matches_reference(device, dtype, slot_dtype, kv_heads, head_dim):
    """k, v as column slices of a fused qkv output (strided rows); -1 slots skipped."""
    tokens, num_slots = 11, 40
    qkv = torch.randn(tokens, (4 + 2) * kv_heads * head_dim).to(dtype).to(device)
    _, k, v = qkv.split([4 * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_slots)[:tokens]
    slots[[2, 5]] = -1
    slots = slots.to(slot_dtype).to(device)
    k_cache = torch.randn(2, num_slots // 2, kv_heads, head_dim).to(dtype).to(device)  # leading dims
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, k_ref, v_ref, slots)
    assert not torch.equal(k_ref, k_cache)
    kernels.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_store_kv_into_the_contiguous_cache_layout(device):
    """KVCache.store: slots = row * max_seq_len + position, one call for K and V."""
    max_batch, max_seq, kv_heads, hd = 4, 30, 3, 64
    k_cache = torch.zeros(max_batch, max_seq, kv_heads, hd, device=device, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    rows, positions = torch.tensor([1, 1, 3]), torch.tensor([5, 6, 29])
    k = torch.randn(3, kv_heads, hd, device=device).half()
    v = torch.randn(3, kv_heads, hd, device=device).half()
    kernels.store_kv(k, v, k_cache, v_cache, (rows * max_seq + positions).to(device))
    assert torch.equal(k_cache[rows, positions], k) and torch.equal(v_cache[rows, positions], v)
    assert k_cache.count_nonzero() == k.count_nonzero()


# ---------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (7, 2 * 11008), (3, 2 * 5), (2, 2 * 13), (0, 64)],
                         ids=str)
def test_silu_and_mul_matches_reference(device, dtype, shape):
    x = (3 * torch.randn(shape)).to(dtype).to(device)
    out = kernels.silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    assert out.shape == (shape[0], shape[1] // 2) and out.dtype == dtype
    if x.numel():
        assert rel_err(out, ref) <= RTOL[dtype]
        # HF's order: silu of the first half times the second half.
        gate, up = x.float().chunk(2, dim=-1)
        assert rel_err(out, gate * torch.sigmoid(gate) * up) <= 2 * RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_far_out_gates(device):
    """Gates whose e^-gate overflows or underflows float32 (the CPU kernel clamps its exponent)."""
    gate = torch.tensor([-1e4, -200.0, -90.0, -88.5, -20.0, 0.0, 20.0, 88.5, 90.0, 200.0, 1e4])
    x = torch.cat([gate, torch.full_like(gate, 1.5)]).to(device)[None]
    out = kernels.silu_and_mul(x)
    assert torch.allclose(out.cpu(), reference.silu_and_mul(x).cpu(), rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------------------
# Bad inputs: an error naming the argument, the same from the kernel and the reference
# ---------------------------------------------------------------------------

def attention_args(device, **change):
    q, k, v, tables, lens = paged([5, 9], 4, 2, 3, 64, torch.float16, device)
    args = {"q": q, "k_cache": k, "v_cache": v, "block_tables": tables, "context_lens": lens, "scale": 0.125}
    for name, fn in change.items():
        args[name] = fn(args[name])
    return args


def kv_args(device, **change):
    k = torch.randn(3, 2, 64, device=device)
    args = {"k": k, "v": k.clone(), "k_cache": torch.zeros(2, 8, 2, 64, device=device),
            "v_cache": torch.zeros(2, 8, 2, 64, device=device),
            "slots": torch.tensor([0, 3, -1], device=device)}
    for name, fn in change.items():
        args[name] = fn(args[name])
    return args


BAD_ATTENTION = {
    "q dtype": ({"q": lambda t: t.int()}, "q must be float32, float16 or bfloat16"),
    "q dims": ({"q": lambda t: t[0]}, "q must be 3-D"),
    "q head_dim": ({"q": lambda t: t[..., :12]}, "q must have a head_dim that is a multiple of 8"),
    "q contiguity": ({"q": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)}, "q must be contiguous"),
    "k_cache dtype": ({"k_cache": lambda t: t.float()}, "k_cache must have the dtype of q"),
    "k_cache dims": ({"k_cache": lambda t: t[0]}, "k_cache must have shape"),
    "k_cache heads": ({"k_cache": lambda t: t.repeat(1, 1, 2, 1)}, "must be a multiple of k_cache's num_kv_heads"),
    "k_cache contiguity": ({"k_cache": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)},
                           "k_cache must be contiguous"),
    "v_cache shape": ({"v_cache": lambda t: t[:-1]}, "v_cache must have the shape of k_cache"),
    "block_tables dtype": ({"block_tables": lambda t: t.long()}, "block_tables must be int32"),
    "block_tables dims": ({"block_tables": lambda t: t[:, 0]}, "block_tables must have shape"),
    "context_lens batch": ({"context_lens": lambda t: t[:1]}, "context_lens must have shape"),
    "scale": ({"scale": lambda s: float("inf")}, "scale must be finite"),
}
# Value checks need the host: the CPU raises, a GPU gives NaN (tested below).
BAD_ATTENTION_VALUES = {
    "context_lens too long": ({"context_lens": lambda t: t + 100}, "context_lens must lie in"),
    "context_lens negative": ({"context_lens": lambda t: t - 6}, "context_lens must lie in"),
    "block id negative": ({"block_tables": lambda t: t.fill_(-1)}, "block_tables must hold block ids"),
    "block id too big": ({"block_tables": lambda t: t + 100}, "block_tables must hold block ids"),
}
BAD_STORE = {
    "k dtype": ({"k": lambda t: t.double()}, "k must be float32, float16 or bfloat16"),
    "k dims": ({"k": lambda t: t[0]}, "k must be 3-D"),
    "k rows": ({"k": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)}, "k must have contiguous rows"),
    "v shape": ({"v": lambda t: t[:, :1]}, "v must have the shape of k"),
    "k_cache shape": ({"k_cache": lambda t: t[..., :32]}, "k_cache must have shape"),
    "k_cache contiguity": ({"k_cache": lambda t: t.transpose(0, 1)}, "k_cache must be contiguous"),
    "v_cache dtype": ({"v_cache": lambda t: t.half()}, "v_cache must have the dtype of k_cache"),
    "slots dtype": ({"slots": lambda t: t.float()}, "slots must be int64 (or int32)"),
    "slots shape": ({"slots": lambda t: t[:2]}, "slots must have shape"),
}


def errors(fn, args) -> tuple[str, str]:
    """The messages of the compiled kernel and of the reference for the same bad call."""
    with pytest.raises(RuntimeError) as compiled:
        getattr(kernels, fn)(**args)
    with pytest.raises(ValueError) as ref:
        getattr(reference, fn)(**args)
    return str(compiled.value), str(ref.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD_ATTENTION), ids=str)
def test_decode_attention_rejects_bad_input(device, case):
    change, message = BAD_ATTENTION[case]
    compiled, ref = errors("decode_attention", attention_args(device, **change))
    assert message in ref and ref in compiled


@pytest.mark.parametrize("case", list(BAD_ATTENTION_VALUES), ids=str)
def test_decode_attention_rejects_bad_values_on_cpu(case):
    change, message = BAD_ATTENTION_VALUES[case]
    compiled, ref = errors("decode_attention", attention_args("cpu", **change))
    assert message in ref and ref in compiled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD_STORE), ids=str)
def test_store_kv_rejects_bad_input(device, case):
    change, message = BAD_STORE[case]
    compiled, ref = errors("store_kv", kv_args(device, **change))
    assert message in ref and ref in compiled


def test_store_kv_rejects_out_of_range_slots_on_cpu():
    args = kv_args("cpu", slots=lambda t: t + 14)
    before = args["k_cache"].clone()
    compiled, ref = errors("store_kv", args)
    assert "slots must be < num_slots=16" in ref and ref in compiled
    assert torch.equal(args["k_cache"], before)  # checked before anything is written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [lambda t: t.int(), lambda t: t[0], lambda t: t[:, :-1],
                                 lambda t: t[:, ::2]], ids=["dtype", "dims", "odd width", "strided"])
def test_silu_and_mul_rejects_bad_input(device, bad):
    x = bad(torch.randn(3, 16, device=device))
    with pytest.raises(RuntimeError, match="silu_and_mul: gate_up must"):
        kernels.silu_and_mul(x)
    with pytest.raises(ValueError, match="silu_and_mul: gate_up must"):
        reference.silu_and_mul(x)


# ---------------------------------------------------------------------------
# GPU only: no host synchronisation, bad values give NaN, CUDA graphs
# ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group,head_dim", [(3, 64), (4, 128)], ids=["partition-kernel", "tensor-core"])
def test_cuda_bad_values_give_nan_not_a_crash(group, head_dim):
    q, k, v, tables, lens = paged([5, 9, 700, 20], 4, 2, group, head_dim, torch.float16, "cuda")
    lens[0] = 10_000        # longer than the table allows
    lens[1] = -3
    tables[2, 100] = 10**6  # a block id past the cache, inside the length
    out = kernels.decode_attention(q, k, v, tables, lens, 0.125)
    assert out[:3].isnan().all()
    ref = reference.decode_attention(q[3:], k, v, tables[3:], lens[3:], 0.125)
    assert rel_err(out[3:], ref) <= RTOL[torch.float16]
    args = kv_args("cuda", slots=lambda t: torch.tensor([0, 16, 10**9], device="cuda"))
    kernels.store_kv(**args)  # slots past the cache are skipped
    torch.cuda.synchronize()
    assert torch.equal(args["k_cache"].view(16, 2, 64)[0], args["k"][0])
    assert args["k_cache"].view(16, 2, 64)[1:].count_nonzero() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_size", [16, BIG])
def test_cuda_graph_replays_for_new_lengths(block_size):
    """Captured once (split-K: capacity > 512), replayed after the lengths change in place."""
    q, k, v, tables, lens = paged([3000] * 3, block_size, 2, 4, 128, torch.bfloat16, "cuda")
    lens.copy_(torch.tensor([3000, 40, 700], dtype=torch.int32))
    kernels.decode_attention(q, k, v, tables, lens, 0.1)  # build and warm up outside the graph
    slots = torch.tensor([5, 3001, -1], device="cuda")
    new_k, new_v = torch.randn(3, 2, 128, device="cuda").bfloat16(), torch.randn(3, 2, 128, device="cuda").bfloat16()
    flat_k, flat_v = k.view(-1, 2, 128), v.view(-1, 2, 128)
    kernels.store_kv(new_k, new_v, flat_k, flat_v, slots)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.store_kv(new_k, new_v, flat_k, flat_v, slots)
        out = kernels.decode_attention(q, k, v, tables, lens, 0.1)
    for new_lens in ([3000, 40, 700], [1, 513, 2999], [0, 1024, 512]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        ref = reference.decode_attention(q, k, v, tables, lens, 0.1)
        assert rel_err(out, ref) <= RTOL[torch.bfloat16], new_lens



# ---------------------------------------------------------------------------
# In the model: decode steps through the kernels == one forward over everything
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [16, 12], ids=["decode-kernel", "sdpa-fallback"])
def test_model_decode_steps_match_full_forward(device, head_dim):
    """Prefill, then one token at a time for a ragged batch (store_kv + decode_attention,
    or SDPA with a mask for a head_dim the kernel does not take) == a single prefill."""
    from minideploy.config import ModelConfig
    from minideploy.models import ForwardContext, KVCache, random_model

    config = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=72, num_layers=2,
                         num_heads=6, num_kv_heads=2, head_dim=head_dim, max_position_embeddings=64)
    model = random_model(config, torch.float32, device, seed=3)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.inference_mode():
        cache = KVCache(config, 3, 24, torch.float32, device)
        positions = torch.arange(20, device=device).expand(2, -1)
        full = model.logits(model(ids, ForwardContext(positions, 20, first_row=1), cache))
        cache = KVCache(config, 3, 24, torch.float32, device)
        starts = [9, 14]  # ragged: row b decodes from position starts[b]
        for b, s in enumerate(starts):
            prompt = ForwardContext(torch.arange(s, device=device)[None], s, first_row=1 + b)
            model(ids[b:b + 1, :s], prompt, cache)
        steps = []
        for i in range(20 - max(starts)):
            pos = torch.tensor([[s + i] for s in starts], device=device)
            ctx = ForwardContext(pos, int(pos.max()) + 1, first_row=1)
            token = ids.gather(1, pos)
            steps.append(model.logits(model(token, ctx, cache))[:, 0])
    for i, step in enumerate(steps):
        expect = full[[0, 1], [starts[0] + i, starts[1] + i]]
        assert torch.allclose(step, expect, atol=1e-5), i
