"""Linear layers of Llama-2-7B on the measured roofline of this device.

First measures the device's two ceilings: read bandwidth of a buffer far
larger than the last-level cache, and FLOP/s of a large square matmul. Then
times y = x @ W^T for the 7B shapes at batch 1..512 and places every point on
that roofline: at small batch the points sit on the sloped (memory) roof, and
they bend over to the flat (compute) roof near the ridge point. Weights rotate
through copies that overflow the cache, as they do inside a model.

On a CPU the shapes are the 7B ones divided by 8, in fp32, so the run takes
well under a minute on two cores; the JSON says so (`small_shapes`).
Writes figures/roofline_<device>.json and .png (device: h100, a100, cpu, ...).
"""
from __future__ import annotations

import os
import statistics

import torch
import torch.nn.functional as F

from ..models.shapes import MODEL_SHAPES
from ..roofline import (arithmetic_intensity, decode_crossover_batch, linear_bytes,
                        linear_flops, measure_roof, published_spec)
from .common import FIGURES, bench_parser, device_name, device_tag, load_result, roofline_plot, write_result
from .timing import Rotating, cache_bytes, describe, time_fn

# (label, in_features K, out_features N) of Llama-2-7B's linears; qkv is q, k, v fused.
SHAPES_7B = [("q/o", 4096, 4096), ("gate/up", 4096, 11008), ("down", 11008, 4096),
             ("qkv", 4096, 12288)]
CPU_SCALE = 8
DEFAULT_BATCHES = "1,2,4,8,16,32,64,128,256,512"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def measure_points(shapes, batches: list[int], dtype: torch.dtype, device: torch.device,
                   repeats: int) -> list[dict]:
    """Time F.linear for every shape and batch; one dict per point with raw seconds."""
    points = []
    for label, k, n in shapes:
        weights = Rotating(torch.randn(n, k, device=device, dtype=dtype) * k**-0.5)
        for batch in batches:
            x = torch.randn(batch, k, device=device, dtype=dtype)  # [B, K]; small, stays cached as in a model
            seconds = time_fn(lambda: F.linear(x, weights.next()[0]), warmup=3, repeats=repeats,
                              device=device)
            flops, nbytes = linear_flops(batch, n, k), linear_bytes(batch, n, k, dtype, act_fmt=dtype)
            median = statistics.median(seconds)
            points.append({
                "group": f"{label} {k}→{n}", "k": k, "n": n, "batch": batch,
                "intensity": arithmetic_intensity(batch, n, k, dtype, act_fmt=dtype),
                "flops": flops, "bytes": nbytes, "weight_copies": len(weights),
                "flops_per_s": flops / median, "bytes_per_s": nbytes / median,
                "stats": describe(seconds), "seconds": seconds,
            })
    return points


def roofs_of(result: dict) -> list[dict]:
    measured = result["measured_roof"]
    roofs = [{"label": "measured", "peak_flops": measured["peak_flops"],
              "bandwidth": measured["bandwidth"]}]
    if result.get("published"):
        spec = result["published"]
        roofs.append({"label": f"{spec['name']} datasheet", "peak_flops": spec["peak_tflops"] * 1e12,
                      "bandwidth": spec["bandwidth_gbs"] * 1e9, "dashed": True})
    return roofs


def plot_result(result: dict, path=None, ax=None):
    """Draw a roofline JSON (this module's output) — also what the chapter-2 notebook calls."""
    scaled = f", shapes / {result['shape_scale']} (CPU)" if result["small_shapes"] else ""
    title = (f"{result['device']}\n{result['dtype']} linears of Llama-2-7B, "
             f"batch {result['batches'][0]}–{result['batches'][-1]}{scaled}")
    return roofline_plot(path, roofs_of(result), result["points"], title, ax=ax)


