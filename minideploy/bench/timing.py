"""Timing that means something: warm-up, device clocks, medians, cold caches.

- `time_fn` returns raw per-call seconds; callers take medians (`describe`).
  `time_graph` times calls replayed back to back from a CUDA graph instead.
  On a GPU it reads CUDA events, so it measures the GPU's time, not Python's;
  a short spin kernel before each sample lets the host queue the call before
  the GPU reaches it, so launch latency does not leak into small kernels.
- A kernel that reads the same weight every call finds it in L2 (50 MB on an
  H100, more than a 4096² fp16 matrix) and looks faster than it will inside a
  model, where each layer's weights were evicted by the layers before it.
  `Rotating` cycles through enough copies of the inputs to overflow the cache;
  `flush_l2` is the alternative for inputs too large to copy.
"""
from __future__ import annotations

import math
import statistics
import time
from functools import cache
from pathlib import Path
from typing import Callable, Optional

import torch

FALLBACK_CACHE_BYTES = 50 * 2**20
# ~50 µs at GPU clocks near 2 GHz: longer than launching one call from Python.
_LEAD_CYCLES = 100_000


def cache_bytes(device: torch.device | str) -> int:
    """Last-level cache size: the GPU's L2, or the CPU's largest cache (fallback 50 MiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or FALLBACK_CACHE_BYTES)
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=FALLBACK_CACHE_BYTES)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10,
            device: torch.device | str = "cpu", inner: int = 1,
            before_each: Optional[Callable[[], object]] = None) -> list[float]:
    """Seconds per call of `fn()`, one value per sample (`repeats` values).

    Each sample times `inner` back-to-back calls and divides by `inner`. On a
    GPU keep inner=1 for GPU time: the spin kernel gives the host ~50 µs to
    queue ONE call, while back-to-back calls of a small kernel measure how
    fast Python can launch them (~25 µs per F.linear on the H100 host, above
    the 18 µs GEMV itself) -- the overhead CUDA graphs remove. `before_each`
    runs untimed before every sample (e.g. `flush_l2`). Warm-up calls absorb
    one-time costs: kernel selection, allocator growth, thread-pool start.
    """
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, inner >= 1, warmup >= 0; got {repeats}, {inner}, {warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(repeats)]
            for start, end in events:
                if before_each is not None:
                    before_each()
                if hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(_LEAD_CYCLES)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
            torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 / inner for start, end in events]
    samples = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        begin = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - begin) / inner)
    return samples


def time_graph(fn: Callable[[], object], calls: int, device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of `fn` when `calls` of them replay back to back from one CUDA graph,
    as a decode step runs its kernels: each call's share of the GPU time, without the launch
    and event gap that one timed call carries (an empty kernel times ~4 µs on an H100)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture: workspaces, kernel selection
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return [t / calls for t in time_fn(graph.replay, warmup=2, repeats=repeats, device=device)]


def add_read_floors(points: list[dict], device: torch.device, repeats: int, read_bytes_per_s: float) -> None:
    """Give each graph-replayed point (method ending in "_graph") the time of a kernel that
    only reads as many bytes (`kernels.read_words`: 16-byte loads, several in flight, every
    SM busy), replayed from a CUDA graph through copies that overflow the cache, as the
    point's calls are. The measured bandwidth is a 1 GiB read; at a few MB the fixed costs of
    any kernel (its launch, the ramp up to full bandwidth, the tail) take a share of the
    time: `read_floor` says what fraction of the bandwidth a kernel that does nothing but
    read these bytes reaches, `fraction_of_read_floor` how close the point comes to it."""
    from .. import kernels

    floors: dict[int, dict] = {}
    for p in points:
        if not p["method"].endswith("_graph"):
            continue
        nbytes = p["bytes"]
        if nbytes not in floors:
            words = -(-nbytes // 16) * 4  # whole 16-byte loads
            data = Rotating(torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device=device))
            floors[nbytes] = describe(time_graph(lambda: kernels.read_words(data.next()[0]), max(4, len(data)),
                                                 device, repeats))
            del data
        floor = floors[nbytes]
        p["read_floor"] = {"stats": floor, "fraction_of_read_bandwidth": nbytes / floor["median"] / read_bytes_per_s}
        p["fraction_of_read_floor"] = floor["median"] / p["stats"]["median"]


def describe(samples: list[float]) -> dict:
    """Median and spread (min, quartiles, max) of raw samples."""
    ordered = sorted(samples)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "p25": q1, "p75": q3,
            "max": ordered[-1], "n": len(ordered)}


class Rotating:
    """Enough copies of some tensors to overflow the cache; `next()` cycles through them.

    Rotating(w, x) keeps the originals as the first copy and clones the rest, so
    that the copies together hold at least `factor` x the last-level cache
    (at least two copies on a GPU). Clone, not expand: each copy has its own memory.
    """

    def __init__(self, *tensors: torch.Tensor, factor: float = 2.0, max_copies: int = 256,
                 cache: Optional[int] = None):
        if not tensors:
            raise ValueError("Rotating needs at least one tensor")
        device = tensors[0].device
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        target = factor * (cache if cache is not None else cache_bytes(device))
        copies = min(max_copies, max(2 if device.type == "cuda" else 1, math.ceil(target / nbytes)))
        self.sets = [tuple(tensors)] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]
        self.bytes = nbytes * copies
        self._i = -1

    def __len__(self) -> int:
        return len(self.sets)

    def next(self) -> tuple[torch.Tensor, ...]:
        self._i = (self._i + 1) % len(self.sets)
        return self.sets[self._i]


@cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(2 * cache_bytes(device), dtype=torch.uint8, device=device)


def flush_l2(device: torch.device | str) -> None:
    """Evict the cache by writing a buffer twice its size (pass as `before_each`)."""
    _flush_buffer(torch.device(device)).zero_()
