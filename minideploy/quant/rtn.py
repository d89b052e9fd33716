"""Round-to-nearest (RTN) weight quantization: pure functions, no modules.

Asymmetric integer quantization in groups of `group_size` consecutive input
features of each output row (the AutoAWQ / LMDeploy convention):

    scale = (max - min) / (2^bits - 1)          one per group, float
    zero  = clamp(round(-min / scale), 0, 2^bits - 1)   one integer per group
    q     = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    w~    = (q - zero) * scale

Shapes: w [out_features, in_features]; q the same (uint8, one value each);
scales and zeros [out_features, in_features // group_size].
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (3, 4, 8)


def check_group_size(in_features: int, group_size: int, layer: str = "weight") -> None:
    """Group size must divide in_features; name the layer and the sizes that would fit."""
    if group_size <= 0 or in_features % group_size:
        fits = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0]
        raise ValueError(f"{layer}: group size {group_size} does not divide in_features={in_features}; "
                         f"sizes that fit: {', '.join(map(str, fits)) or 'none of 16..256'}")


def quantize(w: torch.Tensor, bits: int, group_size: int, layer: str = "weight"):
    """w [N, K] float → (q uint8 [N, K], scales [N, K/g] float32, zeros [N, K/g] uint8)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"w_bits must be one of {SUPPORTED_BITS}, got {bits}")
    n, k = w.shape
    check_group_size(k, group_size, layer)
    groups = w.float().reshape(n, k // group_size, group_size)
    w_max, w_min = groups.amax(-1), groups.amin(-1)
    q_max = 2**bits - 1
    scales = ((w_max - w_min) / q_max).clamp(min=1e-5)
    zeros = (-w_min / scales).round().clamp(0, q_max)
    q = (groups / scales[..., None]).round().add(zeros[..., None]).clamp(0, q_max)
    return q.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize` up to rounding: [N, K] in `dtype`."""
    n, k = q.shape
    group_size = k // scales.shape[1]
    groups = q.float().reshape(n, -1, group_size) - zeros.float()[..., None]
    return (groups * scales[..., None]).reshape(n, k).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, layer: str = "weight") -> torch.Tensor:
    """Quantize then dequantize: the weight the quantized model effectively uses."""
    return dequantize(*quantize(w, bits, group_size, layer), dtype=w.dtype)


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float → (q int8 [N, K], scales float32 [N]): symmetric, one scale per row,
    q = round(w / scale) with scale = max |w| / 127 (a zero row gets scale 0)."""
    w = w.float()
    scales = w.abs().amax(1) / 127
    q = (w / scales.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).round().clamp(-127, 127)
    return q.to(torch.int8), scales