def main(argv=None) -> dict:
    parser = bench_parser("roofline", __doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batches", default=DEFAULT_BATCHES, help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per point "
                        "(default: 20 on a GPU, 7 on a CPU)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: float16 on a GPU, float32 on a CPU")
    parser.add_argument("--full-shapes", action="store_true",
                        help="on a CPU, time the real 7B shapes too (minutes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 avoids stalls on a busy shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if cuda else torch.float32)
    repeats = args.repeats or (20 if cuda else 7)
    batches = sorted({int(b) for b in args.batches.split(",")})
    small = not cuda and not args.full_shapes
    scale = CPU_SCALE if small else 1
    shapes = [(label, k // scale, n // scale) for label, k, n in SHAPES_7B]
    name = device_name(device)
    if small:
        print(f"CPU run: Llama-2-7B shapes divided by {CPU_SCALE} in {str(dtype).removeprefix('torch.')}, so that it finishes "
              "in seconds; GPU figures come from a GPU run (--full-shapes for the real shapes).")
    load_before = os.getloadavg()

    roof, raw = measure_roof(device, dtype=dtype, repeats=max(5, repeats // 2))
    print(f"{name}: measured read {raw['bandwidth']['read_bytes_per_s'] / 1e9:.1f} GB/s, copy "
          f"{raw['bandwidth']['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
          f"{roof.peak_flops / 1e12:.3g} TFLOP/s ({raw['matmul']['dtype']}), ridge {roof.ridge:.3g} FLOP/B")
    points = measure_points(shapes, batches, dtype, device, repeats)
    for p in points:
        p["fraction_of_roof"] = p["flops_per_s"] / roof.attainable(p["intensity"])

    spec = published_spec(name) if cuda else None
    seven_b = MODEL_SHAPES["llama2-7b"]
    crossover = {"measured": decode_crossover_batch(seven_b, roof)}
    if spec is not None:
        crossover["published"] = decode_crossover_batch(seven_b, spec.roof())
    result = {
        "device_tag": device_tag(device), "dtype": str(dtype).removeprefix("torch."),
        "small_shapes": small, "shape_scale": scale,
        "note": (f"CPU: Llama-2-7B shapes / {CPU_SCALE}, {dtype}; not the GPU story's numbers"
                 if small else "Llama-2-7B linear shapes"),
        "threads": torch.get_num_threads(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "cache_bytes": cache_bytes(device),
        "batches": batches, "repeats": repeats,
        "measured": raw,
        "measured_roof": {"peak_flops": roof.peak_flops, "bandwidth": roof.bandwidth,
                          "ridge": roof.ridge, "bandwidth_from": "read-only sum",
                          "peak_from": (f"best square {raw['matmul']['dtype']} matmul of n in "
                                        f"{[run['n'] for run in raw['matmul']['runs']]}: "
                                        f"n={raw['matmul']['n']}")},
        "published": None if spec is None else {
            "name": spec.name, "peak_tflops": spec.peak_tflops, "bandwidth_gbs": spec.bandwidth_gbs,
            "ridge": spec.roof().ridge, "source": spec.source},
        "llama2_7b_decode_crossover_batch": crossover,
        "points": points,
    }
    tag = result["device_tag"]
    path = write_result(f"roofline_{tag}", result, device)
    result = load_result(f"roofline_{tag}")  # the plot shows exactly what the JSON holds
    plot_result(result, FIGURES / f"roofline_{tag}.png")

    print(f"{'shape':>20} {'batch':>5} {'median us':>10} {'FLOP/B':>7} {'TFLOP/s':>8} "
          f"{'GB/s':>8} {'of roof':>7}")
    for p in points:
        print(f"{p['group']:>20} {p['batch']:>5} {p['stats']['median'] * 1e6:>10.1f} "
              f"{p['intensity']:>7.1f} {p['flops_per_s'] / 1e12:>8.3f} {p['bytes_per_s'] / 1e9:>8.1f} "
              f"{p['fraction_of_roof']:>7.0%}")
    print(f"Llama-2-7B decode turns compute-bound at batch ≈ {crossover} (context 0) -> {path}")
    return result


if __name__ == "__main__":
    main()
