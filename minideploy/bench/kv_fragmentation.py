"""KV memory wasted by contiguous preallocation vs paged blocks, and how many sequences fit.

Workload: the serving benchmark's (seeded): prompts of 128..1024 tokens, outputs
of 128..1024, each request caught at a uniformly random point of its generation
(a snapshot of a busy server). Memory: the KV share of an 80 GB GPU serving a
Llama-2-7B-shaped fp16 model with cache_max_entry_count 0.8 (chapter 1's
formulas). Requests are admitted in order until the next one does not fit:

- contiguous: every sequence reserves session_len (4096) slots up front, as an
  engine without paging must (it cannot know how long the answer will be);
- paged: the real BlockManager hands out blocks of `block_size` tokens as the
  sequence grows; the only waste is the unfilled tail of each last block.

Waste = reserved slots not holding a token / reserved slots. Pure bookkeeping:
no device is involved, the numbers are exact for this workload.
"""
from __future__ import annotations

import random

from .. import memory
from ..cache.block_manager import BlockManager, OutOfBlocks
from ..models.shapes import MODEL_SHAPES
from .common import FIGURES, bench_parser, save_figure, write_result

BLOCK_SIZES = (16, 32, 64, 128)


def workload(count: int, seed: int, lengths=(128, 1024)) -> list[int]:
    """Current lengths (prompt + tokens generated so far) of `count` in-flight requests."""
    rng = random.Random(seed)
    current = []
    for _ in range(count):
        prompt, output = rng.randint(*lengths), rng.randint(*lengths)
        current.append(prompt + rng.randint(1, output))
    return current


def contiguous(lengths: list[int], capacity_tokens: int, session_len: int) -> dict:
    admitted = lengths[:capacity_tokens // session_len]
    reserved = len(admitted) * session_len
    return {"sequences": len(admitted), "reserved_tokens": reserved, "used_tokens": sum(admitted),
            "waste": 1 - sum(admitted) / reserved}


def paged(lengths: list[int], capacity_tokens: int, block_size: int) -> dict:
    manager = BlockManager(capacity_tokens // block_size, block_size, enable_prefix_caching=False)
    admitted = []
    for i, length in enumerate(lengths):
        try:
            manager.allocate(i, [0] * length)
        except OutOfBlocks:
            break
        admitted.append(length)
    manager.check()
    reserved = manager.num_active * block_size
    return {"block_size": block_size, "sequences": len(admitted), "reserved_tokens": reserved,
            "used_tokens": sum(admitted), "waste": 1 - sum(admitted) / reserved,
            "block_map": [manager.block_table(i)[:] for i in range(min(len(admitted), 16))]}


def plot(result: dict, path) -> None:
    import matplotlib.pyplot as plt

    rows = [("contiguous", result["contiguous"])] + [(f"paged {r['block_size']}", r) for r in result["paged"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [name for name, _ in rows]
    colors = ["#999999"] + ["#1f77b4"] * (len(rows) - 1)
    bars = ax1.bar(labels, [100 * r["waste"] for _, r in rows], color=colors)
    ax1.bar_label(bars, fmt="%.1f%%")
    ax1.set_ylabel("reserved KV slots wasted (%)")
    bars = ax2.bar(labels, [r["sequences"] for _, r in rows], color=colors)
    ax2.bar_label(bars)
    ax2.set_ylabel("sequences that fit at once")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{result['model_shape']}, {result['capacity_tokens']} KV tokens, "
                 f"{result['requests']} in-flight requests", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = bench_parser("kv_fragmentation", __doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-shape", default="llama2-7b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--memory-gb", type=float, default=80.0)
    parser.add_argument("--cache-max-entry-count", type=float, default=0.8)
    parser.add_argument("--session-len", type=int, default=4096)
    args = parser.parse_args(argv)

    config = MODEL_SHAPES[args.model_shape]
    capacity = memory.max_kv_tokens(config, int(args.memory_gb * memory.GB), kv_fraction=args.cache_max_entry_count)
    lengths = workload(args.requests, args.seed)
    result = {"model_shape": args.model_shape, "memory_gb": args.memory_gb,
              "cache_max_entry_count": args.cache_max_entry_count, "capacity_tokens": capacity,
              "session_len": args.session_len, "requests": args.requests, "seed": args.seed,
              "workload": "prompt U[128,1024] + U[1,output], output U[128,1024]",
              "contiguous": contiguous(lengths, capacity, args.session_len),
              "paged": [paged(lengths, capacity, b) for b in BLOCK_SIZES]}
    print(f"{capacity} KV tokens; contiguous at session_len {args.session_len}: "
          f"{result['contiguous']['sequences']} sequences, {result['contiguous']['waste']:.1%} wasted")
    for r in result["paged"]:
        print(f"paged, blocks of {r['block_size']:3}: {r['sequences']} sequences, {r['waste']:.2%} wasted")
    print(f"-> {write_result('kv_fragmentation', result, 'cpu')}")
    plot(result, FIGURES / "kv_fragmentation.png")
    return result


if __name__ == "__main__":
    main()
