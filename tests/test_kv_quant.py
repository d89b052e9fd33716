"""KV-cache quantization (quant_policy 8 / 4): the pure functions, the references, the kernels.

quantize_kv / dequantize_kv are checked round trip and on hand-made rows; the
quantized store_kv and decode_attention references against their definitions
(quantize, then place; dequantize, then the float reference); the CPU and CUDA
kernels against the references on ragged paged batches, with bad inputs failing
with the same message everywhere.
"""
from __future__ import annotations

import pytest
import torch

from minideploy import kernels
from minideploy.kernels import reference
from test_attention_kernels import BIG, CUDA, DEVICES, DTYPES, LENS, errors, paged, rel_err

BITS = [8, 4]
# Kernel vs reference on the same codes: only float rounding differs (the CUDA kernel
# folds dequantization into the sums), then one rounding to the output dtype.
RTOL_Q = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _compiled(kernel_mode):
    kernel_mode("compiled")


def quantized(q, k, v, bits):
    """Float caches -> (q, uint8 caches, params) as store_kv would have written them."""
    k_codes, k_params = kernels.quantize_kv(k, bits)
    v_codes, v_params = kernels.quantize_kv(v, bits)
    return q, k_codes, v_codes, k_params, v_params


def paged_quant(lens, block_size, kv_heads, group, head_dim, dtype, device, bits, seed=0, spare_blocks=3):
    q, k, v, tables, lens = paged(lens, block_size, kv_heads, group, head_dim, dtype, device, seed,
                                  spare_blocks)
    q, kc, vc, kp, vp = quantized(q, k, v, bits)
    return q, kc, vc, tables, lens, kp, vp


