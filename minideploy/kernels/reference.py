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
    if positions.dtype not in POSITION_DTYPES:
        _fail(f"{op}: positions must be int64 (or int32), got {dtype_name(positions.dtype)}")
    if positions.device != q.device:
        _fail(f"{op}: positions must be on q's device {q.device}, got {positions.device}")
    if positions.dim() != 1 or positions.shape[0] != q.shape[0]:
        _fail(f"{op}: positions must have shape [num_tokens]=[{q.shape[0]}], got {_shape(positions)}")
    _check_contiguous(op, "positions", positions)
    if cos_sin.dtype != torch.float32:
        _fail(f"{op}: cos_sin must be float32, got {dtype_name(cos_sin.dtype)}")
    if cos_sin.device != q.device:
        _fail(f"{op}: cos_sin must be on q's device {q.device}, got {cos_sin.device}")
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


def check_w4a16_args(op: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     x: torch.Tensor | None = None) -> None:
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        _fail(f"{op}: qweight must be 2-D int32 [out_features, in_features / 8], "
              f"got {dtype_name(qweight.dtype)} {_shape(qweight)}")
    n, k = qweight.shape[0], qweight.shape[1] * 8
    _check_float(op, "scales", scales)
    if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] == 0 or k % scales.shape[1]:
        _fail(f"{op}: scales must have shape [out_features={n}, groups] with groups dividing "
              f"in_features={k}, got {_shape(scales)}")
    group = k // scales.shape[1]
    if group % W4_GROUP_MULTIPLE:
        _fail(f"{op}: group size {group} (in_features {k} / {scales.shape[1]} groups) must be a "
              f"multiple of {W4_GROUP_MULTIPLE}")
    _check_like(op, "zeros", zeros, "scales", scales)
    if zeros.shape != scales.shape:
        _fail(f"{op}: zeros must have the shape of scales {_shape(scales)}, got {_shape(zeros)}")
    if qweight.device != scales.device:
        _fail(f"{op}: qweight must be on scales' device {scales.device}, got {qweight.device}")
    for arg, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        _check_contiguous(op, arg, t)
    if x is not None:
        _check_like(op, "x", x, "scales", scales)
        if x.dim() != 2 or x.shape[1] != k:
            _fail(f"{op}: x must be 2-D [tokens, in_features={k}], got shape {_shape(x)}")
        _check_contiguous(op, "x", x)


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
