"""Chapter 2: the roofline — is a decode step limited by memory or by arithmetic?

A kernel that does F floating-point operations and moves B bytes to or from
memory takes at least max(B / bandwidth, F / peak) seconds. Its arithmetic
intensity I = F / B (FLOP per byte) decides which term wins: below the *ridge
point* peak / bandwidth the kernel is memory-bound, above it compute-bound.

Decoding one token per sequence multiplies a [B, K] activation by every [N, K]
weight matrix: 2·B·N·K FLOPs for N·K weights that must be read whatever B is.
At B = 1 in fp16 that is one FLOP per byte, two orders of magnitude below any
GPU's ridge, which is why batching (chapter 6) and smaller weights (chapter 3,
int4: ~4x fewer bytes) are what make decoding fast.

This module holds the arithmetic (pure functions, bytes from `memory.py`), a
table of published device ceilings, and functions that *measure* the ceilings
of the device in use. Units: FLOP/s and bytes/s inside; TFLOP/s and GB/s
(10**12, 10**9) only at the edges.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig
from .memory import (TORCH_FORMATS, Format, format_bits, kv_bytes_per_token, linear_shapes,
                     param_breakdown, quantized_linear_bytes, weight_bytes)

TERA, GIGA = 1e12, 1e9


@dataclass(frozen=True)
class Roof:
    """Two ceilings of one device: peak FLOP/s and memory bytes/s."""

    peak_flops: float
    bandwidth: float
    label: str = ""

    def __post_init__(self):
        for name in ("peak_flops", "bandwidth"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"Roof.{name} must be positive and finite, got {value}")

    @property
    def ridge(self) -> float:
        """FLOP per byte at which the two ceilings meet."""
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        """The roofline: the most FLOP/s a kernel of this intensity can reach."""
        return min(self.peak_flops, intensity * self.bandwidth)

    def time(self, flops: float, nbytes: float) -> float:
        """Lower bound on seconds: max(bytes / bandwidth, FLOPs / peak)."""
        return max(nbytes / self.bandwidth, flops / self.peak_flops)

    def bound(self, intensity: float) -> str:
        return "memory" if intensity < self.ridge else "compute"


@dataclass(frozen=True)
class DeviceSpec:
    """Published ceilings: dense fp16 tensor-core TFLOP/s and HBM/GDDR GB/s."""

    name: str
    tag: str
    peak_tflops: float
    bandwidth_gbs: float
    pattern: str  # regex on torch.cuda.get_device_name(); excludes variants with other numbers
    source: str

    def roof(self) -> Roof:
        return Roof(self.peak_tflops * TERA, self.bandwidth_gbs * GIGA, f"{self.name} (published)")


# Vendor datasheets. Dense numbers: the datasheets print "with sparsity" figures (2x)
# next to them. fp16 inputs, fp32 accumulate -- what torch's fp16 matmul (cuBLAS,
# CUBLAS_COMPUTE_32F) runs; only on GeForce does that differ from fp16 accumulate.
PUBLISHED: dict[str, DeviceSpec] = {s.tag: s for s in [
    DeviceSpec("A100 SXM4 80GB", "a100", 312.0, 2039.0, r"A100[- ]SXM4?-80GB",
               "NVIDIA A100 datasheet: FP16 Tensor Core 312 TFLOPS (624 sparse); 2,039 GB/s"),
    DeviceSpec("H100 SXM5", "h100", 989.4, 3350.0, r"H100(?!.*(PCIe|NVL))",
               "NVIDIA H100 datasheet: FP16 Tensor Core 1,979 TFLOPS sparse (989.4 dense); 3.35 TB/s"),
    DeviceSpec("H200 SXM", "h200", 989.4, 4800.0, r"H200(?!.*NVL)",
               "NVIDIA H200 datasheet: FP16 Tensor Core 1,979 TFLOPS sparse (989.4 dense); 4.8 TB/s"),
    DeviceSpec("RTX 4090", "rtx4090", 165.2, 1008.0, r"RTX 4090(?! D)",
               "NVIDIA Ada whitepaper: FP16 tensor, FP32 accumulate 165.2 TFLOPS dense "
               "(330.3 with FP16 accumulate); 1,008 GB/s"),
    DeviceSpec("L40S", "l40s", 362.05, 864.0, r"L40S",
               "NVIDIA L40S datasheet: FP16 Tensor Core 362.05 TFLOPS (733 sparse); 864 GB/s"),
]}


def published_spec(device_name: str) -> Optional[DeviceSpec]:
    """The table entry whose pattern matches a device name, e.g. 'NVIDIA H100 80GB HBM3'."""
    for spec in PUBLISHED.values():
        if re.search(spec.pattern, device_name, flags=re.IGNORECASE):
            return spec
    return None


# ------------------------------------------------------- one decode linear

def _quantized(fmt: Format) -> bool:
    name = TORCH_FORMATS.get(fmt, fmt) if isinstance(fmt, torch.dtype) else fmt
    return isinstance(name, str) and name.startswith("int")


def weight_storage_bytes(n: int, k: int, fmt: Format = "fp16", *, group_size: Optional[int] = 128,
                         zero: Optional[str] = "packed") -> int:
    """Bytes of an [n, k] weight: float formats plain, int formats with group scales/zeros."""
    if _quantized(fmt):
        return quantized_linear_bytes(n, k, format_bits(fmt), group_size, zero)
    return n * k * format_bits(fmt) // 8


def linear_flops(batch: int, n: int, k: int) -> int:
    """y[B, N] = x[B, K] @ W[N, K]^T: one multiply and one add per weight per row."""
    return 2 * batch * n * k


def linear_bytes(batch: int, n: int, k: int, fmt: Format = "fp16", *, act_fmt: Format = "fp16",
                 group_size: Optional[int] = 128, zero: Optional[str] = "packed") -> int:
    """Bytes a linear must move at least once: the weight, x [B, K] in and y [B, N] out."""
    act = format_bits(act_fmt) // 8
    return weight_storage_bytes(n, k, fmt, group_size=group_size, zero=zero) + batch * (k + n) * act


def arithmetic_intensity(batch: int, n: int, k: int, fmt: Format = "fp16", **bytes_kwargs) -> float:
    """FLOP per byte of a decode linear; see `linear_bytes` for the keyword arguments."""
    return linear_flops(batch, n, k) / linear_bytes(batch, n, k, fmt, **bytes_kwargs)


def _crossover(roof: Roof, flops_per_seq: float, bytes_per_seq: float, fixed_bytes: float) -> Optional[int]:
    # Intensity B·f / (W + B·c) grows with B towards f / c; it reaches the ridge r
    # where B·(f - r·c) >= r·W. If f / c <= r no batch size ever gets there.
    slope = flops_per_seq - roof.ridge * bytes_per_seq
    if slope <= 0:
        return None
    return max(1, math.ceil(roof.ridge * fixed_bytes / slope))


def crossover_batch(roof: Roof, n: int, k: int, fmt: Format = "fp16", **bytes_kwargs) -> Optional[int]:
    """Smallest batch at which an [n, k] decode linear becomes compute-bound (None: never)."""
    weight = linear_bytes(0, n, k, fmt, **bytes_kwargs)
    per_seq = linear_bytes(1, n, k, fmt, **bytes_kwargs) - weight
    return _crossover(roof, linear_flops(1, n, k), per_seq, weight)


# ------------------------------------------------------ one decode step

@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


def weights_read_per_step(config: ModelConfig, weights: Format = "fp16", **weight_kwargs) -> int:
    """Weight bytes one decode step reads: everything except an untied embedding table.

    The embedding is a lookup of B rows, not a matmul; an lm_head tied to it is
    a full matmul and reads the whole table.
    """
    total = weight_bytes(config, weights, **weight_kwargs)
    if config.tie_word_embeddings:
        return total
    kept = weights if not _quantized(weights) else weight_kwargs.get("keep_fmt", "fp16")
    return total - param_breakdown(config)["embed"] * format_bits(kept) // 8


def decode_step_cost(config: ModelConfig, batch: int, context_len: int = 0, *,
                     weights: Format = "fp16", kv_dtype: Format = "fp16", **weight_kwargs) -> StepCost:
    """FLOPs and bytes of one decode step: `batch` sequences, `context_len` cached tokens each.

    FLOPs: 2·B per parameter of every linear (decoder layers + lm_head), plus
    attention over the cache: per layer and sequence, q·K^T and p·V cost
    2·q_size·L each. Bytes: the weights read once (`weights_read_per_step`)
    plus every cached token's K and V. Activations and the new token's K/V
    writes are a few KB per sequence and left out.
    """
    if batch < 1 or context_len < 0:
        raise ValueError(f"need batch >= 1 and context_len >= 0, got {batch}, {context_len}")
    linear_params = (config.num_layers * sum(n * k for n, k in linear_shapes(config).values())
                     + config.vocab_size * config.hidden_size)
    flops_per_seq = 2 * linear_params + config.num_layers * 4 * config.q_size * context_len
    kv = kv_bytes_per_token(config, kv_dtype) * context_len
    return StepCost(flops=batch * flops_per_seq,
                    bytes=weights_read_per_step(config, weights, **weight_kwargs) + batch * kv)


def predict_step_time(config: ModelConfig, roof: Roof, batch: int, context_len: int = 0,
                      **cost_kwargs) -> float:
    """Roofline lower bound on the seconds of one decode step (see `decode_step_cost`)."""
    cost = decode_step_cost(config, batch, context_len, **cost_kwargs)
    return roof.time(cost.flops, cost.bytes)


def decode_crossover_batch(config: ModelConfig, roof: Roof, context_len: int = 0,
                           **cost_kwargs) -> Optional[int]:
    """Smallest batch at which a whole decode step turns compute-bound (None: never).

    Cached K/V grow with the batch like the FLOPs do, so long contexts can keep
    a step memory-bound at any batch size (attention reads ~1 byte per FLOP).
    """
    one, two = (decode_step_cost(config, b, context_len, **cost_kwargs) for b in (1, 2))
    per_seq_flops, per_seq_bytes = one.flops, two.bytes - one.bytes
    return _crossover(roof, per_seq_flops, per_seq_bytes, one.bytes - per_seq_bytes)


# ------------------------------------------------- measuring the device

def _median(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def measure_bandwidth(device: torch.device | str = "cpu", *, nbytes: Optional[int] = None,
                      warmup: int = 2, repeats: int = 10) -> dict:
    """Achieved memory bandwidth: a copy (read + write) and a read-only sum.

    Buffers are far larger than the last-level cache (default 1 GiB on a GPU,
    256 MiB on a CPU), so every byte comes from DRAM/HBM. Returns medians in
    bytes/s and the raw seconds of every sample.
    """
    from .bench.timing import time_fn

    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.randn(nbytes // 4, device=device)  # fp32: sum accumulates in the dtype it reads
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), warmup=warmup, repeats=repeats, device=device)
    read = time_fn(lambda: src.sum(), warmup=warmup, repeats=repeats, device=device)
    size = src.numel() * src.element_size()
    return {"bytes": size,
            "copy_bytes_per_s": 2 * size / _median(copy), "copy_seconds": copy,
            "read_bytes_per_s": size / _median(read), "read_seconds": read}


def measure_matmul(device: torch.device | str = "cpu", *, sizes: Optional[tuple[int, ...]] = None,
                   dtype: Optional[torch.dtype] = None, warmup: int = 2, repeats: int = 10) -> dict:
    """Achieved FLOP/s of large square matmuls on random data (zeros run faster on GPUs).

    The peak is the best median over `sizes`: 4096², 8192², 16384² fp16 on a
    GPU (tensor cores), 512², 1024², 1536² fp32 on a CPU. Every run is kept.
    """
    from .bench.timing import time_fn

    device = torch.device(device)
    cuda = device.type == "cuda"
    sizes = sizes or ((4096, 8192, 16384) if cuda else (512, 1024, 1536))
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    runs = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        seconds = time_fn(lambda: torch.mm(a, b, out=out), warmup=warmup, repeats=repeats, device=device)
        runs.append({"n": n, "flops_per_s": 2 * n**3 / _median(seconds), "seconds": seconds})
        del a, b, out
    best = max(runs, key=lambda run: run["flops_per_s"])
    return {"dtype": str(dtype).removeprefix("torch."), "n": best["n"],
            "flops_per_s": best["flops_per_s"], "runs": runs}


def measure_roof(device: torch.device | str = "cpu", **kwargs) -> tuple[Roof, dict]:
    """The measured roofline: matmul peak and read bandwidth, with the raw measurements.

    kwargs: `nbytes` for the bandwidth buffers, `sizes` and `dtype` for the
    matmul, `repeats` for both.
    """
    repeats = {"repeats": kwargs["repeats"]} if "repeats" in kwargs else {}
    bw = measure_bandwidth(device, nbytes=kwargs.get("nbytes"), **repeats)
    mm = measure_matmul(device, sizes=kwargs.get("sizes"), dtype=kwargs.get("dtype"), **repeats)
    roof = Roof(mm["flops_per_s"], bw["read_bytes_per_s"], "measured")
    return roof, {"bandwidth": bw, "matmul": mm}
