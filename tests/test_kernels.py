"""Kernels against their PyTorch reference, the input contract, and the build machinery.

The compiled kernels are loaded with `build.load` (which raises) so that a
broken build fails here instead of silently falling back to the reference.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minideploy import kernels
from minideploy.kernels import build, reference

CUDA = pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
])
DEVICES = ["cpu", CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (num_tokens, hidden): SmolLM2's 576, ragged sizes that defeat 16-byte packs,
# rows above 1024 packs (several strides per thread on CUDA), enough work for OpenMP.
NORM_SHAPES = [(1, 576), (7, 576), (33, 576), (1, 100), (7, 100), (33, 4096), (5, 7),
               (2, 12290)]
# (num_tokens, num_heads, num_kv_heads, head_dim)
ROPE_SHAPES = [(1, 9, 3, 64), (7, 9, 3, 64), (33, 32, 8, 128), (5, 7, 1, 32), (33, 5, 5, 16),
               (3, 1, 1, 2)]
MAX_POSITIONS = 257


@pytest.fixture(autouse=True)
def _auto_dispatch(kernel_mode):
    """Tests start from the default dispatch, whatever the caller's environment says."""
    kernel_mode(None)


def compiled(device: str):
    """The compiled extension for `device`; raises if it does not build."""
    arch = build.cuda_arch(torch.cuda.current_device()) if device == "cuda" else None
    return build.load(kernels.NORM_ROPE, device, arch)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def randn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def rope_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device,
                pos_dtype=torch.int64):
    q = randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    k = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), device=device, dtype=pos_dtype)
    cos_sin = randn(MAX_POSITIONS, head_dim, device=device)
    return q, k, positions, cos_sin


# ---------------------------------------------------------------------------
# Kernels against the reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norm_matches_reference(device, dtype, shape):
    ext = compiled(device)
    x = randn(*shape, dtype=dtype, device=device)
    weight = randn(shape[1], dtype=dtype, device=device)
    out = ext.rms_norm(x, weight, 1e-5)
    ref = reference.rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) <= RTOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_add_rms_norm_matches_reference(device, dtype, shape):
    ext = compiled(device)
    x = randn(*shape, dtype=dtype, device=device)
    residual = randn(*shape, dtype=dtype, device=device)
    weight = randn(shape[1], dtype=dtype, device=device)
    x_before, residual_before = x.clone(), residual.clone()
    out, s = ext.add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_s = reference.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(s, ref_s)  # one rounding of x + residual, as torch does it
    assert rel_err(out, ref_out) <= RTOL[dtype]
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_add_rms_norm_rounds_special_sums_as_torch(dtype):
    """The CPU kernels round 8 floats at a time to 16 bits (vec8.h's from_float8): ties to
    even, overflow to infinity, infinities, NaN and signed zeros as torch rounds them."""
    ext = compiled("cpu")
    info = torch.finfo(dtype)
    ulp = info.eps  # the spacing of [1, 2)
    pairs = [(1.0, ulp / 2), (1.0, 3 * ulp / 2), (1.0 + ulp, ulp / 2), (-1.0, -ulp / 2),
             (info.max, info.max), (-info.max, -info.max), (info.max, info.max * ulp / 4),
             (float("inf"), -float("inf")), (float("nan"), 1.0), (float("inf"), 1.0),
             (-0.0, -0.0), (0.0, -0.0), (info.tiny, -info.tiny / 2), (info.smallest_normal / 4, 0.0),
             (3.0, 2.0**-12), (-5.5, 1e-3), (1e4, 1.0), (0.1, 0.2), (65504.0, 16.0)]
    pairs = pairs * 2 + pairs[:5]  # vectors of 8 and a tail
    x = torch.tensor([a for a, _ in pairs], dtype=torch.float32)
    residual = torch.tensor([b for _, b in pairs], dtype=torch.float32)
    # The inputs as the dtype holds them; their float32 sum rounded once by torch.
    x, residual = x.to(dtype)[None], residual.to(dtype)[None]
    _, s = ext.add_rms_norm(x, residual, torch.ones(x.shape[1], dtype=dtype), 1e-6)
    want = (x.float() + residual.float()).to(dtype)
    assert torch.equal(s.isnan(), want.isnan())
    numbers = ~want.isnan()
    assert torch.equal(s.view(torch.int16)[numbers], want.view(torch.int16)[numbers])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
