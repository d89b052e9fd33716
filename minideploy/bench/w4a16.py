"""W4A16 linear layers: int4 weights against fp16 cuBLAS, on Llama-2-7B shapes.

For every shape and batch size, one run times
  - `cublas_fp16`: F.linear with the fp16 weight (the chapter-2 baseline),
  - `w4a16`: minideploy's kernels (on a GPU: GEMV with in-register dequantization
    up to 48 tokens in calls of 16; above, dequantize to fp16 then cuBLAS; on a CPU
    the kernel up to 128 tokens, then dequantize + matmul),
  - `torch_int4pack`: `torch._weight_int4pack_mm` (tinygemm, bf16) where torch has it,
  - `w4a16_tiles`: the same kernel over the weight rearranged into its device's
    tiles of rows (`reference.tile_rows`, `kernels.w4a16_tile_shape`; on a GPU where
    the 128-weight k-step divides K), the layout the engine runs,
and, for the dequantize + matmul path, the two halves separately — the answer
to "doesn't dequantization take time?": at batch 1 the GEMV's time is what its
bytes cost at the measured bandwidth (the unpacking hides under the loads);
at large batch the same weight is reused by many tokens, the matmul becomes
compute-bound, and the dequantization pass is pure extra time.

At 1 and 16 tokens `cublas_fp16_graph`, `w4a16_graph` and `w4a16_tiles_graph` time the same calls
replayed from a CUDA graph, one call per weight copy back to back, as a decode
step runs them: each call's share of the GPU time without the launch and event
gap that a single timed call carries (an empty kernel times ~4 µs on an H100); beside
each, the same replay of a kernel that only reads as many bytes (`timing.add_read_floors`: at a few
MB no kernel reaches the bandwidth of a 1 GiB read; this says how far any can).

Weights rotate through copies that overflow L2, as inside a model. Bytes of a
W4A16 call: N·K/2 packed weights + 2·N·K/g·2 scales and zeros + activations.
Writes figures/w4a16_<device>.json and .png. On a CPU: shapes / 8, float32.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from .. import kernels
from ..quant.pack import pack_int4
from ..quant.rtn import quantize
from ..roofline import measure_bandwidth
from .common import FIGURES, bench_parser, device_tag, load_result, save_figure, write_result
from .roofline import CPU_SCALE, SHAPES_7B
from .timing import Rotating, add_read_floors, describe, time_fn, time_graph

CUDA_BATCHES = "1,2,4,8,16,32,64,128,256"
# The model runs gate and up as one fused projection (silu_and_mul splits its output).
SHAPES = SHAPES_7B + [("gate+up", 4096, 22016)]
CPU_BATCHES = "1,2,4,8,16"


def w4_weight_bytes(n: int, k: int, group: int, scale_bytes: int) -> int:
    """Packed nibbles plus one scale and one zero (or offset) per group."""
    return n * k // 2 + 2 * n * (k // group) * scale_bytes


def int4pack_operands(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """Our (q, scales, zeros) → tinygemm's packed weight and [K/g, N, 2] bf16 scale/offset.

    tinygemm computes w = (q - 8)·scale + offset, so offset = (8 - zero)·scale.
    """
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()
    weight = torch._convert_weight_to_int4pack(packed, 8)
    offset = (8 - zeros.float()) * scales.float()
    scale_offset = torch.stack([scales.float(), offset], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return weight, scale_offset


def int4pack_mm(x: torch.Tensor, operands: tuple[torch.Tensor, torch.Tensor], group: int) -> torch.Tensor:
    weight, scale_offset = operands
    return torch._weight_int4pack_mm(x, weight, group, scale_offset)


def bench_shape(label, k, n, group, batches, dtype, device, repeats) -> list[dict]:
    w = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    q, scales, zeros = quantize(w, 4, group)
    packed = (pack_int4(q), scales.to(dtype).contiguous(), zeros.to(dtype).contiguous())
    dense = Rotating(w)
    w4 = Rotating(*packed)
    reference = kernels.reference.dequantize_w4(*packed)
    cuda = device.type == "cuda"
    shape = kernels.w4a16_tile_shape(device)
    tiles = None
    if shape is not None and (k // 8) % shape[1] == 0:
        tiles = Rotating(kernels.reference.tile_rows(packed[0], *shape),
                         *(kernels.reference.tile_rows(t, shape[0]) for t in packed[1:]))
    tinygemm = None
    if cuda and hasattr(torch, "_weight_int4pack_mm"):
        try:
            tinygemm = Rotating(*int4pack_operands(q, scales, zeros))
        except RuntimeError as err:  # the packing API changed across torch versions
            print(f"torch._weight_int4pack_mm unavailable here: {err}".splitlines()[0])
    act = torch.finfo(dtype).bits // 8
    points = []
    for m in batches:
        x = torch.randn(m, k, device=device, dtype=dtype)
        errors = {"w4a16": (kernels.w4a16_linear(x, *packed) - F.linear(x, reference)).abs().max().item()}
        packed_bytes = w4_weight_bytes(n, k, group, act)
        runs = {"cublas_fp16" if cuda else "dense": (lambda: F.linear(x, dense.next()[0]), n * k * act),
                "w4a16": (lambda: kernels.w4a16_linear(x, *w4.next()), packed_bytes)}
        if tiles is not None:
            errors["w4a16_tiles"] = (kernels.w4a16_linear_tiled(x, *tiles.sets[0], n)
                                     - F.linear(x, reference)).abs().max().item()
            runs["w4a16_tiles"] = (lambda: kernels.w4a16_linear_tiled(x, *tiles.next(), n), packed_bytes)
        if cuda and m <= 8:  # the fp16 GEMV kernel's two versions (chapter 2), same weights
            fp16_gemv = kernels.build.load(kernels.LINEAR, "cuda", kernels.build.cuda_arch(device.index or 0))
            for version in (1, 2):
                runs[f"fp16_gemv_v{version}"] = (lambda v=version: fp16_gemv.linear(x, dense.next()[0], v), n * k * act)
        if m > kernels.w4a16_gemv_max_tokens(device):  # the two halves of the large-batch path
            runs["w4a16_dequantize_only"] = (lambda: kernels.dequantize_w4(*w4.next()), 0)
            runs["fp16_matmul_only"] = (lambda: F.linear(x, dense.next()[0]), 0)
        if tinygemm is not None:
            xb = x.to(torch.bfloat16)
            errors["torch_int4pack"] = (int4pack_mm(xb, tinygemm.sets[0], group).float()
                                        - F.linear(x.float(), reference.float())).abs().max().item()
            runs["torch_int4pack"] = (lambda: int4pack_mm(xb, tinygemm.next(), group), packed_bytes)
        graphed = {}
        if cuda and m in (1, kernels.W4A16_GEMV_MAX_TOKENS):
            graphed = {"cublas_fp16_graph": (runs["cublas_fp16"], len(dense)),
                       "w4a16_graph": (runs["w4a16"], len(w4))}
            if tiles is not None:
                graphed["w4a16_tiles_graph"] = (runs["w4a16_tiles"], len(tiles))
        for method, (fn, weight_bytes) in list(runs.items()) + [
                (name, run) for name, (run, _) in graphed.items()]:
            if method in graphed:
                seconds = time_graph(fn, graphed[method][1], device, repeats)
            else:
                seconds = time_fn(fn, warmup=3, repeats=repeats, device=device)
            median = statistics.median(seconds)
            nbytes = weight_bytes + (m * k + m * n) * act
            points.append({"shape": label, "k": k, "n": n, "group_size": group, "batch": m, "method": method,
                           "bytes": nbytes, "bytes_per_s": nbytes / median, "flops_per_s": 2 * m * n * k / median,
                           "stats": describe(seconds), "seconds": seconds,
                           "max_abs_error": errors.get(method)})
    return points


def plot(result: dict, path=None, axes=None):
    """Left: bs-1 bandwidth per shape and method; right: time vs batch for the first shape."""
    import matplotlib.pyplot as plt

    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    points, bw = result["points"], result["bandwidth"]["read_bytes_per_s"]
    methods = [m for m in ("cublas_fp16", "dense", "torch_int4pack", "w4a16", "w4a16_tiles")
               if any(p["method"] == m for p in points)]
    shapes = list(dict.fromkeys(p["shape"] for p in points))
    first = min(p["batch"] for p in points)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [next((p["bytes_per_s"] / 1e9 for p in points if p["shape"] == s and p["method"] == method
                        and p["batch"] == first), 0) for s in shapes]
        axes[0].bar([j + i * width for j in range(len(shapes))], values, width, label=method)
    axes[0].axhline(bw / 1e9, color="k", ls=":", label="measured read bandwidth")
    axes[0].set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(shapes))], shapes, fontsize=8)
    axes[0].set_ylabel(f"GB/s at batch {first}")
    axes[0].legend(fontsize=7)
    shape = shapes[0]
    for method in methods + ["w4a16_dequantize_only", "fp16_matmul_only"]:
        pts = sorted((p["batch"], p["stats"]["median"] * 1e6) for p in points
                     if p["shape"] == shape and p["method"] == method)
        if pts:
            axes[1].plot(*zip(*pts), "o-" if "only" not in method else ".:", label=method)
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("batch (tokens)")
    axes[1].set_ylabel(f"µs per call, {shape}")
    axes[1].legend(fontsize=7)
    axes[0].figure.suptitle(f"W4A16 g{result['group_size']} vs {result['dtype']} on {result['device']}", fontsize=9)
    if path is not None and fig is not None:
        save_figure(fig, path)
    return axes


def main(argv=None) -> dict:
    parser = bench_parser("w4a16", __doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batches", default=None, help=f"comma-separated (default: CUDA {CUDA_BATCHES}, "
                        f"CPU {CPU_BATCHES})")
    parser.add_argument("--group-size", type=int, default=None,
                        help="default 128 on a GPU; 32 on a CPU (11008 / 8 = 1376 = 43·32)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on a GPU, 7 on a CPU")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    batches = [int(b) for b in (args.batches or (CUDA_BATCHES if cuda else CPU_BATCHES)).split(",")]
    scale = 1 if cuda else CPU_SCALE
    args.group_size = args.group_size or (128 if cuda else 32)
    if not cuda:
        print(f"CPU run: Llama-2-7B shapes / {CPU_SCALE}, float32 activations.")
    bandwidth = measure_bandwidth(device)
    points = []
    for label, k, n in SHAPES:
        points += bench_shape(f"{label} {k // scale}→{n // scale}", k // scale, n // scale, args.group_size,
                              batches, dtype, device, args.repeats or (20 if cuda else 7))
    baseline = "cublas_fp16" if cuda else "dense"
    for p in points:
        p["fraction_of_read_bandwidth"] = p["bytes_per_s"] / bandwidth["read_bytes_per_s"]
        base_method = baseline + "_graph" if p["method"].endswith("_graph") else baseline
        base = next(b for b in points if b["shape"] == p["shape"] and b["batch"] == p["batch"]
                    and b["method"] == base_method)
        p["speedup_vs_baseline"] = base["stats"]["median"] / p["stats"]["median"]
    if cuda:
        add_read_floors(points, device, args.repeats or 20, bandwidth["read_bytes_per_s"])
    result = {"dtype": str(dtype).removeprefix("torch."), "group_size": args.group_size, "batches": batches,
              "small_shapes": not cuda, "baseline": baseline, "bandwidth": bandwidth, "points": points}
    tag = device_tag(device)
    out = write_result(f"w4a16_{tag}", result, device)
    result = load_result(f"w4a16_{tag}")
    plot(result, FIGURES / f"w4a16_{tag}.png")
    print(f"{'shape':>20} {'batch':>5} {'method':>22} {'us':>9} {'GB/s':>7} {'of BW':>6} {'x base':>6} "
          f"{'a read-only kernel':>24}")
    for p in points:
        floor = p.get("read_floor")
        floor = (f"{floor['stats']['median'] * 1e6:>9.1f} us {floor['fraction_of_read_bandwidth']:>4.0%} of BW"
                 if floor else "")
        print(f"{p['shape']:>20} {p['batch']:>5} {p['method']:>22} {p['stats']['median'] * 1e6:>9.1f} "
              f"{p['bytes_per_s'] / 1e9:>7.0f} {p['fraction_of_read_bandwidth']:>6.0%} "
              f"{p['speedup_vs_baseline']:>6.2f} {floor}")
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()
