"""Build one rank's model: a Llama of `rank_config`'s size, its weight shards, two all-reduces.

A builder is a small picklable recipe — `Checkpoint` (a model directory, GGUF
file or converted workspace) or `RandomWeights` (a named shape with seeded
weights) — that every rank calls with its own rank number in its own process,
so no rank ever receives weights from another.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelConfig
from ..models import LlamaModel, load_model, random_model, resolve_model_path
from ..models.llama import rope_cos_sin
from ..quant import quantize_model_, tile_linears_, use_w4a16_linears_
from .linear import RowParallel
from .shard import rank_config, shard_state_dict
from .vocab import VocabParallelEmbedding, VocabParallelLMHead
from .workspace import is_workspace, read_workspace


def rank_device(device_type: str, rank: int) -> torch.device:
    """CPU ranks share the host; GPU rank r owns cuda:r."""
    return torch.device("cpu") if device_type == "cpu" else torch.device("cuda", rank)


def build_rank_model(config: ModelConfig, state: dict[str, torch.Tensor], tp: int, rank: int,
                     dtype: torch.dtype, device: torch.device,
                     max_positions: Optional[int] = None) -> LlamaModel:
    """The rank's model from the rank's tensors (native names, as `shard_state_dict` gives them)."""
    local = rank_config(config, tp)
    rows = -(-config.vocab_size // tp)
    with torch.device("meta"):
        model = LlamaModel(local, max_positions)
        if local.quant is not None:
            use_w4a16_linears_(model, local.quant)
        if tp > 1:
            model.embed = VocabParallelEmbedding(rows, config.hidden_size, rank)
            model.lm_head = VocabParallelLMHead(rows, config.hidden_size, config.vocab_size, tp)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty() unties shared parameters
    model.cos_sin = rope_cos_sin(config, max_positions or config.max_position_embeddings).to(device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"rank {rank}: weights missing {missing[:5]} / unexpected {unexpected[:5]}")
    if tp > 1:  # after loading, so that the state dict keeps the single-device names
        for layer in model.layers:
            layer.attn.o = RowParallel(layer.attn.o)
            layer.mlp.down = RowParallel(layer.mlp.down)
    return tile_linears_(model).eval().requires_grad_(False)  # the kernels' layouts


@dataclass(frozen=True)
class Checkpoint:
    """Weights from disk: an HF directory, a GGUF file, 'default', or a converted workspace."""

    path: Optional[str | os.PathLike]
    dtype: torch.dtype
    device_type: str
    max_positions: Optional[int] = None

    def __call__(self, rank: int, tp: int) -> LlamaModel:
        device = rank_device(self.device_type, rank)
        if is_workspace(self.path):
            config, state = read_workspace(self.path, tp, rank)
        else:  # the full model on the CPU, then this rank's slice
            loaded = load_model(resolve_model_path(self.path).path, dtype=self.dtype, device="cpu")
            config = loaded.config
            state = shard_state_dict(loaded.model.state_dict(), config, tp, rank)
            del loaded
        return build_rank_model(config, state, tp, rank, self.dtype, device, self.max_positions)


@dataclass(frozen=True)
class RandomWeights:
    """`random_model(config, seed)` — RTN-quantized if config.quant — then this rank's slice.

    Every rank draws the same full model on its own device (same seed, same
    generator), so tp ranks together hold exactly the tp=1 model.
    """

    config: ModelConfig
    dtype: torch.dtype
    device_type: str
    seed: int = 0
    max_positions: Optional[int] = None

    def __call__(self, rank: int, tp: int) -> LlamaModel:
        device = rank_device(self.device_type, rank)
        rank_config(self.config, tp)  # fail on the sizes before drawing any weights
        full = random_model(self.config, self.dtype, device, self.max_positions, self.seed)
        if self.config.quant is not None:
            quantize_model_(full, self.config.quant)
        if tp == 1:  # no copy: a 13B model and its shard would not fit one GPU together
            return full
        state = shard_state_dict(full.state_dict(), self.config, tp, rank)
        del full
        return build_rank_model(self.config, state, tp, rank, self.dtype, device, self.max_positions)
