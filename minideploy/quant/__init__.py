"""Chapter 3: weight-only quantization (RTN now; AWQ search and W4A16 kernels build on it)."""
from __future__ import annotations

from typing import Iterator

import torch

from ..models.llama import LlamaModel, Linear
from .rtn import check_group_size, dequantize, fake_quantize, quantize

__all__ = ["check_group_size", "decoder_linears", "dequantize", "fake_quantize", "fake_quantize_model_",
           "quantize"]


def decoder_linears(model: LlamaModel) -> Iterator[tuple[str, Linear]]:
    """The linears that weight-only quantization replaces: q/k/v/o and gate/up/down of every layer.

    Embeddings and the LM head stay in float (they are one lookup and one matmul,
    and the most sensitive to error). The fused qkv and gate_up rows are
    quantized row by row, exactly as the separate projections would be.
    """
    for i, layer in enumerate(model.layers):
        for name, module in (("attn.qkv", layer.attn.qkv), ("attn.o", layer.attn.o),
                             ("mlp.gate_up", layer.mlp.gate_up), ("mlp.down", layer.mlp.down)):
            yield f"layers.{i}.{name}", module


@torch.no_grad()
def fake_quantize_model_(model: LlamaModel, bits: int, group_size: int) -> LlamaModel:
    """Replace every decoder linear's weight by its RTN round trip, in place."""
    linears = list(decoder_linears(model))
    for name, module in linears:  # check every layer before touching any
        check_group_size(module.in_features, group_size, name)
    for name, module in linears:
        module.weight.copy_(fake_quantize(module.weight, bits, group_size, name))
    return model
