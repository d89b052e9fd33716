"""Named model shapes: configs of well-known models, without their weights.

Chapter 1 does memory arithmetic on them; later chapters build random-weight
models of these shapes directly on the GPU to measure speed, because decode
speed does not depend on the values of the weights. Numbers are those of the
published Hugging Face `config.json` of each model.
"""
from __future__ import annotations

from ..config import ModelConfig


def _llama2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=hidden // heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_ids=(2,))


MODEL_SHAPES: dict[str, ModelConfig] = {
    # 7B and 13B use multi-head attention: one K/V head per query head.
    "llama2-7b": _llama2(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    "llama2-13b": _llama2(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40),
    # 70B uses grouped-query attention: 8 K/V heads shared by 64 query heads.
    "llama2-70b": _llama2(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8),
}