def test_rope_matches_reference(device, dtype, shape, pos_dtype):
    ext = compiled(device)
    q, k, positions, cos_sin = rope_inputs(*shape, dtype, device, pos_dtype)
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = ext.rope(q, k, positions, cos_sin)
    q_ref, k_ref = reference.rope(q, k, positions, cos_sin)
    assert rel_err(q_out, q_ref) <= RTOL[dtype] and rel_err(k_out, k_ref) <= RTOL[dtype]
    # Same products, same roundings, no fused multiply-adds: bit for bit.
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def rope_store_kv_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, pos_dtype=torch.int64,
                         slot_dtype=torch.int64):
    """qkv, positions, cos_sin, zeroed caches of 2 x 24 slots, and distinct slots (a third
    of them -1: skipped)."""
    q, k, positions, cos_sin = rope_inputs(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, pos_dtype)
    v = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    qkv = torch.cat([t.reshape(num_tokens, -1) for t in (q, k, v)], dim=1)
    k_cache = torch.zeros(2, 24 + num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    slots = torch.randperm(k_cache.numel() // (num_kv_heads * head_dim))[:num_tokens]
    slots[::3] = -1
    return qkv, positions, cos_sin, k_cache, k_cache.clone(), slots.to(slot_dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
def test_rope_store_kv_matches_reference(device, dtype, shape, index_dtype):
    """q, k and the caches bit for bit as reference.rope_store_kv (rope, then store_kv);
    v a view of qkv; rows of skipped slots untouched."""
    ext = compiled(device)
    num_tokens, num_heads, num_kv_heads, _ = shape
    qkv, positions, cos_sin, k_cache, v_cache, slots = rope_store_kv_inputs(*shape, dtype, device, index_dtype,
                                                                            index_dtype)
    qkv_before, ref_k_cache, ref_v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    q, k, v = ext.rope_store_kv(qkv, num_heads, num_kv_heads, positions, cos_sin, k_cache, v_cache, slots)
    q_ref, k_ref, v_ref = reference.rope_store_kv(qkv, num_heads, num_kv_heads, positions, cos_sin,
                                                  ref_k_cache, ref_v_cache, slots)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)
    assert v.data_ptr() == v_ref.data_ptr() and torch.equal(qkv, qkv_before)
    written = int((slots >= 0).sum())
    assert int(k_cache.flatten(0, 1).any(-1).any(-1).sum()) == written


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_dispatches_to_compiled(device):
    compiled(device)
    x = randn(3, 64, device=device)
    assert kernels.backend_for(x) == device
    weight = randn(64, device=device)
    assert rel_err(kernels.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)) <= 1e-6
    out, s = kernels.add_rms_norm(x, x, weight, 1e-5)
    assert torch.equal(s, x + x)
    q, k, positions, cos_sin = rope_inputs(3, 9, 3, 64, torch.float32, device)
    assert torch.equal(kernels.rope(q, k, positions, cos_sin)[0],
                       reference.rope(q, k, positions, cos_sin)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    ext = compiled(device)
    x = randn(0, 576, device=device)
    weight = randn(576, device=device)
    assert ext.rms_norm(x, weight, 1e-5).shape == (0, 576)
    assert ext.add_rms_norm(x, x, weight, 1e-5)[1].shape == (0, 576)
    q, k, positions, cos_sin = rope_inputs(0, 9, 3, 64, torch.float32, device)
    assert ext.rope(q, k, positions, cos_sin)[1].shape == (0, 3, 64)


@settings(max_examples=25, deadline=None)
@given(num_tokens=st.integers(1, 40), hidden=st.integers(1, 700),
       heads=st.integers(1, 12), kv_heads=st.integers(1, 4), half=st.integers(1, 80),
       dtype=st.sampled_from(DTYPES))
def test_random_shapes_cpu(num_tokens, hidden, heads, kv_heads, half, dtype):
    ext = compiled("cpu")
    x = randn(num_tokens, hidden, dtype=dtype)
    weight = randn(hidden, dtype=dtype)
    assert rel_err(ext.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)) <= RTOL[dtype]
    q, k, positions, cos_sin = rope_inputs(num_tokens, heads, kv_heads, 2 * half, dtype, "cpu")
    assert torch.equal(ext.rope(q, k, positions, cos_sin)[0],
                       reference.rope(q, k, positions, cos_sin)[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_range_position_gives_nan():
    ext = compiled("cuda")
    q, k, positions, cos_sin = rope_inputs(4, 9, 3, 64, torch.float16, "cuda")
    positions[2] = MAX_POSITIONS  # not checked on the GPU: that would synchronise
    q_out, k_out = ext.rope(q, k, positions, cos_sin)
    assert q_out[2].isnan().all() and k_out[2].isnan().all()
    assert not q_out[[0, 1, 3]].isnan().any()


# ---------------------------------------------------------------------------
# The reference is Hugging Face's computation, bit for bit in float32
# ---------------------------------------------------------------------------

def test_reference_is_hugging_face_in_float32():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hidden, head_dim = 576, 64
    x = randn(9, hidden)
    norm = llama.LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden))
        assert torch.equal(reference.rms_norm(x, norm.weight.detach(), 1e-5), norm(x))

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(MAX_POSITIONS, dtype=torch.float32)[:, None] * inv_freq
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_positions, head_dim]
    q, k, positions, _ = rope_inputs(9, 9, 3, head_dim, torch.float32, "cpu")
    emb = torch.cat([freqs, freqs], dim=-1)[positions]  # HF's cos/sin: [num_tokens, head_dim]
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim=1)
    q_ref, k_ref = reference.rope(q, k, positions, cos_sin)
    assert torch.equal(q_ref, q_hf) and torch.equal(k_ref, k_hf)
    q_cpu, k_cpu = compiled("cpu").rope(q, k, positions, cos_sin)
    assert torch.equal(q_cpu, q_hf) and torch.equal(k_cpu, k_hf)


