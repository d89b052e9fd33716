"""Paged decode attention: bytes/s of the kernel against the measured memory bandwidth.

At decode, attention reads every cached key and value of the batch once for one
query per sequence: a memory-bound stream whose floor is its bytes over the
bandwidth. For every shape, context length, batch size and quant_policy
(0: fp16 cache, 8: int8, 4: int4 with per-token-per-head scale and zero), one run
times
  - `kernel`: `kernels.decode_attention` (CUDA / CPU extension),
  - `reference`: the pure-PyTorch reference (gather the blocks, dequantize, einsum
    softmax einsum), the baseline,
On a GPU also `kernel_graph`: the kernel's calls replayed back to back from a CUDA
graph, one per cache copy (at least 4), as a decode step runs attention: its share of
the GPU time without the ~4 us of launch and event gap that one timed call carries
(at batch 1 and 4k tokens, a third of the call), and beside each such point the same
replay of a kernel that only reads as many bytes (`timing.add_read_floors`): at a few MB no kernel
reaches the bandwidth of a 1 GiB read, and this says how far any can.
Each reports bytes/s = (K/V bytes read + their scale/zero params + q + out) / time,
as a fraction of the read bandwidth measured in the same run (the issue's target:
>= 70 % at contexts of 4k and more on an H100). The int8 / int4 caches read 1/2 and
1/4 of fp16's bytes, so at the same fraction of bandwidth they are 2x / 4x faster.

Caches are paged (block size 64, blocks shuffled); small caches rotate through
copies that overflow the L2 cache, as every layer's cache does inside a model.
Points whose cache would exceed --max-cache-gb are skipped (listed in the JSON),
and the reference runs only where its float32 gather stays small.
Shapes: Llama-2-7B attention (32 heads, 32 KV heads, head_dim 128) and a GQA shape
(32 heads, 8 KV heads: Llama-3-8B), fp16. On a CPU: 8 heads (8 and 2 KV heads),
float32, contexts 512..4k, batch 1..8. Writes figures/paged_attention_<device>.json, .png.
"""
from __future__ import annotations

import math
import statistics

import torch

from .. import kernels
from ..roofline import measure_bandwidth
from .common import FIGURES, bench_parser, device_tag, load_result, save_figure, write_result
from .timing import Rotating, add_read_floors, cache_bytes, describe, time_fn, time_graph

BLOCK_SIZE = 64
POLICIES = (0, 8, 4)
CUDA_SHAPES = [("llama2-7b", 32, 32, 128), ("gqa-32q8kv", 32, 8, 128)]
CPU_SHAPES = [("8q8kv", 8, 8, 128), ("gqa-8q2kv", 8, 2, 128)]
CUDA_CONTEXTS, CPU_CONTEXTS = "512,1024,2048,4096,8192,16384,32768", "512,2048,4096"
CUDA_BATCHES, CPU_BATCHES = "1,4,16,64", "1,8"
REFERENCE_MAX_TOKENS = {"cuda": 1 << 17, "cpu": 1 << 14}  # batch * context where the reference runs
TARGET_FRACTION, TARGET_CONTEXT = 0.70, 4096
GRAPH_MIN_CALLS = 4  # calls a graph replays when the cache is not rotated (too large to copy)


class _Single:
    """Rotating's interface for inputs already far larger than the cache (no copies)."""

    def __init__(self, *tensors):
        self.sets = [tuple(tensors)]

    def next(self):
        return self.sets[0]


