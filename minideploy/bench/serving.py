"""Serving throughput and latency: continuous batching vs transformers' static batching.

Workload (seeded): N requests of random prompt tokens with random prompt and
output lengths, every output exactly its length (`ignore_eos`), arriving all at
once (`--request-rate inf`) or as a Poisson process. The engine runs them with
continuous batching over the paged cache, once per `--max-batch-sizes` entry;
the baseline — transformers' `generate` on the same model with left-padded
static batches in arrival order, each batch running until its longest output is
done — runs the same requests in the same process. Each static batch's
`generate` is timed and the timeline rebuilt from the durations (a batch starts
once it is full and the previous one is done), so a baseline longer than one
machine session allows is timed in parts: `--hf-batches 0:3`, then
`--append --max-batch-sizes '' --hf-batches 3:8`, on the same kind of machine.

Reported per run: requests/s, output tokens/s, and p50/p90/p99 of time to first
token (TTFT), time per output token after the first (TPOT), inter-token latency
(ITL) and end-to-end latency. Static batching returns a batch's tokens when the
batch ends, so its TTFT is its end-to-end latency.

`--quant-policy 8` (4) adds the engine over an int8 (int4) KV cache: the same memory
holds twice (~3.5x) the tokens, so larger batches run without preemption.

CPU: the default model (fp32, and W4 g64 RTN with `--w4`), short lengths;
CUDA: a Llama-2-7B-shaped fp16 model with random weights (speed does not depend
on the values). Its baseline is static batch 32: on an 80 GB H100, batch 48 ran
only with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True and was slower (422 vs
487 tok/s), batch 64 ran out of memory either way (figures/serving_h100.json keeps
each try). Writes figures/serving_{cpu,h100}.json and a plot.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig, GenerationConfig, QuantConfig
from ..engine.llm_engine import LLMEngine
from ..cache.kv_cache import KV_FORMATS
from ..memory import TORCH_FORMATS
from ..models import LoadedModel, NoTokenizer, load_model, random_model
from ..models.shapes import MODEL_SHAPES
from ..quant import quantize_model_
from ..roofline import Roof, measure_roof, predict_step_time
from .common import (FIGURES, bench_parser, device_name, device_tag, load_result, provenance, save_figure,
                     write_result)
from .decode import hf_model_of_shape


@dataclass
class Request:
    prompt_ids: list[int]
    output_len: int
    arrival: float
    token_times: list[float] = field(default_factory=list)


def make_workload(count: int, seed: int, prompt_lens, output_lens, vocab: int, rate: float) -> list[Request]:
    rng = random.Random(seed)
    requests, clock = [], 0.0
    for _ in range(count):
        if math.isfinite(rate):
            clock += rng.expovariate(rate)
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(*prompt_lens))]
        requests.append(Request(prompt, rng.randint(*output_lens), clock))
    return requests


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    return {f"p{q}": float(torch.quantile(t, q / 100)) for q in (50, 90, 99)} | {"mean": float(t.mean())}


def summarize(requests: list[Request], seconds: float, streaming: bool) -> dict:
    outputs = sum(r.output_len for r in requests)
    ttft = [r.token_times[0] - r.arrival for r in requests]
    e2e = [r.token_times[-1] - r.arrival for r in requests]
    itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])] if streaming else []
    tpot = [(r.token_times[-1] - r.token_times[0]) / (r.output_len - 1) for r in requests
            if streaming and r.output_len > 1]
    return {"seconds": seconds, "requests_per_s": len(requests) / seconds, "output_tokens_per_s": outputs / seconds,
            "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "itl_s": percentiles(itl),
            "e2e_s": percentiles(e2e)}


def run_engine(loaded: LoadedModel, engine_config: EngineConfig, workload: list[Request], roof: Roof,
               weights: dict | None = None) -> dict:
    """Run the workload; besides the request metrics, split the time into prefill and decode
    steps and set the decode steps beside chapter 2's roofline (`predict_step_time` for each
    step's batch and cached tokens, at the measured bandwidth and matmul peak)."""
    requests = [Request(r.prompt_ids, r.output_len, r.arrival) for r in workload]
    engine = LLMEngine(loaded, engine_config)
    engine.generate([[11] * 16], [GenerationConfig(max_new_tokens=2, ignore_eos=True)])  # warm-up
    by_seq, pending, steps = {}, list(requests), 0
    split = {"prefill_steps": 0, "prefill_s": 0.0, "decode_steps": 0, "decode_s": 0.0, "decode_roofline_s": 0.0}
    weights = weights or {"weights": TORCH_FORMATS[engine.cache.dtype]}
    # A quantized cache's codes (its per-token scale and zero, ~6% more, are left out).
    kv_dtype = KV_FORMATS.get(engine.cache.quant_policy, TORCH_FORMATS[engine.cache.dtype])
    start = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            r = pending.pop(0)
            seq = engine.add_request(r.prompt_ids, GenerationConfig(max_new_tokens=r.output_len, ignore_eos=True))
            by_seq[seq.seq_id] = r
        if not engine.has_work():
            time.sleep(min(pending[0].arrival - now, 0.01))
            continue
        before = time.perf_counter()
        advanced = engine.step()  # returns once the step's tokens are on the host
        after = time.perf_counter()
        steps, now = steps + 1, after - start
        kind = "prefill" if engine.last_batch.is_prefill else "decode"
        split[f"{kind}_steps"] += 1
        split[f"{kind}_s"] += after - before
        if kind == "decode":
            cached = sum(s.num_computed for s in advanced) / len(advanced)
            split["decode_roofline_s"] += predict_step_time(engine.config, roof, len(advanced), round(cached),
                                                            kv_dtype=kv_dtype, **weights)
        for seq in advanced:
            by_seq[seq.seq_id].token_times.append(now)
    seconds = time.perf_counter() - start
    assert engine.manager.num_active == 0
    split["decode_fraction_of_roofline"] = split["decode_roofline_s"] / split["decode_s"]
    split["decode_step_ms"] = 1e3 * split["decode_s"] / max(split["decode_steps"], 1)
    return {"max_batch_size": engine_config.max_batch_size, "steps": steps,
            "preempted": engine.scheduler.num_preempted, "kv_blocks": engine.manager.num_blocks,
            **split, **summarize(requests, seconds, streaming=True)}