# ---------------------------------------------------------------------------
# Bad inputs: the same clear error, naming the argument, on every backend
# ---------------------------------------------------------------------------

def _norm(x=None, weight=None, eps=1e-5):
    x = randn(4, 576) if x is None else x
    weight = randn(x.shape[-1]) if weight is None else weight
    return lambda: kernels.rms_norm(x, weight, eps)


def _add_norm(residual):
    x = randn(4, 576)
    return lambda: kernels.add_rms_norm(x, residual, randn(576), 1e-5)


def _rope(**override):
    q, k, positions, cos_sin = rope_inputs(5, 9, 3, 64, torch.float32, "cpu")
    args = dict(q=q, k=k, positions=positions, cos_sin=cos_sin) | override
    return lambda: kernels.rope(**args)


def _rope_store_kv(**override):
    qkv, positions, cos_sin, k_cache, v_cache, slots = rope_store_kv_inputs(5, 9, 3, 64, torch.float32, "cpu")
    args = dict(qkv=qkv, num_heads=9, num_kv_heads=3, positions=positions, cos_sin=cos_sin, k_cache=k_cache,
                v_cache=v_cache, slots=slots) | override
    return lambda: kernels.rope_store_kv(**args)


BAD_CALLS = {
    "x int": (_norm(x=torch.ones(4, 576, dtype=torch.int32)), "rms_norm: x must be float32"),
    "x 3-D": (_norm(x=randn(2, 4, 576)), "rms_norm: x must be 2-D"),
    "x non-contiguous": (_norm(x=randn(576, 4).t()), "rms_norm: x must be contiguous"),
    "weight dtype": (_norm(weight=randn(576, dtype=torch.float16)),
                     "rms_norm: weight must have the dtype of x (float32), got float16"),
    "weight shape": (_norm(weight=randn(512)),
                     "rms_norm: weight must have shape [hidden]=[576], got [512]"),
    "eps": (_norm(eps=-1.0), "rms_norm: eps must be >= 0"),
    "residual shape": (_add_norm(randn(3, 576)), "add_rms_norm: residual must have the shape of x"),
    "residual dtype": (_add_norm(randn(4, 576, dtype=torch.bfloat16)),
                       "add_rms_norm: residual must have the dtype of x"),
    "q int": (_rope(q=torch.ones(5, 9, 64, dtype=torch.int64)), "rope: q must be float32"),
    "q non-contiguous": (_rope(q=randn(5, 64, 9).transpose(1, 2)), "rope: q must be contiguous"),
    "q odd head_dim": (_rope(q=randn(5, 9, 63), k=randn(5, 3, 63), cos_sin=randn(300, 63)),
                       "rope: q must have an even head_dim"),
    "k dtype": (_rope(k=randn(5, 3, 64, dtype=torch.bfloat16)), "rope: k must have the dtype of q"),
    "k shape": (_rope(k=randn(5, 3, 32)), "rope: k must have shape"),
    "positions dtype": (_rope(positions=torch.zeros(5)),
                        "rope: positions must be int64 (or int32), got float32"),
    "positions shape": (_rope(positions=torch.zeros(4, dtype=torch.int64)),
                        "rope: positions must have shape [num_tokens]=[5], got [4]"),
    "positions range": (_rope(positions=torch.tensor([0, 1, 2, 3, MAX_POSITIONS])),
                        "rope: positions must lie in [0, 257)"),
    "negative position": (_rope(positions=torch.tensor([0, -1, 2, 3, 4])),
                          "rope: positions must lie in [0, 257)"),
    "cos_sin dtype": (_rope(cos_sin=randn(300, 64, dtype=torch.float16)),
                      "rope: cos_sin must be float32"),
    "cos_sin shape": (_rope(cos_sin=randn(300, 32)), "rope: cos_sin must have shape"),
    "qkv 3-D": (_rope_store_kv(qkv=randn(5, 15, 64)), "rope_store_kv: qkv must be 2-D"),
    "qkv width": (_rope_store_kv(num_kv_heads=2), "rope_store_kv: qkv's width 960 must be (num_heads=9"),
    "qkv non-contiguous": (_rope_store_kv(qkv=randn(960, 5).t()), "rope_store_kv: qkv must be contiguous"),
    "rope_store_kv positions": (_rope_store_kv(positions=torch.zeros(4, dtype=torch.int64)),
                                "rope_store_kv: positions must have shape [num_tokens]=[5], got [4]"),
    "rope_store_kv positions range": (_rope_store_kv(positions=torch.tensor([0, 1, 2, 3, MAX_POSITIONS])),
                                      "rope_store_kv: positions must lie in [0, 257)"),
    "k_cache dtype": (_rope_store_kv(k_cache=torch.zeros(2, 29, 3, 64, dtype=torch.float16)),
                      "rope_store_kv: k_cache must have the dtype of qkv (float32), got float16"),
    "k_cache shape": (_rope_store_kv(k_cache=torch.zeros(2, 29, 3, 32)), "rope_store_kv: k_cache must have shape"),
    "v_cache shape": (_rope_store_kv(v_cache=torch.zeros(2, 28, 3, 64)),
                      "rope_store_kv: v_cache must have the shape of k_cache"),
    "slots dtype": (_rope_store_kv(slots=torch.zeros(5)), "rope_store_kv: slots must be int64 (or int32), got float32"),
    "slots shape": (_rope_store_kv(slots=torch.zeros(6, dtype=torch.int64)),
                    "rope_store_kv: slots must have shape [num_tokens]=[5], got [6]"),
    "slots range": (_rope_store_kv(slots=torch.tensor([0, 1, 2, 3, 58])),
                    "rope_store_kv: slots must be < num_slots=58 (or negative: skip), got 58"),
}


