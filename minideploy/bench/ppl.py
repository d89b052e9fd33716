"""Perplexity of the default model, float and weight-quantized, on held-out text.

Evaluation text: `pydoc_data.topics` sorted by key, from the 41st topic on
(the first 40 are the calibration split), 40 windows of 512 tokens, fp32;
or `--text FILE`. Each window is scored on its own. Rows: float, then RTN at
W4 g64, W4 g32, W3 g64 (asymmetric, groups along in_features, every
q/k/v/o/gate/up/down projection). Writes figures/ppl.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..models import load_model
from ..quant import fake_quantize_model_
from ..quant.data import token_windows, topics_text
from ..quant.perplexity import perplexity
from .common import write_result

SETTINGS = [(4, 64), (4, 32), (3, 64)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minideploy.bench.ppl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--text", type=Path, default=None, help="evaluate on this UTF-8 text file instead")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, dtype=torch.float32)
    text = args.text.read_text(encoding="utf-8") if args.text else topics_text("eval")
    windows = token_windows(loaded.tokenizer, text, args.windows, args.window_len, args.text)
    float_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    rows = []

    def score(method: str, bits=None, group_size=None):
        start = time.perf_counter()
        ppl = perplexity(loaded.model, windows, progress=True)
        rows.append({"method": method, "w_bits": bits, "group_size": group_size, "ppl": ppl,
                     "seconds": time.perf_counter() - start})
        print(f"{method:6} {'' if bits is None else f'W{bits} g{group_size}':8} ppl {ppl:.2f}", flush=True)

    score("float")
    for bits, group_size in SETTINGS:
        loaded.model.load_state_dict(float_state, strict=False)
        fake_quantize_model_(loaded.model, bits, group_size)
        score("rtn", bits, group_size)
    result = {"model": str(loaded.source.path), "dtype": "float32",
              "text": str(args.text) if args.text else "pydoc_data.topics, sorted keys[40:]",
              "windows": args.windows, "window_len": args.window_len, "rows": rows}
    name = "ppl" if args.text is None else f"ppl_{args.text.stem}"
    print(f"-> {write_result(name, result, 'cpu')}")
    return result


if __name__ == "__main__":
    main()
