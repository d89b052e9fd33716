"""Chapter 1: how many bytes a model needs — weights and KV cache, before any code runs.

Deployment starts with arithmetic: whether a model fits on a GPU, and how many
tokens of context fit beside it, follow from the config alone. Everything here
is a pure function of a `ModelConfig`; the chapter-1 notebook checks the
numbers against real tensors.

Storage formats are named by short strings (`fp32`, `fp16`, `bf16`, `int8`,
`int4`; a torch dtype works too) and measured in *bits* so that 4-bit weights
stay exact integers of bytes.

Units: GB = 10**9 bytes (what GPU vendors print: "80 GB"), GiB = 2**30 bytes
(what the allocator reports). All functions return bytes; divide at the edge.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .config import ModelConfig

GB = 10**9
GiB = 2**30

FORMAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}
TORCH_FORMATS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int8: "int8", torch.uint8: "int8"}
ZERO_POINTS = ("packed", "fp16", None)

Format = Union[str, torch.dtype]


def format_bits(fmt: Format) -> int:
    """Bits per stored element of a format name or torch dtype."""
    name = TORCH_FORMATS.get(fmt, fmt) if isinstance(fmt, torch.dtype) else fmt
    if name not in FORMAT_BITS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMAT_BITS)} or a torch dtype")
    return FORMAT_BITS[name]


def _is_integer(fmt: Format) -> bool:
    name = TORCH_FORMATS.get(fmt, fmt) if isinstance(fmt, torch.dtype) else fmt
    return isinstance(name, str) and name.startswith("int")


def _bits_to_bytes(bits: int) -> int:
    return -(-bits // 8)  # ceil: a half-filled byte still occupies a byte


# ---------------------------------------------------------------- parameters

def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of the linear layers of ONE decoder layer.

    Named as in transformers' LlamaForCausalLM. The native model fuses q/k/v and
    gate/up into one matmul each; fusing stacks rows, so the counts (and the
    per-row quantization groups) are the same.
    """
    h, q, kv, i = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def param_breakdown(config: ModelConfig) -> dict[str, int]:
    """Unique parameters by role: embed, attention, mlp, norms, lm_head.

    With tied embeddings the output projection *is* the embedding matrix, so
    `lm_head` counts 0 — as `nn.Module.parameters()` counts a shared tensor once.
    """
    shapes = linear_shapes(config)
    per_layer = {name: out * inp for name, (out, inp) in shapes.items()}
    attention = sum(per_layer[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(per_layer[n] for n in ("gate_proj", "up_proj", "down_proj"))
    embed = config.vocab_size * config.hidden_size
    return {
        "embed": embed,
        "attention": config.num_layers * attention,
        "mlp": config.num_layers * mlp,
        # RMSNorm has one weight vector: two per layer (attention, MLP) + the final one.
        "norms": (2 * config.num_layers + 1) * config.hidden_size,
        "lm_head": 0 if config.tie_word_embeddings else embed,
    }


def param_count(config: ModelConfig) -> int:
    """Total unique parameters (equals `sum(p.numel() for p in model.parameters())`)."""
    return sum(param_breakdown(config).values())


# ------------------------------------------------------------- weight bytes

def quantized_linear_bytes(out_features: int, in_features: int, bits: int,
                           group_size: Optional[int] = 128, zero: Optional[str] = "packed",
                           scale_fmt: Format = "fp16") -> int:
    """Bytes of one weight-only quantized linear layer [out_features, in_features].

    Each row is cut into groups of `group_size` consecutive input weights (None:
    one group per row, i.e. per-channel); every group stores one scale and,
    unless symmetric, one zero point:
      zero="packed": an N-bit integer zero packed like the weights — what AutoAWQ
                     and LMDeploy's AWQ format store (`qzeros`), the default here;
      zero="fp16":   a 16-bit zero (some GPTQ/RTN variants);
      zero=None:     symmetric quantization, no zero point.
    The scale is `scale_fmt` (fp16 in AutoAWQ and LMDeploy).
    """
    if zero not in ZERO_POINTS:
        raise ValueError(f"zero must be one of {ZERO_POINTS}, got {zero!r}")
    group = in_features if group_size is None else group_size
    if group <= 0 or in_features % group:
        raise ValueError(f"group_size {group_size} must divide in_features {in_features}: "
                         "the groups tile each row of inputs exactly")
    groups = out_features * (in_features // group)
    zero_bits = {"packed": bits, "fp16": 16, None: 0}[zero]
    meta_bits = groups * (format_bits(scale_fmt) + zero_bits)
    return _bits_to_bytes(out_features * in_features * bits + meta_bits)


def group_size_for(config: ModelConfig, preferred: int = 128) -> int:
    """The largest of preferred, preferred/2, ... that divides every linear's in_features.

    128 is AWQ's and LMDeploy's usual group; the default model's hidden size
    576 = 4.5 · 128 forces 64 there.
    """
    group = preferred
    while group > 1 and any(inp % group for _, inp in linear_shapes(config).values()):
        group //= 2
    return group


def weight_bytes(config: ModelConfig, fmt: Format = "fp16", *, group_size: Optional[int] = 128,
                 zero: Optional[str] = "packed", keep_fmt: Format = "fp16",
                 quantize_lm_head: bool = False) -> int:
    """Bytes of all weights stored in format `fmt`.

    Float formats (fp32/fp16/bf16): every parameter in that format.
    Integer formats (int8/int4): weight-only quantization as in AWQ — only the
    linear layers of the decoder layers are quantized (see
    `quantized_linear_bytes` for `group_size` and `zero`); embeddings, norms
    and the lm_head stay in `keep_fmt` (fp16 by default), because they are a
    small share of a large model and quantizing them costs accuracy.
    `quantize_lm_head=True` quantizes an untied lm_head too.
    """
    if not _is_integer(fmt):
        return _bits_to_bytes(param_count(config) * format_bits(fmt))
    bits = format_bits(fmt)
    parts = param_breakdown(config)
    kept = parts["embed"] + parts["norms"]
    linear = config.num_layers * sum(
        quantized_linear_bytes(out, inp, bits, group_size, zero)
        for out, inp in linear_shapes(config).values())
    if parts["lm_head"] and quantize_lm_head:
        linear += quantized_linear_bytes(config.vocab_size, config.hidden_size, bits,
                                         group_size, zero)
    else:
        kept += parts["lm_head"]
    return linear + _bits_to_bytes(kept * format_bits(keep_fmt))


# ---------------------------------------------------------------- KV cache

def kv_bytes_per_token(config: ModelConfig, dtype: Format = "fp16") -> int:
    """Bytes one token adds to the KV cache: a key and a value vector per layer.

    Grouped-query attention shares each K/V head among num_heads/num_kv_heads
    query heads, so only `num_kv_heads` count — Llama-2-70B stores 8 of 64.
    (Quantized KV caches also keep small per-head scales; not counted here.)
    """
    return _bits_to_bytes(2 * config.num_layers * config.num_kv_heads * config.head_dim
                          * format_bits(dtype))


def kv_cache_bytes(config: ModelConfig, seq_len: int, batch_size: int = 1,
                   dtype: Format = "fp16") -> int:
    """2 · layers · kv_heads · head_dim · seq_len · batch · bytes — the whole KV cache."""
    return _bits_to_bytes(2 * config.num_layers * config.num_kv_heads * config.head_dim
                          * seq_len * batch_size * format_bits(dtype))


def mha_block_bytes(layers: int, heads: int, head_dim: int, seq_len: int,
                    bytes_per_element: float) -> float:
    """The course outline's formula: BlockSize = 2 · Layers · Heads · HeadDim · Seq · Bytes.

    Correct for multi-head attention, where every query head has its own K/V
    head. For GQA models pass num_kv_heads as `heads` (or use `kv_cache_bytes`);
    passing all heads overestimates Llama-2-70B's cache 8×.
    """
    return 2 * layers * heads * head_dim * seq_len * bytes_per_element


# ------------------------------------------------------------- what fits

def max_kv_tokens(config: ModelConfig, memory_bytes: int, *, weights: Format = "fp16",
                  kv_dtype: Format = "fp16", kv_fraction: float = 1.0,
                  reserve_bytes: int = 0, **weight_kwargs) -> int:
    """Tokens of KV cache that fit in `memory_bytes` beside the weights.

    `kv_fraction` is LMDeploy's `--cache-max-entry-count`: the share of the
    memory left after weights (and `reserve_bytes`, e.g. activations and the
    CUDA context) that the KV cache may take. Returns 0 if the weights alone
    do not fit. `weight_kwargs` go to `weight_bytes` (group_size, zero, ...).
    """
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv_fraction must be in (0, 1], got {kv_fraction}")
    free = memory_bytes - weight_bytes(config, weights, **weight_kwargs) - reserve_bytes
    if free <= 0:
        return 0
    return int(free * kv_fraction) // kv_bytes_per_token(config, kv_dtype)


def max_batch_size(config: ModelConfig, memory_bytes: int, seq_len: int, **kwargs) -> int:
    """How many sequences of `seq_len` tokens fit at once (see `max_kv_tokens` for kwargs)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return max_kv_tokens(config, memory_bytes, **kwargs) // seq_len
