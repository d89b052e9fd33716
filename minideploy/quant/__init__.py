"""Chapter 3: weight-only quantization — RTN, AWQ's search, and int4 W4A16 linears."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

from ..config import QuantConfig
from .. import kernels
from .linear import Int8Linear, W4A16Linear, W4A16TiledLinear
from .rtn import check_group_size, dequantize, fake_quantize, quantize

if TYPE_CHECKING:  # models import this package (W4A16Linear): no import back at run time
    from ..models.llama import LlamaModel

__all__ = ["Int8Linear", "QuantConfig", "W4A16Linear", "W4A16TiledLinear", "check_group_size", "decoder_linears",
           "dequantize", "fake_quantize", "fake_quantize_model_", "quantize", "quantize_lm_head_", "quantize_model_",
           "tile_linears_", "use_w4a16_linears_"]


def decoder_linears(model: LlamaModel) -> Iterator[tuple[str, torch.nn.Module]]:
    """The linears that weight-only quantization replaces: q/k/v/o and gate/up/down of every layer.

    Embeddings and the LM head stay in float (they are one lookup and one matmul,
    and the most sensitive to error). The fused qkv and gate_up rows are
    quantized row by row, exactly as the separate projections would be.
    """
    for i, layer in enumerate(model.layers):
        for name, module in (("attn.qkv", layer.attn.qkv), ("attn.o", layer.attn.o),
                             ("mlp.gate_up", layer.mlp.gate_up), ("mlp.down", layer.mlp.down)):
            yield f"layers.{i}.{name}", module


def _check_all(model: LlamaModel, group_size: int) -> list[tuple[str, torch.nn.Module]]:
    """Check every layer before touching any: a failure leaves the model as it was."""
    linears = list(decoder_linears(model))
    for name, module in linears:
        check_group_size(module.in_features, group_size, name)
    return linears


def _replace(model: LlamaModel, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@torch.no_grad()
def fake_quantize_model_(model: LlamaModel, bits: int, group_size: int) -> LlamaModel:
    """Replace every decoder linear's weight by its RTN round trip, in place."""
    for name, module in _check_all(model, group_size):
        module.weight.copy_(fake_quantize(module.weight, bits, group_size, name))
    return model


@torch.no_grad()
def quantize_model_(model: LlamaModel, quant: QuantConfig) -> LlamaModel:
    """Swap every decoder linear for a W4A16Linear holding its RTN-quantized weight.

    After `awq.awq_search_` the float weights are already scaled and clipped, so
    this is the last step of AWQ too.
    """
    for name, module in _check_all(model, quant.group_size):
        _replace(model, name, W4A16Linear.from_float(module.weight, quant.w_bits, quant.group_size, name))
    return model


def use_w4a16_linears_(model: LlamaModel, quant: QuantConfig) -> LlamaModel:
    """Swap every decoder linear for an empty W4A16Linear (a checkpoint fills it)."""
    for name, module in _check_all(model, quant.group_size):
        device = next(module.parameters()).device
        with torch.device(device):
            _replace(model, name, W4A16Linear(module.in_features, module.out_features,
                                              quant.w_bits, quant.group_size, name))
    return model


@torch.no_grad()
def tile_linears_(model: LlamaModel) -> LlamaModel:
    """Swap the decoder's linears (and on a CPU a float32 LM head) for their device kernel's
    tiled layouts (the same products, faster), in place, and return the model:
      - every W4A16Linear for a W4A16TiledLinear (CPU and CUDA); a layer whose in_features
        the tile's words do not divide (CUDA: 128 weights) keeps the shared layout;
      - on a CPU, every float32 Linear of the layers and the LM head for a TiledLinear; an
        embedding tied to the head then looks its rows up in the head's tiles (TiledEmbedding:
        one copy of the largest matrix, as before). Default model, a decode step's LM head
        on 2 cores (AVX2), interleaved: 32 tokens 20.1 -> 16.3 ms, 8 tokens 7.0 -> 4.8 ms.
    The engine's runners call it on the model they run."""
    from ..models.llama import Linear, TiledEmbedding, TiledLinear

    shapes, rows = {}, {}  # device -> W4A16 (rows, words) / float tile rows, or None; asking builds the kernel
    for name, module in list(model.named_modules()):
        if isinstance(module, W4A16Linear):
            device = module.qweight.device
            if device not in shapes:
                shapes[device] = kernels.w4a16_tile_shape(device)
            shape = shapes[device]
            if shape is not None and module.qweight.shape[1] % shape[1] == 0:
                _replace(model, name, W4A16TiledLinear(module, *shape))
        elif (type(module) is Linear and (name.startswith("layers.") or name == "lm_head")
              and module.weight.dtype == torch.float32):
            device = module.weight.device
            if device not in rows:
                rows[device] = kernels.linear_tile_rows(device)
            if rows[device] is not None:
                tied = name == "lm_head" and module.weight is model.embed.weight
                _replace(model, name, TiledLinear(module, rows[device]))
                if tied:
                    model.embed = TiledEmbedding(model.lm_head)
    return model


@torch.no_grad()
def quantize_lm_head_(model: LlamaModel) -> LlamaModel:
    """Swap the LM head for an Int8Linear (one scale per vocabulary row), in place.

    The embedding keeps its float weight (a tied one is untied: the lookup reads one
    row a token, the head all of them). Not part of AutoAWQ's format: a runtime choice."""
    if not isinstance(getattr(model.lm_head, "weight", None), torch.Tensor):
        raise TypeError(f"quantize_lm_head_: the LM head must be a float linear, got {type(model.lm_head).__name__}")
    model.lm_head = Int8Linear.from_float(model.lm_head.weight)
    return model