def assert_codes_match(out: torch.Tensor, ref: torch.Tensor, bits: int) -> None:
    """Bit for bit on the CPU; on a GPU at most one step apart in a few codes."""
    if out.device.type == "cpu":
        assert torch.equal(out, ref)
        return
    nibbles = [(t & 0xF, t >> 4) if bits == 4 else (t,) for t in (out, ref)]
    for a, b in zip(*nibbles):
        diff = (a.int() - b.int()).abs()
        assert int(diff.max()) <= 1 and diff.count_nonzero().item() <= max(1, diff.numel() // 1000)


# ---------------------------------------------------------------------------
# quantize_kv / dequantize_kv: pure functions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_round_trip_is_within_half_a_step(bits, dtype):
    x = (3 * torch.randn(5, 3, 64) + torch.randn(5, 3, 1)).to(dtype)
    codes, params = reference.quantize_kv(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (5, 3, 64 if bits == 8 else 32)
    assert params.dtype == torch.float32 and params.shape == (5, 3, 2)
    scale, zero = params.unbind(-1)
    xf = x.float()
    assert torch.equal(zero, xf.amin(-1))
    assert torch.allclose(scale * (2**bits - 1), xf.amax(-1) - xf.amin(-1), rtol=1e-6)
    back = reference.dequantize_kv(codes, params, 64)
    assert back.dtype == torch.float32 and back.shape == x.shape
    assert ((back - xf).abs() <= scale[..., None] * 0.5001 + 1e-6).all()
    # The extremes of each row come back (almost) exactly: code 0 and code 2^bits - 1.
    assert torch.allclose(back.amin(-1), xf.amin(-1)) and torch.allclose(back.amax(-1), xf.amax(-1), rtol=1e-5)
    # Quantizing the dequantized values again gives the same codes.
    again, _ = reference.quantize_kv(back, bits)
    assert (again.int() - codes.int()).abs().max() <= (1 if bits == 8 else 17)


def test_int4_packs_element_2i_in_the_low_nibble():
    x = torch.tensor([[0.0, 15.0, 1.0, 2.0, 14.0, 3.0]])  # min 0, max 15: scale 1, codes = x
    codes, params = reference.quantize_kv(x, 4)
    assert codes.tolist() == [[0 | 15 << 4, 1 | 2 << 4, 14 | 3 << 4]]
    assert params.tolist() == [[1.0, 0.0]]
    assert torch.equal(reference.dequantize_kv(codes, params, 6), x)
    codes8, params8 = reference.quantize_kv(x * 17, 8)  # 0..255: scale 1
    assert codes8.tolist() == [[0, 255, 17, 34, 238, 51]] and params8.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("bits", BITS)
def test_constant_rows_quantize_without_nan(bits):
    x = torch.full((4, 2, 16), -2.5)
    x[1] = 0.0
    codes, params = reference.quantize_kv(x, bits)
    assert torch.equal(codes, torch.zeros_like(codes))
    assert torch.equal(params[..., 0], torch.zeros(4, 2))
    assert torch.equal(reference.dequantize_kv(codes, params, 16), x)


def test_quantize_rejects_bad_bits_and_odd_int4_rows():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        reference.quantize_kv(torch.randn(2, 8), 2)
    with pytest.raises(ValueError, match="even for 4 bits"):
        reference.quantize_kv(torch.randn(2, 7), 4)
    with pytest.raises(ValueError, match="dequantize_kv: cache must be uint8"):
        reference.dequantize_kv(torch.zeros(2, 5, dtype=torch.uint8), torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match=r"dequantize_kv: params must be float32 \[2,2\]"):
        reference.dequantize_kv(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 3), 8)


def test_kv_cache_width():
    assert reference.kv_cache_width(128, 0) == 128 and reference.kv_cache_width(128, 8) == 128
    assert reference.kv_cache_width(128, 4) == 64
    with pytest.raises(ValueError, match="quant_policy must be one of"):
        reference.kv_cache_width(128, 2)
    with pytest.raises(ValueError, match="even head_dim"):
        reference.kv_cache_width(7, 4)
    assert kernels.quantize_kv is reference.quantize_kv and kernels.dequantize_kv is reference.dequantize_kv


# ---------------------------------------------------------------------------
# The references are their definitions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
def test_reference_store_kv_quantizes_each_row_into_its_slot(bits):
    k, v = torch.randn(5, 2, 8).half(), torch.randn(5, 2, 8).half()
    width = 8 if bits == 8 else 4
    k_cache, v_cache = torch.full((3, 4, 2, width), 7, dtype=torch.uint8), torch.zeros(3, 4, 2, width, dtype=torch.uint8)
    k_params, v_params = torch.full((3, 4, 2, 2), -1.0), torch.full((3, 4, 2, 2), -1.0)
    slots = torch.tensor([0, 11, -1, 5, -7])
    reference.store_kv(k, v, k_cache, v_cache, slots, k_params, v_params)
    k_codes, k_p = reference.quantize_kv(k, bits)
    v_codes, v_p = reference.quantize_kv(v, bits)
    flat = lambda t: t.view(12, 2, -1)  # noqa: E731
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat(k_cache)[s], k_codes[i]) and torch.equal(flat(v_cache)[s], v_codes[i])
            assert torch.equal(flat(k_params)[s], k_p[i]) and torch.equal(flat(v_params)[s], v_p[i])
    untouched = [s for s in range(12) if s not in (0, 11, 5)]
    assert (flat(k_cache)[untouched] == 7).all() and (flat(k_params)[untouched] == -1).all()


@pytest.mark.parametrize("bits", BITS)
def test_reference_decode_attention_is_float_attention_over_dequantized_caches(bits):
    q, kc, vc, tables, lens, kp, vp = paged_quant([1, 7, 33, 0, 130], 16, 2, 3, 64, torch.float32,
                                                  "cpu", bits)
    out = reference.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    k, v = reference.dequantize_kv(kc, kp, 64), reference.dequantize_kv(vc, vp, 64)
    expect = reference.decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.allclose(out, expect, atol=1e-6)


