"""Tensor parallelism: decode latency per token at tp=1 and tp=N, all-reduce cost, the α-β model.

CPU (default): the built-in default model (9 heads, 3 KV heads) at tp=1 and
tp=3, ranks as gloo processes on this host's cores; all-reduce over gloo.
Writes figures/tp_cpu.json.

CUDA (`--device cuda`, needs 2 GPUs): Llama-2-7B and -13B shapes with seeded
random fp16 weights built on each GPU, tp=1 and tp=2 over NCCL, decode steps
(eager, a KV cache of `--context` tokens) at batch 1/8/64 timed with CUDA
events; NCCL all-reduce latency for the message sizes decode sends and a
sweep up to 64 MiB. Writes figures/tp_<gpu>x<tp>.json.

Both fit the ring model t(n) = 2(p-1)α + 2(p-1)/p·n/β to the sweep and print,
beside each measured tp=N step, the prediction tp=1 time / N + modelled
communication (2 all-reduces per layer + embedding all-reduce + logits
all-gather).
"""
from __future__ import annotations

import os
from functools import partial

import torch

from ..config import DTYPES
from ..models import ForwardContext, KVCache
from ..models.shapes import MODEL_SHAPES
from ..models.loader import model_config_of, resolve_model_path
from ..parallel import Checkpoint, RandomWeights, rank_device, run_spmd
from ..parallel.comm import allreduce_bytes_per_layer, decode_comm_seconds, fit_ring, measure_allreduce
from .common import FIGURES, bench_parser, device_name, device_tag, save_figure, write_result
from .timing import describe, time_fn


def decode_step_seconds(rank: int, tp: int, build, batches: list[int], context: int, device_type: str,
                        repeats: int) -> dict[int, dict]:
    """Inside a group: one decode step (forward + logits) per batch size, after `context` tokens."""
    model = build(rank, tp)
    device = rank_device(device_type, rank)
    cache = KVCache(model.config, max(batches), context + 1, model.dtype, device)
    out = {}
    with torch.inference_mode():
        for batch in batches:
            ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
            ctx = ForwardContext(torch.full((batch, 1), context, device=device), context + 1)
            samples = time_fn(lambda: model.logits(model(ids, ctx, cache)[:, -1]), warmup=3,
                              repeats=repeats, device=device)
            out[batch] = {**describe(samples), "samples": samples}
    return out


