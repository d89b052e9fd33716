"""The CPU small-batch linear (GEMV) kernel against torch's F.linear."""
import pytest
import torch
import torch.nn.functional as F

from minideploy import kernels

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,out_features,in_features",
                         [(1, 960, 576), (3, 77, 33), (16, 1, 5), (7, 129, 1000), (1, 49152, 576), (29, 960, 576),
                          (32, 50, 1536)])
def test_linear_matches_reference(dtype, tokens, out_features, in_features):
    x = torch.randn(tokens, in_features).to(dtype)
    w = torch.randn(out_features, in_features).to(dtype)
    ref = F.linear(x.double(), w.double())
    out = kernels.build.load(kernels.LINEAR, "cpu").linear(x, w)  # the kernel, whatever the dispatch
    assert out.dtype == dtype and out.shape == (tokens, out_features)
    assert kernels.backend_for(x, kernels.LINEAR) == "cpu"
    assert ((kernels.linear(x, w).double() - ref).norm() / ref.norm()).item() < TOL[dtype]
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


@pytest.mark.parametrize("amx", [True, False])
def test_bfloat16_on_an_amx_cpu_takes_the_kernel_up_to_4_tokens(monkeypatch, amx):
    """Where AMX multiplies bfloat16 tiles, torch's matmul takes bfloat16 steps of 5+ tokens;
    elsewhere the kernel takes up to GEMV_MAX_TOKENS, in every dtype."""
    monkeypatch.setattr(kernels, "_cpu_has_amx", lambda: amx)
    calls = []
    monkeypatch.setattr(F, "linear", lambda x, w: calls.append(x.shape[0]) or x @ w.T)
    w = torch.randn(24, 64)
    for dtype in (torch.bfloat16, torch.float32):
        for tokens in (1, 4, 5, kernels.GEMV_MAX_TOKENS, kernels.GEMV_MAX_TOKENS + 1):
            kernels.linear(torch.randn(tokens, 64).to(dtype), w.to(dtype))
    bf16_to_torch = [5, kernels.GEMV_MAX_TOKENS] if amx else []
    assert calls == bf16_to_torch + [kernels.GEMV_MAX_TOKENS + 1] * 2


@pytest.mark.parametrize("out_features,in_features", [(77, 33), (129, 1000), (960, 576), (2, 9)])
def test_a_rows_result_does_not_depend_on_the_other_rows(out_features, in_features):
    """Weight rows 3 and activation rows 4 or 8 at a time, ragged tails included: every sum runs
    over k in the same order, so row i of a 13-token step equals that token alone, bit for bit
    (a decode step gives each sequence the logits it would get by itself)."""
    x = torch.randn(13, in_features)
    w = torch.randn(out_features, in_features)
    together = kernels.linear(x, w)
    for i in range(13):
        assert torch.equal(together[i:i + 1], kernels.linear(x[i:i + 1], w))
    assert torch.equal(together[5:9], kernels.linear(x[5:9], w))


@pytest.fixture(scope="module")
def portable_cpu_extension(portable_isa, portable_cpu_build):
    """The kernel built for a smaller instruction set (conftest.PORTABLE_BUILDS): 8-lane sums."""
    return portable_cpu_build(kernels.LINEAR, portable_isa)


@pytest.mark.parametrize("tokens,out_features,in_features", [(1, 960, 576), (3, 77, 33), (16, 7, 1000)])
def test_portable_cpu_kernel_matches_reference(portable_cpu_extension, tokens, out_features, in_features):
    x = torch.randn(tokens, in_features)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(out_features, in_features).to(dtype)
        ref = F.linear(x.to(dtype).double(), w.double())
        out = portable_cpu_extension.linear(x.to(dtype), w)
        assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[dtype]
    q, scales = random_int8_weight(out_features, in_features)
    exact = F.linear(x.double(), q.double() * scales.double()[:, None])
    out = portable_cpu_extension.linear_int8(x, q, scales)
    assert ((out.double() - exact).norm() / exact.norm()).item() < TOL[torch.float32]


def test_non_contiguous_activations_are_accepted():
    hidden = torch.randn(2, 5, 64)
    w = torch.randn(10, 64)
    last = hidden[:, -1]  # a strided view, as when taking the last token's hidden state
    assert torch.allclose(kernels.linear(last, w), F.linear(last, w), atol=1e-5)


