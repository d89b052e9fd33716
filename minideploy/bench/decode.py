"""Greedy decode speed: the native model against transformers' `generate`.

Same model, same prompts, same dtype, same run. For `generate`, decode speed
is (N - 1) tokens over t(N new tokens) - t(1 new token), so prompt processing
cancels out.

CPU (default): the real default model at batch 1 through the engine's
generator, float and then with its decoder linears in W4 (RTN g64 in memory,
in the CPU kernel's tiles of rows; and, as the baseline of that layout, in the
rows every device shares), then also its LM head in int8 (one scale a row: the
default model's GGUF keeps that matrix in 8 bits too), then W4A16 as LMDeploy
runs it (the float16 model, same quantization, LM head float16), and the W4 +
int8 head model once more with its decoder layers run by the Python loop
instead of one C++ call a step (`LlamaModel.decode_in_one_call`). The seven
(HF included) take turns, one timed generation each per round, so that a drift
of the machine's speed reaches them all alike.
Writes figures/decode_cpu.json.

CUDA with --model-shape (e.g. llama2-7b): random fp16 weights built on the
GPU; native decode replays CUDA graphs (one per batch bucket) with the greedy
token fed back on the device, timed with CUDA events; HF `generate` on a
same-shaped model; and the weight-streaming limit, weight bytes over the
measured copy bandwidth; then the same model RTN-quantized to W4A16 (g128)
and timed again (`--w4a16-group-size 0` skips it), in the kernel's tiles as the
engine runs it, and at the smallest batch also in the shared row layout (the
baseline of the tiles). Each model is also timed at
batch 1 from a graph captured with programmatic dependent launch off
(MINIDEPLOY_PDL=0, csrc/cuda/launch.cuh): what overlapping the kernels is
worth. `--profile` adds GPU time per kernel of a bs-1 step, also measured with
PDL off: with it on, a kernel's time includes its wait for the one before.
Writes figures/decode_<gpu>.json.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from .. import kernels
from ..config import GenerationConfig, ModelConfig, QuantConfig
from ..engine import Generator
from ..engine.cuda_graphs import CUDAGraphDecoder
from ..memory import weight_bytes
from ..models import KVCache, load_model, random_model
from ..models.shapes import MODEL_SHAPES
from ..quant import quantize_lm_head_, quantize_model_, tile_linears_
from ..roofline import measure_bandwidth
from .common import FIGURES, bar_plot, bench_parser, device_tag, load_result, save_figure, summarize, write_result
from .timing import describe, time_fn

PROMPT = "Write a short story about a robot who learns to paint."


def time_native(gen: Generator, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    start = time.perf_counter()
    for seqs in gen.stream([ids], [config]):
        pass
    return time.perf_counter() - start, seqs[0].output_ids


def time_hf(hf, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids], device=hf.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out[0, len(ids):].tolist()


def decode_rates(timers: dict, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Median decode tokens/s of each timer, prefill cancelled out; raw timings kept.

    The timers take turns, round by round: on a machine whose speed drifts (a shared
    CPU did by 2x within minutes) every variant sees the same drift."""
    for timer in timers.values():
        timer(2)  # warm-up: kernel builds, allocator, thread pools
    runs = {name: {"full": [], "one": [], "tokens": None} for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            t, runs[name]["tokens"] = timer(new_tokens)
            runs[name]["full"].append(t)
            runs[name]["one"].append(timer(1)[0])
    return {name: {"tokens_per_s": (new_tokens - 1) / (summarize(r["full"])["median"] - summarize(r["one"])["median"]),
                   "seconds_n_tokens": r["full"], "seconds_1_token": r["one"], "tokens": r["tokens"]}
            for name, r in runs.items()}


def decode_rate(timer, new_tokens: int, repeats: int) -> dict:
    return decode_rates({"only": timer}, new_tokens, repeats)["only"]


def hf_model_of_shape(config: ModelConfig, dtype: torch.dtype, device: str):
    """transformers' LlamaForCausalLM with this shape and random weights, built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                            intermediate_size=config.intermediate_size,
                            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                            num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                            max_position_embeddings=config.max_position_embeddings,
                            rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                            tie_word_embeddings=config.tie_word_embeddings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)


def plot_cpu(result: dict, path) -> None:
    """The CPU run's tokens/s, one bar a variant."""
    g = result["native_w4"]["group_size"]
    variants = {"HF generate": "hf_generate", "minideploy\nfloat": "native",
                f"W4 g{g}\nrows": "native_w4_row_layout", f"W4 g{g}\ntiles": "native_w4",
                f"W4 g{g} tiles + int8\nhead, Python loop": "native_w4_int8_head_python_loop",
                f"W4 g{g} tiles\n+ int8 LM head": "native_w4_int8_head",
                f"W4A16 g{g}\n(fp16 activations)": "native_w4a16"}
    bar_plot(path, list(variants), [result[key]["tokens_per_s"] for key in variants.values()],
             "decode tokens/s (bs 1)",
             f"default model, {result['dtype']} activations, CPU ({result['threads']} threads): "
             f"{result['speedup']:.2f}x HF; W4 {result['w4_speedup_vs_float']:.2f}x float")


def bench_cpu(args) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    loaded = load_model(args.model, dtype=dtype, device="cpu")
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    hf = AutoModelForCausalLM.from_pretrained(str(loaded.source.path), dtype=dtype).eval()

    quant = QuantConfig(4, args.w4_group_size)
    w4_model = load_model(args.model, dtype=dtype, device="cpu")
    quantize_model_(w4_model.model, quant)  # RTN in memory: speed does not depend on how scales were found
    # The same, and the LM head in int8 too (one scale a row), as the default model's GGUF keeps it.
    w4_head_model = load_model(args.model, dtype=dtype, device="cpu")
    quantize_lm_head_(quantize_model_(w4_head_model.model, quant))
    # W4A16 as LMDeploy runs it: float16 activations, embeddings and LM head beside the
    # int4 linears (the LM head, the largest matrix left, then streams half the bytes).
    half = load_model(args.model, dtype=torch.float16, device="cpu")
    quantize_model_(half.model, quant)
    # The W4 + int8 head model again, its layers run by the Python loop instead of one C++ call
    # a step (LlamaModel.decode_in_one_call): what that call saves.
    loop_model = load_model(args.model, dtype=dtype, device="cpu")
    quantize_lm_head_(quantize_model_(loop_model.model, quant))
    loop_model.model.decode_in_one_call = False
    session_len = len(ids) + args.new_tokens
    gens = {name: Generator(m.model, m.tokenizer, m.config, session_len=session_len)
            for name, m in (("native", loaded), ("w4", w4_model), ("w4_int8_head", w4_head_model), ("w4a16", half),
                            ("w4_int8_head_python_loop", loop_model))}
    # The W4 model in the layout every device shares: quantized after its Generator is built
    # (a runner tiles the int4 linears it is given for the CPU kernel), so it keeps the rows.
    rows_model = load_model(args.model, dtype=dtype, device="cpu")
    gens["w4_rows"] = Generator(rows_model.model, rows_model.tokenizer, rows_model.config, session_len=session_len)
    quantize_model_(rows_model.model, quant)
    rates = decode_rates({"hf": lambda n: time_hf(hf, ids, n),
                          **{name: (lambda n, g=g: time_native(g, ids, n)) for name, g in gens.items()}},
                         args.new_tokens, args.repeats)
    hf_result, native, w4, w4_int8_head, w4a16, w4_rows, w4_loop = (
        rates[k] for k in ("hf", "native", "w4", "w4_int8_head", "w4a16", "w4_rows", "w4_int8_head_python_loop"))
    tile_rows = kernels.w4a16_tile_shape(torch.device("cpu"))[0]
    result = {
        "model": str(loaded.source.path), "dtype": args.dtype, "batch_size": 1,
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(), "interleaved_repeats": args.repeats,
        "hf_generate": hf_result, "native": native,
        "speedup": native["tokens_per_s"] / hf_result["tokens_per_s"],
        "same_tokens": native["tokens"] == hf_result["tokens"],
        "native_w4": {**w4, "w_bits": quant.w_bits, "group_size": quant.group_size, "tile_rows": tile_rows,
                      "note": "decoder linears RTN-quantized in memory, in the CPU kernel's tiles of rows "
                              "(quant.tile_linears_); embeddings and LM head float"},
        "w4_speedup_vs_float": w4["tokens_per_s"] / native["tokens_per_s"],
        "native_w4_row_layout": {**w4_rows, "w_bits": quant.w_bits, "group_size": quant.group_size,
                                 "note": "as native_w4 in the layout every device shares (not tiled): "
                                         "the kernel transposes each tile's rows in registers"},
        "w4_tiles_speedup_vs_rows": w4["tokens_per_s"] / w4_rows["tokens_per_s"],
        "native_w4_int8_head": {**w4_int8_head, "w_bits": quant.w_bits, "group_size": quant.group_size,
                                "note": "as native_w4, and the LM head int8 with one scale per row "
                                        "(quant.quantize_lm_head_)"},
        "w4_int8_head_speedup_vs_float": w4_int8_head["tokens_per_s"] / native["tokens_per_s"],
        "native_w4_int8_head_python_loop": {**w4_loop, "note": "as native_w4_int8_head, its decoder layers run "
                                            "by the Python loop (decode_in_one_call False), not one C++ call"},
        "layers_in_one_call_speedup": w4_int8_head["tokens_per_s"] / w4_loop["tokens_per_s"],
        "layers_in_one_call_same_tokens": w4_int8_head["tokens"] == w4_loop["tokens"],
        "native_w4a16": {**w4a16, "w_bits": quant.w_bits, "group_size": quant.group_size,
                         "note": "the same RTN quantization of the float16 model: float16 activations, "
                                 "embeddings and LM head"},
        "w4a16_speedup_vs_float": w4a16["tokens_per_s"] / native["tokens_per_s"],
    }
    path = write_result("decode_cpu", result, "cpu")
    plot_cpu(result, FIGURES / "decode_cpu.png")
    print(f"HF generate {hf_result['tokens_per_s']:.1f} tok/s | minideploy "
          f"{native['tokens_per_s']:.1f} tok/s | speedup {result['speedup']:.2f}x | "
          f"same greedy tokens: {result['same_tokens']} | W4 rows {w4_rows['tokens_per_s']:.1f}, "
          f"tiles {w4['tokens_per_s']:.1f} tok/s | "
          f"W4 + int8 LM head {w4_int8_head['tokens_per_s']:.1f} tok/s "
          f"(layers in the Python loop: {w4_loop['tokens_per_s']:.1f}) | "
          f"W4A16 (float16 activations) {w4a16['tokens_per_s']:.1f} tok/s -> {path}")
    return result


def bench_cuda(args) -> dict:
    device, dtype = "cuda", getattr(torch, args.dtype)
    config = MODEL_SHAPES[args.model_shape]
    batches = sorted(args.batches)
    max_len = args.prompt_len + args.new_tokens + 1
    bandwidth = measure_bandwidth(device)
    weights = weight_bytes(config, dtype)
    limit = bandwidth["copy_bytes_per_s"] / weights  # tokens/s at batch 1 if only weights moved

    model = random_model(config, dtype, device, max_positions=max_len)
    cache = KVCache(config, max(batches), max_len, dtype, device)
    native = time_graphs(model, cache, batches, args, "fp16")
    kernel_profile = profile_step(model, cache, args) if args.profile else None
    w4a16 = None
    if args.w4a16_group_size:
        quant = QuantConfig(4, args.w4a16_group_size)
        quantize_model_(model, quant)  # RTN on the GPU; the fp16 decoder weights are freed
        torch.cuda.empty_cache()
        w4_bytes = model_bytes(model)
        # The baseline of the kernel's tiles: the layout every device shares (AutoAWQ's rows).
        rows = time_graphs(model, cache, batches[:1], args, "w4a16 rows")
        tile_linears_(model)  # what the engine's runners do at load
        w4a16 = {"group_size": quant.group_size, "weight_bytes": w4_bytes,
                 "weight_streaming_limit_tokens_per_s": bandwidth["copy_bytes_per_s"] / w4_bytes,
                 "tile_shape": kernels.w4a16_tile_shape(torch.device(device)),
                 "native": time_graphs(model, cache, batches, args, "w4a16"),
                 "native_row_layout": rows,
                 "kernel_profile": profile_step(model, cache, args) if args.profile else None}
    del cache, model
    torch.cuda.empty_cache()

    hf = hf_model_of_shape(config, dtype, device)
    hf_rows = {}
    for batch in batches:
        ids = torch.randint(0, config.vocab_size, (batch, args.prompt_len)).tolist()
        hf_rows[batch] = decode_rate(lambda n: time_hf_batch(hf, ids, n), args.hf_new_tokens, 2)
        hf_rows[batch]["tokens_per_s"] *= batch
        hf_rows[batch].pop("tokens")
        print(f"bs {batch:3d}: HF generate {hf_rows[batch]['tokens_per_s']:8.1f} tok/s", flush=True)
    bs1 = native[batches[0]]["graph"]["tokens_per_s"]
    result = {
        "model_shape": args.model_shape, "dtype": args.dtype, "weight_bytes": weights,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "hf_new_tokens": args.hf_new_tokens,
        "bandwidth": bandwidth, "weight_streaming_limit_tokens_per_s": limit,
        "native": native, "hf_generate": hf_rows,
        "bs1_fraction_of_limit": bs1 / limit,
        "bs1_speedup_vs_hf": bs1 / hf_rows[batches[0]]["tokens_per_s"],
        "kernel_profile": kernel_profile,
        "w4a16": w4a16,
    }
    if w4a16 is not None:
        w4_bs1 = w4a16["native"][batches[0]]["graph"]["tokens_per_s"]
        w4a16["bs1_speedup_vs_fp16"] = w4_bs1 / bs1
        w4a16["bs1_fraction_of_limit"] = w4_bs1 / w4a16["weight_streaming_limit_tokens_per_s"]
        w4a16["bs1_tiles_speedup_vs_rows"] = (
            w4_bs1 / w4a16["native_row_layout"][batches[0]]["graph"]["tokens_per_s"])
    tag = device_tag(device)
    path = write_result(f"decode_{tag}", result, device)
    result = load_result(f"decode_{tag}")  # the plot shows exactly what the JSON holds
    plot_cuda(result, FIGURES / f"decode_{tag}.png")
    print(f"bs1: {bs1:.1f} tok/s = {100 * bs1 / limit:.1f}% of the weight-streaming limit "
          f"{limit:.1f} tok/s ({bandwidth['copy_bytes_per_s'] / 1e12:.2f} TB/s copy); "
          f"{result['bs1_speedup_vs_hf']:.1f}x HF generate -> {path}")
    if w4a16 is not None:
        print(f"W4A16 g{w4a16['group_size']} bs1: {w4a16['bs1_speedup_vs_fp16']:.2f}x fp16, "
              f"{100 * w4a16['bs1_fraction_of_limit']:.1f}% of its weight-streaming limit")
    return result


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step streams for the weights: parameters and quantized buffers (not RoPE tables)."""
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers() if not name.endswith("cos_sin")]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@contextlib.contextmanager
def pdl_off():
    """Kernels launched meanwhile (or captured into a graph) run one after the other."""
    before = os.environ.get("MINIDEPLOY_PDL")
    os.environ["MINIDEPLOY_PDL"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MINIDEPLOY_PDL"]
        else:
            os.environ["MINIDEPLOY_PDL"] = before


def time_graphs(model, cache, batches: list[int], args, label: str) -> dict:
    """Decode tokens/s per batch: CUDA-graph replay, the eager loop for `--eager-batches`,
    and at the smallest batch a graph captured with PDL off ("graph_no_pdl")."""
    graphs = CUDAGraphDecoder(model, cache, buckets=batches)
    graphs.capture()
    eager = CUDAGraphDecoder(model, cache, buckets=batches)  # never captured: the eager loop
    no_pdl = CUDAGraphDecoder(model, cache, buckets=batches[:1])
    with pdl_off():
        no_pdl.capture()
    native = {}
    for batch in batches:
        prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), device="cuda")
        first = graphs.prefill(prompts)
        positions = torch.full((batch,), args.prompt_len, device="cuda")
        row = {}
        for name, decoder in (("graph", graphs), ("eager", eager), ("graph_no_pdl", no_pdl)):
            if ((name == "eager" and batch not in args.eager_batches)
                    or (name == "graph_no_pdl" and batch != batches[0])):
                continue
            seconds = time_fn(lambda: decoder.greedy(first, positions, args.new_tokens), warmup=1,
                              repeats=args.repeats, device="cuda")
            row[name] = {"seconds": seconds, "step_ms": describe([1e3 * s / args.new_tokens for s in seconds]),
                         "tokens_per_s": batch * args.new_tokens / describe(seconds)["median"]}
        native[batch] = row
        print(f"{label} bs {batch:3d}: graph {row['graph']['tokens_per_s']:8.1f} tok/s"
              + (f" | eager {row['eager']['tokens_per_s']:.1f}" if "eager" in row else "")
              + (f" | graph, PDL off {row['graph_no_pdl']['tokens_per_s']:.1f}" if "graph_no_pdl" in row else ""),
              flush=True)
    return native


def profile_step(model, cache, args, steps: int = 8) -> list[dict]:
    """GPU time per kernel over `steps` eager bs-1 decode steps: where a step's time goes.

    With PDL off: a kernel launched early would count its wait for the one before."""
    from torch.profiler import ProfilerActivity, profile

    decoder = CUDAGraphDecoder(model, cache, buckets=[1])
    first = decoder.prefill(torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device="cuda"))
    positions = torch.full((1,), args.prompt_len, device="cuda")
    decoder.greedy(first, positions, 2)
    torch.cuda.synchronize()
    with pdl_off(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.greedy(first, positions, steps)
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:120], "calls_per_step": e.count / steps,
             "us_per_step": e.self_device_time_total / steps}
            for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r["us_per_step"])[:25]


def time_hf_batch(hf, ids: list[list[int]], new_tokens: int) -> tuple[float, list[int]]:
    x = torch.tensor(ids, device=hf.device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start, []


def plot_cuda(result: dict, path=None, ax=None):
    """Decode tokens/s against batch size from a decode_<gpu>.json (also used by notebook 02)."""
    import matplotlib.pyplot as plt

    batches = sorted(int(b) for b in result["native"])
    result = {**result, "native": {int(b): v for b, v in result["native"].items()},
              "hf_generate": {int(b): v for b, v in result["hf_generate"].items()}}
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(batches, [result["native"][b]["graph"]["tokens_per_s"] for b in batches], "o-",
            label="minideploy (CUDA graphs)")
    eager = [b for b in batches if "eager" in result["native"][b]]
    ax.plot(eager, [result["native"][b]["eager"]["tokens_per_s"] for b in eager], "s--",
            label="minideploy eager")
    if result.get("w4a16"):
        w4 = {int(b): v for b, v in result["w4a16"]["native"].items()}
        ax.plot(batches, [w4[b]["graph"]["tokens_per_s"] for b in batches], "D-",
                label=f"minideploy W4A16 g{result['w4a16']['group_size']} (CUDA graphs)")
    ax.plot(batches, [result["hf_generate"][b]["tokens_per_s"] for b in batches], "^-",
            label="HF generate")
    ax.plot(batches, [b * result["weight_streaming_limit_tokens_per_s"] for b in batches], "k:",
            label="weight-streaming limit x batch")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title(f"{result['model_shape']} {result['dtype']} decode on {result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    if path is not None and fig is not None:
        save_figure(fig, path)
    return ax


def main(argv=None) -> dict:
    parser = bench_parser("decode", __doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="default", help="CPU: model path or 'default'")
    parser.add_argument("--model-shape", default="llama2-7b", choices=sorted(MODEL_SHAPES),
                        help="CUDA: random-weight model of this shape")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="CUDA")
    parser.add_argument("--eager-batches", type=int, nargs="+", default=[1, 8], help="CUDA")
    parser.add_argument("--prompt-len", type=int, default=128, help="CUDA")
    parser.add_argument("--hf-new-tokens", type=int, default=32, help="CUDA: HF generate is slow")
    parser.add_argument("--w4a16-group-size", type=int, default=128,
                        help="CUDA: then RTN-quantize the same model to W4A16 with this group size and "
                             "time it again (0: skip)")
    parser.add_argument("--w4-group-size", type=int, default=64, help="CPU: group size of the W4 row")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: record GPU time per kernel of a bs-1 decode step")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        args.dtype = args.dtype or "float16"
        return bench_cuda(args)
    args.dtype = args.dtype or "float32"
    return bench_cpu(args)


if __name__ == "__main__":
    main()
