"""Perplexity of the default model, float and weight-quantized, on held-out text.

Evaluation text: `pydoc_data.topics` sorted by key, from the 41st topic on
(the first 40 are the calibration split), 40 windows of 512 tokens, fp32;
or `--text FILE`. Each window is scored on its own. Rows: float, then RTN and
AWQ at each setting (default W4 g64, W4 g32, W3 g64; asymmetric, groups along
in_features, every q/k/v/o/gate/up/down projection); with `--quant-policy 8,4`
also the float weights over an int8 / int4 KV cache, keys rotated after their
mean key is taken off, as the engine stores them (means from the calibration
split), and rotated only, to show what the shift buys. AWQ calibrates on the calibration split (about 12 minutes
per setting on 2 CPU cores with 64 x 512 tokens). Writes figures/ppl.json, or
figures/ppl_kv.json for `--settings "" --quant-policy 8,4` (the KV rows alone).
`--lm-head-int8`: after the float row, the LM head is swapped for int8 rows
(`quant.quantize_lm_head_`, as `--lm-head-int8` runs it) and every later row keeps
it; figures/ppl_lm_head_int8.json (`--settings ""`: float against float + int8 head).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..cache.kv_cache import (KEY_CALIBRATION_LEN, KEY_CALIBRATION_WINDOWS, key_calibration_windows,
                              mean_keys)
from ..models import load_model
from ..quant import Int8Linear, fake_quantize_model_, quantize_lm_head_
from ..quant.awq import AWQConfig, awq_search_
from ..quant.data import token_windows, topics_text
from ..quant.perplexity import perplexity
from .common import bench_parser, write_result

SETTINGS = "4:64,4:32,3:64"


def main(argv=None) -> dict:
    parser = bench_parser("ppl", __doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--text", type=Path, default=None, help="evaluate on this UTF-8 text file instead")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--settings", default=SETTINGS, help="comma-separated BITS:GROUP_SIZE")
    parser.add_argument("--lm-head-int8", action="store_true",
                        help="score every row after the float one with the LM head in int8")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--search-samples", type=int, default=16,
                        help="calibration sequences that score AWQ's candidates")
    parser.add_argument("--quant-policy", default="",
                        help="comma-separated KV-cache policies (8: int8, 4: int4) scored on the float "
                             "weights beside the weight rows, e.g. 8,4")
    args = parser.parse_args(argv)
    settings = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",") if item]
    kv_policies = [int(v) for v in args.quant_policy.split(",") if v]
    if any(p not in (4, 8) for p in kv_policies):
        parser.error(f"--quant-policy takes 8 and/or 4, got {args.quant_policy!r}")

    loaded = load_model(args.model, dtype=torch.float32)
    text = args.text.read_text(encoding="utf-8") if args.text else topics_text("eval")
    windows = token_windows(loaded.tokenizer, text, args.windows, args.window_len, args.text)
    float_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    rows = []

    def score(method: str, bits=None, group_size=None, kv_policy=0, key_means=None):
        start = time.perf_counter()
        ppl = perplexity(loaded.model, windows, progress=True, quant_policy=kv_policy, key_means=key_means)
        lm_head = "int8" if isinstance(loaded.model.lm_head, Int8Linear) else "float"
        rows.append({"method": method, "w_bits": bits, "group_size": group_size, "kv_quant_policy": kv_policy,
                     "kv_key_shift": key_means is not None, "lm_head": lm_head, "ppl": ppl,
                     "seconds": time.perf_counter() - start})
        print(f"{method:6} {'' if bits is None else f'W{bits} g{group_size}':8} "
              f"{f'KV int{kv_policy}' if kv_policy else '':8} "
              f"{'' if key_means is None else 'mean key off':12} LM head {lm_head:5} ppl {ppl:.2f}", flush=True)

    score("float")
    if args.lm_head_int8:
        quantize_lm_head_(loaded.model)
        score("float")
    if kv_policies:
        key_means = mean_keys(loaded.model, key_calibration_windows(loaded.tokenizer, loaded.config.vocab_size,
                                                                    args.window_len))
    for policy in kv_policies:
        score("float", kv_policy=policy)
        score("float", kv_policy=policy, key_means=key_means)
    calib = token_windows(loaded.tokenizer, topics_text("calib"), args.calib_samples, args.calib_seqlen)
    for bits, group_size in settings:
        loaded.model.load_state_dict(float_state, strict=False)
        fake_quantize_model_(loaded.model, bits, group_size)
        score("rtn", bits, group_size)
        loaded.model.load_state_dict(float_state, strict=False)
        start = time.perf_counter()
        config = AWQConfig(w_bits=bits, group_size=group_size, search_samples=args.search_samples)
        reports = awq_search_(loaded.model, calib, config)
        fake_quantize_model_(loaded.model, bits, group_size)
        calib_seconds = time.perf_counter() - start
        score("awq", bits, group_size)
        rows[-1].update(calib_seconds=calib_seconds,
                        alphas=[{k: v for k, v in r.items() if not k.endswith("losses")} for r in reports])
    result = {"model": str(loaded.source.path), "dtype": "float32",
              "text": str(args.text) if args.text else "pydoc_data.topics, sorted keys[40:]",
              "windows": args.windows, "window_len": args.window_len,
              "calibration": {"text": "pydoc_data.topics, sorted keys[:40]", "samples": args.calib_samples,
                              "seqlen": args.calib_seqlen, "search_samples": args.search_samples,
                              "kv_key_means": {"windows": KEY_CALIBRATION_WINDOWS,
                                               "seqlen": min(KEY_CALIBRATION_LEN, args.window_len)}},
              "rows": rows}
    # KV policies alone (--settings "") make a table of their own, beside the weight table.
    name = ("ppl_lm_head_int8" if args.lm_head_int8 else "ppl" if settings else "ppl_kv") + (
        "" if args.text is None else f"_{args.text.stem}")
    print(f"-> {write_result(name, result, 'cpu')}")
    return result


if __name__ == "__main__":
    main()