def test_bad_inputs_name_the_argument():
    ext = kernels.build.load(kernels.LINEAR, "cpu")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ext.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        ext.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x must be float32"):
        ext.linear(torch.ones(2, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.linear(torch.randn(2, 8), torch.randn(8, 4).t())


@pytest.mark.parametrize("tokens,out_features,in_features",
                         [(1, 960, 576), (3, 77, 33), (16, 1, 5), (7, 129, 1000), (13, 48, 1), (29, 960, 576),
                          (32, 50, 1536), (33, 40, 24)])
def test_tiled_linear_matches_reference(tokens, out_features, in_features):
    """The float32 weight in tiles of rows (ragged last tile, odd tile counts, 1..3 token
    passes); past GEMV_MAX_TOKENS the untiled weight goes to torch's matmul."""
    x = torch.randn(tokens, in_features)
    w = torch.randn(out_features, in_features)
    rows = kernels.linear_tile_rows(x.device)
    tiles = kernels.reference.tile_rows(w, rows)
    ref = F.linear(x.double(), w.double())
    out = kernels.linear_tiled(x, tiles, out_features)
    assert out.shape == (tokens, out_features) and out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.float32]
    if tokens <= kernels.GEMV_MAX_TOKENS:
        kernel = kernels.build.load(kernels.LINEAR, "cpu").linear_tiled(x, tiles, out_features)
        assert torch.equal(out, kernel)


@pytest.mark.parametrize("out_features,in_features", [(1, 5), (21, 40), (960, 576), (129, 1000)])
def test_untile_rows_matches_reference(out_features, in_features):
    """The C++ untile (the weight for torch's matmul past GEMV_MAX_TOKENS), ragged last tile too."""
    ext = kernels.build.load(kernels.LINEAR, "cpu")
    w = torch.randn(out_features, in_features)
    tiles = kernels.reference.tile_rows(w, ext.tile_rows())
    assert torch.equal(ext.untile_rows(tiles, out_features), w)
    assert torch.equal(kernels.reference.untile_rows(tiles, out_features), w)
    with pytest.raises(RuntimeError, match="untile_rows: tiles must be float32"):
        ext.untile_rows(tiles, out_features + ext.tile_rows())  # one tile too few
    with pytest.raises(RuntimeError, match="untile_rows: tiles must be float32"):
        ext.untile_rows(tiles.double(), out_features)


def test_a_tiled_rows_result_does_not_depend_on_the_other_rows():
    """Each output is one chain of FMAs over k in order, whatever the pass it is in: token i
    of a 29-token step (passes of 10, 10, 9 with AVX-512) equals that token alone."""
    x = torch.randn(29, 576)
    w = torch.randn(100, 576)
    tiles = kernels.reference.tile_rows(w, kernels.linear_tile_rows(x.device))
    together = kernels.linear_tiled(x, tiles, 100)
    for i in range(29):
        assert torch.equal(together[i:i + 1], kernels.linear_tiled(x[i:i + 1], tiles, 100))


def test_portable_tiled_kernel_matches_reference(portable_cpu_extension):
    x = torch.randn(21, 200)
    w = torch.randn(45, 200)
    tiles = kernels.reference.tile_rows(w, portable_cpu_extension.tile_rows())
    ref = F.linear(x.double(), w.double())
    out = portable_cpu_extension.linear_tiled(x, tiles, 45)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.float32]


def test_tiled_linear_bad_inputs_name_the_argument():
    ext = kernels.build.load(kernels.LINEAR, "cpu")
    rows = ext.tile_rows()
    tiles = kernels.reference.tile_rows(torch.randn(20, 8), rows)
    with pytest.raises(RuntimeError, match="tiles must be float32"):
        ext.linear_tiled(torch.randn(2, 8), tiles, tiles.shape[0] * rows + 1)  # one tile too few
    with pytest.raises(RuntimeError, match="tiles must be float32"):
        ext.linear_tiled(torch.randn(2, 9), tiles, 20)  # in_features differ
    with pytest.raises(RuntimeError, match="tiles must be float32"):
        ext.linear_tiled(torch.randn(2, 8), tiles.double(), 20)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        ext.linear_tiled(torch.randn(2, 8).half(), tiles, 20)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.linear_tiled(torch.randn(2, 8), tiles.transpose(0, 1).contiguous().transpose(0, 1), 20)


def random_int8_weight(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    return q, torch.rand(out_features) * 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,out_features,in_features",
                         [(1, 960, 576), (3, 77, 33), (16, 1, 5), (7, 129, 1000), (1, 4099, 576), (32, 50, 1536)])
def test_int8_linear_matches_reference(dtype, tokens, out_features, in_features):
    """Ragged shapes: rows not a multiple of 3, tokens not of 4, in_features not of 8."""
    x = torch.randn(tokens, in_features).to(dtype)
    q, scales = random_int8_weight(out_features, in_features)
    exact = F.linear(x.double(), q.double() * scales.double()[:, None])
    out = kernels.int8_linear(x, q, scales)
    assert out.dtype == dtype and out.shape == (tokens, out_features)
    assert ((out.double() - exact).norm() / exact.norm()).item() < TOL[dtype]
    reference = kernels.reference.int8_linear(x, q, scales)
    assert ((out.double() - reference.double()).norm() / exact.norm()).item() < TOL[dtype]