def plot(result: dict, path=None, axes=None):
    """Left: all-reduce time against message size, measured and modelled. Right: decode
    ms/token at tp=1 and tp=N, measured, and the model's tp=N prediction."""
    import matplotlib.pyplot as plt
    import numpy as np

    from ..parallel.comm import ring_allreduce_seconds

    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ar, tp = result["allreduce"], result["tp"]
    sizes = np.array([r["bytes"] for r in ar["measured"]])
    ax = axes[0]
    ax.loglog(sizes, [r["median"] * 1e6 for r in ar["measured"]], "o", ms=4, label=f"measured ({tp} ranks)")
    grid = np.logspace(np.log10(sizes.min()), np.log10(sizes.max()), 100)
    ax.loglog(grid, [ring_allreduce_seconds(n, tp, ar["alpha_s"], ar["beta_bytes_per_s"]) * 1e6 for n in grid],
              "-", label=f"ring model: α={ar['alpha_s'] * 1e6:.1f} µs, β={ar['beta_bytes_per_s'] / 1e9:.2f} GB/s")
    for n in sorted({r["allreduce_bytes_per_message"] for r in result["decode"]}):
        ax.axvline(n, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("message size (bytes); dotted: decode's messages")
    ax.set_ylabel("all-reduce time (µs)")
    ax.set_title(f"all-reduce, {result['backend']}", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    rows = result["decode"]
    x = np.arange(len(rows))
    for i, (key, label) in enumerate((("tp1_ms", "tp=1 measured"), ("tpn_ms", f"tp={tp} measured"),
                                      ("tpn_predicted_ms", f"tp={tp} predicted"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(x, [f"{r['model']}\nbs {r['batch']}" for r in rows], fontsize=7)
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"decode, {result['device']}", fontsize=9)
    ax.legend(fontsize=7)
    if path is not None:
        save_figure(axes[0].figure, path, close=fig is not None)
    return axes


def main(argv=None) -> dict:
    parser = bench_parser("tp", __doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tp", type=int, default=None, help="default: 3 on CPU, 2 on CUDA")
    parser.add_argument("--model", default="default", help="CPU: model path or 'default'")
    parser.add_argument("--model-shapes", nargs="+", default=["llama2-7b", "llama2-13b"],
                        choices=sorted(MODEL_SHAPES), help="CUDA: random-weight shapes")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: CPU 1 8, CUDA 1 8 64")
    parser.add_argument("--context", type=int, default=None, help="cached tokens per sequence "
                        "(default: CPU 64, CUDA 256)")
    parser.add_argument("--repeats", type=int, default=None, help="default: CPU 10, CUDA 30")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    tp = args.tp or (2 if cuda else 3)
    batches = args.batches or ([1, 8, 64] if cuda else [1, 8])
    context = args.context or (256 if cuda else 64)
    repeats = args.repeats or (30 if cuda else 10)
    dtype = DTYPES["float16" if cuda else "float32"]
    if cuda:
        models = [(name, RandomWeights(MODEL_SHAPES[name], dtype, "cuda"), MODEL_SHAPES[name])
                  for name in args.model_shapes]
    else:
        models = [(args.model, Checkpoint(args.model, dtype, "cpu"),
                   model_config_of(resolve_model_path(args.model)))]
    dtype_bytes = torch.finfo(dtype).bits // 8
    load_before = os.getloadavg()  # CPU timings on a shared host move with what else runs there

    decode_sizes = sorted({b * c.hidden_size * dtype_bytes for _, _, c in models for b in batches})
    sweep = [2**k for k in range(10, 27 if cuda else 23)]
    sizes = sorted(set(sweep + decode_sizes))
    measured = run_spmd(partial(measure_allreduce, sizes=sizes, device_type=args.device, dtype=dtype,
                                repeats=repeats), tp, args.device)
    alpha, beta = fit_ring(sizes, [measured[s]["median"] for s in sizes], tp)
    print(f"all-reduce over {tp} ranks: α = {alpha * 1e6:.1f} µs, β = {beta / 1e9:.2f} GB/s")

    rows, raw = [], {}
    for name, build, config in models:
        steps = {t: run_spmd(partial(decode_step_seconds, build=build, batches=batches, context=context,
                                     device_type=args.device, repeats=repeats), t, args.device)
                 for t in (1, tp)}
        raw[name] = {f"tp{t}": {str(b): v for b, v in s.items()} for t, s in steps.items()}
        for b in batches:
            one, many = steps[1][b]["median"], steps[tp][b]["median"]
            comm = decode_comm_seconds(config, tp, b, dtype_bytes, alpha, beta)
            rows.append({"model": name, "batch": b, "tp1_ms": one * 1e3, "tpn_ms": many * 1e3,
                         "speedup": one / many, "tpn_predicted_ms": (one / tp + comm) * 1e3,
                         "predicted_comm_ms": comm * 1e3,
                         "allreduce_bytes_per_message": b * config.hidden_size * dtype_bytes,
                         "allreduce_bytes_per_token_per_layer":
                             allreduce_bytes_per_layer(config, 1, dtype_bytes),
                         "allreduces_per_step": 2 * config.num_layers + 1})
            r = rows[-1]
            print(f"{name} bs {b}: tp=1 {r['tp1_ms']:.2f} ms, tp={tp} {r['tpn_ms']:.2f} ms "
                  f"(predicted {r['tpn_predicted_ms']:.2f}: {r['predicted_comm_ms']:.2f} ms communication)")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    figure = "tp_cpu" if not cuda else f"tp_{device_tag(device)}x{tp}"
    result = {"tp": tp, "backend": "nccl" if cuda else "gloo", "dtype": str(dtype).removeprefix("torch."),
              "context": context, "batches": batches,
              "note": ("ranks are processes sharing this host's CPU cores" if not cuda
                       else "random fp16 weights; eager decode steps (no CUDA graphs)"),
              "host_load_avg_before_after": [load_before, os.getloadavg()],
              "allreduce": {"alpha_s": alpha, "beta_bytes_per_s": beta,
                            "measured": [measured[s] for s in sizes]},
              "decode": rows, "raw_decode": raw}
    path = write_result(figure, result, device)
    plot({**result, "device": device_name(device)}, FIGURES / f"{figure}.png")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
