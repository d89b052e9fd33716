"""The W4A16 kernels (int4 weights, float activations) against their PyTorch reference.

Calls go through `kernels.w4a16_linear` / `kernels.dequantize_w4` with
MINIDEPLOY_KERNELS=compiled, so a kernel that does not build fails here instead
of falling back: on a GPU up to 16 tokens run the GEMV, up to 48 run it 16 at a
time; on the CPU up to 128 run the kernel (from 9 on, its dequantize-into-cache path);
more tokens dequantize and call the matmul.
Weights are random 4-bit values packed by `quant.pack.pack_int4`.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minideploy import kernels
from minideploy.kernels import build, reference
from minideploy.quant.pack import pack_int4

CUDA = pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
])
DEVICES = ["cpu", CUDA]
# Largest error allowed, as a fraction of a typical output (the spread of a
# dot product, sqrt(K) rms(x) rms(w)): float32 accumulation throughout, then
# the output rounded to its dtype (outputs reach a few typical sizes).
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (out_features N, in_features K, group g): the default model's projections
# (576 -> 960 qkv, 1536 -> 576 down), N ragged against the vector width and
# the rows per thread (1, 7, 33, 1000), K a multiple of 32 but not of 64 or 128
# (96), a single group (96 / 96), and g = 32 / 64 / 128 / 192.
SHAPES = [(1, 96, 32), (7, 96, 96), (33, 576, 64), (960, 576, 64), (576, 1536, 128),
          (1000, 1536, 128), (7, 576, 192)]
TOKENS = [1, 2, 3, 5, 8, 16, 17, 40, 65, 130]  # GEMV, chunks (CUDA) or cache tiles (CPU), matmul


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16, torch.bfloat16] if device == "cpu" else [
        torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _compiled(kernel_mode):
    """Compiled kernels or an error: never the silent fallback to the reference."""
    kernel_mode("compiled")


def compiled(device: str):
    arch = build.cuda_arch(torch.cuda.current_device()) if device == "cuda" else None
    return build.load(kernels.W4A16, device, arch)


def random_weight(n: int, k: int, group: int, dtype=torch.float32, device="cpu", seed=0):
    """(qweight, scales, zeros) of a random int4 weight; |w| up to ~0.3."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) + 0.5) * 0.02
    zeros = torch.randint(0, 16, (n, k // group), generator=gen).float()
    return pack_int4(q).to(device), scales.to(dtype).to(device), zeros.to(dtype).to(device)


def reference_linear(x, qweight, scales, zeros) -> torch.Tensor:
    """The reference in float32 on the CPU (the inputs' values are exact in float32)."""
    return reference.w4a16_linear(x.float().cpu(), qweight.cpu(), scales.float().cpu(),
                                  zeros.float().cpu())


def typical_output(x: torch.Tensor, w: torch.Tensor) -> float:
    """The spread of x @ w^T's elements: sqrt(K) rms(x) rms(w)."""
    return x.float().pow(2).mean().sqrt().item() * w.float().pow(2).mean().sqrt().item() * w.shape[1] ** 0.5


def assert_matches(out, x, qweight, scales, zeros):
    ref = reference_linear(x, qweight, scales, zeros)
    assert out.dtype == x.dtype and out.shape == ref.shape and out.device == x.device
    typical = typical_output(x, reference.dequantize_w4(qweight.cpu(), scales.float().cpu(), zeros.float().cpu()))
    err = (out.float().cpu() - ref).abs().max().item()
    assert err <= TOL[x.dtype] * typical, f"max error {err:.3g} vs typical output {typical:.3g}"


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_linear_matches_reference(device, tokens, n, k, group):
    for dtype in dtypes_for(device):
        qweight, scales, zeros = random_weight(n, k, group, dtype, device, seed=n + k + tokens)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype).to(device)
        assert kernels.backend_for(x, kernels.W4A16) == device
        assert_matches(kernels.w4a16_linear(x, qweight, scales, zeros), x, qweight, scales, zeros)


# [gate | up] weights for the fused SwiGLU activation: 2 x 13 rows (13 features: a tile of
# 8 and a ragged one), 2 x 480 (the default model's intermediate size is 1536; 480 keeps it fast).
GATED_SHAPES = [(26, 96, 32), (960, 576, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,group", GATED_SHAPES)
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 40, 65])
def test_silu_and_mul_of_a_w4a16_gate_up_matches_the_two_ops(device, tokens, n, k, group):
    """The fused kernel (CUDA: the GEMV's epilogue) gives exactly what the GEMV followed by
    silu_and_mul gives, and both match the reference."""
    for dtype in dtypes_for(device):
        qweight, scales, zeros = random_weight(n, k, group, dtype, device, seed=n + tokens)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype).to(device)
        fused = kernels.w4a16_silu_and_mul(x, qweight, scales, zeros)
        two_ops = kernels.silu_and_mul(kernels.w4a16_linear(x, qweight, scales, zeros))
        assert fused.shape == (tokens, n // 2) and fused.dtype == dtype
        assert torch.equal(fused, two_ops)
        # Against the float32 reference: each of gate and up is off by up to TOL * typical
        # (assert_matches), and silu(g) * u moves by about |u| + |g| per unit of error.
        ref = reference.w4a16_silu_and_mul(x.float().cpu(), qweight.cpu(), scales.float().cpu(),
                                           zeros.float().cpu())
        gate, up = reference_linear(x, qweight, scales, zeros).chunk(2, dim=-1)
        typical = typical_output(x, reference.dequantize_w4(qweight.cpu(), scales.float().cpu(),
                                                            zeros.float().cpu()))
        bound = 2 * TOL[dtype] * typical * (gate.abs() + up.abs() + typical)
        assert ((fused.float().cpu() - ref).abs() <= bound).all()


# The CUDA GEMV beyond SHAPES: long K, groups of 256 and 384, a long K with a 64-group,
# and one K that is no multiple of its 128-wide k-steps (a partial last step).
LONG_SHAPES = SHAPES + [(40, 11008, 128), (33, 4096, 256), (17, 6144, 384), (24, 7168, 64), (9, 6176, 32)]


def cuda_only(test):
    """A test of the CUDA kernels only: marked `cuda`, skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


GEMV_VERSIONS = [1, 2]  # the CUDA kernel's versions (csrc/cuda/w4a16.cu); 2 is the default


@cuda_only
@pytest.mark.parametrize("n,k,group", LONG_SHAPES + [(4500, 4096, 128)])  # and an N of 2 waves
@pytest.mark.parametrize("tokens", [t for t in TOKENS if t <= kernels.W4A16_GEMV_MAX_TOKENS])
def test_cuda_gemv_long_shapes_match_reference(tokens, n, k, group):
    ext = compiled("cuda")
    for dtype in dtypes_for("cuda"):
        qweight, scales, zeros = random_weight(n, k, group, dtype, "cuda", seed=n + k + tokens)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype).cuda()
        for version in GEMV_VERSIONS:
            out = ext.gemv(x, qweight, scales, zeros, version)
            assert_matches(out, x, qweight, scales, zeros)
        assert torch.equal(kernels.w4a16_linear(x, qweight, scales, zeros), ext.gemv(x, qweight, scales, zeros))


@cuda_only
def test_cuda_gemv_rejects_unknown_versions():
    qweight, scales, zeros = random_weight(8, 128, 128, torch.float16, "cuda")
    x = torch.randn(1, 128, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="version must be 1 or 2, got 3"):
        compiled("cuda").gemv(x, qweight, scales, zeros, 3)


CHAIN_SIZES = [4096, 11008, 4096, 11008, 4100]  # 4096 -> 11008 -> 4096 -> 11008 -> 4100


@pytest.fixture(scope="module")
def chain_weights():
    """(qweight, scales, zeros) on the CPU, float32 scales, for each layer of CHAIN_SIZES."""
    return [random_weight(n, k, 128, seed=i) for i, (k, n) in enumerate(zip(CHAIN_SIZES, CHAIN_SIZES[1:]))]


@pytest.mark.parametrize("device", DEVICES)
def test_gated_gemv_rejects_an_odd_number_of_rows(device):
    qweight, scales, zeros = random_weight(7, 96, 32, torch.float16, device)
    x = torch.randn(1, 96, dtype=torch.float16, device=device)
    with pytest.raises(RuntimeError, match="even number of rows"):
        kernels.w4a16_silu_and_mul(x, qweight, scales, zeros)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="w4a16_silu_and_mul_tiled: a .gate . up. weight has an even"):
            kernels.w4a16_silu_and_mul_tiled(x, *cpu_tiles(qweight, scales, zeros), 7)


@cuda_only
@pytest.mark.parametrize("version", GEMV_VERSIONS)
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_cuda_gemv_chain_replayed_from_a_cuda_graph(chain_weights, tokens, version):
    """Decode's pattern: calls captured back to back in one CUDA graph, each reading the
    output of the call before, the last N ragged. Every layer matches the reference on
    its own input, and the replay (into outputs poisoned with NaN) equals the eager
    chain bit for bit."""
    ext = compiled("cuda")
    for dtype in dtypes_for("cuda"):
        weights = [(q.cuda(), s.to(dtype).cuda(), z.to(dtype).cuda()) for q, s, z in chain_weights]
        x = (torch.randn(tokens, CHAIN_SIZES[0], generator=torch.Generator().manual_seed(7)) * 0.01)
        x = x.to(dtype).cuda()

        def chain():
            outs = [x]
            for qweight, scales, zeros in weights:
                outs.append(ext.gemv(outs[-1], qweight, scales, zeros, version))
            return outs

        eager = chain()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain()
        for out in captured[1:]:
            out.fill_(float("nan"))  # poison: the replay must write every element
        graph.replay()
        torch.cuda.synchronize()
        for layer, (qweight, scales, zeros) in enumerate(weights):
            # assert_matches' check, on the GPU: these weights are large for the CPU reference
            w = reference.dequantize_w4(qweight, scales.float(), zeros.float())
            x_in = captured[layer].float()
            err = (captured[layer + 1].float() - x_in @ w.t()).abs().max().item()
            typical = typical_output(x_in, w)
            assert err <= TOL[dtype] * typical, f"layer {layer}: max error {err:.3g} vs {typical:.3g}"
            assert torch.equal(captured[layer + 1], eager[layer + 1])


@cuda_only
@pytest.mark.parametrize("version", GEMV_VERSIONS)
@pytest.mark.parametrize("group", [32, 128])
def test_cuda_gemv_extreme_nibbles_and_infinities(group, version):
    """Every q/z extreme; then x with infinities (one in the last k, in the partial last
    k-step where K is no multiple of 128): inf and NaN where the reference has them,
    the other outputs within tolerance."""
    ext = compiled("cuda")
    n, k = 9, 4 * group
    for dtype in dtypes_for("cuda"):
        for q_value, z_value in ((0, 15), (15, 0), (15, 15), (8, 7)):
            qweight = pack_int4(torch.full((n, k), q_value, dtype=torch.uint8)).cuda()
            scales = torch.full((n, k // group), 0.25, dtype=dtype, device="cuda")
            zeros = torch.full((n, k // group), float(z_value), dtype=dtype, device="cuda")
            x = torch.randn(3, k, generator=torch.Generator().manual_seed(q_value)).to(dtype).cuda()
            assert_matches(ext.gemv(x, qweight, scales, zeros, version), x, qweight, scales, zeros)
        for rows, width, g in ((20, 4 * group, group), (20, 448, 64), (9, 6176, 32)):
            qweight, scales, zeros = random_weight(rows, width, g, dtype, "cuda", seed=width)
            x = torch.randn(3, width, generator=torch.Generator().manual_seed(width)).to(dtype)
            x[0, -1], x[1, 5] = float("inf"), float("-inf")
            out = ext.gemv(x.cuda(), qweight, scales, zeros, version).cpu()
            ref = reference_linear(x, qweight, scales, zeros).to(dtype)
            assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
            assert torch.equal(out[out.isinf()], ref[ref.isinf()])
            assert_matches(out[2:].cuda(), x[2:].cuda(), qweight, scales, zeros)


@pytest.mark.parametrize("tokens", [17, 40, 100])
def test_cpu_gemv_takes_any_number_of_tokens(tokens):
    qweight, scales, zeros = random_weight(33, 576, 64)
    x = torch.randn(tokens, 576)
    assert_matches(compiled("cpu").gemv(x, qweight, scales, zeros), x, qweight, scales, zeros)


def test_cpu_gemv_of_unit_vectors_is_the_weight_exactly():
    """x = identity: row m of the output is column m of w, every nibble in its place."""
    qweight, scales, zeros = random_weight(13, 192, 64)
    w = reference.dequantize_w4(qweight, scales, zeros)
    for m0 in range(0, 192, 16):  # 16 tokens at a time, as in decode
        eye = torch.eye(192)[m0:m0 + 16]
        assert torch.equal(compiled("cpu").gemv(eye, qweight, scales, zeros), w[:, m0:m0 + 16].t())


def test_extreme_nibbles_and_zero_points():
    """All 0s and all 15s (every word's sign bit set) against zero points 15 and 0.

    The kernel computes s (sum q x - z sum x): where q = z the two sums cancel, to
    float32 rounding of their size (s * 15 * sum |x|), not to an exact zero."""
    n, k, group = 9, 128, 32
    for q_value, z_value in ((0, 15), (15, 0), (15, 15), (8, 7)):
        qweight = pack_int4(torch.full((n, k), q_value, dtype=torch.uint8))
        scales = torch.full((n, k // group), 0.25)
        zeros = torch.full((n, k // group), float(z_value))
        x = torch.randn(3, k)
        out = kernels.w4a16_linear(x, qweight, scales, zeros)
        expected = (q_value - z_value) * 0.25 * x.sum(1, keepdim=True).expand(3, n)
        terms = 0.25 * max(q_value, z_value) * x.abs().sum().item()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6 * terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_infinities_and_nans_as_in_the_reference(dtype):
    """inf * w is +-inf (NaN where w = 0) as in x @ w^T, not the inf - inf = NaN of the
    factorised sums; a NaN poisons its row. Rows without them stay on the fast path."""
    qweight, scales, zeros = random_weight(20, 192, 64, dtype, seed=1)
    zeros[3] = 5.0
    qweight[3] = pack_int4(torch.full((1, 192), 5, dtype=torch.uint8))  # row 3: w = 0
    x = torch.randn(4, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, -1], x[1, 5], x[2, 7] = float("inf"), float("-inf"), float("nan")
    out = kernels.w4a16_linear(x, qweight, scales, zeros)
    ref = reference_linear(x, qweight, scales, zeros).to(dtype)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert torch.equal(out[out.isinf()], ref[ref.isinf()])
    assert_matches(out[3:], x[3:], qweight, scales, zeros)


def test_non_contiguous_activations_are_accepted():
    qweight, scales, zeros = random_weight(10, 64, 32)
    hidden = torch.randn(2, 5, 64)
    last = hidden[:, -1]  # a strided view: the last token's hidden state
    torch.testing.assert_close(kernels.w4a16_linear(last, qweight, scales, zeros),
                               reference_linear(last.contiguous(), qweight, scales, zeros))


def test_empty_inputs():
    qweight, scales, zeros = random_weight(0, 64, 32)
    assert kernels.w4a16_linear(torch.randn(3, 64), qweight, scales, zeros).shape == (3, 0)
    assert kernels.dequantize_w4(qweight, scales, zeros).shape == (0, 64)
    qweight, scales, zeros = random_weight(5, 64, 32)
    assert kernels.w4a16_linear(torch.randn(0, 64), qweight, scales, zeros).shape == (0, 5)


@pytest.fixture(scope="module")
def portable_cpu_extension(portable_isa, portable_cpu_build):
    """The CPU kernel built for a smaller instruction set (conftest.PORTABLE_BUILDS)."""
    return portable_cpu_build(kernels.W4A16, portable_isa)


@pytest.mark.parametrize("n,k,group", SHAPES)
def test_portable_cpu_kernel_matches_reference(portable_cpu_extension, n, k, group):
    for dtype in dtypes_for("cpu"):
        qweight, scales, zeros = random_weight(n, k, group, dtype, seed=n + k)
        for tokens in (1, 2, 5, 16):
            x = torch.randn(tokens, k).to(dtype)
            assert_matches(portable_cpu_extension.gemv(x, qweight, scales, zeros), x, qweight, scales,
                           zeros)
            tiles = [reference.tile_rows(t, portable_cpu_extension.tile_shape()[0]) for t in (qweight, scales, zeros)]
            assert torch.equal(portable_cpu_extension.gemv_tiled(x, *tiles, n),
                               portable_cpu_extension.gemv(x, qweight, scales, zeros))
        assert torch.equal(portable_cpu_extension.dequantize(qweight, scales, zeros),
                           reference.dequantize_w4(qweight, scales, zeros))


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 20), n=st.integers(1, 40), groups=st.integers(1, 4),
       group_32s=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_cpu_gemv_property(tokens, n, groups, group_32s, dtype, seed):
    """Any shape the layout allows: the GEMV (any token count) agrees with the reference."""
    group = 32 * group_32s
    qweight, scales, zeros = random_weight(n, group * groups, group, dtype, seed=seed)
    x = torch.randn(tokens, group * groups, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert_matches(compiled("cpu").gemv(x, qweight, scales, zeros), x, qweight, scales, zeros)


# ---------------------------------------------------------------------------
# The CPU kernel's own layout: the same tensors in tiles of rows
# ---------------------------------------------------------------------------

def cpu_tiles(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [reference.tile_rows(t, compiled("cpu").tile_shape()[0]) for t in tensors]


@pytest.mark.parametrize("rows,cols", [(8, 1), (16, 1), (16, 16), (4, 3)])
def test_tile_rows_layout_and_inverse(rows, cols):
    """qtiles[t, s, r C + c] = qweight[t R + r, s C + c]; rows past N zero; untile gives the
    tensor back."""
    qweight, scales, _ = random_weight(21, 384, 64)
    tiles = reference.tile_rows(qweight, rows, cols)
    assert tiles.shape == (-(-21 // rows), 48 // cols, rows * cols) and tiles.is_contiguous()
    for n in (0, 5, 20):
        for s in (0, 48 // cols - 1):
            assert torch.equal(tiles[n // rows, s, n % rows * cols:(n % rows + 1) * cols],
                               qweight[n, s * cols:(s + 1) * cols])
    assert not tiles[-1, :, 21 % rows * cols:].any()
    assert torch.equal(reference.untile_rows(tiles, 21, rows), qweight)
    assert torch.equal(reference.untile_rows(reference.tile_rows(scales, rows), 21), scales)
    with pytest.raises(ValueError, match="5-column runs do not divide a row of 48"):
        reference.tile_rows(qweight, rows, 5)


@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_cpu_tiled_linear_is_the_row_layouts_bit_for_bit(tokens, n, k, group):
    """Same sums in the same order as the shared layout's kernel; and the reference's values.
    Ragged N leaves a partial last tile; 9 to 128 tokens dequantize tiles into cache, more
    dequantize + matmul."""
    for dtype in dtypes_for("cpu"):
        qweight, scales, zeros = random_weight(n, k, group, dtype, seed=n + k + tokens)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        out = kernels.w4a16_linear_tiled(x, *cpu_tiles(qweight, scales, zeros), n)
        assert torch.equal(out, kernels.w4a16_linear(x, qweight, scales, zeros))
        assert_matches(out, x, qweight, scales, zeros)
        if n % 2 == 0:  # as a [gate | up] weight: the gated call, the same bits as the two ops
            gated = kernels.w4a16_silu_and_mul_tiled(x, *cpu_tiles(qweight, scales, zeros), n)
            assert torch.equal(gated, kernels.silu_and_mul(out))


@pytest.mark.parametrize("rows,cols", [(8, 1), (16, 1), (16, 16), (4, 2)])
def test_tiled_reference_takes_any_tile_shape(rows, cols, kernel_mode):
    kernel_mode("reference")
    qweight, scales, zeros = random_weight(38, 128, 32)
    x = torch.randn(3, 128)
    tiles = [reference.tile_rows(qweight, rows, cols)] + [reference.tile_rows(t, rows) for t in (scales, zeros)]
    assert torch.equal(kernels.w4a16_linear_tiled(x, *tiles, 38), reference.w4a16_linear(x, qweight, scales, zeros))
    assert torch.equal(kernels.w4a16_silu_and_mul_tiled(x, *tiles, 38),
                       reference.w4a16_silu_and_mul(x, qweight, scales, zeros))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3, 12])  # the GEMV, the dequantize-into-cache path
def test_cpu_tiled_infinities_and_nans_as_in_the_reference(dtype, tokens):
    qweight, scales, zeros = random_weight(20, 192, 64, dtype, seed=1)
    x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, -1], x[1, 7] = float("inf"), float("nan")
    out = kernels.w4a16_linear_tiled(x, *cpu_tiles(qweight, scales, zeros), 20)
    ref = reference_linear(x, qweight, scales, zeros).to(dtype)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert_matches(out[2:], x[2:], qweight, scales, zeros)


def _tiled_call(change: dict):
    """kernels.w4a16_linear_tiled with one argument replaced (float16, N = 20: 2 tiles of 16)."""
    qweight, scales, zeros = random_weight(20, 96, 32, torch.float16)
    args = dict(x=torch.randn(2, 96).half(), out_features=20,
                **dict(zip(("qtiles", "stiles", "ztiles"), cpu_tiles(qweight, scales, zeros))))
    args.update({name: f(args[name]) for name, f in change.items()})
    return kernels.w4a16_linear_tiled(args["x"], args["qtiles"], args["stiles"], args["ztiles"],
                                      args["out_features"])


BAD_TILED_CALLS = {
    "qtiles 2-D": (dict(qtiles=lambda t: t[0]), "qtiles must be 3-D int32 [tiles, in_features / "),
    "out_features for more tiles": (dict(out_features=lambda n: 40), "out_features=40 needs"),
    "out_features 0": (dict(out_features=lambda n: 0), "out_features=0 needs 0 tiles"),
    "stiles tiles": (dict(stiles=lambda t: t[:1].contiguous()), "stiles must have shape [tiles="),
    "stiles float64": (dict(stiles=lambda t: t.double()), "stiles must be float32, float16 or bfloat16"),
    "ztiles dtype": (dict(ztiles=lambda t: t.float()), "ztiles must have the dtype of stiles (float16)"),
    "ztiles shape": (dict(ztiles=lambda t: t[:, :1].contiguous()), "ztiles must have the shape of stiles"),
    "stiles non-contiguous": (dict(stiles=lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)),
                              "stiles must be contiguous"),
    "x in_features": (dict(x=lambda x: x[:, :64]), "x must be 2-D [tokens, in_features=96]"),
    "x dtype": (dict(x=lambda x: x.float()), "x must have the dtype of stiles (float16), got float32"),
}


@pytest.mark.parametrize("case", BAD_TILED_CALLS, ids=str)
def test_cpu_tiled_bad_input_names_the_problem(case, kernel_mode):
    """The kernel and the reference say the same thing."""
    change, message = BAD_TILED_CALLS[case]
    messages = []
    for mode in ("compiled", "reference"):
        kernel_mode(mode)
        with pytest.raises((RuntimeError, ValueError), match=re.escape(message)) as info:
            _tiled_call(change)
        messages.append(str(info.value).splitlines()[0])
    if case != "qtiles 2-D":  # the kernel also names its own tile width
        assert messages[0] == messages[1]


def test_cpu_tiled_gemv_wants_this_cpus_tile_width():
    ext = compiled("cpu")
    qweight, scales, zeros = random_weight(20, 96, 32)
    rows, cols = ext.tile_shape()
    assert cols == 1
    other = [reference.tile_rows(t, rows * 2) for t in (qweight, scales, zeros)]
    with pytest.raises(RuntimeError, match=re.escape(f"(this CPU's tiles of {rows} rows, 1 word wide)")):
        ext.gemv_tiled(torch.randn(1, 96), *other, 20)


# ---------------------------------------------------------------------------
# The CUDA kernel's tiles: 16 rows x 16 words, a block's k-step in one piece
# ---------------------------------------------------------------------------

# K a multiple of the 128-weight k-step (the CUDA tiles need it): N ragged against the
# 16-row tile (1, 33, 17, 40), one k-step to 11008, groups of 32 to 384.
CUDA_TILED_SHAPES = [(1, 128, 32), (33, 256, 64), (1000, 1536, 128), (40, 11008, 128), (17, 6144, 384),
                     (24, 7168, 64)]


def cuda_tiles(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> list[torch.Tensor]:
    rows, cols = compiled("cuda").tile_shape()
    return [reference.tile_rows(qweight, rows, cols), reference.tile_rows(scales, rows),
            reference.tile_rows(zeros, rows)]


@cuda_only
@pytest.mark.parametrize("n,k,group", CUDA_TILED_SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 16, 17, 40, 65])
def test_cuda_tiled_linear_is_the_row_layouts_bit_for_bit(tokens, n, k, group):
    """Same kernel, same sums, other addresses; above 48 tokens, dequantize + matmul."""
    for dtype in dtypes_for("cuda"):
        qweight, scales, zeros = random_weight(n, k, group, dtype, "cuda", seed=n + k + tokens)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype).cuda()
        out = kernels.w4a16_linear_tiled(x, *cuda_tiles(qweight, scales, zeros), n)
        assert torch.equal(out, kernels.w4a16_linear(x, qweight, scales, zeros))
        assert_matches(out, x, qweight, scales, zeros)


@cuda_only
@pytest.mark.parametrize("n,k,group", [(26, 128, 32), (54, 256, 64), (960, 1536, 128)])
@pytest.mark.parametrize("tokens", [1, 9, 17, 65])
def test_cuda_tiled_silu_and_mul_is_the_row_layouts_bit_for_bit(tokens, n, k, group):
    """The gated GEMV over tiles; 27 features put up rows across two tiles."""
    for dtype in dtypes_for("cuda"):
        qweight, scales, zeros = random_weight(n, k, group, dtype, "cuda", seed=n + tokens)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype).cuda()
        fused = kernels.w4a16_silu_and_mul_tiled(x, *cuda_tiles(qweight, scales, zeros), n)
        assert fused.shape == (tokens, n // 2)
        assert torch.equal(fused, kernels.w4a16_silu_and_mul(x, qweight, scales, zeros))


@cuda_only
def test_cuda_tiled_gemv_names_bad_input_as_the_reference_does():
    ext = compiled("cuda")
    qweight, scales, zeros = random_weight(20, 256, 32, torch.float16, "cuda")
    x = torch.randn(2, 256).half().cuda()
    with pytest.raises(RuntimeError, match=re.escape("(the CUDA kernel's tiles of 16 rows, 16 words wide)")):
        ext.gemv_tiled(x, *(reference.tile_rows(t, 16) for t in (qweight, scales, zeros)), 20)
    tiles = cuda_tiles(qweight, scales, zeros)
    for args, message in [((x, *tiles, 40), "out_features=40 needs 3 tiles of 16 rows, qtiles has 2"),
                          ((x[:, :128].contiguous(), *tiles, 20), "x must be 2-D [tokens, in_features=256]"),
                          ((x.float(), *tiles, 20), "x must have the dtype of stiles (float16), got float32"),
                          ((x, tiles[0], tiles[1], tiles[2].float(), 20), "ztiles must have the dtype of stiles"),
                          ((x, tiles[0], tiles[1].cpu(), tiles[2].cpu(), 20), "qtiles must be on stiles' device cpu")]:
        for gemv in (ext.gemv_tiled, reference.w4a16_linear_tiled):
            with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
                gemv(*args)
    odd = cuda_tiles(*random_weight(21, 256, 32, torch.float16, "cuda"))
    with pytest.raises(RuntimeError, match="even number of rows"):
        ext.gemv_tiled(x, *odd, 21, gated=True)


# ---------------------------------------------------------------------------
# Dequantize
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_dequantize_matches_reference(device, n, k, group):
    for dtype in dtypes_for(device) + ([torch.float32] if device == "cuda" else []):
        qweight, scales, zeros = random_weight(n, k, group, dtype, device, seed=n * k)
        out = kernels.dequantize_w4(qweight, scales, zeros)
        ref = reference.dequantize_w4(qweight.cpu(), scales.cpu(), zeros.cpu())
        assert out.dtype == dtype and out.shape == (n, k) and out.device.type == device
        if device == "cpu" or dtype == torch.float32:
            # (q - z) * s in float32, rounded once to the dtype: bit for bit
            assert torch.equal(out.cpu(), ref)
        else:
            torch.testing.assert_close(out.cpu(), ref)  # within the dtype's rounding


# ---------------------------------------------------------------------------
# The input contract: same checks (and on the CPU the same messages) as the reference
# ---------------------------------------------------------------------------

def _call(device, tokens=2, n=8, k=96, group=32, x_dtype=None, qweight=None, scales=None,
          zeros=None, x=None, op="linear"):
    """A call with one argument replaced; arguments not given are valid float16 on `device`."""
    dtype = torch.float16
    q0, s0, z0 = random_weight(n, k, group, dtype, device)
    qweight = q0 if qweight is None else qweight(q0)
    scales = s0 if scales is None else scales(s0)
    zeros = z0 if zeros is None else zeros(z0)
    x = torch.randn(tokens, k, device=device).to(x_dtype or dtype) if x is None else x(device)
    if op == "dequantize":
        return lambda: kernels.dequantize_w4(qweight, scales, zeros)
    return lambda: kernels.w4a16_linear(x, qweight, scales, zeros)


def _non_contiguous(t):
    """Same shape and values, transposed storage."""
    return t.t().contiguous().t()


# case -> (the argument `_call` replaces, the message: literal text or a regex)
BAD_CALLS = {
    "qweight int64": (dict(qweight=lambda q: q.long()), "qweight must be 2-D int32"),
    "qweight 1-D": (dict(qweight=lambda q: q.flatten()), "qweight must be 2-D int32"),
    "group of 16": (dict(scales=lambda s: s.repeat(1, 2), zeros=lambda z: z.repeat(1, 2)),
                    "group size 16 (in_features 96 / 6 groups) must be a multiple of 32"),
    "groups not dividing": (dict(scales=lambda s: s.repeat(1, 2)[:, :5].contiguous(),
                                 zeros=lambda z: z.repeat(1, 2)[:, :5].contiguous()),
                            "scales must have shape [out_features=8, groups] with groups dividing "
                            "in_features=96"),
    "scales rows": (dict(scales=lambda s: s[:5].contiguous()), "scales must have shape"),
    # a float16/bfloat16-only (CUDA) kernel may leave out float32
    "scales float64": (dict(scales=lambda s: s.double()),
                       re.compile(r"scales must be (float32, )?float16 or bfloat16, got float64")),
    "zeros dtype": (dict(zeros=lambda z: z.bfloat16()),
                    "zeros must have the dtype of scales (float16), got bfloat16"),
    "zeros shape": (dict(zeros=lambda z: z[:, :1].contiguous()),
                    "zeros must have the shape of scales [8,3], got [8,1]"),
    "x dtype": (dict(x_dtype=torch.bfloat16), "x must have the dtype of scales (float16), got bfloat16"),
    "x in_features": (dict(x=lambda device: torch.randn(2, 64, device=device).half()),
                      "x must be 2-D [tokens, in_features=96], got shape [2,64]"),
    "qweight non-contiguous": (dict(qweight=_non_contiguous), "qweight must be contiguous"),
    "scales non-contiguous": (dict(scales=_non_contiguous), "scales must be contiguous"),
    "zeros non-contiguous": (dict(zeros=_non_contiguous), "zeros must be contiguous"),
}
DEQUANTIZE_CASES = [case for case in BAD_CALLS if not case.startswith("x ")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_input_names_the_problem(device, case):
    change, message = BAD_CALLS[case]
    pattern = message if isinstance(message, re.Pattern) else re.escape(message)
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        _call(device, **change)()
    if case in DEQUANTIZE_CASES:
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            _call(device, op="dequantize", **change)()


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_cpu_bad_input_reads_like_the_reference(case, kernel_mode):
    change, _ = BAD_CALLS[case]
    messages = []
    for mode in ("compiled", "reference"):
        kernel_mode(mode)
        with pytest.raises((RuntimeError, ValueError)) as info:
            _call("cpu", **change)()
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1]


def test_cpu_gemv_checks_its_own_inputs():
    """What the dispatch never sends: a non-contiguous x, a tensor on another device."""
    ext = compiled("cpu")
    qweight, scales, zeros = random_weight(8, 64, 32)
    with pytest.raises(RuntimeError, match="w4a16_linear: x must be contiguous"):
        ext.gemv(torch.randn(64, 2).t(), qweight, scales, zeros)
    with pytest.raises(RuntimeError, match="w4a16_linear: x must be 2-D"):
        ext.gemv(torch.randn(2, 1, 64), qweight, scales, zeros)
    with pytest.raises(RuntimeError, match="w4a16_linear: x must have the dtype of scales"):
        ext.gemv(torch.ones(2, 64, dtype=torch.int32), qweight, scales, zeros)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="qweight must be a CPU tensor"):
            ext.dequantize(qweight.cuda(), scales, zeros)
