"""What tensor parallelism costs: bytes all-reduced per token and the ring (α-β) model.

Per decode step and per layer, each rank all-reduces the attention output and
the MLP output: 2 × [batch, hidden] values, whatever tp is. A ring all-reduce
of n bytes over p ranks is a reduce-scatter then an all-gather, 2(p-1) steps
that each send n/p bytes:

    t(n) = 2(p-1)·α + 2(p-1)/p · n/β

with α the per-message latency and β the link bandwidth. Decode messages are
small (Llama-2-7B at batch 1: 8 KiB), so α, not β, sets the price: 65
all-reduces per token at ~10 µs each is most of a millisecond.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..bench.timing import describe, time_fn
from ..config import ModelConfig
from .build import rank_device


def allreduce_bytes_per_layer(config: ModelConfig, batch: int, dtype_bytes: int) -> int:
    """Bytes each rank all-reduces per layer for one decode step: after o and after down."""
    return 2 * batch * config.hidden_size * dtype_bytes


def ring_allreduce_seconds(n_bytes: float, tp: int, alpha: float, beta: float) -> float:
    return 2 * (tp - 1) * alpha + 2 * (tp - 1) / tp * n_bytes / beta


def ring_allgather_seconds(n_bytes: float, tp: int, alpha: float, beta: float) -> float:
    """n_bytes: the gathered result (each rank contributes n/tp)."""
    return (tp - 1) * alpha + (tp - 1) / tp * n_bytes / beta


def fit_ring(sizes: list[int], seconds: list[float], tp: int) -> tuple[float, float]:
    """(α seconds, β bytes/s) fitted to measured all-reduce times: t = a + b·n by least
    squares on the relative error, so microsecond messages count as much as megabyte ones."""
    n, t = torch.tensor(sizes, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    design = torch.stack([torch.ones_like(n), n], dim=1) / t[:, None]
    a, b = torch.linalg.lstsq(design, torch.ones_like(t)[:, None]).solution.flatten().tolist()
    steps = 2 * (tp - 1)
    return max(a, 0.0) / steps, steps / tp / b if b > 0 else math.inf


def decode_comm_seconds(config: ModelConfig, tp: int, batch: int, dtype_bytes: int,
                        alpha: float, beta: float) -> float:
    """Predicted communication of one decode step: 2 all-reduces per layer, one for the
    vocab-parallel embedding, one all-gather of the logits."""
    hidden = batch * config.hidden_size * dtype_bytes
    return ((2 * config.num_layers + 1) * ring_allreduce_seconds(hidden, tp, alpha, beta)
            + ring_allgather_seconds(batch * config.vocab_size * dtype_bytes, tp, alpha, beta))


def measure_allreduce(rank: int, tp: int, sizes: list[int], device_type: str, dtype: torch.dtype,
                      repeats: int = 20) -> dict[int, dict]:
    """Run inside a group (`run_spmd`): seconds per all-reduce of each size, rank 0's samples."""
    device = rank_device(device_type, rank)
    out = {}
    for size in sizes:
        buf = torch.zeros(max(1, size * 8 // torch.finfo(dtype).bits), dtype=dtype, device=device)  # sums stay 0
        samples = time_fn(lambda: dist.all_reduce(buf), warmup=3, repeats=repeats, device=device)
        out[size] = {"bytes": buf.numel() * buf.element_size(), **describe(samples), "samples": samples}
    return out