@pytest.mark.parametrize("mode", ["compiled", "reference"])
@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_input_names_the_argument(case, mode, kernel_mode):
    kernel_mode(mode)
    call, message = BAD_CALLS[case]
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        call()


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_input_same_message_on_every_backend(case, kernel_mode):
    messages = []
    for mode in ("compiled", "reference"):
        kernel_mode(mode)
        with pytest.raises((RuntimeError, ValueError)) as info:
            BAD_CALLS[case][0]()
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["compiled", "reference"])
def test_device_mismatch_names_the_argument(mode, kernel_mode):
    kernel_mode(mode)
    x = randn(4, 576, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="rms_norm: weight must be on x's device"):
        kernels.rms_norm(x, randn(576), 1e-5)
    q, k, positions, cos_sin = rope_inputs(5, 9, 3, 64, torch.float32, "cuda")
    with pytest.raises((RuntimeError, ValueError), match="rope: positions must be on q's device"):
        kernels.rope(q, k, positions.cpu(), cos_sin)
    with pytest.raises((RuntimeError, ValueError), match="rope: cos_sin must be on q's device"):
        kernels.rope(q, k, positions, cos_sin.cpu())


# ---------------------------------------------------------------------------
# Dispatch, fallback and the build machinery
# ---------------------------------------------------------------------------

