"""Which rows and columns of each weight a tensor-parallel rank holds.

Megatron's split of a Llama block needs two all-reduces per layer and nothing
else. q/k/v and gate/up are *column-parallel*: rank r computes its slice of the
output features, and since attention works head by head and SwiGLU element by
element, the slice is all that rank needs downstream. o and down are
*row-parallel*: their input features are already split, so each rank's product
is a partial sum of the full output, and one all-reduce adds them up.

So a rank is an ordinary Llama with fewer heads and a narrower MLP —
`rank_config` — whose weights `shard_state_dict` cuts from the full ones; only
the embedding, the LM head and the two all-reduces are new modules.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..kernels.reference import W4_GROUP_MULTIPLE


def check_tp(config: ModelConfig, tp: int) -> None:
    """Fail early, naming the sizes, when `config` cannot be split `tp` ways."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    h, kv = config.num_heads, config.num_kv_heads
    if h % tp:
        fits = [t for t in range(2, h + 1) if h % t == 0 and (kv % t == 0 or t % kv == 0)]
        raise ValueError(f"tp={tp} does not divide num_heads={h} (num_kv_heads={kv}); "
                         f"tp that fit this model: 1, {', '.join(map(str, fits))}")
    if kv % tp and tp % kv:
        raise ValueError(f"tp={tp} must divide num_kv_heads={kv} or be a multiple of it "
                         f"(then each KV head is replicated on tp/{kv} ranks)")
    if config.intermediate_size % tp:
        raise ValueError(f"tp={tp} does not divide intermediate_size={config.intermediate_size}")
    if config.quant is not None:
        g = config.quant.group_size
        for name, features in (("attention output (o) in_features", config.q_size),
                               ("MLP down in_features", config.intermediate_size)):
            if (features // tp) % g:
                raise ValueError(f"W4A16 with tp={tp}: the {name} per rank, {features}/{tp} = "
                                 f"{features // tp}, is not a multiple of the group size {g}; "
                                 "quantize with a smaller --w-group-size or use another tp")
            if (features // tp) % W4_GROUP_MULTIPLE:
                raise ValueError(f"W4A16 with tp={tp}: the {name} per rank ({features // tp}) must "
                                 f"be a multiple of {W4_GROUP_MULTIPLE} for the kernels")


def rank_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The model one rank runs: its heads, its KV heads (at least one) and its MLP slice."""
    check_tp(config, tp)
    return dataclasses.replace(config, num_heads=config.num_heads // tp,
                               num_kv_heads=max(1, config.num_kv_heads // tp),
                               intermediate_size=config.intermediate_size // tp)


def kv_head_range(config: ModelConfig, tp: int, rank: int) -> range:
    """The KV heads of `rank`: a contiguous run, or the one head shared by tp/kv ranks."""
    kv = config.num_kv_heads
    if kv >= tp:
        per = kv // tp
        return range(rank * per, (rank + 1) * per)
    head = rank // (tp // kv)
    return range(head, head + 1)


def vocab_range(vocab_size: int, tp: int, rank: int) -> range:
    """Rows of the embedding and LM head on `rank`; the last shard is padded up to `per_rank`."""
    per_rank = -(-vocab_size // tp)
    return range(rank * per_rank, min(vocab_size, (rank + 1) * per_rank))


def qkv_rows(config: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Row indices of the fused [q | k | v] weight that `rank` holds: whole heads only."""
    d, q_heads = config.head_dim, config.num_heads // tp
    q = torch.arange(rank * q_heads * d, (rank + 1) * q_heads * d)
    kv = kv_head_range(config, tp, rank)
    k = torch.arange(kv.start * d, kv.stop * d) + config.q_size
    return torch.cat([q, k, k + config.kv_size])


def gate_up_rows(config: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Row indices of the fused [gate | up] weight: the same slice of each half."""
    per = config.intermediate_size // tp
    gate = torch.arange(rank * per, (rank + 1) * per)
    return torch.cat([gate, gate + config.intermediate_size])


def split_columns(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank's block of input features (of a qweight: of its int32 words, 8 features each)."""
    per = t.shape[1] // tp
    return t[:, rank * per:(rank + 1) * per]


def shard_tensor(name: str, t: torch.Tensor, config: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank's part of one tensor of the native model's full state dict (same name).

    Float `.weight`s and W4A16 `.qweight/.scales/.zeros` split alike: each holds
    one row per output feature, so column-parallel layers take rows; row-parallel
    ones take a block of input features (qweight packs 8 per column, scales and
    zeros one group per column; `check_tp` made both splits whole). Norms stay
    whole; embedding and LM head keep the vocabulary rows of `vocab_range`.
    """
    if ".attn.qkv." in name:
        t = t[qkv_rows(config, tp, rank)]
    elif ".mlp.gate_up." in name:
        t = t[gate_up_rows(config, tp, rank)]
    elif ".attn.o." in name or ".mlp.down." in name:
        t = split_columns(t, tp, rank)
    elif name in ("embed.weight", "lm_head.weight"):
        vocab = vocab_range(config.vocab_size, tp, rank)
        t = pad_rows(t[vocab.start:vocab.stop], -(-config.vocab_size // tp))
    return t.contiguous()


def shard_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, tp: int,
                     rank: int) -> dict[str, torch.Tensor]:
    """The native model's full state dict → rank's tensors under the same names."""
    check_tp(config, tp)
    return {name: shard_tensor(name, t, config, tp, rank) for name, t in state.items()}


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended up to `rows`: every rank's vocabulary shard has the same size."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
