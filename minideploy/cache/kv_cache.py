"""Paged K/V storage: one pool of fixed-size blocks per layer, shared by every sequence.

Layout per layer: [num_blocks, block_size, num_kv_heads, head_dim] for K and V.
A sequence's tokens live in the blocks its block table lists (the block manager
decides which); token p sits in slot block_table[p // block_size] * block_size
+ p % block_size. Nothing is reserved for a sequence's maximum length, so the
only waste is the unfilled tail of each sequence's last block.

KV quantization (LMDeploy's `quant_policy`): 8 stores uint8 codes, 4 two codes
per byte, each token's head vector with its own float32 (scale, zero); the
store kernel quantizes, decode attention dequantizes as it reads, and prefill
dequantizes the gathered blocks before SDPA. A quantized cache holds keys
rotated by an orthogonal matrix R (the model multiplies q and k by R after
RoPE; q.k is unchanged): a few outlier channels set the range of every
key after RoPE, and R spreads them over all channels, so the 16 levels of
int4 land closer to the values (QuaRot's idea; on the default model int4's
perplexity increase drops from ~17% to ~7%). Before the rotation each key
loses its layer's and head's mean key (`mean_keys`, measured once on
calibration text): a query's scores all shift by the same q.mean, which softmax
ignores, so attention is unchanged, while the keys' range no longer carries
their common offset (int4's increase drops to ~3.5%; no bytes, no kernel change).

Sizing follows LMDeploy: `cache_max_entry_count` < 1 is the fraction of the
device memory still free after the weights, >= 1 a number of blocks.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .. import kernels, memory
from ..config import EngineConfig, ModelConfig
from ..models import ForwardContext, KVCache, NoTokenizer
from ..quant.data import token_windows, topics_text

log = logging.getLogger(__name__)

KV_FORMATS = {8: "int8", 4: "int4"}  # quant_policy -> stored format
PARAM_BYTES = 2 * 4  # (scale, zero) as float32 per token, per KV head, for K and for V


def key_rotation(dim: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An orthogonal [dim, dim] matrix: the normalised Sylvester Hadamard matrix when dim is a
    power of two, else the Q of a seeded Gaussian matrix (any rotation spreads outliers)."""
    if dim & (dim - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        r = h / math.sqrt(dim)
    else:
        gen = torch.Generator().manual_seed(0)
        r = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))[0]
    return r.to(dtype=dtype, device=device)


KEY_CALIBRATION_WINDOWS, KEY_CALIBRATION_LEN = 8, 512  # text the mean keys are measured on


def key_calibration_windows(tokenizer, vocab_size: int, max_len: int) -> torch.Tensor:
    """[windows, tokens] ids: the calibration split of chapter 3's text, or seeded random ids
    beside a random-weight model (which has no tokenizer)."""
    length = min(KEY_CALIBRATION_LEN, max_len)
    if isinstance(tokenizer, NoTokenizer):
        gen = torch.Generator().manual_seed(0)
        return torch.randint(vocab_size, (KEY_CALIBRATION_WINDOWS, length), generator=gen)
    return token_windows(tokenizer, topics_text("calib"), KEY_CALIBRATION_WINDOWS, length)


@torch.inference_mode()
def mean_keys(model, windows: torch.Tensor) -> torch.Tensor:
    """[num_layers, num_kv_heads, head_dim] float32: each layer's and KV head's mean key
    (after RoPE, as the cache stores it) over the windows, each run on its own."""
    device, dtype = model.device, model.dtype
    length = windows.shape[1]
    cache = KVCache(model.config, 1, length, dtype, device)
    ctx = ForwardContext(torch.arange(length, device=device)[None], length)
    total = torch.zeros(cache.k.shape[0], *cache.k.shape[3:], dtype=torch.float32, device=device)
    for row in windows:
        model(row.to(device)[None], ctx, cache)
        total += cache.k[:, 0].sum(1, dtype=torch.float32)
    return total / windows.numel()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, quant_policy: int = 0) -> int:
    """Chapter 1's formula, plus the quantization parameters when the cache is quantized."""
    if quant_policy == 0:
        return memory.kv_bytes_per_token(config, dtype)
    params = 2 * config.num_layers * config.num_kv_heads * PARAM_BYTES
    return memory.kv_bytes_per_token(config, KV_FORMATS[quant_policy]) + params