def test_set_mode_switches_at_the_next_call(kernel_mode):
    x = randn(3, 64)
    kernel_mode("reference")
    assert kernels.backend_for(x) == "reference" and os.environ[kernels.ENV_VAR] == "reference"
    kernel_mode(None)
    compiled("cpu")
    assert kernels.backend_for(x) == "cpu" and kernels.ENV_VAR not in os.environ
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernel_mode("fast-please")
    assert kernels.mode() == "auto"  # a bad value changed nothing


@pytest.mark.parametrize("value,backend", [("reference", "reference"), ("fast-please", None)])
def test_env_var_is_read_at_the_first_call(value, backend):
    """A fresh process with MINIDEPLOY_KERNELS set (as a shell or a worker starts one)."""
    code = "import torch; from minideploy import kernels; print(kernels.backend_for(torch.zeros(2, 8)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, kernels.ENV_VAR: value})
    if backend is None:
        assert run.returncode != 0 and f"{kernels.ENV_VAR} must be one of" in run.stderr
    else:
        assert run.returncode == 0 and run.stdout.strip() == backend, run.stderr


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken(*args):
        raise build.KernelBuildError("no C++ compiler found (test)")

    monkeypatch.setattr(build, "load", broken)
    build.try_load.cache_clear()
    build.resolved.clear()  # kernels' remembered answers
    try:
        x, weight = randn(3, 64), randn(64)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found") as record:
            assert kernels.backend_for(x) == "reference"
            out = kernels.rms_norm(x, weight, 1e-5)
            kernels.rope(*rope_inputs(3, 9, 3, 64, torch.float32, "cpu"))
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
        assert torch.equal(out, reference.rms_norm(x, weight, 1e-5))
    finally:
        build.try_load.cache_clear()
        build.resolved.clear()


def test_cache_key_changes_with_sources_and_target(tmp_path):
    source = tmp_path / "op.cpp"
    source.write_text("int a;")
    flags = build._flags("cpu", None)
    key = build.build_key([source], "cpu", None, flags)
    assert key == build.build_key([source], "cpu", None, flags)
    assert key != build.build_key([source], "cpu", None, {"extra_cflags": ["-O0"]})
    assert build.build_key([source], "cuda", "sm_80", flags) != build.build_key(
        [source], "cuda", "sm_90", flags)
    (tmp_path / "common.h").write_text("// a header beside the source counts too")
    assert key != build.build_key([source], "cpu", None, flags)
    source.write_text("int b;")
    assert key != build.build_key([source], "cpu", None, flags)
    nested = tmp_path / "cpu" / "op.cpp"  # csrc/cpu/*.cpp include csrc/*.h
    nested.parent.mkdir()
    nested.write_text("int c;")
    before = build.build_key([nested], "cpu", None, flags)
    (tmp_path / "shared.h").write_text("// a header one folder up counts too")
    assert before != build.build_key([nested], "cpu", None, flags)


@pytest.mark.parametrize("device", DEVICES)
def test_build_flags_survive_loading(device):
    """torch appends its libraries to the flag lists it is given; ours must not change."""
    arch = build.cuda_arch(torch.cuda.current_device()) if device == "cuda" else None
    before = build._flags(device, arch)
    build.build_extension(kernels.NORM_ROPE, device, arch)
    assert build._flags(device, arch) == before


def test_stale_lock_from_killed_build_is_removed(caplog):
    compiled("cpu")
    module_name = compiled("cpu").__name__
    lock = build.cache_root() / module_name / "lock"
    lock.touch()  # what a build killed between FileBaton.try_acquire and release leaves
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        module = build.build_extension(kernels.NORM_ROPE, "cpu")
    assert time.monotonic() - start < 120  # torch would have waited for the lock forever
    assert not lock.exists()
    assert "stale build lock" in caplog.text
    x, weight = randn(2, 8), randn(8)
    assert rel_err(module.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)) <= 1e-6


def test_lock_age_decides_without_flock(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    assert not build.clear_stale_lock(tmp_path, have_flock=False)  # young: a build may own it
    old = time.time() - build.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.clear_stale_lock(tmp_path, have_flock=False)
    assert not lock.exists()
