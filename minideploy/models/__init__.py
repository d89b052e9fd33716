"""Model loading: the built-in default, HF directories and GGUF files → the native model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..quant import use_w4a16_linears_
from .llama import ForwardContext, KVCache, LlamaModel, rope_cos_sin
from .loader import (DEFAULT_MODEL_NAME, ModelNotFoundError, ModelSource, load_hf_config,
                     load_state_dict, load_tokenizer, model_config_of, resolve_model_path)

__all__ = ["DEFAULT_MODEL_NAME", "ForwardContext", "KVCache", "LlamaModel", "LoadedModel",
           "ModelNotFoundError", "ModelSource", "NoTokenizer", "load_model", "random_model", "resolve_model_path"]


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: Any
    config: ModelConfig
    source: ModelSource


def load_model(model_path: Optional[str | os.PathLike] = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", max_positions: Optional[int] = None) -> LoadedModel:
    """Load weights, config and tokenizer of a Llama-family model into the native model."""
    source = resolve_model_path(model_path)
    config = model_config_of(source)
    tokenizer = load_tokenizer(source)
    with torch.device("meta"):  # no memory, no random init: the checkpoint fills every weight
        model = LlamaModel(config, max_positions)
        if config.quant is not None:
            use_w4a16_linears_(model, config.quant)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty() unties shared parameters
    # RoPE angles stay float32 whatever the model dtype: the kernels require it.
    model.cos_sin = rope_cos_sin(config, max_positions or config.max_position_embeddings).to(device)
    model.load_hf_state_dict(load_state_dict(source))
    return LoadedModel(model.eval().requires_grad_(False), tokenizer, config, source)


class NoTokenizer:
    """Stands in for a tokenizer beside random-weight models: a token's text is its id."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 max_positions: Optional[int] = None, seed: int = 0) -> LlamaModel:
    """A model of this shape with seeded random weights, built directly on `device` in `dtype`.

    Decode speed does not depend on the weights' values, so 7B-shaped speed work
    needs no checkpoint (and never materialises a float32 copy on the GPU).
    """
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaModel(config, max_positions)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.uniform_(0.8, 1.2)
        else:  # roughly the scale of trained Llama weights, so activations stay finite
            p.data.normal_(0.0, 0.02)
    model.cos_sin = rope_cos_sin(config, max_positions or config.max_position_embeddings).to(device)
    return model.eval().requires_grad_(False)
