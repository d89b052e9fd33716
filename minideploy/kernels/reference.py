"""Pure-PyTorch references: the specification of every kernel.

Each function here is what the compiled kernels in `minideploy/csrc/` must
compute. They are written the way Hugging Face's Llama writes them
(`LlamaRMSNorm`, `apply_rotary_pos_emb`), operation for operation, so that in
float32 the reference is bit-for-bit what Hugging Face computes. The `check_*`
functions are the input contract; the C++ launchers enforce the same contract
with `TORCH_CHECK`s and the same messages, so a bad call reads the same on
every backend.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POSITION_DTYPES = (torch.int64, torch.int32)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> "float32" (the C++ launchers print the same names)."""
    return str(dtype).removeprefix("torch.")


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape)).replace(" ", "")


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_float(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(f"{op}: {arg} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")


def _check_like(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    """`t` must share `ref`'s dtype and device."""
    if t.dtype != ref.dtype:
        _fail(f"{op}: {arg} must have the dtype of {ref_arg} ({dtype_name(ref.dtype)}), "
              f"got {dtype_name(t.dtype)}")
    if t.device != ref.device:
        _fail(f"{op}: {arg} must be on {ref_arg}'s device {ref.device}, got {t.device}")


def _check_contiguous(op: str, arg: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        _fail(f"{op}: {arg} must be contiguous (call .contiguous() first)")


def check_rms_norm_args(op: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    _check_float(op, "x", x)
    if x.dim() != 2:
        _fail(f"{op}: x must be 2-D [num_tokens, hidden], got shape {_shape(x)}")
    if x.shape[1] == 0:
        _fail(f"{op}: x must have hidden > 0, got shape {_shape(x)}")
    _check_contiguous(op, "x", x)
    _check_like(op, "weight", weight, "x", x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        _fail(f"{op}: weight must have shape [hidden]=[{x.shape[1]}], got {_shape(weight)}")
    _check_contiguous(op, "weight", weight)
    if not eps >= 0.0:
        _fail(f"{op}: eps must be >= 0, got {eps:g}")


def check_rope_args(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor) -> None:
    op = "rope"
    _check_float(op, "q", q)
    if q.dim() != 3:
        _fail(f"{op}: q must be 3-D [num_tokens, num_heads, head_dim], got shape {_shape(q)}")
    head_dim = q.shape[2]
    if head_dim % 2 != 0:
        _fail(f"{op}: q must have an even head_dim, got shape {_shape(q)}")
    _check_contiguous(op, "q", q)
    _check_like(op, "k", k, "q", q)
    if k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != head_dim:
        _fail(f"{op}: k must have shape [num_tokens, num_kv_heads, head_dim]="
              f"[{q.shape[0]},*,{head_dim}], got {_shape(k)}")
    _check_contiguous(op, "k", k)
    _check_positions(op, "q", q, positions, cos_sin, head_dim)


def _check_positions(op: str, ref_arg: str, ref: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, head_dim: int) -> None:
    """positions [num_tokens] and cos_sin [max_positions, head_dim] for the rows of `ref`."""
    if positions.dtype not in POSITION_DTYPES:
        _fail(f"{op}: positions must be int64 (or int32), got {dtype_name(positions.dtype)}")
    if positions.device != ref.device:
        _fail(f"{op}: positions must be on {ref_arg}'s device {ref.device}, got {positions.device}")
    if positions.dim() != 1 or positions.shape[0] != ref.shape[0]:
        _fail(f"{op}: positions must have shape [num_tokens]=[{ref.shape[0]}], got {_shape(positions)}")
    _check_contiguous(op, "positions", positions)
    if cos_sin.dtype != torch.float32:
        _fail(f"{op}: cos_sin must be float32, got {dtype_name(cos_sin.dtype)}")
    if cos_sin.device != ref.device:
        _fail(f"{op}: cos_sin must be on {ref_arg}'s device {ref.device}, got {cos_sin.device}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim:
        _fail(f"{op}: cos_sin must have shape [max_positions, head_dim]=[*,{head_dim}], "
              f"got {_shape(cos_sin)}")
    _check_contiguous(op, "cos_sin", cos_sin)
    # Checking the range needs the values on the host; on a GPU that would be a
    # synchronisation, so only CPU tensors are checked (as the C++ kernels do).
    if positions.device.type == "cpu" and positions.numel() > 0:
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cos_sin.shape[0]:
            bad = lo if lo < 0 else hi
            _fail(f"{op}: positions must lie in [0, {cos_sin.shape[0]}) (the rows of cos_sin), "
                  f"got {bad}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, exactly as Hugging Face's LlamaRMSNorm.

    x [num_tokens, hidden], weight [hidden] -> [num_tokens, hidden] in x's dtype.
    """
    check_rms_norm_args("rms_norm", x, weight, eps)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)       # [num_tokens, 1]
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: s = x + residual (in x's dtype); returns (rms_norm(s), s)."""
    op = "add_rms_norm"
    check_rms_norm_args(op, x, weight, eps)
    _check_like(op, "residual", residual, "x", x)
    if residual.shape != x.shape:
        _fail(f"{op}: residual must have the shape of x {_shape(x)}, got {_shape(residual)}")
    _check_contiguous(op, "residual", residual)
    s = x + residual
    input_dtype = s.dtype
    h = s.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)       # [num_tokens, 1]
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype), s


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [num_tokens, heads, head_dim]; cos, sin [num_tokens, 1, head_dim // 2] float32.
    # Hugging Face computes x * cat(cos, cos) + rotate_half(x) * cat(sin, sin);
    # per half that is exactly the two lines below (negation is exact).
    xf = x.to(torch.float32)
    x1, x2 = xf.chunk(2, dim=-1)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    return torch.cat((out1, out2), dim=-1).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding, Hugging Face "rotate_half" convention, in float32.

    q [num_tokens, num_heads, head_dim], k [num_tokens, num_kv_heads, head_dim],
    positions [num_tokens] (int64 or int32), cos_sin [max_positions, head_dim]
    float32 holding cos in [:, :head_dim // 2] and sin in [:, head_dim // 2:].
    Returns new tensors (q_out, k_out) in q's dtype.
    """
    check_rope_args(q, k, positions, cos_sin)
    cos, sin = cos_sin[positions.long()].unsqueeze(1).chunk(2, dim=-1)  # [num_tokens, 1, head_dim // 2]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def check_rope_store_kv_args(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor,
                             cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slots: torch.Tensor) -> int:
    """The input contract of rope_store_kv; returns head_dim."""
    op = "rope_store_kv"
    _check_float(op, "qkv", qkv)
    if qkv.dim() != 2:
        _fail(f"{op}: qkv must be 2-D [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], "
              f"got shape {_shape(qkv)}")
    heads = num_heads + 2 * num_kv_heads
    if num_heads <= 0 or num_kv_heads <= 0 or qkv.shape[1] <= 0 or qkv.shape[1] % heads or qkv.shape[1] // heads % 2:
        _fail(f"{op}: qkv's width {qkv.shape[1]} must be (num_heads={num_heads} + 2 * "
              f"num_kv_heads={num_kv_heads}) * an even head_dim > 0")
    _check_contiguous(op, "qkv", qkv)
    head_dim = qkv.shape[1] // heads
    _check_positions(op, "qkv", qkv, positions, cos_sin, head_dim)
    _check_like(op, "k_cache", k_cache, "qkv", qkv)
    _check_caches(op, k_cache, v_cache, num_kv_heads, head_dim)
    _check_slots(op, "qkv", qkv, slots, k_cache.numel() // (num_kv_heads * head_dim))
    return head_dim


def rope_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention's step after the qkv projection, for a float cache: qkv [num_tokens,
    (num_heads + 2 num_kv_heads) head_dim] -> (q, k) rotated by `rope` ([num_tokens, heads,
    head_dim], new tensors) and v (a view of qkv); k and v written to the cache slots as
    `store_kv` writes them (slots[i] < 0: skipped)."""
    head_dim = check_rope_store_kv_args(qkv, num_heads, num_kv_heads, positions, cos_sin, k_cache, v_cache, slots)
    q, k, v = qkv.split_with_sizes([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k = rope(q.reshape(-1, num_heads, head_dim).contiguous(), k.reshape(-1, num_kv_heads, head_dim).contiguous(),
                positions, cos_sin)
    v = v.view(-1, num_kv_heads, head_dim)
    store_kv(k, v, k_cache, v_cache, slots)
    return q, k, v


# --- W4A16: int4 weights, float activations (chapter 3) --------------------------------
#
# The kernel layout of a quantized nn.Linear [N out, K in] with groups of g input features:
#     qweight [N, K / 8] int32   word j of row n holds weights k = 8j .. 8j+7, nibble i
#                                holding k = 8j + W4_ORDER[i] (AutoAWQ's interleave, along K)
#     scales  [N, K / g]         x's dtype
#     zeros   [N, K / g]         x's dtype, integer values (the zero point)
#     w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]
# g must be a multiple of 32 (one 16-byte load of a row never straddles two groups).
W4_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
W4_GROUP_MULTIPLE = 32


def _check_groups_and_x(op: str, names: tuple[str, str, str], packed: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, k: int, shape_ok: bool, want: str, x: torch.Tensor | None) -> None:
    """The checks both W4 layouts share, with their argument names: scales and zeros of groups
    along in_features = k (shape_ok: scales has the layout's shape `want`), the three tensors
    contiguous on one device, then x [tokens, k] if given."""
    packed_arg, scales_arg, zeros_arg = names
    _check_float(op, scales_arg, scales)
    groups = scales.shape[1] if scales.dim() >= 2 else 0
    if not shape_ok or groups == 0 or k % groups:
        _fail(f"{op}: {scales_arg} must have shape {want} with groups dividing in_features={k}, "
              f"got {_shape(scales)}")
    if (k // groups) % W4_GROUP_MULTIPLE:
        _fail(f"{op}: group size {k // groups} (in_features {k} / {groups} groups) must be a "
              f"multiple of {W4_GROUP_MULTIPLE}")
    _check_like(op, zeros_arg, zeros, scales_arg, scales)
    if zeros.shape != scales.shape:
        _fail(f"{op}: {zeros_arg} must have the shape of {scales_arg} {_shape(scales)}, got {_shape(zeros)}")
    if packed.device != scales.device:
        _fail(f"{op}: {packed_arg} must be on {scales_arg}' device {scales.device}, got {packed.device}")
    for arg, t in zip(names, (packed, scales, zeros)):
        _check_contiguous(op, arg, t)
    if x is not None:
        _check_like(op, "x", x, scales_arg, scales)
        if x.dim() != 2 or x.shape[1] != k:
            _fail(f"{op}: x must be 2-D [tokens, in_features={k}], got shape {_shape(x)}")
        _check_contiguous(op, "x", x)


def check_w4a16_args(op: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     x: torch.Tensor | None = None) -> None:
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        _fail(f"{op}: qweight must be 2-D int32 [out_features, in_features / 8], "
              f"got {dtype_name(qweight.dtype)} {_shape(qweight)}")
    n, k = qweight.shape[0], qweight.shape[1] * 8
    _check_groups_and_x(op, ("qweight", "scales", "zeros"), qweight, scales, zeros, k,
                        scales.dim() == 2 and scales.shape[0] == n, f"[out_features={n}, groups]", x)


def unpack_w4(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K / 8] int32 words → [N, K] int32 values 0..15 in k order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (qweight[..., None] >> shifts) & 0xF  # [N, K/8, 8], nibble order
    inverse = [W4_ORDER.index(i) for i in range(8)]
    return nibbles[..., inverse].reshape(qweight.shape[0], -1)


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] (scales' dtype) that a W4A16 linear multiplies by."""
    check_w4a16_args("dequantize_w4", qweight, scales, zeros)
    q = unpack_w4(qweight).float()
    n, k = q.shape
    groups = scales.shape[1]
    w = (q.view(n, groups, -1) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(n, k).to(scales.dtype)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequantize_w4(...)^T → [M, N] in x's dtype."""
    check_w4a16_args("w4a16_linear", qweight, scales, zeros, x)
    return torch.nn.functional.linear(x, dequantize_w4(qweight, scales, zeros))


# --- W4A16 in tiles of rows: each kernel's own layout ---------------------------------
#
# A kernel reads R rows of the weight together: the CPU kernel's vector lanes are R
# adjacent rows (R = 16 with AVX-512, else 8), the CUDA kernel's mma tile is 16 rows. In
# the layout above those rows lie K / 2 bytes apart; rearranged once (at load, as
# TurboMind converts weights for its kernels) a tile's loads are contiguous:
#     qtiles [ceil(N / R), K / (8 C), R * C]    qtiles[t, s, r * C + c] = qweight[t * R + r, s * C + c]
#     stiles, ztiles [ceil(N / R), K / g, R]    stiles[t, j, r] = scales[t * R + r, j]
# C is the words of a row kept together: 1 on the CPU (word j of the R rows is one vector),
# 16 on CUDA (a k-step of 128 weights: a warp's load reads 512 contiguous bytes, 8 rows x
# 64, where the shared layout gives it 64 bytes from each of 8 rows). Each device's kernel
# says its (R, C): `kernels.w4a16_tile_shape`. Rows past N are zero (computed, never
# written out).

def tile_rows(t: torch.Tensor, rows: int, cols: int = 1) -> torch.Tensor:
    """[N, K] → [ceil(N / rows), K / cols, rows * cols]: runs of `cols` columns of the
    tile's rows side by side, zero-padded to whole tiles; cols must divide K."""
    if t.shape[1] % cols:
        raise ValueError(f"tile_rows: {cols}-column runs do not divide a row of {t.shape[1]}")
    padded = torch.cat([t, t.new_zeros(-t.shape[0] % rows, t.shape[1])])
    runs = padded.view(-1, rows, t.shape[1] // cols, cols).transpose(1, 2)
    return runs.reshape(runs.shape[0], runs.shape[1], rows * cols).contiguous()


def untile_rows(tiles: torch.Tensor, n: int, rows: int | None = None) -> torch.Tensor:
    """`tile_rows`' inverse: the first n rows [n, K] (rows: per tile, default the last dim's)."""
    rows = rows or tiles.shape[2]
    runs = tiles.view(tiles.shape[0], tiles.shape[1], rows, -1).transpose(1, 2)
    return runs.reshape(tiles.shape[0] * rows, -1)[:n].contiguous()


def untile_w4a16(qtiles: torch.Tensor, stiles: torch.Tensor, ztiles: torch.Tensor,
                 n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scales, zeros) in the shared layout from their tiles (R: stiles' last dim)."""
    rows = stiles.shape[2]
    return untile_rows(qtiles, n, rows), untile_rows(stiles, n), untile_rows(ztiles, n)


def check_w4a16_tiled_args(op: str, qtiles: torch.Tensor, stiles: torch.Tensor, ztiles: torch.Tensor,
                           n: int, x: torch.Tensor) -> None:
    """The checks of `check_w4a16_args`, on tiles of any shape (R from stiles' last dim)."""
    if qtiles.dtype != torch.int32 or qtiles.dim() != 3:
        _fail(f"{op}: qtiles must be 3-D int32 [tiles, in_features / (8 C), R * C] (tiles of R rows "
              f"and C words), got {dtype_name(qtiles.dtype)} {_shape(qtiles)}")
    rows = stiles.shape[2] if stiles.dim() == 3 and stiles.shape[2] else qtiles.shape[2]
    if qtiles.shape[2] % rows:
        _fail(f"{op}: qtiles' last dim {qtiles.shape[2]} must be a multiple of the {rows} rows a tile "
              f"of stiles has")
    tiles, k = qtiles.shape[0], qtiles.shape[1] * qtiles.shape[2] // rows * 8
    if n <= 0 or -(-n // rows) != tiles:
        _fail(f"{op}: out_features={n} needs {-(-max(n, 0) // rows)} tiles of {rows} rows, qtiles has {tiles}")
    _check_groups_and_x(op, ("qtiles", "stiles", "ztiles"), qtiles, stiles, ztiles, k,
                        stiles.dim() == 3 and stiles.shape[0] == tiles and stiles.shape[2] == rows,
                        f"[tiles={tiles}, groups, {rows}]", x)


def w4a16_linear_tiled(x: torch.Tensor, qtiles: torch.Tensor, stiles: torch.Tensor, ztiles: torch.Tensor,
                       n: int) -> torch.Tensor:
    """`w4a16_linear` of the weight whose first n rows the tiles hold."""
    check_w4a16_tiled_args("w4a16_linear_tiled", qtiles, stiles, ztiles, n, x)
    return w4a16_linear(x, *untile_w4a16(qtiles, stiles, ztiles, n))


def w4a16_silu_and_mul_tiled(x: torch.Tensor, qtiles: torch.Tensor, stiles: torch.Tensor,
                             ztiles: torch.Tensor, n: int) -> torch.Tensor:
    """`w4a16_silu_and_mul` of a [gate | up] weight of n rows in tiles."""
    return silu_and_mul(w4a16_linear_tiled(x, qtiles, stiles, ztiles, n))


# --- int8 linear (the LM head in int8) -----------------------------------------------
#
# qweight [N, K] int8, scales [N] float32: w[n, k] = qweight[n, k] * scales[n]
# (symmetric, one scale per output row); x [M, K] in any float dtype.

def check_int8_linear_args(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    op = "linear_int8"
    _check_float(op, "x", x)
    if x.dim() != 2:
        _fail(f"{op}: x must be 2-D [tokens, in_features], got {x.dim()}-D")
    if qweight.dtype != torch.int8:
        _fail(f"{op}: qweight must be int8, got {dtype_name(qweight.dtype)}")
    if qweight.dim() != 2 or qweight.shape[1] != x.shape[1]:
        _fail(f"{op}: weight must have shape [out_features, in_features={x.shape[1]}], "
              f"got {_shape(qweight)}")
    if scales.dtype != torch.float32 or scales.dim() != 1 or scales.shape[0] != qweight.shape[0]:
        _fail(f"{op}: scales must be float32 [out_features={qweight.shape[0]}], "
              f"got {dtype_name(scales.dtype)} {_shape(scales)}")


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (scales[:, None] * qweight)^T → [M, N] in x's dtype: float32 sums, then the scale."""
    check_int8_linear_args(x, qweight, scales)
    return (torch.nn.functional.linear(x.float(), qweight.float()) * scales).to(x.dtype)


# --- KV cache writes and decode attention --------------------------------------------
#
# A KV cache is seen by the kernels as slots: [num_slots, num_kv_heads, head_dim], any
# leading dims flattened (the contiguous KVCache's layer [max_batch, max_seq_len, ...] has
# slot = row * max_seq_len + position; a paged cache [num_blocks, block_size, ...] has
# slot = block * block_size + offset). Decode attention reads it as blocks
# [num_blocks, block_size, num_kv_heads, head_dim] through a block table: token t of
# sequence b sits in block block_tables[b, t // block_size], at offset t % block_size.
SLOT_DTYPES = (torch.int64, torch.int32)
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8


def _strides(t: torch.Tensor) -> str:
    return str(list(t.stride())).replace(" ", "")


def _rows_contiguous(t: torch.Tensor) -> bool:
    """t [n, a, b] with every t[i] contiguous (the stride between the t[i] is free)."""
    return (t.shape[2] <= 1 or t.stride(2) == 1) and (t.shape[1] <= 1 or t.stride(1) == t.shape[2])


# --- KV-cache quantization (LMDeploy's quant_policy) ----------------------------------
#
# quant_policy 8 stores each K/V element as one uint8 code, 4 as a nibble (two codes a
# byte: element 2i in the low nibble, 2i+1 in the high one). Asymmetric, per token and
# KV head: one (scale, zero) pair in float32 for each row of head_dim values, with
#     zero = min(x), scale = (max(x) - min(x)) / (2^bits - 1),
#     q = clamp(round((x - zero) / scale), 0, 2^bits - 1)    (q = 0 when scale == 0),
#     x ~= q * scale + zero.
# A cache row is then head_dim bytes (int8) or head_dim / 2 bytes (int4), and the
# parameters live beside the cache as [..., num_kv_heads, 2] float32 = (scale, zero).
# Which policy a cache holds follows from its last dim: head_dim -> 8, head_dim / 2 -> 4.
KV_QUANT_POLICIES = (0, 8, 4)  # 0: the cache in the activations' float dtype


def kv_cache_width(head_dim: int, quant_policy: int = 0) -> int:
    """The last dim of a KV cache of heads of `head_dim` under `quant_policy` (0, 8 or 4)."""
    if quant_policy not in KV_QUANT_POLICIES:
        raise ValueError(f"quant_policy must be one of {KV_QUANT_POLICIES}, got {quant_policy}")
    if quant_policy == 4:
        if head_dim % 2:
            raise ValueError(f"quant_policy 4 (int4) needs an even head_dim, got {head_dim}")
        return head_dim // 2
    return head_dim


def _kv_bits(width: int, head_dim: int) -> int:
    """8 or 4 for a quantized cache whose last dim is `width`; 0 if it fits neither."""
    if width == head_dim:
        return 8
    if head_dim % 2 == 0 and width == head_dim // 2:
        return 4
    return 0


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes uint8 [..., head_dim] (bits 8) or [..., head_dim // 2]
    (bits 4, packed), params float32 [..., 2] = (scale, zero)), per row of head_dim values.

    Float32 math in this order (the kernels repeat it, so codes match bit for bit):
    scale = (max - min) / (2^bits - 1); q = round_half_even((x - min) / scale), clamped.
    """
    if bits not in (8, 4):
        raise ValueError(f"quantize_kv: bits must be 8 or 4, got {bits}")
    if x.dim() == 0 or x.shape[-1] == 0 or (bits == 4 and x.shape[-1] % 2):
        raise ValueError(f"quantize_kv: x must have a non-empty last dim (even for 4 bits), "
                         f"got shape {_shape(x)}")
    qmax = float(2**bits - 1)
    xf = x.float()
    lo = xf.amin(-1, keepdim=True)                                        # [..., 1]
    # A tensor divisor: torch turns division by a Python number into a multiplication by
    # its reciprocal on some devices, which rounds differently from the kernels' division.
    scale = (xf.amax(-1, keepdim=True) - lo) / torch.full_like(lo, qmax)  # [..., 1]
    q = torch.where(scale > 0, (xf - lo) / scale, 0.0).round_().clamp_(0.0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)                            # [..., head_dim // 2]
    return q, torch.cat([scale, lo], dim=-1)


def dequantize_kv(cache: torch.Tensor, params: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Codes [..., head_dim] (int8) or [..., head_dim // 2] (int4) and params [..., 2]
    -> float32 [..., head_dim] = code * scale + zero (two roundings, as the kernels)."""
    bits = _kv_bits(cache.shape[-1], head_dim) if cache.dim() else 0
    if cache.dtype != torch.uint8 or not bits:
        _fail(f"dequantize_kv: cache must be uint8 [..., head_dim] or [..., head_dim // 2] with "
              f"head_dim={head_dim}, got {dtype_name(cache.dtype)} {_shape(cache)}")
    if params.dtype != torch.float32 or tuple(params.shape) != (*cache.shape[:-1], 2):
        expect = str([*cache.shape[:-1], 2]).replace(" ", "")
        _fail(f"dequantize_kv: params must be float32 {expect}, got {dtype_name(params.dtype)} {_shape(params)}")
    codes = cache
    if bits == 4:
        codes = torch.stack([cache & 0xF, cache >> 4], dim=-1).flatten(-2)  # [..., head_dim]
    return codes.float() * params[..., 0, None] + params[..., 1, None]


def _kv_cache_bits(op: str, head_arg: str, head: torch.Tensor, k_cache: torch.Tensor,
                   k_params: torch.Tensor | None, v_params: torch.Tensor | None) -> int:
    """The cache's dtype and last dim; returns 0 (a float cache), 8 or 4 (quantized)."""
    if (k_params is None) != (v_params is None):
        _fail(f"{op}: k_params and v_params must be given together (a quantized cache) "
              "or both left out (a float cache)")
    if k_params is None:
        _check_like(op, "k_cache", k_cache, head_arg, head)
        return 0
    head_dim = head.shape[-1]
    if k_cache.dtype != torch.uint8:
        _fail(f"{op}: k_cache must be uint8 for a quantized cache (k_params given), "
              f"got {dtype_name(k_cache.dtype)}")
    if k_cache.device != head.device:
        _fail(f"{op}: k_cache must be on {head_arg}'s device {head.device}, got {k_cache.device}")
    width = k_cache.shape[-1] if k_cache.dim() else -1
    if head_dim % 2 and width != head_dim and width in (head_dim // 2, head_dim // 2 + 1):
        _fail(f"{op}: {head_arg} must have an even head_dim for an int4 cache, got shape {_shape(head)}")
    bits = _kv_bits(width, head_dim)
    if not bits:
        _fail(f"{op}: k_cache must have a last dim of head_dim={head_dim} (int8) or head_dim/2="
              f"{head_dim // 2} (int4) for a quantized cache, got shape {_shape(k_cache)}")
    return bits


def _check_kv_params(op: str, head_arg: str, head: torch.Tensor, k_cache: torch.Tensor,
                     k_params: torch.Tensor, v_params: torch.Tensor) -> None:
    """(scale, zero) per cache row: float32 [*k_cache.shape[:-1], 2], contiguous."""
    expect = str([*k_cache.shape[:-1], 2]).replace(" ", "")
    for arg, t in (("k_params", k_params), ("v_params", v_params)):
        if t.dtype != torch.float32:
            _fail(f"{op}: {arg} must be float32, got {dtype_name(t.dtype)}")
        if t.device != head.device:
            _fail(f"{op}: {arg} must be on {head_arg}'s device {head.device}, got {t.device}")
        if _shape(t) != expect:
            _fail(f"{op}: {arg} must have shape {expect} (k_cache's leading dims, then scale and "
                  f"zero), got {_shape(t)}")
        _check_contiguous(op, arg, t)


# --- KV cache writes and decode attention ---------------------------------------------

def check_store_kv_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slots: torch.Tensor, k_params: torch.Tensor | None = None,
                        v_params: torch.Tensor | None = None) -> int:
    """The input contract of store_kv; returns the cache's bits (0: float, 8 or 4)."""
    op = "store_kv"
    _check_float(op, "k", k)
    if k.dim() != 3:
        _fail(f"{op}: k must be 3-D [num_tokens, num_kv_heads, head_dim], got shape {_shape(k)}")
    if not _rows_contiguous(k):
        _fail(f"{op}: k must have contiguous rows (strides [*, head_dim, 1]), got strides {_strides(k)}")
    _check_like(op, "v", v, "k", k)
    if v.shape != k.shape:
        _fail(f"{op}: v must have the shape of k {_shape(k)}, got {_shape(v)}")
    if not _rows_contiguous(v):
        _fail(f"{op}: v must have contiguous rows (strides [*, head_dim, 1]), got strides {_strides(v)}")
    bits = _kv_cache_bits(op, "k", k, k_cache, k_params, v_params)
    width = k.shape[2] // 2 if bits == 4 else k.shape[2]
    _check_caches(op, k_cache, v_cache, k.shape[1], width)
    if bits:
        _check_kv_params(op, "k", k, k_cache, k_params, v_params)
    _check_slots(op, "k", k, slots, k_cache.numel() // max(1, k.shape[1] * width))
    return bits


def _check_caches(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, width: int) -> None:
    """k_cache [..., num_slots, num_kv_heads, width] contiguous, v_cache the same."""
    if k_cache.dim() < 3 or tuple(k_cache.shape[-2:]) != (num_kv_heads, width):
        _fail(f"{op}: k_cache must have shape [..., num_slots, num_kv_heads, head_dim]="
              f"[...,*,{num_kv_heads},{width}], got {_shape(k_cache)}")
    _check_contiguous(op, "k_cache", k_cache)
    _check_like(op, "v_cache", v_cache, "k_cache", k_cache)
    if v_cache.shape != k_cache.shape:
        _fail(f"{op}: v_cache must have the shape of k_cache {_shape(k_cache)}, got {_shape(v_cache)}")
    _check_contiguous(op, "v_cache", v_cache)


def _check_slots(op: str, ref_arg: str, ref: torch.Tensor, slots: torch.Tensor, num_slots: int) -> None:
    """slots [num_tokens] for the rows of `ref`, each < num_slots (or negative: skipped)."""
    if slots.dtype not in SLOT_DTYPES:
        _fail(f"{op}: slots must be int64 (or int32), got {dtype_name(slots.dtype)}")
    if slots.device != ref.device:
        _fail(f"{op}: slots must be on {ref_arg}'s device {ref.device}, got {slots.device}")
    if slots.dim() != 1 or slots.shape[0] != ref.shape[0]:
        _fail(f"{op}: slots must have shape [num_tokens]=[{ref.shape[0]}], got {_shape(slots)}")
    _check_contiguous(op, "slots", slots)
    # A GPU check would synchronise: there, out-of-range slots are skipped instead.
    if slots.device.type == "cpu" and slots.numel() > 0:
        bad = slots[slots >= num_slots]
        if bad.numel():
            _fail(f"{op}: slots must be < num_slots={num_slots} (or negative: skip), got {int(bad[0])}")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, k_params: torch.Tensor | None = None,
             v_params: torch.Tensor | None = None) -> None:
    """k_cache[slots[i]] = k[i] and v_cache[slots[i]] = v[i], in place; slots[i] < 0: skipped.

    k, v [num_tokens, num_kv_heads, head_dim] (rows contiguous); caches [..., num_kv_heads,
    width] contiguous, seen as [num_slots, num_kv_heads, width]; slots [num_tokens].
    Float cache: width = head_dim, the caches in k's dtype. Quantized cache (k_params and
    v_params given, float32 [..., num_kv_heads, 2]): uint8 caches, width head_dim (int8) or
    head_dim / 2 (int4); each row is quantized by `quantize_kv` and its (scale, zero) written
    to the same slot of the params.
    """
    bits = check_store_kv_args(k, v, k_cache, v_cache, slots, k_params, v_params)
    keep = slots >= 0
    index = slots[keep].long()
    inside = slice(None)
    if slots.device.type != "cpu":  # out-of-range slots are skipped, as on the GPU
        inside = index < k_cache.numel() // max(1, k_cache.shape[-1] * k_cache.shape[-2])
    index = index[inside]
    for src, cache, params in ((k, k_cache, k_params), (v, v_cache, v_params)):
        rows = src[keep][inside]                                          # [n, num_kv_heads, head_dim]
        flat = cache.view(-1, *cache.shape[-2:])                          # [num_slots, num_kv_heads, width]
        if bits:
            rows, row_params = quantize_kv(rows, bits)
            params.view(-1, src.shape[1], 2).index_copy_(0, index, row_params)
        flat.index_copy_(0, index, rows)


def check_decode_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, context_lens: torch.Tensor,
                                scale: float, k_params: torch.Tensor | None = None,
                                v_params: torch.Tensor | None = None) -> int:
    """The input contract of decode_attention; returns the cache's bits (0: float, 8 or 4)."""
    op = "decode_attention"
    _check_float(op, "q", q)
    if q.dim() != 3:
        _fail(f"{op}: q must be 3-D [batch, num_heads, head_dim], got shape {_shape(q)}")
    batch, num_heads, head_dim = q.shape
    if not (0 < head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0):
        _fail(f"{op}: q must have a head_dim that is a multiple of {HEAD_DIM_MULTIPLE} in "
              f"[{HEAD_DIM_MULTIPLE}, {MAX_HEAD_DIM}], got shape {_shape(q)}")
    _check_contiguous(op, "q", q)
    bits = _kv_cache_bits(op, "q", q, k_cache, k_params, v_params)
    width = head_dim // 2 if bits == 4 else head_dim
    if k_cache.dim() != 4 or k_cache.shape[3] != width:
        _fail(f"{op}: k_cache must have shape [num_blocks, block_size, num_kv_heads, head_dim]="
              f"[*,*,*,{width}], got {_shape(k_cache)}")
    if k_cache.shape[1] == 0 or k_cache.shape[2] == 0:
        _fail(f"{op}: k_cache must have block_size > 0 and num_kv_heads > 0, got shape {_shape(k_cache)}")
    if num_heads % k_cache.shape[2]:
        _fail(f"{op}: q's num_heads ({num_heads}) must be a multiple of k_cache's num_kv_heads "
              f"({k_cache.shape[2]})")
    _check_contiguous(op, "k_cache", k_cache)
    _check_like(op, "v_cache", v_cache, "k_cache", k_cache)
    if v_cache.shape != k_cache.shape:
        _fail(f"{op}: v_cache must have the shape of k_cache {_shape(k_cache)}, got {_shape(v_cache)}")
    _check_contiguous(op, "v_cache", v_cache)
    if bits:
        _check_kv_params(op, "q", q, k_cache, k_params, v_params)
    for arg, t, shape in (("block_tables", block_tables, "[batch, max_blocks]"),
                          ("context_lens", context_lens, "[batch]")):
        if t.dtype != torch.int32:
            _fail(f"{op}: {arg} must be int32, got {dtype_name(t.dtype)}")
        if t.device != q.device:
            _fail(f"{op}: {arg} must be on q's device {q.device}, got {t.device}")
        if t.dim() != shape.count(",") + 1 or t.shape[0] != batch:
            _fail(f"{op}: {arg} must have shape {shape} with batch={batch}, got {_shape(t)}")
        _check_contiguous(op, arg, t)
    if not math.isfinite(scale):
        _fail(f"{op}: scale must be finite, got {scale}")
    # Value checks need the host: on a GPU a bad length or block gives NaN outputs instead.
    if q.device.type == "cpu" and batch > 0:
        num_blocks, block_size = k_cache.shape[:2]
        capacity = block_tables.shape[1] * block_size
        bad = context_lens[(context_lens < 0) | (context_lens > capacity)]
        if bad.numel():
            _fail(f"{op}: context_lens must lie in [0, {capacity}] (max_blocks * block_size), "
                  f"got {int(bad[0])}")
        used = torch.arange(block_tables.shape[1]) * block_size < context_lens[:, None]
        if used.any():
            ids = block_tables[used]
            bad = ids[(ids < 0) | (ids >= num_blocks)]
            if bad.numel():
                _fail(f"{op}: block_tables must hold block ids in [0, {num_blocks}) for every "
                      f"block a sequence uses, got {int(bad[0])}")
    return bits


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, k_params: torch.Tensor | None = None,
                     v_params: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query per sequence over its cached keys 0..context_lens[b]-1.

    q [batch, num_heads, head_dim]; k_cache, v_cache [num_blocks, block_size, num_kv_heads,
    head_dim] in q's dtype, or quantized (k_params, v_params float32 [num_blocks, block_size,
    num_kv_heads, 2] given): uint8 [..., head_dim] (int8) or [..., head_dim / 2] (int4),
    dequantized by `dequantize_kv`. block_tables [batch, max_blocks] int32; context_lens
    [batch] int32. Query head h reads kv head h // (num_heads // num_kv_heads) (grouped-query
    attention, as Hugging Face's repeat_kv). softmax(scale * q k^T) v in float32 -> [batch,
    num_heads, head_dim] in q's dtype; a sequence with no keys gets zeros.
    """
    bits = check_decode_attention_args(q, k_cache, v_cache, block_tables, context_lens, scale,
                                       k_params, v_params)
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, width = k_cache.shape
    lens = context_lens.long()
    span = block_tables.shape[1] * block_size
    if q.device.type == "cpu" and batch > 0:  # no need to gather keys beyond the longest sequence
        span = int(lens.max())
    t = torch.arange(span, device=q.device)
    valid = t[None, :] < lens[:, None]                                    # [batch, span]
    blocks = block_tables.long()[:, t // block_size]                      # [batch, span]
    slots = torch.where(valid, blocks * block_size + t % block_size, 0)   # padding reads slot 0
    if bits:
        keys = dequantize_kv(k_cache.reshape(-1, kv_heads, width)[slots],
                             k_params.reshape(-1, kv_heads, 2)[slots], head_dim)
        values = dequantize_kv(v_cache.reshape(-1, kv_heads, width)[slots],
                               v_params.reshape(-1, kv_heads, 2)[slots], head_dim)
    else:
        keys = k_cache.reshape(-1, kv_heads, head_dim)[slots].float()     # [batch, span, kv_heads, head_dim]
        values = v_cache.reshape(-1, kv_heads, head_dim)[slots].float()
    values = values.masked_fill(~valid[:, :, None, None], 0.0)            # padding weighs 0, even if NaN
    qf = q.float().view(batch, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.einsum("bkgd,btkd->bkgt", qf, keys) * scale           # [batch, kv_heads, group, span]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(lens[:, None, None, None] > 0, probs, 0.0)       # no keys: zeros, not NaN
    out = torch.einsum("bkgt,btkd->bkgd", probs, values)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def check_silu_and_mul_args(gate_up: torch.Tensor) -> None:
    op = "silu_and_mul"
    _check_float(op, "gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        _fail(f"{op}: gate_up must be 2-D [num_tokens, 2 * intermediate] (an even width), "
              f"got shape {_shape(gate_up)}")
    _check_contiguous(op, "gate_up", gate_up)


def w4a16_silu_and_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation of a W4A16 [gate | up] linear: the two ops, in order."""
    return silu_and_mul(w4a16_linear(x, qweight, scales, zeros))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: gate_up [num_tokens, 2 * I] = [gate | up] -> silu(gate) * up [num_tokens, I].

    Hugging Face's order (gate_proj rows first) and roundings: silu in float32,
    rounded to the dtype, then the product, rounded again.
    """
    check_silu_and_mul_args(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# --- read_words: a kernel that only reads (the floor of memory-bound kernels) ---------

def check_read_words_args(data: torch.Tensor) -> None:
    nbytes = data.numel() * data.element_size()
    if not data.is_contiguous():
        _fail("read_words: data must be a contiguous CUDA tensor")
    if nbytes % 16 or data.data_ptr() % 16:
        _fail(f"read_words: data must be 16-byte aligned and a multiple of 16 bytes long, got {nbytes} bytes")


def read_words(data: torch.Tensor) -> torch.Tensor:
    """The xor of every 32-bit word of `data` (int32 [1]): what the read kernel computes so
    that its loads count (csrc/cuda/linear.cu)."""
    check_read_words_args(data)
    words = data.reshape(-1).view(torch.int32)
    while words.numel() > 1:
        half = words.numel() // 2
        words = torch.cat([words[:half] ^ words[half:2 * half], words[2 * half:]])
    return words.reshape(1) if words.numel() else torch.zeros(1, dtype=torch.int32, device=data.device)