def test_int8_linear_is_the_float_kernel_on_the_dequantized_weight():
    """Integer weights times a power-of-two scale are exact floats: the int8 path then sums
    the same products in the same order as the float GEMV, bit for bit."""
    x = torch.randn(5, 576)
    q, _ = random_int8_weight(100, 576)
    scales = torch.full((100,), 2.0**-7)
    assert torch.equal(kernels.int8_linear(x, q, scales), kernels.linear(x, q.float() * scales[:, None]))


def test_int8_linear_above_the_gemv_bound_uses_the_reference():
    x = torch.randn(kernels.GEMV_MAX_TOKENS + 1, 64)
    q, scales = random_int8_weight(10, 64)
    assert torch.equal(kernels.int8_linear(x, q, scales), kernels.reference.int8_linear(x, q, scales))


def test_int8_linear_bad_inputs_name_the_argument():
    """The kernel (RuntimeError) and the reference (ValueError) say the same."""
    ext = kernels.build.load(kernels.LINEAR, "cpu")
    q, scales = random_int8_weight(4, 8)
    x = torch.randn(2, 8)
    for fn in (ext.linear_int8, kernels.reference.int8_linear):
        with pytest.raises((RuntimeError, ValueError), match="qweight must be int8"):
            fn(x, q.int(), scales)
        with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
            fn(torch.randn(2, 9), q, scales)
        with pytest.raises((RuntimeError, ValueError), match=r"scales must be float32 \[out_features=4\]"):
            fn(x, q, scales[:3])
        with pytest.raises((RuntimeError, ValueError), match="scales must be float32"):
            fn(x, q, scales.double())
        with pytest.raises((RuntimeError, ValueError), match="x must be"):
            fn(x.int(), q, scales)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.linear_int8(x, torch.randint(-9, 9, (8, 4), dtype=torch.int8).t(), scales)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,out_features,in_features",
                         [(1, 4096, 4096), (2, 77, 8), (3, 1000, 11008), (5, 33, 264), (8, 12288, 4096),
                          (1, 32000, 4096)])
def test_cuda_gemv_matches_reference(dtype, tokens, out_features, in_features):
    x = torch.randn(tokens, in_features, device="cuda").to(dtype)
    w = (torch.randn(out_features, in_features, device="cuda") * in_features**-0.5).to(dtype)
    ref = F.linear(x.double(), w.double())
    assert kernels.backend_for(x, kernels.LINEAR) == "cuda"
    # the kernel itself takes up to 8 tokens; kernels.linear sends only 1 token to it
    ext = kernels.build.load(kernels.LINEAR, "cuda", kernels.build.cuda_arch(0))
    for out in (ext.linear(x, w, 1), ext.linear(x, w, 2), kernels.linear(x, w)):
        assert out.dtype == dtype and out.shape == (tokens, out_features)
        assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gemv_rejects_bad_inputs():
    ext = kernels.build.load(kernels.LINEAR, "cuda", kernels.build.cuda_arch(0))
    x = torch.randn(2, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ext.linear(torch.randn(2, 12, device="cuda", dtype=torch.float16),
                   torch.randn(4, 12, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="tokens <= 8"):
        ext.linear(torch.randn(9, 16, device="cuda", dtype=torch.float16), x)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        ext.linear(x, torch.randn(4, 16, device="cuda"))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ext.linear(x.float(), torch.randn(4, 16, device="cuda"))
    with pytest.raises(RuntimeError, match="version must be 1 or 2"):
        ext.linear(x, torch.randn(4, 16, device="cuda", dtype=torch.float16), 3)


@pytest.mark.parametrize("words", [0, 4, 12, 4 * 1001])
def test_read_words_reference_is_the_xor_of_the_words(words):
    data = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, generator=torch.Generator().manual_seed(words))
    expected = 0
    for w in data.tolist():
        expected ^= w
    assert kernels.reference.read_words(data).tolist() == [expected]
    assert kernels.read_words(data).tolist() == [expected]  # the CPU takes the reference


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("nbytes", [16, 48, 4096 * 16 + 16, 9 * 2**20 + 16 * 77, 64 * 2**20])
def test_cuda_read_kernel_matches_reference(nbytes):
    """Every 16-byte unit is read once: grid-strided loops with 4 loads in flight, ragged tails."""
    data = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
    expected = kernels.reference.read_words(data.cpu())
    for view in (data, data.view(torch.uint8)):  # any dtype: only the bytes count
        partials = kernels.read_words(view)  # one word a warp
        assert partials.dtype == torch.int32 and torch.equal(kernels.reference.read_words(partials.cpu()), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_read_kernel_rejects_bad_inputs():
    data = torch.zeros(64, dtype=torch.int32, device="cuda")
    for fn in (kernels.read_words, lambda d: kernels.reference.read_words(d.cpu())):
        with pytest.raises((RuntimeError, ValueError), match="multiple of 16 bytes"):
            fn(data[:5])
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        kernels.read_words(data[1:5])
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.read_words(data.view(8, 8).t())
