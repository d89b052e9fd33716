"""Packing 4-bit integers into int32 words: AutoAWQ's GEMM layout, pure functions.

AutoAWQ (and LMDeploy's AWQ loader) store a quantized nn.Linear [N out, K in] as

    qweight [K, N / 8] int32   eight 4-bit weights of one input row per word,
    qzeros  [K / g, N / 8] int32   the zero points, packed the same way,
    scales  [K / g, N] float16,

where the eight output columns 8c..8c+7 sit in a word's nibbles in the order
[0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds column 8c + ORDER[i]): the order its
CUDA kernel's dequantization trick unpacks fastest.
"""
from __future__ import annotations

import torch

from ..kernels.reference import W4_ORDER as ORDER, unpack_w4

PACK = 8  # 4-bit values per int32


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers in 0..15 (cols % 8 == 0) → [rows, cols / 8] int32, AWQ order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"pack_int4: columns must be a multiple of 8, got {cols}")
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[..., list(ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    words = (v << shifts).sum(-1)  # disjoint bits: the sum is an OR
    return (words - (words >> 31 << 32)).to(torch.int32)  # as a signed 32-bit word


def unpack_int4(words: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [rows, cols / 8] int32 → [rows, cols] uint8."""
    return unpack_w4(words).to(torch.uint8)


def to_awq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our RTN/AWQ output (q [N, K], scales/zeros [N, K/g]) → AutoAWQ GEMM tensors."""
    return {"qweight": pack_int4(q.t().contiguous()),
            "qzeros": pack_int4(zeros.t().contiguous()),
            "scales": scales.t().contiguous().to(torch.float16)}


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AutoAWQ GEMM tensors → (q [N, K] uint8, scales [N, K/g] float32, zeros [N, K/g] uint8)."""
    return (unpack_int4(qweight).t().contiguous(), scales.float().t().contiguous(),
            unpack_int4(qzeros).t().contiguous())
