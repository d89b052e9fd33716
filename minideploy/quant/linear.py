"""W4A16Linear: a decoder linear whose weight is stored as 4-bit integers in groups.

A decode step streams every weight once per token, so its speed is bytes over
bandwidth: int4 weights with one scale and zero point per group of g input
features stream ~3.6x fewer bytes than fp16 (4 bits + 2·16/g bits per weight).
The kernels dequantize in registers (`kernels.w4a16_linear`); the layout is
`kernels.reference.check_w4a16_args`'s, AutoAWQ's nibble order along in_features.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .pack import from_awq, pack_int4, to_awq, unpack_int4
from .rtn import check_group_size, quantize, quantize_rows_int8


def quantized_values(qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared layout's tensors as (q uint8 [out, in], scales float32, zeros uint8 [out, in / g])."""
    return unpack_int4(qweight), scales.float(), zeros.round().to(torch.uint8)


class W4A16Linear(nn.Module):
    """y = x · dequant(qweight)ᵀ; the buffers follow the model's dtype (`.to(dtype)`), qweight stays int32."""

    def __init__(self, in_features: int, out_features: int, w_bits: int, group_size: int,
                 layer: str = "weight"):
        super().__init__()
        check_group_size(in_features, group_size, layer)
        if group_size % kernels.reference.W4_GROUP_MULTIPLE:
            raise ValueError(f"{layer}: group size {group_size} must be a multiple of "
                             f"{kernels.reference.W4_GROUP_MULTIPLE} for the W4A16 kernels")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.group_size = w_bits, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(out_features, groups))
        self.register_buffer("zeros", torch.empty(out_features, groups))

    @classmethod
    def from_float(cls, weight: torch.Tensor, w_bits: int, group_size: int,
                   layer: str = "weight") -> "W4A16Linear":
        """RTN-quantize a float weight [out, in] (after AWQ's scaling and clipping, if any)."""
        module = cls(weight.shape[1], weight.shape[0], w_bits, group_size, layer).to(weight.device)
        q, scales, zeros = quantize(weight, w_bits, group_size, layer)
        module.set_quantized(q, scales, zeros)
        return module.to(weight.dtype)

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """q [out, in] integers, scales/zeros [out, in / g]: pack into the kernel layout."""
        self.qweight.copy_(pack_int4(q))
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q uint8 [out, in], scales float32, zeros uint8 [out, in / g]): what `to_awq` packs."""
        return quantized_values(self.qweight, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w4a16_linear(x, self.qweight, self.scales, self.zeros)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] linear's output, fused into the GEMV call (no forward hooks)."""
        return kernels.w4a16_silu_and_mul(x, self.qweight, self.scales, self.zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w_bits={self.w_bits}, group_size={self.group_size}")


class W4A16TiledLinear(nn.Module):
    """A W4A16Linear's tensors rearranged for the kernel of the device it runs on: tiles of
    R rows with runs of C words of each row side by side (`reference.tile_rows`).

    CPU (R = its vector width, 16 with AVX-512; C = 1): the kernel's lanes are rows, so in
    the shared layout it loads R rows separately and transposes them in registers; in tiles
    a vector is one load. Same sums in the same order, 1.3-1.7x faster on the default
    model's shapes. CUDA (R = 16, C = 16): a warp reads 512 contiguous bytes of a block's
    tile where the shared layout gives it 64 bytes from each of 8 rows; same sums too.
    (R, C) depends on the machine, so this is a runtime layout, made where the model runs
    (`quant.tile_linears_`, called by the engine's runners, as TurboMind converts
    weights for its kernels at load); checkpoints keep the shared layout (`quantized()`
    gives it back)."""

    def __init__(self, linear: W4A16Linear, rows: int, cols: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.w_bits, self.group_size, self.rows, self.cols = linear.w_bits, linear.group_size, rows, cols
        tile = kernels.reference.tile_rows
        self.register_buffer("qtiles", tile(linear.qweight, rows, cols))
        self.register_buffer("stiles", tile(linear.scales, rows))
        self.register_buffer("ztiles", tile(linear.zeros, rows))

    def untiled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) in the shared layout."""
        return kernels.reference.untile_w4a16(self.qtiles, self.stiles, self.ztiles, self.out_features)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As W4A16Linear.quantized: what `to_awq` packs."""
        return quantized_values(*self.untiled())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.w4a16_linear_tiled(x, *self.tiles(), self.out_features)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """As W4A16Linear.silu_and_mul (fused into the GEMV call)."""
        return kernels.w4a16_silu_and_mul_tiled(x, *self.tiles(), self.out_features)

    def tiles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qtiles, stiles, ztiles), read from the buffer dict: nn.Module's attribute lookup
        costs ~0.8 us a buffer on a small CPU, and a CPU decode step of the default model
        makes 120 of these calls (in-process A/B: 9.8 -> 9.2 ms a step)."""
        buffers = self._buffers
        return buffers["qtiles"], buffers["stiles"], buffers["ztiles"]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"w_bits={self.w_bits}, group_size={self.group_size}, "
                f"tiles of {self.rows} rows x {self.cols} words")


class Int8Linear(nn.Module):
    """y = x · (scales ⊙ qweight)ᵀ: int8 weights, one float32 scale per output row.

    For the LM head of a small model on a CPU, where it is the largest matrix a decode
    step reads (the default model's: 49152 x 576, 113 MB in float32): int8 streams a
    quarter of the bytes. One scale per row, as gpt-fast's int8 weight-only mode; the
    default model's GGUF keeps this matrix in 8 bits too (Q8_0)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Linear":
        module = cls(weight.shape[1], weight.shape[0]).to(weight.device)
        q, scales = quantize_rows_int8(weight.detach())
        module.qweight.copy_(q)
        module.scales.copy_(scales)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 scales are the kernel's input; a module `.to(dtype)` may have cast them.
        return kernels.int8_linear(x, self.qweight, self.scales.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"


def awq_tensors(module: W4A16Linear | W4A16TiledLinear, rows: list[int]) -> list[dict[str, torch.Tensor]]:
    """Split a fused module's rows (e.g. q|k|v) into AutoAWQ GEMM tensors, one dict per part."""
    q, scales, zeros = module.quantized()
    return [to_awq(*parts) for parts in zip(q.split(rows), scales.split(rows), zeros.split(rows))]


def fused_from_awq(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """AutoAWQ tensors of q, k, v (or gate, up) → the fused module's buffers (rows concatenated)."""
    unpacked = [from_awq(p["qweight"], p["qzeros"], p["scales"]) for p in parts]
    q, scales, zeros = (torch.cat(column) for column in zip(*unpacked))
    return {"qweight": pack_int4(q), "scales": scales, "zeros": zeros.float()}
