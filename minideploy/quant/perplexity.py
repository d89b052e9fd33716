"""Perplexity: exp(mean negative log-likelihood of each next token), window by window."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import ForwardContext, KVCache, LlamaModel


@torch.inference_mode()
def perplexity(model: LlamaModel, windows: torch.Tensor, progress: bool = False) -> float:
    """windows [num_windows, window] token ids; each window is scored on its own (no carry-over)."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    length = windows.shape[1]
    cache = KVCache(model.config, 1, length, dtype, device)
    ctx = ForwardContext(torch.arange(length, device=device)[None], length)
    total_nll, count = 0.0, 0
    for row in tqdm(windows, desc="perplexity", disable=not progress):
        ids = row.to(device)[None]
        logits = model.logits(model(ids, ctx, cache))[0, :-1]  # [window - 1, vocab] float32
        total_nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += length - 1
    return math.exp(total_nll / count)
