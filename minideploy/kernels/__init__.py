"""Fused kernels: one Python function per op, dispatched on the input's device.

    CUDA tensor -> CUDA extension   (minideploy/csrc/cuda/*.cu)
    CPU tensor  -> CPU extension    (minideploy/csrc/cpu/*.cpp, OpenMP + SIMD)
    otherwise, or if the build fails -> the PyTorch reference (kernels/reference.py),
                                        with one warning saying why

The environment variable MINIDEPLOY_KERNELS, read at the first kernel call, chooses
(`set_mode` switches it later: a notebook cell, a test):
    unset / "auto"  the dispatch above
    "reference"     always the PyTorch reference
    "compiled"      the compiled kernels, raising KernelBuildError if they don't build

On Hopper GPUs the CUDA kernels launch to overlap the kernel before them
(programmatic dependent launch, csrc/cuda/launch.cuh); MINIDEPLOY_PDL=0, read at
every launch, turns that off (for A/B timings).
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

import torch

from minideploy.kernels import build, reference
from minideploy.kernels.build import KernelBuildError, cuda_arch, load, try_load

__all__ = ["rms_norm", "add_rms_norm", "rope", "rope_store_kv", "linear", "linear_tiled", "linear_tile_rows",
           "int8_linear", "w4a16_linear", "w4a16_silu_and_mul",
           "w4a16_linear_tiled", "w4a16_silu_and_mul_tiled", "w4a16_tile_shape", "w4a16_gemv_max_tokens", "read_words",
           "dequantize_w4", "store_kv",
           "decode_attention", "decode_attention_fits", "quantize_kv", "dequantize_kv", "silu_and_mul", "decode_layers", "backend_for", "mode", "set_mode", "KernelBuildError", "reference"]

ENV_VAR = "MINIDEPLOY_KERNELS"
MODES = ("auto", "reference", "compiled")
NORM_ROPE = "norm_rope"  # the extension holding rms_norm, add_rms_norm and rope
LINEAR = "linear"  # the small-batch linear (GEMV), CPU and CUDA
# Above this many tokens a linear is a matrix product with weight reuse: BLAS's job. On 2
# CPU cores the kernel (csrc/cpu/linear.cpp, version 4) beat torch's BLAS at 1-32 tokens on
# the default model's shapes (100-125 vs 20-120 GFLOP/s; the LM head 36-95 vs 6-60) and
# lost to it from 64 on. That machine had AVX2. On one with AVX-512 (a 2-core Xeon, one
# decode step's float32 linears, 30 layers and the LM head), the kernel's 16-lane build
# against torch's BLAS (oneDNN): 24 tokens 69.6 vs 81.2 ms, 28: 74.9 vs 82.3, 32: 68.7 vs
# 73.4, with the 4 x 6 tiles it takes beyond 8 tokens (linear.cpp); its 3 x 8 tiles had lost
# to BLAS from ~26 tokens on (32 tokens, another run: 68.7 vs 57.6 ms).
GEMV_MAX_TOKENS = 32
# bfloat16 on a CPU with AMX (tile matrix units, e.g. Xeon Sapphire Rapids): torch's matmul
# (oneDNN) multiplies bfloat16 tiles there, and beats the kernel's vector FMAs from ~5 tokens
# on. Default model, 2 cores, one decode step's linears summed (30 layers and the LM head):
# 8 tokens 18.3 (kernel) vs 14.2 ms (torch), 16 tokens 38.5 vs 20.4, 32 tokens 76.6 vs 23.4;
# 2 tokens 9.4-11.3 vs 16.9-20.2, 4 tokens 19.3-19.6 vs 19.8-20.1 (a tie).
GEMV_MAX_TOKENS_AMX_BF16 = 4
# On an H100 the CUDA GEMV beat cuBLAS at 1 token (7B decode 163.9 vs 160.1 tok/s) but
# ran at half its speed at 8 (574 vs 1158 tok/s; figures/decode_h100.json and the commit
# that added it): each extra row re-reads activations per weight pack. Batch 1 only, then.
GEMV_MAX_TOKENS_CUDA = 1
W4A16 = "w4a16"  # int4-weight linear: GEMV for decode, dequantize + matmul beyond
# On a GPU up to this many tokens a W4A16 GEMV call (weights dequantized in registers,
# read once for every token); a longer prompt dequantizes the weight once and calls the
# matmul (w4a16_gemv_max_tokens: where, for each device).
W4A16_GEMV_MAX_TOKENS = 16
# On a GPU, up to this many tokens still take the GEMV, 16 at a time: each call reads the
# int4 weights again, fewer bytes than dequantizing them to float16 and reading that back.
# H100, Llama-2-7B shapes (figures/w4a16_h100.json at 0e9f960, where the bound was 64): at
# 32 tokens two GEMV calls took 47-79 us against 84-160 us for dequantize + cuBLAS, at 64
# four took 45-155 us against 35-160 (slower on four shapes of five); 7B decode at batch 32
# 2377 -> 4146 tok/s (figures/decode_h100.json).
W4A16_GEMV_CHUNKED_MAX_TOKENS_CUDA = 48
# On a CPU one call takes up to this many tokens: from 9 on the kernel dequantizes each
# tile of rows once into cache and multiplies every token by it (csrc/cpu/w4a16.cpp), where
# dequantize + matmul converts the whole weight to float32 in memory first. Default model,
# 30 layers' W4 linears, 2 cores (AMD EPYC, AVX2): 32 tokens 87 vs 275 ms, 128: 346 vs
# 512, 256: 693 vs 681 (a tie).
W4A16_GEMV_MAX_TOKENS_CPU = 128
ATTENTION = "attention"  # store_kv and decode_attention
ACTIVATION = "activation"  # silu_and_mul
DECODER = "decoder"  # decode_layers: a decode step's decoder layers in one call (CPU)


_mode: Optional[str] = None  # MINIDEPLOY_KERNELS once read (None: not yet)


def _parse_mode(value: Optional[str]) -> str:
    parsed = (value or "").strip().lower() or "auto"
    if parsed not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)} (or unset), got {parsed!r}")
    return parsed


def mode() -> str:
    """"auto", "reference" or "compiled": MINIDEPLOY_KERNELS, read at the first call.

    Not at every call: a CPU decode step makes ~300 kernel calls, and reading the
    environment each time (~1 us) cost 5% of it."""
    global _mode
    if _mode is None:
        _mode = _parse_mode(os.environ.get(ENV_VAR))
    return _mode


def set_mode(value: Optional[str]) -> None:
    """Use `value`'s kernels from the next call on (None: "auto"). Sets MINIDEPLOY_KERNELS
    too, so that processes started afterwards (tensor-parallel workers) follow."""
    global _mode
    _mode = _parse_mode(value)  # a bad value changes nothing
    if value is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = value


def _extension(name: str, device: torch.device) -> Optional[ModuleType]:
    """The compiled extension for `device`, or None when the reference must be used.

    Remembered per (mode, extension, device): a decode step makes a few hundred kernel
    calls, and resolving each one anew cost ~3 us of a ~20 ms CPU step."""
    key = (mode(), name, device)
    if key in build.resolved:
        return build.resolved[key]
    ext = _resolve(name, device)
    if device.type != "cuda" or device.index is not None:  # "cuda" alone follows the current device
        build.resolved[key] = ext
    return ext


def _resolve(name: str, device: torch.device) -> Optional[ModuleType]:
    if mode() == "reference" or device.type not in ("cpu", "cuda"):
        return None
    arch = None
    if device.type == "cuda":
        arch = cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    if mode() == "compiled":
        return load(name, device.type, arch)
    return try_load(name, device.type, arch)


def backend_for(tensor: torch.Tensor, extension: str = NORM_ROPE) -> str:
    """Which implementation a call on `tensor` uses: "cuda", "cpu" or "reference".

    Builds the extension if needed (to know whether it builds).
    """
    ext = _extension(extension, tensor.device)
    return "reference" if ext is None else tensor.device.type


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: x [num_tokens, hidden], weight [hidden] -> [num_tokens, hidden] (x's dtype)."""
    ext = _extension(NORM_ROPE, x.device)
    if ext is None:
        return reference.rms_norm(x, weight, eps)
    return ext.rms_norm(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + residual; returns (rms_norm(s, weight, eps), s) as new tensors."""
    ext = _extension(NORM_ROPE, x.device)
    if ext is None:
        return reference.add_rms_norm(x, residual, weight, eps)
    return ext.add_rms_norm(x, residual, weight, float(eps))


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (HF rotate_half convention, float32 math); returns new (q, k).

    q [num_tokens, num_heads, head_dim], k [num_tokens, num_kv_heads, head_dim],
    positions [num_tokens] int64 (or int32), cos_sin [max_positions, head_dim]
    float32 = [cos | sin]. On CUDA an out-of-range position is not checked
    (that would synchronise); that token's outputs are NaN.
    """
    ext = _extension(NORM_ROPE, q.device)
    if ext is None:
        return reference.rope(q, k, positions, cos_sin)
    return ext.rope(q, k, positions, cos_sin)


def rope_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rope` and `store_kv` of the qkv projection's output in one call, for a float cache.

    qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] -> (q, k, v): q and k
    rotated (new tensors [num_tokens, heads, head_dim]), v a view of qkv; k and v also
    written to the cache slots (caches [..., num_kv_heads, head_dim] in qkv's dtype, seen
    as [num_slots, ...]; slots [num_tokens], negative: skipped). One kernel instead of two,
    and on a CPU one call instead of the split, reshapes and two calls (~10 us a layer of
    Python). As `rope` and `store_kv`, a GPU does not check positions and slots."""
    ext = _extension(NORM_ROPE, qkv.device)
    if ext is None:
        return reference.rope_store_kv(qkv, num_heads, num_kv_heads, positions, cos_sin, k_cache, v_cache, slots)
    return ext.rope_store_kv(qkv, num_heads, num_kv_heads, positions, cos_sin, k_cache, v_cache, slots)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] @ weight[out, in]^T -> [tokens, out].

    A decode step (a few tokens) uses the GEMV kernels: on the CPU up to 32
    tokens in any float dtype (bfloat16 on an AMX CPU: up to 4); on a GPU one
    token in fp16/bf16 with 16-byte aligned rows (the kernel itself accepts up
    to 8). Everything else is torch's matmul (cuBLAS on a GPU), which is also
    the reference.
    """
    if x.dim() == 2 and _gemv_fits(x, weight):
        ext = _extension(LINEAR, x.device)
        if ext is not None:
            return ext.linear(x.contiguous(), weight)
    return torch.nn.functional.linear(x, weight)


def linear_tile_rows(device: torch.device) -> Optional[int]:
    """Rows per tile of `linear_tiled`'s float32 weight on `device` (the CPU kernel's vector
    width: 16 with AVX-512, else 8), or None where no tiled kernel runs (CUDA, no compiler)."""
    ext = _extension(LINEAR, device) if device.type == "cpu" else None
    return None if ext is None else ext.tile_rows()


def linear_tiled(x: torch.Tensor, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """`linear` of a float32 weight in the CPU kernel's tiles (`reference.tile_rows(weight,
    linear_tile_rows(device))`): up to GEMV_MAX_TOKENS tokens the tiled GEMV
    (csrc/cpu/linear.cpp), more tokens the untiled weight through torch's matmul."""
    ext = _extension(LINEAR, x.device) if x.device.type == "cpu" else None
    if ext is None:
        return torch.nn.functional.linear(x, reference.untile_rows(tiles, out_features))
    if x.dim() == 2 and x.shape[0] <= GEMV_MAX_TOKENS:
        return ext.linear_tiled(x.contiguous(), tiles, out_features)  # checks its inputs
    return torch.nn.functional.linear(x, ext.untile_rows(tiles, out_features))


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] @ (scales[:, None] * qweight)^T: int8 weights, one float32 scale a row.

    On the CPU up to GEMV_MAX_TOKENS tokens run the GEMV kernel (csrc/cpu/linear.cpp);
    everything else is the reference (the weight dequantized, then torch's matmul)."""
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= GEMV_MAX_TOKENS:
        ext = _extension(LINEAR, x.device)
        if ext is not None:
            return ext.linear_int8(x.contiguous(), qweight, scales)
    return reference.int8_linear(x, qweight, scales)


def read_words(data: torch.Tensor) -> torch.Tensor:
    """A kernel that only reads `data`: how fast a memory-bound kernel of that many bytes can
    be at best (bench.timing.add_read_floors). Returns int32 words whose xor is the xor of
    data's 32-bit words (`reference.read_words` of either); CUDA, the reference elsewhere."""
    ext = _extension(LINEAR, data.device) if data.is_cuda else None
    if ext is None:
        return reference.read_words(data)
    return ext.read_words(data)


def _gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        if x.dtype == torch.bfloat16 and _cpu_has_amx():
            return x.shape[0] <= GEMV_MAX_TOKENS_AMX_BF16
        return x.shape[0] <= GEMV_MAX_TOKENS
    return (x.device.type == "cuda" and x.shape[0] <= GEMV_MAX_TOKENS_CUDA and x.is_contiguous()
            and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and weight.is_contiguous() and x.shape[1] % 8 == 0
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


@functools.cache
def _cpu_has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent in some versions
    return bool(check and check())


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor) -> torch.Tensor:
    """x [tokens, K] @ W^T with W stored as int4 (layout: `reference.check_w4a16_args`)."""
    ext = _extension(W4A16, x.device)
    if ext is None:
        return reference.w4a16_linear(x, qweight, scales, zeros)
    if x.dim() == 2 and x.shape[0] <= w4a16_gemv_max_tokens(x.device):
        return _w4a16_gemv(ext.gemv, x, qweight, scales, zeros)  # the kernel checks its inputs
    reference.check_w4a16_args("w4a16_linear", qweight, scales, zeros, x)
    return torch.nn.functional.linear(x, ext.dequantize(qweight, scales, zeros))


def w4a16_silu_and_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a W4A16 [gate | up] linear: x [tokens, K] -> [tokens, out / 2].

    The GEMV computes it in its epilogue: on a GPU a block holds 8 gate rows and their 8
    up rows (one kernel a layer fewer, and no [tokens, out] intermediate); on a CPU the
    call applies silu_and_mul's loop to its output (one call a layer fewer). Above the
    GEMV's token bound, w4a16_linear then silu_and_mul; the same roundings everywhere."""
    ext = _extension(W4A16, x.device)
    if ext is None:
        return reference.w4a16_silu_and_mul(x, qweight, scales, zeros)
    if x.dim() == 2 and x.shape[0] <= w4a16_gemv_max_tokens(x.device):
        return _w4a16_gemv(ext.gemv, x, qweight, scales, zeros, gated=True)
    return silu_and_mul(w4a16_linear(x, qweight, scales, zeros))


def w4a16_gemv_max_tokens(device: torch.device) -> int:
    """The most tokens the W4A16 kernels take on `device`; more dequantize + matmul."""
    return W4A16_GEMV_CHUNKED_MAX_TOKENS_CUDA if device.type == "cuda" else W4A16_GEMV_MAX_TOKENS_CPU


def _w4a16_gemv(gemv, x: torch.Tensor, *weight, **gated: bool) -> torch.Tensor:
    """An extension's GEMV over x's rows; on a GPU W4A16_GEMV_MAX_TOKENS at a time."""
    x = x.contiguous()
    if not x.is_cuda or x.shape[0] <= W4A16_GEMV_MAX_TOKENS:  # no split: ~4 us a call
        return gemv(x, *weight, **gated)
    return torch.cat([gemv(part, *weight, **gated) for part in x.split(W4A16_GEMV_MAX_TOKENS)])


def w4a16_tile_shape(device: torch.device) -> Optional[tuple[int, int]]:
    """(rows R, words C) of the tiles the W4A16 GEMV reads on `device` (`reference.tile_rows`):
    the CPU kernel's vector width (16 with AVX-512, else 8) by 1 word; CUDA's mma tile, 16 by
    16 (a k-step); None without the kernel."""
    ext = _extension(W4A16, device)
    return None if ext is None else tuple(ext.tile_shape())


def w4a16_linear_tiled(x: torch.Tensor, qtiles: torch.Tensor, stiles: torch.Tensor, ztiles: torch.Tensor,
                       out_features: int) -> torch.Tensor:
    """`w4a16_linear` of a weight in the kernel's tiles of rows (`w4a16_tile_shape`): the
    GEMV's token bound as in `w4a16_linear`; more tokens dequantize and matmul."""
    ext = _extension(W4A16, x.device)
    if ext is None:
        return reference.w4a16_linear_tiled(x, qtiles, stiles, ztiles, out_features)
    if x.dim() == 2 and x.shape[0] <= w4a16_gemv_max_tokens(x.device):
        return _w4a16_gemv(ext.gemv_tiled, x, qtiles, stiles, ztiles, out_features)  # checks its inputs
    reference.check_w4a16_tiled_args("w4a16_linear_tiled", qtiles, stiles, ztiles, out_features, x)
    return w4a16_linear(x, *reference.untile_w4a16(qtiles, stiles, ztiles, out_features))


def w4a16_silu_and_mul_tiled(x: torch.Tensor, qtiles: torch.Tensor, stiles: torch.Tensor,
                             ztiles: torch.Tensor, out_features: int) -> torch.Tensor:
    """`w4a16_silu_and_mul` of a [gate | up] weight in the kernel's tiles."""
    ext = _extension(W4A16, x.device)
    if ext is None:
        return reference.w4a16_silu_and_mul_tiled(x, qtiles, stiles, ztiles, out_features)
    if x.dim() == 2 and x.shape[0] <= w4a16_gemv_max_tokens(x.device):
        return _w4a16_gemv(ext.gemv_tiled, x, qtiles, stiles, ztiles, out_features, gated=True)
    return silu_and_mul(w4a16_linear_tiled(x, qtiles, stiles, ztiles, out_features))


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] (scales' dtype) of a W4A16 linear."""
    ext = _extension(W4A16, qweight.device)
    if ext is None:
        return reference.dequantize_w4(qweight, scales, zeros)
    return ext.dequantize(qweight, scales, zeros)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, k_params: Optional[torch.Tensor] = None,
             v_params: Optional[torch.Tensor] = None) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into cache slots, in place (one launch).

    The caches (contiguous, any leading dims) are seen as [num_slots, num_kv_heads, width];
    slots [num_tokens] int64 or int32, a negative slot is skipped (padding). Rows of k and v
    must be contiguous; the stride between rows is free (v may be a slice of the qkv output).
    Float cache: k's dtype, width = head_dim. Quantized cache (quant_policy 8 / 4): pass
    k_params, v_params float32 [..., num_kv_heads, 2]; the caches are uint8 with width
    head_dim (int8) or head_dim / 2 (int4), and each row is quantized on the way in
    (`reference.quantize_kv`: asymmetric, per token and head).
    On CUDA an out-of-range slot is not checked (that would synchronise): it is skipped.
    """
    ext = _extension(ATTENTION, k.device)
    if ext is None:
        reference.store_kv(k, v, k_cache, v_cache, slots, k_params, v_params)
    else:
        ext.store_kv(k, v, k_cache, v_cache, slots, k_params, v_params)


# Pure functions (no kernel): quantize rows of K/V, and dequantize gathered cache blocks
# (the prefill path runs SDPA over them).
quantize_kv = reference.quantize_kv
dequantize_kv = reference.dequantize_kv


def decode_attention_fits(head_dim: int) -> bool:
    """Whether decode_attention takes heads of this size (on every backend)."""
    return 0 < head_dim <= reference.MAX_HEAD_DIM and head_dim % reference.HEAD_DIM_MULTIPLE == 0


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     k_params: Optional[torch.Tensor] = None,
                     v_params: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged cache -> [batch, num_heads, head_dim].

    q [batch, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim]
    in q's dtype, or quantized: uint8 [..., head_dim] (int8) / [..., head_dim / 2] (int4)
    with k_params, v_params float32 [num_blocks, block_size, num_kv_heads, 2] (scale, zero),
    dequantized in the kernel. block_tables [batch, max_blocks] int32; context_lens [batch]
    int32 (keys 0..len-1). Float32 softmax; GQA. On CUDA nothing depends on the host value
    of context_lens (CUDA graphs replay it); a bad length or block id gives NaN there
    instead of an error.
    """
    ext = _extension(ATTENTION, q.device)
    if ext is None:
        return reference.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                          k_params, v_params)
    return ext.decode_attention(q, k_cache, v_cache, block_tables, context_lens, float(scale),
                                k_params, v_params)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [num_tokens, 2 * I] = [gate | up] -> silu(gate) * up [num_tokens, I], in one pass."""
    ext = _extension(ACTIVATION, gate_up.device)
    if ext is None:
        return reference.silu_and_mul(gate_up)
    return ext.silu_and_mul(gate_up)


def decode_layers(h: torch.Tensor, norms: list[torch.Tensor], caches: list[torch.Tensor],
                  linears: list[list[torch.Tensor]], out_features: list[int], positions: torch.Tensor,
                  slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  cos_sin: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float,
                  scale: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A decode step's decoder layers in one call from Python: (h, residual) after the last
    layer, or None where this cannot run (not a CPU; a kernel not built; mode "reference"),
    and the model's own Python loop then runs them (csrc/cpu/decoder.cpp says what it does,
    and calls the same kernels: the outputs are the loop's bit for bit).

    Per layer: norms (attention's, the MLP's), caches (K and V blocks), four linears (qkv, o,
    gate_up, down), each its float32 tiles or its int4 tiles, scales and zeros, and their
    out_features. Why: between the ~250 kernel calls of a batch-1 step Python ran for about a
    third of it (default model, W4 + int8 head, 2 cores in a slow phase: 6.3 of 17.3-20.7 ms a
    token, timed with the kernels replaced by stubs that return cached outputs). The step with
    this call against the Python loop in the same run: figures/decode_cpu.json
    (native_w4_int8_head, native_w4_int8_head_python_loop: 1.30x there; 1.27x, 1.42x in runs before).
    Gathering the tensors costs the model ~0.16 ms a step (LlamaModel._decode_layers_in_one_call)."""
    if h.device.type != "cpu":
        return None
    runner = _extension(DECODER, h.device)
    modules = [_extension(name, h.device) for name in (NORM_ROPE, ATTENTION, LINEAR, W4A16, ACTIVATION)]
    if runner is None or None in modules:
        return None
    return runner.decode_layers(h, norms, caches, linears, out_features, positions, slots, block_tables,
                                context_lens, cos_sin, num_heads, num_kv_heads, float(eps), float(scale),
                                [m.__name__ for m in modules])
