"""The native Llama-family model, in plain PyTorch, readable top to bottom.

RMSNorm, RoPE, the linears, the KV-cache write, decode attention and the
SwiGLU activation go through `minideploy.kernels` (CUDA / C++ / reference);
prefill attention is torch's SDPA. Tokens travel flattened, `[num_tokens,
hidden]`; attention metadata travels in an explicit `ForwardContext`.

The KV cache here is contiguous: one row of `max_seq_len` slots per batch
entry, preallocated once per batch (gpt-fast style). The kernels already see it
as a paged cache whose blocks are whole rows (slot = row * max_seq_len +
position; block table of row r = [r]), so chapter 4's paged cache
(`minideploy.cache.PagedKVCache`) plugs in behind the same calls: `prepare`,
`store`, `blocks`, `attention_params`, `key_rotation` (an orthogonal matrix
applied to q and k before the cache, or None) and `key_shift` (per layer, taken
off the rotated keys); prefill reads a contiguous row
with `keys_values` (rectangular batches, padded) and a paged sequence with
`sequences_keys_values` (ragged batches, `ForwardContext.query_lens`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import kernels
from ..config import ModelConfig
from ..quant.linear import W4A16TiledLinear, fused_from_awq


@dataclass(frozen=True)
class ForwardContext:
    """Where the tokens of one forward pass sit.

    positions: [batch, seq] position of each input token in its sequence.
    kv_len: keys/values 0..kv_len-1 of each cache row are attended to (prefill).
    first_row: batch entry b uses cache row first_row + b.
    The kernels' view of the same facts, computed once per forward by
    `KVCache.prepare` (CUDA graphs pass static buffers instead):
    slots: [batch * seq] int64, the cache slot each new token's K/V goes to.
    block_tables: [batch, max_blocks] int32, the cache blocks of each sequence.
    context_lens: [batch] int32, the keys each sequence attends to once its new
        tokens are stored (decode: position + 1).
    Ragged prefill over a paged cache (the engine's prefill: no padding): the batch is
    one row of flattened tokens, sequence i's `query_lens[i]` tokens back to back; it
    attends to its `kv_lens[i]` keys (host copies of context_lens) through row i of
    block_tables. None: the batch is rectangular.
    """

    positions: torch.Tensor
    kv_len: int
    first_row: int = 0
    slots: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    query_lens: tuple[int, ...] | None = None
    kv_lens: tuple[int, ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]


class KVCache:
    """Contiguous K/V storage: [num_layers, max_batch_size, max_seq_len, num_kv_heads, head_dim]."""

    key_rotation = key_shift = None  # float keys need no rotation nor shift (see PagedKVCache)

    def __init__(self, config: ModelConfig, max_batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (config.num_layers, max_batch_size, max_seq_len, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Each layer's (K, V) views, made once: indexing the tensors costs ~1 us a call on a
        # small CPU, four times a layer in every decode step.
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def geometry(self) -> dict:
        """Constructor arguments (besides config and device) of an empty cache like this one."""
        return {"max_batch_size": self.k.shape[1], "max_seq_len": self.max_seq_len, "dtype": self.k.dtype}

    def prepare(self, ctx: ForwardContext) -> ForwardContext:
        """`ctx` with the kernels' metadata filled in where missing (once per forward).

        A row is one block of max_seq_len slots: token p of batch entry b goes to slot
        (first_row + b) * max_seq_len + p, and b's block table is [first_row + b].
        """
        if ctx.slots is not None and ctx.block_tables is not None and ctx.context_lens is not None:
            return ctx
        positions = ctx.positions                                 # [batch, seq]
        rows = torch.arange(ctx.first_row, ctx.first_row + ctx.batch_size, device=positions.device)
        fill = {}
        if ctx.slots is None:
            fill["slots"] = (rows[:, None] * self.max_seq_len + positions).reshape(-1)
        if ctx.block_tables is None:
            fill["block_tables"] = rows[:, None].to(torch.int32)  # [batch, 1]
        if ctx.context_lens is None:
            fill["context_lens"] = (positions[:, -1] + 1).to(torch.int32)
        return dataclasses.replace(ctx, **fill)

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V as [num_blocks, block_size, num_kv_heads, head_dim]: a row is a block."""
        return self.layers[layer]

    def attention_params(self, layer: int) -> dict:
        """Extra arguments of decode attention: none, the cache is not quantized."""
        return {}

    def keys_values(self, layer: int, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [batch, kv_len, num_kv_heads, head_dim] of the rows in use."""
        rows = slice(ctx.first_row, ctx.first_row + ctx.batch_size)
        return self.k[layer, rows, :ctx.kv_len], self.v[layer, rows, :ctx.kv_len]


def rope_cos_sin(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half, sin in the second.

    Computed exactly as transformers does, so float32 outputs match bit for bit.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling is not None:
        inv_freq = llama3_scale(inv_freq, config)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def llama3_scale(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    s = config.rope_scaling
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Linear(nn.Linear):
    """nn.Linear without bias whose matmul goes through `kernels.linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] linear's output (W4A16Linear fuses the two)."""
        return kernels.silu_and_mul(self(x))


class TiledLinear(nn.Module):
    """A float32 `Linear` on a CPU with its weight in the GEMV kernel's tiles of rows
    (`reference.tile_rows`, `kernels.linear_tiled`): the lanes of a vector are rows, so a
    decode step's tokens multiply one weight vector each with no sums across lanes; 1.1-1.4x
    faster than the row layout at 8-32 tokens on the default model's shapes (linear.cpp).
    A runtime layout, made by the engine's runners (`quant.tile_linears_`) as TurboMind
    converts weights at load; `weight` gives a copy of the weight back."""

    def __init__(self, linear: Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        self.register_buffer("tiles", kernels.reference.tile_rows(linear.weight.detach(), rows))

    @property
    def weight(self) -> torch.Tensor:
        """The weight [out, in], untiled (a copy: for code that reads a linear's weight)."""
        return kernels.reference.untile_rows(self._buffers["tiles"], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_tiled(x, self._buffers["tiles"], self.out_features)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """As Linear.silu_and_mul."""
        return kernels.silu_and_mul(self(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tiles of {self.rows} rows"


class TiledEmbedding(nn.Module):
    """The embedding of a model whose LM head is tied to it and tiled (`TiledLinear`): a token's
    row is looked up in the head's tiles (row n: tile n // R, lane n % R), so the model keeps one
    copy of its largest matrix. A runtime layout, as TiledLinear."""

    def __init__(self, head: TiledLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rows = head.out_features, head.in_features, head.rows
        self.register_buffer("tiles", head._buffers["tiles"])  # the head's tensor, not a copy

    @property
    def weight(self) -> torch.Tensor:
        """The weight [vocab, hidden], untiled (a copy, as TiledLinear.weight)."""
        return kernels.reference.untile_rows(self._buffers["tiles"], self.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._buffers["tiles"][ids // self.rows, :, ids % self.rows]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, looked up in the LM head's tiles of {self.rows} rows"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without a residual: norm(x). With one: (norm(x + residual), x + residual), fused."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        # q, k and v share one matmul: one pass over the activations instead of three.
        self.qkv = Linear(config.hidden_size, config.q_size + 2 * config.kv_size)
        self.o = Linear(config.q_size, config.hidden_size)
        self.scale = 1.0 / math.sqrt(config.head_dim)  # SDPA's default

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, ctx: ForwardContext,
                cache: KVCache, visible: torch.Tensor | None) -> torch.Tensor:
        """`visible` [batch, 1, seq, kv_len] is SDPA's mask; None: decode (seq == 1) with
        the decode-attention kernel, which reads each sequence's length instead of a mask."""
        c = self.config
        batch, seq = ctx.positions.shape
        qkv = self.qkv(x)
        if cache.key_rotation is None:  # a float cache: RoPE and the cache write in one kernel
            # q, k [num_tokens, heads, head_dim] rotated; v a strided view of qkv.
            q, k, v = kernels.rope_store_kv(qkv, c.num_heads, c.num_kv_heads, ctx.positions.reshape(-1),
                                            cos_sin, *cache.blocks(self.layer), ctx.slots)
        else:  # quantized caches: softmax(q.k) is unchanged by the rotation (PagedKVCache)
            # split_with_sizes, not Tensor.split: its Python wrapper costs 5 us a call on a small CPU.
            q, k, v = qkv.split_with_sizes([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q, k = kernels.rope(q.reshape(-1, c.num_heads, c.head_dim).contiguous(),
                                k.reshape(-1, c.num_kv_heads, c.head_dim).contiguous(),
                                ctx.positions.reshape(-1), cos_sin)
            q, k = q @ cache.key_rotation, k @ cache.key_rotation - cache.key_shift[self.layer]
            v = v.view(-1, c.num_kv_heads, c.head_dim)  # store_kv reads rows with any stride
            cache.store(self.layer, k, v, ctx)
        if ctx.query_lens is not None:  # ragged prefill: each sequence over its own keys
            out = ragged_attention(q, k, v, cache, self.layer, ctx, gqa=c.num_heads != c.num_kv_heads)
            return self.o(out.reshape(-1, c.q_size))
        if visible is None:  # decode: one query per sequence over its cache
            k_blocks, v_blocks = cache.blocks(self.layer)
            out = kernels.decode_attention(q, k_blocks, v_blocks, ctx.block_tables, ctx.context_lens,
                                           self.scale, **cache.attention_params(self.layer))
            # out: [batch, num_heads, head_dim]
            return self.o(out.view(batch, c.q_size))
        keys, values = cache.keys_values(self.layer, ctx)  # [batch, kv_len, num_kv_heads, head_dim]
        out = F.scaled_dot_product_attention(
            q.view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2),
            keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=visible, enable_gqa=c.num_heads != c.num_kv_heads)
        return self.o(out.transpose(1, 2).reshape(batch * seq, c.q_size))


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int,
                     ctx: ForwardContext, gqa: bool) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] of sequences back to back -> the same shape.

    One SDPA per sequence, causal from the end of its cached prefix, so no padding and no
    batch-wide mask. Keys and values come from the sequence's blocks, except where they are
    exactly the k, v [num_tokens, num_kv_heads, head_dim] just computed: no cached prefix and
    a float cache (no gather). A quantized cache is always read back, so a prompt sees the
    rounded keys whether it runs in a batch or alone through the decode kernel."""
    fresh = [n == kv_len and not cache.quant_policy for n, kv_len in zip(ctx.query_lens, ctx.kv_lens)]
    read = [i for i, f in enumerate(fresh) if not f]
    stored = cache.sequences_keys_values(layer, ctx.block_tables, ctx.kv_lens, read) if read else {}
    out, start = torch.empty_like(q), 0
    with sdpa_kernel(RAGGED_BACKENDS):
        for i, (n, kv_len) in enumerate(zip(ctx.query_lens, ctx.kv_lens)):
            keys, values = (k[start:start + n], v[start:start + n]) if fresh[i] else stored[i]
            causal, mask = n == kv_len, None
            if not causal:  # query j sits at position kv_len - n + j and sees keys up to it
                mask = (torch.arange(kv_len, device=q.device)[None, :]
                        <= torch.arange(kv_len - n, kv_len, device=q.device)[:, None])
            out[start:start + n] = F.scaled_dot_product_attention(
                q[None, start:start + n].transpose(1, 2), keys[None].transpose(1, 2),
                values[None].transpose(1, 2), attn_mask=mask, is_causal=causal, enable_gqa=gqa)[0].transpose(0, 1)
            start += n
    return out


# SDPA backends of the ragged prefill. Its inputs are 4-D (a batch of one): with 3-D inputs
# torch fell back to its math path (CPU: 2-4x slower; H100: 0.4-1 ms against 30-40 us for a
# 576-1024-token prompt of a 7B layer). cuDNN is left out: it builds a plan for every new
# sequence length, 1.25 ms of host time a call on the H100 (0.52 s of a 0.69 s prefill step
# of 13 prompts, the GPU busy 0.2 s).
RAGGED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up.silu_and_mul(x))  # silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, residual, cos_sin, ctx, cache, visible):
        if residual is None:
            x, residual = self.attn_norm(h), h
        else:
            x, residual = self.attn_norm(h, residual)
        h = self.attn(x, cos_sin, ctx, cache, visible)
        x, residual = self.mlp_norm(h, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        positions = max_positions or config.max_position_embeddings
        self.register_buffer("cos_sin", rope_cos_sin(config, positions), persistent=False)
        # On a CPU a decode step's layers run in one C++ call where they can (kernels.decode_layers);
        # False keeps them in the Python loop of `forward` (the reference; A/B timings).
        self.decode_in_one_call = True

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # a parameter that every runtime layout keeps as it is

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, cache: KVCache) -> torch.Tensor:
        """input_ids [batch, seq] → final hidden states [batch, seq, hidden] (after the norm)."""
        h = self.embed(input_ids.reshape(-1))  # [num_tokens, hidden]
        ctx = cache.prepare(ctx)  # slots, block tables, context lengths: once, for every layer
        visible = None  # decode (the kernel reads context_lens) or ragged prefill: no mask to build
        if ctx.query_lens is None and (ctx.positions.shape[1] > 1
                                       or not kernels.decode_attention_fits(self.config.head_dim)):
            # A query at position p sees keys 0..p: causal within the prompt, everything cached
            # before. [batch, 1, seq, kv_len], built once and shared by every layer.
            visible = (torch.arange(ctx.kv_len, device=h.device)[None, None, :]
                       <= ctx.positions[:, :, None])[:, None]
        layers_out = None
        if visible is None and ctx.query_lens is None and self.decode_in_one_call:  # decode; on a CPU, one call
            layers_out = self._decode_layers_in_one_call(h, ctx, cache)
        if layers_out is None:
            residual = None
            for layer in self.layers:
                h, residual = layer(h, residual, self.cos_sin, ctx, cache, visible)
        else:
            h, residual = layers_out
        h, _ = self.norm(h, residual)
        return h.view(*input_ids.shape, -1)

    def _decode_layers_in_one_call(self, h: torch.Tensor, ctx: ForwardContext, cache: KVCache):
        """`kernels.decode_layers` over the layers (C++ calling the kernels `forward`'s loop calls),
        or None, and the loop runs: not a CPU, a quantized cache, more tokens than the float
        GEMV takes, a linear in no CPU tile layout (the engine's runners tile them), kernels
        not built. The tensors are gathered every step: a quantized or re-tiled layer is a new
        module, and a runner holding the old ones would compute the old model."""
        if h.device.type != "cpu" or cache.key_rotation is not None or h.shape[0] > kernels.GEMV_MAX_TOKENS:
            return None
        norms, caches, linears, out_features = [], [], [], []
        for i, layer in enumerate(self.layers):
            parts = layer._modules  # nn.Module's attribute lookup: ~0.5 us a name on a small CPU
            # (this walk: ~0.16 ms a step for the default model's 30 layers, ~0.28 through attributes)
            attn, mlp = parts["attn"]._modules, parts["mlp"]._modules
            for linear in (attn["qkv"], attn["o"], mlp["gate_up"], mlp["down"]):
                tiles = TILES_OF.get(type(linear))
                if tiles is None:
                    return None
                linears.append(tiles(linear))
                out_features.append(linear.out_features)
            norms += (parts["attn_norm"]._parameters["weight"], parts["mlp_norm"]._parameters["weight"])
            caches += cache.blocks(i)
        c = self.config
        return kernels.decode_layers(h, norms, caches, linears, out_features, ctx.positions.reshape(-1), ctx.slots,
                                     ctx.block_tables, ctx.context_lens, self.cos_sin, c.num_heads, c.num_kv_heads,
                                     c.rms_norm_eps, self.layers[0].attn.scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] → float32 logits [..., vocab]; 2-D into the linear, so a decode
        step's LM head (the largest matrix of a small model) takes the GEMV kernel."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self.lm_head(flat).float().view(*hidden.shape[:-1], -1)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights named as in transformers' LlamaForCausalLM, fusing q/k/v and gate/up."""
        state = {k.removeprefix("model."): v for k, v in state.items()}
        mapped = {"embed.weight": state.pop("embed_tokens.weight"),
                  "norm.weight": state.pop("norm.weight")}
        head = state.pop("lm_head.weight", None)
        if not self.config.tie_word_embeddings:
            if head is None:
                raise KeyError("lm_head.weight is missing and the config does not tie embeddings")
            mapped["lm_head.weight"] = head
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            for target, parts in (("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  ("attn.o", ("self_attn.o_proj",)),
                                  ("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
                                  ("mlp.down", ("mlp.down_proj",))):
                for suffix, tensor in _fused(state, [p + part for part in parts]).items():
                    mapped[f"{p}{target}.{suffix}"] = tensor
            mapped[p + "attn_norm.weight"] = state.pop(p + "input_layernorm.weight")
            mapped[p + "mlp_norm.weight"] = state.pop(p + "post_attention_layernorm.weight")
        leftover = [k for k in state if "rotary_emb" not in k]
        if leftover:
            raise KeyError(f"unexpected weights in the checkpoint: {leftover[:5]}")
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise KeyError(f"weights missing {missing[:5]} / unexpected {unexpected[:5]}")


# The linears `kernels.decode_layers` takes, and their tensors as it takes them.
TILES_OF = {TiledLinear: lambda m: [m._buffers["tiles"]], W4A16TiledLinear: lambda m: list(m.tiles())}

AWQ_TENSORS = ("qweight", "qzeros", "scales")


def _fused(state: dict[str, torch.Tensor], parts: list[str]) -> dict[str, torch.Tensor]:
    """Pop the HF tensors of q/k/v (or gate/up, or one projection) and concatenate their rows:
    float weights directly, AutoAWQ int4 tensors through the kernel layout."""
    if all(f"{part}.weight" in state for part in parts):
        return {"weight": torch.cat([state.pop(f"{part}.weight") for part in parts])}
    if all(f"{part}.qweight" in state for part in parts):
        return fused_from_awq([{name: state.pop(f"{part}.{name}") for name in AWQ_TENSORS} for part in parts])
    raise KeyError(f"{parts[0]}: neither a float .weight nor AutoAWQ .qweight/.qzeros/.scales in the checkpoint")