# ---------------------------------------------------------------------------
# Kernels against the references
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (3, 128), (1, 6)])
def test_store_kv_quantized_matches_reference(device, bits, dtype, slot_dtype, kv_heads, head_dim):
    """k, v as column slices of a fused qkv output (strided rows); -1 slots skipped."""
    tokens, num_slots = 11, 40
    qkv = (2 * torch.randn(tokens, 6 * kv_heads * head_dim)).to(dtype).to(device)
    qkv[3, 4 * kv_heads * head_dim:5 * kv_heads * head_dim] = 0.5  # constant rows: scale 0
    _, k, v = qkv.split([4 * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_slots)[:tokens]
    slots[[2, 5]] = -1
    slots = slots.to(slot_dtype).to(device)
    width = reference.kv_cache_width(head_dim, bits)
    k_cache = torch.randint(0, 256, (2, num_slots // 2, kv_heads, width), dtype=torch.uint8, device=device)
    v_cache = torch.randint(0, 256, k_cache.shape, dtype=torch.uint8, device=device)
    k_params = torch.randn(2, num_slots // 2, kv_heads, 2, device=device)
    v_params = torch.randn_like(k_params)
    ref = [t.clone() for t in (k_cache, v_cache, k_params, v_params)]
    reference.store_kv(k, v, ref[0], ref[1], slots, ref[2], ref[3])
    kernels.store_kv(k, v, k_cache, v_cache, slots, k_params, v_params)
    assert_codes_match(k_cache, ref[0], bits)
    assert_codes_match(v_cache, ref[1], bits)
    assert torch.equal(k_params, ref[2]) and torch.equal(v_params, ref[3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [16, BIG])
def test_decode_attention_quantized_matches_reference(device, bits, head_dim, group, block_size):
    dtype = torch.float16
    args = paged_quant(LENS, block_size, 2, group, head_dim, dtype, device, bits,
                       seed=head_dim + group + block_size + bits)
    q, kc, vc, tables, lens, kp, vp = args
    scale = head_dim ** -0.5
    out = kernels.decode_attention(q, kc, vc, tables, lens, scale, kp, vp)
    ref = reference.decode_attention(q, kc, vc, tables, lens, scale, kp, vp)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert rel_err(out, ref) <= RTOL_Q[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads,group,head_dim",
                         [(2, 3, 64), (1, 8, 128), (2, 12, 128), (1, 5, 72), (3, 2, 256), (2, 1, 8), (4, 7, 32),
                          (1, 1, 256), (3, 1, 48), (2, 1, 40)])
def test_decode_attention_quantized_dtypes_and_shapes(device, bits, dtype, kv_heads, group, head_dim):
    """Every activation dtype; groups beyond 8, odd pack counts, the largest and smallest head_dim;
    one head a group with head_dim a multiple of 16 (16 codes a lane) and not (8 codes)."""
    args = paged_quant([3, 600, 129, 1], 32, kv_heads, group, head_dim, dtype, device, bits, seed=7)
    q, kc, vc, tables, lens, kp, vp = args
    out = kernels.decode_attention(q, kc, vc, tables, lens, 0.1, kp, vp)
    ref = reference.decode_attention(q, kc, vc, tables, lens, 0.1, kp, vp)
    assert out.dtype == dtype and rel_err(out, ref) <= RTOL_Q[dtype]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_decode_attention_quantized_splits_few_sequences_over_threads(bits, threads, torch_threads):
    """The CPU kernel's key ranges (few sequence, kv head pairs for the threads) over codes."""
    q, kc, vc, tables, lens, kp, vp = paged_quant([0, 900], 16, 1, 3, 64, torch.float32, "cpu", bits,
                                                  seed=threads)
    torch_threads(threads)
    out = kernels.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    ref = reference.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert rel_err(out[1], ref[1]) <= RTOL_Q[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lens", [[1, 7, 64, 65, 511, 512], [512, 513, 1024, 1025, 1536, 2047]],
                         ids=["one-partition", "partition-edges"])
@pytest.mark.parametrize("group", [1, 4])
def test_decode_attention_quantized_partition_boundaries(device, bits, lens, group):
    args = paged_quant(lens, 16, 2, group, 128, torch.bfloat16, device, bits, seed=3, spare_blocks=0)
    q, kc, vc, tables, lens, kp, vp = args
    out = kernels.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    ref = reference.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    assert rel_err(out, ref) <= RTOL_Q[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [1, 2])
def test_decode_attention_quantized_reads_only_the_sequences_rows(device, bits, group):
    """Empty sequences give zeros; NaN params in blocks outside the tables and in the slots
    past each length change nothing."""
    args = paged_quant([9, 0, 40], 8, 2, group, 64, torch.float16, device, bits, spare_blocks=4)
    q, kc, vc, tables, lens, kp, vp = args
    ref = reference.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    listed = set(tables[tables >= 0].tolist())
    for blk in range(kc.shape[0]):
        if blk not in listed:
            kp[blk], vp[blk] = float("nan"), float("nan")
    for b, n in enumerate(lens.tolist()):
        if n:
            last = int(tables[b, (n - 1) // 8])
            kp[last, n % 8 or 8:], vp[last, n % 8 or 8:] = float("nan"), float("nan")
    out = kernels.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out, ref) <= RTOL_Q[torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.2)])
def test_store_then_attend_is_close_to_float_attention(device, bits, bound):
    """The whole path: store_kv quantizes a float cache's tokens, decode_attention reads them;
    the output is within the quantization error of float attention."""
    q, k, v, tables, lens = paged([100, 37, 300], 16, 2, 4, 128, torch.float32, device, seed=11)
    slots = torch.arange(k.shape[0] * k.shape[1], device=device)
    kc = torch.empty(*k.shape[:3], reference.kv_cache_width(128, bits), dtype=torch.uint8, device=device)
    vc, kp, vp = torch.empty_like(kc), torch.empty(*k.shape[:3], 2, device=device), torch.empty(*k.shape[:3], 2, device=device)
    kernels.store_kv(k.view(-1, 2, 128), v.view(-1, 2, 128), kc, vc, slots, kp, vp)
    out = kernels.decode_attention(q, kc, vc, tables, lens, 128 ** -0.5, kp, vp)
    exact = reference.decode_attention(q, k, v, tables, lens, 128 ** -0.5)
    assert rel_err(out, exact) <= bound


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", BITS)
def test_cuda_quantized_bad_values_and_graph_replay(bits):
    """Bad lengths or block ids give NaN; one capture of store + attention replays for new lengths."""
    q, kc, vc, tables, lens, kp, vp = paged_quant([5, 9, 700, 20], 4, 2, 3, 64, torch.float16, "cuda", bits)
    lens[0], lens[1], tables[2, 100] = 10_000, -3, 10**6
    out = kernels.decode_attention(q, kc, vc, tables, lens, 0.125, kp, vp)
    assert out[:3].isnan().all()
    ref = reference.decode_attention(q[3:], kc, vc, tables[3:], lens[3:], 0.125, kp, vp)
    assert rel_err(out[3:], ref) <= RTOL_Q[torch.float16]

    q, kc, vc, tables, lens, kp, vp = paged_quant([3000] * 3, 16, 2, 4, 128, torch.bfloat16, "cuda", bits)
    new_k, new_v = torch.randn(3, 2, 128, device="cuda").bfloat16(), torch.randn(3, 2, 128, device="cuda").bfloat16()
    slots = torch.tensor([5, 3001, -1], device="cuda")
    flat = [t.view(-1, 2, t.shape[-1]) for t in (kc, vc, kp, vp)]
    kernels.decode_attention(q, kc, vc, tables, lens, 0.1, kp, vp)  # build and warm up outside the graph
    kernels.store_kv(new_k, new_v, flat[0], flat[1], slots, flat[2], flat[3])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.store_kv(new_k, new_v, flat[0], flat[1], slots, flat[2], flat[3])
        out = kernels.decode_attention(q, kc, vc, tables, lens, 0.1, kp, vp)
    for new_lens in ([3000, 40, 700], [1, 513, 2999], [0, 1024, 512]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        ref = reference.decode_attention(q, kc, vc, tables, lens, 0.1, kp, vp)
        assert rel_err(out, ref) <= RTOL_Q[torch.bfloat16], new_lens


# ---------------------------------------------------------------------------
# Bad inputs: an error naming the argument, the same from the kernel and the reference
# ---------------------------------------------------------------------------

def quant_attention_args(device, bits=8, **change):
    q, kc, vc, tables, lens, kp, vp = paged_quant([5, 9], 4, 2, 3, 64, torch.float16, device, bits)
    args = {"q": q, "k_cache": kc, "v_cache": vc, "block_tables": tables, "context_lens": lens,
            "scale": 0.125, "k_params": kp, "v_params": vp}
    for name, fn in change.items():
        args[name] = fn(args[name])
    return args


def quant_kv_args(device, bits=8, head_dim=64, **change):
    k = torch.randn(3, 2, head_dim, device=device)
    width = head_dim if bits == 8 else head_dim // 2
    args = {"k": k, "v": k.clone(), "k_cache": torch.zeros(2, 8, 2, width, dtype=torch.uint8, device=device),
            "v_cache": torch.zeros(2, 8, 2, width, dtype=torch.uint8, device=device),
            "slots": torch.tensor([0, 3, -1], device=device),
            "k_params": torch.zeros(2, 8, 2, 2, device=device), "v_params": torch.zeros(2, 8, 2, 2, device=device)}
    for name, fn in change.items():
        args[name] = fn(args[name])
    return args


def transposed(t):
    return t.transpose(0, 1).contiguous().transpose(0, 1)


BAD_QUANT_ATTENTION = {
    "v_params missing": ({"v_params": lambda t: None}, "k_params and v_params must be given together"),
    "k_cache float": ({"k_cache": lambda t: t.half()}, "k_cache must be uint8 for a quantized cache"),
    "k_cache width": ({"k_cache": lambda t: t[..., :10]}, "k_cache must have a last dim of head_dim=64 (int8)"),
    "k_cache dims": ({"k_cache": lambda t: t[0]}, "k_cache must have shape [num_blocks, block_size"),
    "k_cache contiguity": ({"k_cache": transposed}, "k_cache must be contiguous"),
    "v_cache dtype": ({"v_cache": lambda t: t.int()}, "v_cache must have the dtype of k_cache (uint8)"),
    "v_cache shape": ({"v_cache": lambda t: t[:-1]}, "v_cache must have the shape of k_cache"),
    "k_params dtype": ({"k_params": lambda t: t.double()}, "k_params must be float32"),
    "k_params shape": ({"k_params": lambda t: t[..., :1]}, "k_params must have shape"),
    "v_params shape": ({"v_params": lambda t: t[:-1]}, "v_params must have shape"),
    "k_params contiguity": ({"k_params": transposed}, "k_params must be contiguous"),
}
BAD_QUANT_STORE = {
    "k_params missing": ({"k_params": lambda t: None}, "k_params and v_params must be given together"),
    "k_cache float": ({"k_cache": lambda t: t.float()}, "k_cache must be uint8 for a quantized cache"),
    "k_cache width": ({"k_cache": lambda t: t[..., :20]}, "k_cache must have a last dim of head_dim=64"),
    "k_cache heads": ({"k_cache": lambda t: t[:, :, :1]}, "k_cache must have shape [..., num_slots"),
    "v_cache shape": ({"v_cache": lambda t: t[:1]}, "v_cache must have the shape of k_cache"),
    "v_params dtype": ({"v_params": lambda t: t.half()}, "v_params must be float32"),
    "k_params shape": ({"k_params": lambda t: t[:1]}, "k_params must have shape [2,8,2,2]"),
    "v_params contiguity": ({"v_params": transposed}, "v_params must be contiguous"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD_QUANT_ATTENTION), ids=str)
def test_decode_attention_quantized_rejects_bad_input(device, case):
    change, message = BAD_QUANT_ATTENTION[case]
    compiled, ref = errors("decode_attention", quant_attention_args(device, **change))
    assert message in ref and ref in compiled


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_uint8_cache_needs_params(device):
    args = quant_attention_args(device, k_params=lambda t: None, v_params=lambda t: None)
    compiled, ref = errors("decode_attention", args)
    assert "k_cache must have the dtype of q (float16), got uint8" in ref and ref in compiled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD_QUANT_STORE), ids=str)
def test_store_kv_quantized_rejects_bad_input(device, case):
    change, message = BAD_QUANT_STORE[case]
    compiled, ref = errors("store_kv", quant_kv_args(device, **change))
    assert message in ref and ref in compiled


@pytest.mark.parametrize("device", DEVICES)
def test_store_kv_int4_needs_an_even_head_dim(device):
    args = quant_kv_args(device, bits=4, head_dim=7)
    compiled, ref = errors("store_kv", args)
    assert "store_kv: k must have an even head_dim for an int4 cache" in ref and ref in compiled


def test_store_kv_quantized_rejects_out_of_range_slots_on_cpu():
    args = quant_kv_args("cpu", bits=4, slots=lambda t: t + 14)
    before = args["k_cache"].clone(), args["k_params"].clone()
    compiled, ref = errors("store_kv", args)
    assert "slots must be < num_slots=16" in ref and ref in compiled
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["k_params"], before[1])