def free_memory_bytes(device: torch.device) -> int:
    """Memory still free on the device: the driver's view, or the OS's MemAvailable.

    On a GPU torch's caching allocator first returns the blocks it holds unused (as LMDeploy
    does before sizing its cache): the driver counts them as taken, and whatever ran before
    (a benchmark's buffers, a previous engine) would otherwise shrink the cache by their size.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the free memory of this machine (/proc/meminfo has no MemAvailable): "
                       "pass cache_max_entry_count as a number of blocks (an int >= 1)")


def num_blocks_for(config: ModelConfig, engine: EngineConfig, dtype: torch.dtype,
                   device: torch.device, max_tokens: int | None = None) -> int:
    """How many blocks the cache gets. On CPU (where the cache is plain RAM) the fraction is
    capped at `max_tokens` (max_batch_size × session_len): more could never be used at once."""
    block_bytes = kv_bytes_per_token(config, dtype, engine.quant_policy) * engine.cache_block_seq_len
    if engine.cache_max_entry_count >= 1:
        blocks = int(engine.cache_max_entry_count)
        how = f"{blocks} blocks as asked"
    else:
        free = free_memory_bytes(device)
        blocks = int(free * engine.cache_max_entry_count) // block_bytes
        how = f"{engine.cache_max_entry_count:.0%} of {free / memory.GiB:.2f} GiB free"
        if device.type == "cpu" and max_tokens is not None:
            cap = -(-max_tokens // engine.cache_block_seq_len)
            if blocks > cap:
                blocks, how = cap, how + f", capped at max_batch_size x session_len = {max_tokens} tokens"
    if blocks < 1:
        raise ValueError(f"the KV cache gets no block: one block of {engine.cache_block_seq_len} tokens "
                         f"is {block_bytes / memory.GiB:.3f} GiB and {how}; lower cache_block_seq_len, "
                         f"raise cache_max_entry_count or free device memory")
    log.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s)", blocks, engine.cache_block_seq_len,
             blocks * engine.cache_block_seq_len, blocks * block_bytes / memory.GiB, how)
    return blocks


class PagedKVCache:
    """The model's cache interface (prepare / store / blocks / sequences_keys_values) over blocks."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, quant_policy: int = 0, key_means: torch.Tensor | None = None):
        """key_means [num_layers, num_kv_heads, head_dim] (`mean_keys`): subtracted from the keys
        of a quantized cache before they are rotated; None: no shift."""
        if quant_policy not in (0, *KV_FORMATS):
            raise ValueError(f"quant_policy must be 0, 4 or 8, got {quant_policy!r}")
        if quant_policy == 4 and config.head_dim % 2:
            raise ValueError(f"int4 KV packs two values a byte: head_dim {config.head_dim} must be even")
        self.config, self.block_size, self.quant_policy, self.dtype = config, block_size, quant_policy, dtype
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads)
        if quant_policy:
            codes = config.head_dim * quant_policy // 8
            self.k = torch.zeros(*shape, codes, dtype=torch.uint8, device=device)
            self.v = torch.zeros(*shape, codes, dtype=torch.uint8, device=device)
            self.k_params = torch.zeros(*shape, 2, dtype=torch.float32, device=device)
            self.v_params = torch.zeros(*shape, 2, dtype=torch.float32, device=device)
        else:
            self.k = torch.zeros(*shape, config.head_dim, dtype=dtype, device=device)
            self.v = torch.zeros(*shape, config.head_dim, dtype=dtype, device=device)
            self.k_params = self.v_params = None
        # Each layer's (K, V) and kernel parameters, made once (as KVCache.layers).
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.layer_params = [{}] * config.num_layers  # float cache: the kernels take no parameters
        if self.k_params is not None:
            self.layer_params = [{"k_params": kp, "v_params": vp}
                                 for kp, vp in zip(self.k_params.unbind(0), self.v_params.unbind(0))]
        self.key_rotation = self.key_shift = self.key_means = None
        if quant_policy:
            # The model stores k @ R - key_shift = (k - mean) @ R (see the module docstring).
            self.key_rotation = key_rotation(config.head_dim, dtype, device)
            expected = (config.num_layers, config.num_kv_heads, config.head_dim)
            if key_means is not None and tuple(key_means.shape) != expected:
                raise ValueError(f"key_means must be [num_layers, num_kv_heads, head_dim] = {list(expected)}, "
                                 f"got {list(key_means.shape)}")
            self.key_means = key_means
            means = torch.zeros(expected) if key_means is None else key_means
            self.key_shift = (means.to(device=device, dtype=torch.float32) @ self.key_rotation.float()).to(dtype)
        elif key_means is not None:
            raise ValueError("key_means shift the keys of a quantized cache: pass quant_policy 8 or 4")

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        params = 0 if self.k_params is None else self.k_params.nbytes + self.v_params.nbytes
        return self.k.nbytes + self.v.nbytes + params

    def geometry(self) -> dict:
        """Constructor arguments (besides config and device) of an empty cache like this one."""
        return {"num_blocks": self.num_blocks, "block_size": self.block_size, "dtype": self.dtype,
                "quant_policy": self.quant_policy, "key_means": self.key_means}


    def prepare(self, ctx):
        """The model runner fills slots, block tables and context lengths from the block manager."""
        if ctx.slots is None or ctx.block_tables is None or ctx.context_lens is None:
            raise ValueError("a paged cache needs slots, block_tables and context_lens in the ForwardContext "
                             "(the model runner builds them from the block manager)")
        return ctx

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx) -> None:
        """Write k, v [num_tokens, num_kv_heads, head_dim] into `ctx.slots` (quantizing if asked)."""
        kernels.store_kv(k, v, *self.layers[layer], ctx.slots, **self.layer_params[layer])

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer]

    def attention_params(self, layer: int) -> dict:
        """Extra arguments decode attention needs for this layer (the quantization parameters)."""
        return self.layer_params[layer]

    def sequences_keys_values(self, layer: int, block_tables: torch.Tensor, kv_lens: tuple[int, ...],
                              which: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values 0..kv_lens[i]-1 of each sequence i in `which` (row i of block_tables),
        {i: ([kv_len, num_kv_heads, head_dim], same)} in the model dtype (prefill). One gather,
        and one dequantization if the cache is quantized, over all their blocks: per sequence,
        a batch of hundreds of prompts paid hundreds of small launches a layer."""
        counts = [-(-kv_lens[i] // self.block_size) for i in which]
        blocks = torch.cat([block_tables[i, :n] for i, n in zip(which, counts)]).long()
        flat = []
        for cache, params in ((self.k[layer], self.k_params), (self.v[layer], self.v_params)):
            gathered = cache[blocks]  # [blocks, block_size, heads, dim or codes]
            if params is not None:
                gathered = kernels.dequantize_kv(gathered, params[layer][blocks], self.config.head_dim)
            flat.append(gathered.flatten(0, 1).to(self.dtype))
        out, start = {}, 0
        for i, n in zip(which, counts):
            out[i] = (flat[0][start:start + kv_lens[i]], flat[1][start:start + kv_lens[i]])
            start += n * self.block_size
        return out

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst of every layer becomes a copy of block src."""
        if not copies:
            return
        src, dst = (torch.tensor(ids, device=self.k.device) for ids in zip(*copies))
        for tensor in (self.k, self.v, self.k_params, self.v_params):
            if tensor is not None:
                tensor[:, dst] = tensor[:, src]