def make_case(batch, context, heads, kv_heads, head_dim, policy, dtype, device, seed=0):
    """q, a paged cache of `context` tokens per sequence (policy 0: dtype; 8 / 4: codes and
    params, quantized from random values), block tables and lengths."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device=device, generator=gen).int().view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype, generator=gen)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    caches = []
    for _ in range(2):
        x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        caches.append((x,) if policy == 0 else kernels.quantize_kv(x, policy))
        del x
    if policy == 0:
        cache = (caches[0][0], caches[1][0])
    else:
        cache = (caches[0][0], caches[1][0], caches[0][1], caches[1][1])  # k, v, k_params, v_params
    return q, cache, tables, lens


def bytes_read(batch, context, heads, kv_heads, head_dim, policy, dtype) -> int:
    act = torch.finfo(dtype).bits // 8
    row = head_dim * act if policy == 0 else head_dim * policy // 8
    params = 0 if policy == 0 else 2 * 4
    kv = 2 * batch * context * kv_heads * (row + params)
    return kv + 2 * batch * heads * head_dim * act + batch * (math.ceil(context / BLOCK_SIZE) + 1) * 4


def bench_point(label, heads, kv_heads, head_dim, batch, context, policy, dtype, device, repeats,
                bandwidth, with_reference) -> list[dict]:
    q, cache, tables, lens = make_case(batch, context, heads, kv_heads, head_dim, policy, dtype, device)
    size = sum(t.numel() * t.element_size() for t in cache)
    sets = Rotating(*cache) if size < 4 * cache_bytes(device) else _Single(*cache)
    scale = head_dim ** -0.5

    def call(fn):
        def run():
            c = sets.next()
            return fn(q, c[0], c[1], tables, lens, scale, *c[2:])
        return run

    out = kernels.decode_attention(q, *cache[:2], tables, lens, scale, *cache[2:])
    methods = {"kernel": call(kernels.decode_attention)}
    if device.type == "cuda":
        methods["kernel_graph"] = methods["kernel"]
    max_err = None
    if with_reference:
        ref = kernels.reference.decode_attention(q, *cache[:2], tables, lens, scale, *cache[2:])
        max_err = (out.float() - ref.float()).abs().max().item()
        del ref
        methods["reference"] = call(kernels.reference.decode_attention)
    nbytes = bytes_read(batch, context, heads, kv_heads, head_dim, policy, dtype)
    points = []
    for method, fn in methods.items():
        if method.endswith("_graph"):
            seconds = time_graph(fn, max(GRAPH_MIN_CALLS, len(sets.sets)), device, repeats)
        else:
            seconds = time_fn(fn, warmup=2, repeats=repeats, device=device)
        median = statistics.median(seconds)
        points.append({"shape": label, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                       "batch": batch, "context": context, "quant_policy": policy, "method": method,
                       "bytes": nbytes, "bytes_per_s": nbytes / median,
                       "fraction_of_read_bandwidth": nbytes / median / bandwidth,
                       "cache_copies": len(sets.sets), "max_abs_error_vs_reference": max_err,
                       "stats": describe(seconds), "seconds": seconds})
    if with_reference:
        points[0]["speedup_vs_reference"] = points[-1]["stats"]["median"] / points[0]["stats"]["median"]
    return points


def summarize(points: list[dict]) -> dict:
    """Per shape and policy: the kernel's fraction of bandwidth at contexts >= 4k, timed as
    single calls and (GPU) replayed from a graph (keys ending in " graph")."""
    out = {}
    for shape in dict.fromkeys(p["shape"] for p in points):
        for policy in POLICIES:
            for method, suffix in (("kernel", ""), ("kernel_graph", " graph")):
                mine = [p for p in points if p["shape"] == shape and p["quant_policy"] == policy
                        and p["method"] == method and p["context"] >= TARGET_CONTEXT]
                if mine:
                    fr = [p["fraction_of_read_bandwidth"] for p in mine]
                    entry = {"min": min(fr), "median": statistics.median(fr), "max": max(fr), "points": len(fr)}
                    if all("read_floor" in p for p in mine):  # what a read-only kernel of the same bytes reaches
                        floor = [p["read_floor"]["fraction_of_read_bandwidth"] for p in mine]
                        entry["read_floor"] = {"min": min(floor), "median": statistics.median(floor),
                                               "max": max(floor)}
                    out[f"{shape} policy {policy}{suffix}"] = entry
    return out


def plot(result: dict, path=None, axes=None):
    """Fraction of bandwidth vs context per shape: kernel (solid) and reference (dotted) for
    each policy, at the smallest and largest batch."""
    import matplotlib.pyplot as plt

    points = result["points"]
    shapes = list(dict.fromkeys(p["shape"] for p in points))
    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
        axes = axes[0]
    batches = sorted({p["batch"] for p in points})
    shown = sorted({batches[0], batches[-1]})
    for ax, shape in zip(axes, shapes):
        for i, policy in enumerate(POLICIES):
            for j, batch in enumerate(shown):
                for method, style in (("kernel", "o-"), ("kernel_graph", "s--"), ("reference", ".:")):
                    pts = sorted((p["context"], p["fraction_of_read_bandwidth"]) for p in points
                                 if p["shape"] == shape and p["quant_policy"] == policy
                                 and p["batch"] == batch and p["method"] == method)
                    if pts:
                        ax.plot(*zip(*pts), style, color=f"C{i}", alpha=1.0 if j else 0.55,
                                label=f"policy {policy} {method} bs{batch}")
        ax.axhline(TARGET_FRACTION, color="k", ls="--", lw=0.8, label=f"target {TARGET_FRACTION:.0%}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens per sequence)")
        ax.set_ylabel("fraction of measured read bandwidth")
        ax.set_title(shape, fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    axes[0].figure.suptitle(f"paged decode attention ({result['dtype']}) on {result['device']}, "
                            f"read bandwidth {result['bandwidth']['read_bytes_per_s'] / 1e9:.0f} GB/s", fontsize=9)
    if path is not None and fig is not None:
        save_figure(fig, path)
    return axes


def main(argv=None) -> dict:
    parser = bench_parser("paged_attention", __doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--contexts", default=None, help=f"comma-separated (default: CUDA {CUDA_CONTEXTS}, "
                        f"CPU {CPU_CONTEXTS})")
    parser.add_argument("--batches", default=None, help=f"comma-separated (default: CUDA {CUDA_BATCHES}, "
                        f"CPU {CPU_BATCHES})")
    parser.add_argument("--policies", default="0,8,4", help="quant_policy values (0, 8, 4)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 10 on a GPU, 3 on a CPU")
    parser.add_argument("--max-cache-gb", type=float, default=None,
                        help="skip points whose K/V cache is larger (default 6 on a GPU, 0.5 on a CPU)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    contexts = [int(c) for c in (args.contexts or (CUDA_CONTEXTS if cuda else CPU_CONTEXTS)).split(",")]
    batches = [int(b) for b in (args.batches or (CUDA_BATCHES if cuda else CPU_BATCHES)).split(",")]
    policies = [int(p) for p in args.policies.split(",")]
    repeats = args.repeats or (10 if cuda else 3)
    max_bytes = (args.max_cache_gb or (6.0 if cuda else 0.5)) * 1e9
    if not cuda:
        print("CPU run: 8 query heads, float32, contexts and batches of the small set.")
    bandwidth = measure_bandwidth(device)
    read_bw = bandwidth["read_bytes_per_s"]
    points, skipped = [], []
    for label, heads, kv_heads, head_dim in (CUDA_SHAPES if cuda else CPU_SHAPES):
        for policy in policies:
            for batch in batches:
                for context in contexts:
                    if bytes_read(batch, context, heads, kv_heads, head_dim, 0, dtype) > max_bytes:
                        skipped.append({"shape": label, "batch": batch, "context": context, "quant_policy": policy})
                        continue
                    with_ref = batch * context * kv_heads // heads <= REFERENCE_MAX_TOKENS[device.type]
                    new = bench_point(label, heads, kv_heads, head_dim, batch, context, policy, dtype,
                                      device, repeats, read_bw, with_ref)
                    points += new
                    k = new[0]
                    graphed = [p for p in new if p["method"] == "kernel_graph"]
                    print(f"{label:>12} policy {policy} bs {batch:>3} ctx {context:>6}: "
                          f"{k['stats']['median'] * 1e6:9.1f} us {k['bytes_per_s'] / 1e9:7.1f} GB/s "
                          f"{k['fraction_of_read_bandwidth']:5.0%} of BW"
                          + "".join(f", graph {g['stats']['median'] * 1e6:.1f} us "
                                    f"{g['fraction_of_read_bandwidth']:.0%}" for g in graphed)
                          + (f", {k['speedup_vs_reference']:.1f}x the reference" if with_ref else ""),
                          flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
    if cuda:
        add_read_floors(points, device, repeats, read_bw)
    result = {"dtype": str(dtype).removeprefix("torch."), "block_size": BLOCK_SIZE, "contexts": contexts,
              "batches": batches, "policies": policies, "small_shapes": not cuda, "baseline": "reference",
              "target": {"fraction_of_read_bandwidth": TARGET_FRACTION, "min_context": TARGET_CONTEXT},
              "bandwidth": bandwidth, "summary": summarize(points), "skipped": skipped, "points": points}
    tag = device_tag(device)
    out = write_result(f"paged_attention_{tag}", result, device)
    plot(load_result(f"paged_attention_{tag}"), FIGURES / f"paged_attention_{tag}.png")
    for key, s in result["summary"].items():
        print(f"{key:>28}: kernel at context >= {TARGET_CONTEXT}: {s['min']:.0%} .. {s['max']:.0%} "
              f"of {read_bw / 1e9:.0f} GB/s (median {s['median']:.0%}, {s['points']} points)"
              + (f"; a kernel that only reads the same bytes: {s['read_floor']['min']:.0%} .. "
                 f"{s['read_floor']['max']:.0%}" if "read_floor" in s else ""))
    for p in points:
        if "read_floor" in p and p["batch"] == 1 and p["context"] >= TARGET_CONTEXT // 2:
            print(f"{p['shape']:>12} policy {p['quant_policy']} bs 1 ctx {p['context']:>6}, graph: kernel "
                  f"{p['fraction_of_read_bandwidth']:.0%}, a kernel that only reads its {p['bytes'] / 1e6:.1f} MB "
                  f"{p['read_floor']['fraction_of_read_bandwidth']:.0%} of the bandwidth")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
