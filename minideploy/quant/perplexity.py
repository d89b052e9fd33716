"""Perplexity: exp(mean negative log-likelihood of each next token), window by window.

With a KV `quant_policy` (8: int8, 4: int4) the window runs over a quantized paged
cache: every query attends to keys and values that went through quantization, which
is what a decode step reads, so the score measures the cache's precision loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache.kv_cache import PagedKVCache
from ..models import ForwardContext, KVCache, LlamaModel


@torch.inference_mode()
def perplexity(model: LlamaModel, windows: torch.Tensor, progress: bool = False,
               quant_policy: int = 0, block_size: int = 64, key_means: torch.Tensor | None = None) -> float:
    """windows [num_windows, window] token ids; each window is scored on its own (no carry-over).
    key_means: the quantized cache's key shift (`cache.kv_cache.mean_keys`)."""
    device, dtype = model.device, model.dtype
    length = windows.shape[1]
    positions = torch.arange(length, device=device)
    if quant_policy:
        num_blocks = -(-length // block_size)
        cache = PagedKVCache(model.config, num_blocks, block_size, dtype, device, quant_policy, key_means)
        ctx = ForwardContext(positions[None], length, slots=positions,
                             block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
                             context_lens=torch.tensor([length], dtype=torch.int32, device=device),
                             query_lens=(length,), kv_lens=(length,))
    else:
        cache = KVCache(model.config, 1, length, dtype, device)
        ctx = ForwardContext(positions[None], length)
    total_nll, count = 0.0, 0
    for row in tqdm(windows, desc="perplexity", disable=not progress):
        ids = row.to(device)[None]
        logits = model.logits(model(ids, ctx, cache))[0, :-1]  # [window - 1, vocab] float32
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(total_nll / count)