def run_hf_static(hf, workload: list[Request], batch_size: int, device: torch.device,
                  which: slice = slice(None)) -> dict:
    """Time transformers' `generate` on each static batch (all of them, or the slice `which`).

    Only the batches' durations are measured; `static_timeline` turns them into each
    request's finish time (a batch starts when it is full and the previous one is done),
    so the batches may be timed in several runs on the same machine (`--hf-batches`)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # How torch's allocator was set up decides whether a large padded batch fits: recorded.
    setup = {"cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")} if device.type == "cuda" else {}
    batches = [workload[i:i + batch_size] for i in range(0, len(workload), batch_size)]
    seconds: list[float | None] = [None] * len(batches)

    def generate(batch: list[Request]) -> float:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                            device=device)
        longest = max(r.output_len for r in batch)
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                        do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    # Warm-up, as the engine gets one: the first batch once, untimed. With a 2-token warm-up
    # the first timed batch on the H100 took twice as long as the same-sized batches after it
    # (83.8 vs 35-43 s): a first-run cost that belongs to no batch.
    # A batch size whose padded KV cache does not fit the device is recorded as such (the
    # largest static batch that fits is the baseline's best), not a crash of the whole run.
    try:
        print(f"HF static batch {batch_size}: warm-up (batch 1, untimed) took {generate(batches[0]):.1f} s",
              flush=True)
        for k in range(len(batches))[which]:
            seconds[k] = generate(batches[k])
            print(f"HF static batch {batch_size}: batch {k + 1}/{len(batches)} took {seconds[k]:.1f} s",
                  flush=True)
    except torch.OutOfMemoryError as error:
        message = (str(error).splitlines() or ["out of memory"])[0]
        print(f"HF static batch {batch_size}: out of memory ({message})", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # for the next batch size
        return {"batch_size": batch_size, **setup, "out_of_memory": message}
    return {"batch_size": batch_size, **setup, "batch_seconds": seconds}


def static_timeline(workload: list[Request], run: dict) -> dict:
    """The summary of a static-batching run whose every batch was timed (else `run` as it is)."""
    seconds, size = run.get("batch_seconds"), run["batch_size"]
    if seconds is None or any(s is None for s in seconds):
        return run
    requests = [Request(r.prompt_ids, r.output_len, r.arrival) for r in workload]
    done = 0.0
    for k, duration in enumerate(seconds):
        batch = requests[k * size:(k + 1) * size]
        done = max(done, batch[-1].arrival) + duration
        for r in batch:
            r.token_times = [done]
    return {**run, **summarize(requests, done, streaming=False)}


def merge_runs(old: list[dict], new: list[dict], key: str) -> list[dict]:
    """Runs by `key`: a new run replaces an old one, except that static batches timed only in
    the old run are kept (their durations fill the new run's gaps)."""
    merged = {r[key]: r for r in old}
    for run in new:
        before = merged.get(run[key])
        if before is not None and "batch_seconds" in run and "batch_seconds" in before:
            run = {**run, "batch_seconds": [n if n is not None else o
                                            for n, o in zip(run["batch_seconds"], before["batch_seconds"])]}
        merged[run[key]] = run
    return [merged[k] for k in sorted(merged)]


def plot(result: dict, path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, runs, key in (("minideploy (continuous)", result["engine"], "max_batch_size"),
                             ("HF generate (static)", result["hf_static"], "batch_size")):
        xs = [r[key] for r in runs]
        ax1.plot(xs, [r["output_tokens_per_s"] for r in runs], marker="o", label=label)
        ax2.plot(xs, [r["e2e_s"]["p50"] for r in runs], marker="o", label=f"{label} p50")
    for label, runs in {**result.get("engine_w4", {}), **result.get("engine_kv", {})}.items():
        ax1.plot([r["max_batch_size"] for r in runs], [r["output_tokens_per_s"] for r in runs], marker="s",
                 label=label)
    ax1.set(xscale="log", xlabel="max batch size", ylabel="output tokens/s", title="throughput")
    ax2.set(xscale="log", xlabel="max batch size", ylabel="end-to-end latency (s)", title="latency")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['model']} on {result['device']}: {result['requests']} requests", fontsize=10)
    save_figure(fig, path)


WORKLOAD_KEYS = ("model", "requests", "request_rate", "seed", "lengths")


def main(argv=None) -> dict:
    parser = bench_parser("serving", __doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--requests", type=int, default=None, help="default: 32 (CPU), 256 (CUDA)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson) or inf")
    parser.add_argument("--max-batch-sizes", default=None, help="comma-separated, '' for none; default "
                                                                "1,4,8,16 (CPU), 16,32,64,128,256 (CUDA)")
    parser.add_argument("--hf-batch-sizes", default=None, help="comma-separated, '' for none; default "
                                                               "1,4,8,16 (CPU), 32 (CUDA)")
    parser.add_argument("--hf-batches", default=None, metavar="START:STOP",
                        help="time only these static batches of the baseline (with --append, the rest "
                             "in other runs: a run longer than a machine allows, split)")
    parser.add_argument("--append", action="store_true",
                        help="merge into the existing figures JSON of the same workload and device")
    parser.add_argument("--w4", action="store_true", help="CPU: also the W4 g64 (RTN) model")
    parser.add_argument("--quant-policy", type=int, default=0, choices=[0, 8, 4],
                        help="also the engine over an int8 (8) / int4 (4) KV cache, at every max batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    count = args.requests or (256 if cuda else 32)
    sizes = lambda text: [int(b) for b in text.split(",") if b.strip()]  # noqa: E731
    batches = sizes(args.max_batch_sizes if args.max_batch_sizes is not None
                    else "16,32,64,128,256" if cuda else "1,4,8,16")
    hf_batches = sizes(args.hf_batch_sizes if args.hf_batch_sizes is not None else "32" if cuda else "1,4,8,16")
    start, _, stop = (args.hf_batches or ":").partition(":")
    which = slice(int(start) if start else None, int(stop) if stop else None)

    if cuda:
        config = MODEL_SHAPES["llama2-7b"]
        lens = dict(prompt_lens=(128, 1024), output_lens=(128, 1024))
        model = random_model(config, torch.float16, device, max_positions=2048)
        loaded = LoadedModel(model, NoTokenizer(), config, source=None)
        name, session_len = "llama2-7b (random weights, fp16)", 2048
    else:
        loaded = load_model("default", dtype=torch.float32)
        config = loaded.config
        lens = dict(prompt_lens=(32, 256), output_lens=(16, 128))
        name, session_len = "default model (fp32)", 512
    workload = make_workload(count, args.seed, vocab=config.vocab_size, rate=args.request_rate, **lens)
    print(f"{count} requests, prompts {lens['prompt_lens']}, outputs {lens['output_lens']}, "
          f"{sum(r.output_len for r in workload)} output tokens")
    result = {"model": name, "requests": count, "request_rate": args.request_rate, "seed": args.seed,
              "lengths": {k: list(v) for k, v in lens.items()}, "engine": [], "hf_static": []}
    tag = device_tag(device)
    if args.append and (FIGURES / f"serving_{tag}.json").exists():
        old = load_result(f"serving_{tag}")
        if any(old.get(k) != result[k] for k in WORKLOAD_KEYS) or old["device"] != device_name(device):
            raise SystemExit(f"--append: figures/serving_{tag}.json holds another workload or device "
                             f"({old['device']}); run without --append")
        result.update(engine=old["engine"], hf_static=old["hf_static"], parts=old.get("parts", []),
                      engine_kv=old.get("engine_kv", {}), engine_w4=old.get("engine_w4", {}))
    result.setdefault("parts", []).append({k: v for k, v in provenance(device).items()
                                           if k in ("date", "commit", "command")})

    def engine_config(b):
        return EngineConfig(device=args.device, dtype="float16" if cuda else "float32", session_len=session_len,
                            max_batch_size=b, cache_max_entry_count=0.8 if cuda else b * session_len // 64 + 1,
                            cache_block_seq_len=64)

    roof = None
    if batches:
        roof, _ = measure_roof(device)
        result["roof"] = {"matmul_flops_per_s": roof.peak_flops, "read_bytes_per_s": roof.bandwidth}

    def sweep(label: str, config_of, weights=None) -> list[dict]:
        """The engine at every max batch size, each run printed as it ends."""
        runs = []
        for b in batches:
            r = run_engine(loaded, config_of(b), workload, roof, weights)
            runs.append(r)
            print(f"{label} max batch {b:4}: {r['output_tokens_per_s']:8.1f} output tok/s, TTFT p50 "
                  f"{r['ttft_s']['p50']:.2f} s, TPOT p50 {1000 * r['tpot_s']['p50']:.1f} ms; decode steps "
                  f"{r['decode_s']:.1f} s ({r['decode_fraction_of_roofline']:.0%} of roofline), prefill steps "
                  f"{r['prefill_s']:.1f} s; {r['kv_blocks']} KV blocks, {r['preempted']} preempted", flush=True)
            if cuda:  # the next engine sizes its cache from the free memory
                gc.collect()
                torch.cuda.empty_cache()
        return runs

    result["engine"] = merge_runs(result["engine"], sweep("minideploy", engine_config), "max_batch_size")
    if args.quant_policy:  # the same engine, its KV cache quantized (more sequences fit)
        label = f"minideploy KV {KV_FORMATS[args.quant_policy]}"
        kv_runs = sweep(label, lambda b: dataclasses.replace(engine_config(b), quant_policy=args.quant_policy))
        engine_kv = result.setdefault("engine_kv", {})
        engine_kv[label] = merge_runs(engine_kv.get(label, []), kv_runs, "max_batch_size")
    if hf_batches:
        hf = hf_model_of_shape(config, torch.float16, "cuda") if cuda else _hf_default(loaded)
        hf_runs = [run_hf_static(hf, workload, b, device, which) for b in hf_batches]
        del hf
        result["hf_static"] = [static_timeline(workload, r)
                               for r in merge_runs(result["hf_static"], hf_runs, "batch_size")]
        for r in result["hf_static"]:
            if "output_tokens_per_s" in r:
                print(f"HF static   batch {r['batch_size']:4}: {r['output_tokens_per_s']:8.1f} output tok/s")
    done_hf = [r for r in result["hf_static"] if "output_tokens_per_s" in r]
    if result["engine"] and done_hf:
        best, best_hf = (max(r["output_tokens_per_s"] for r in runs) for runs in (result["engine"], done_hf))
        result["best_speedup_vs_hf_static"] = best / best_hf
        print(f"best continuous {best:.1f} vs best static {best_hf:.1f} output tok/s: "
              f"{result['best_speedup_vs_hf_static']:.2f}x")
        for label, runs in result.get("engine_kv", {}).items():
            kv_best = max(r["output_tokens_per_s"] for r in runs)
            result.setdefault("best_speedup_vs_hf_static_kv", {})[label] = kv_best / best_hf
            print(f"{label}: best {kv_best:.1f} output tok/s: {kv_best / best_hf:.2f}x")
    if args.w4 and not cuda:
        quantize_model_(loaded.model, QuantConfig(4, 64))  # RTN in memory: speed does not depend on scales
        w4 = {"weights": "int4", "group_size": 64, "keep_fmt": "fp32"}
        engine_w4 = result.setdefault("engine_w4", {})
        label = "minideploy W4 g64"
        engine_w4[label] = merge_runs(engine_w4.get(label, []), sweep(label, engine_config, w4), "max_batch_size")
    path = write_result(f"serving_{tag}", result, device)
    plot({**result, "hf_static": done_hf, "device": device_name(device)}, FIGURES / f"serving_{tag}.png")
    print(f"-> {path}")
    return result


def _hf_default(loaded: LoadedModel):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(loaded.source.path), dtype=torch.float32).eval()


if __name__ == "__main__":
    main()
