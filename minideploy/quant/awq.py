"""AWQ: activation-aware weight quantization (Lin et al., 2023).

A few input channels of each linear carry much larger activations than the
rest; rounding errors in their weights cost the most. AWQ protects them
without mixed precision: it scales weight column j up by s_j before
quantization (more of the integer grid for the salient channels) and divides
the preceding operation's output by s_j, so the float function is unchanged:

    y = (x / s) · (s ⊙ W)ᵀ

with s = mean|x|^α per channel, α chosen on a grid in [0, 1) to minimise the
MSE of the block's output against the float block on calibration text. Scales
fold into the RMSNorm weight (for q/k/v and gate/up) or into the previous
linear's rows (up → down; v → o only where v and o have the same width, i.e.
no grouped-query attention: with GQA one v channel feeds several heads' o
inputs, so no per-channel scale can be folded back). Then each group's
clipping range is shrunk where that lowers the linear's output error.

Layers are processed in order; each layer's calibration input is the output
of the layers before it, already scaled and clipped (still in float).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..models import ForwardContext, KVCache, LlamaModel
from ..models.llama import DecoderLayer
from . import decoder_linears
from .rtn import check_group_size, fake_quantize


@dataclass(frozen=True)
class AWQConfig:
    w_bits: int = 4
    group_size: int = 128
    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    clip_grid: int = 20
    max_shrink: float = 0.5  # clipping tries max|w| * (1 - i/clip_grid) down to this fraction
    search_samples: int = 16  # calibration sequences that score candidates (statistics use all)
    clip_tokens: int = 512  # tokens that score clipping candidates

    def __post_init__(self):
        if self.w_bits not in (3, 4, 8):
            raise ValueError(f"AWQConfig.w_bits must be 3, 4 or 8, got {self.w_bits}")
        if self.grid < 1 or self.clip_grid < 1 or not 0 <= self.max_shrink < 1:
            raise ValueError("AWQConfig: grid and clip_grid must be >= 1 and max_shrink in [0, 1)")


def channel_scales(x_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised so that max(s)·min(s) = 1 (keeps weights in range)."""
    s = x_mean_abs.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


class LayerCalibration:
    """One decoder layer with its calibration inputs, able to rerun parts of itself.

    Sequences go through in chunks of `chunk` (the search subset is the first
    chunk), all sharing one preallocated KV cache.
    """

    def __init__(self, model: LlamaModel, layer: DecoderLayer, x: torch.Tensor, cache: KVCache):
        self.model, self.layer, self.x, self.cache = model, layer, x, cache
        chunk, seq = cache.k.shape[1], x.shape[1]
        self.sub = x[:chunk]  # [chunk, seq, hidden]: the sequences that score candidates
        positions = torch.arange(seq, device=x.device).expand(self.sub.shape[0], -1)
        self.ctx = cache.prepare(ForwardContext(positions, seq))
        self.visible = (torch.arange(seq, device=x.device)[None, None, :] <= positions[:, :, None])[:, None]

    def attention(self, x_normed: torch.Tensor) -> torch.Tensor:
        return self.layer.attn(x_normed, self.model.cos_sin, self.ctx, self.cache, self.visible)

    def o_input(self, flat: torch.Tensor) -> torch.Tensor:
        """What the attention block feeds its o projection for residual stream `flat` (via a hook)."""
        seen = {}

        def capture(module, args, output):  # returns None: o's output is left as it is
            seen.setdefault("x", args[0])

        hook = self.layer.attn.o.register_forward_hook(capture)
        try:
            self.attention(self.layer.attn_norm(flat))
        finally:
            hook.remove()
        return seen["x"]

    def forward_all(self) -> torch.Tensor:
        """The layer on every calibration sequence → the residual stream leaving it."""
        outputs = []
        chunk = self.sub.shape[0]
        for start in range(0, self.x.shape[0], chunk):
            x = self.x[start:start + chunk]
            samples, seq, hidden = x.shape
            ctx = self.cache.prepare(ForwardContext(self.ctx.positions[:samples], seq))
            out, residual = self.layer(x.reshape(-1, hidden), None, self.model.cos_sin, ctx, self.cache,
                                       self.visible[:samples])
            outputs.append((out + residual).view(samples, seq, hidden))
        return torch.cat(outputs)


@torch.no_grad()
def search_scale(linears: list[torch.nn.Linear], inputs: torch.Tensor, block: Callable[[], torch.Tensor],
                 config: AWQConfig) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search alpha for linears sharing `inputs` [tokens, in]; returns (s, alpha, losses).

    `block()` recomputes the inspected block's output with the linears' current weights.
    """
    x_mean_abs = inputs.abs().reshape(-1, inputs.shape[-1]).float().mean(0)
    reference = block()
    originals = [lin.weight.detach().clone() for lin in linears]
    losses = []
    for r in range(config.grid):
        s = channel_scales(x_mean_abs, r / config.grid).to(originals[0].dtype)
        for lin, w in zip(linears, originals):
            lin.weight.copy_(fake_quantize(w * s, config.w_bits, config.group_size) / s)
        losses.append((block() - reference).float().pow(2).mean().item())
    for lin, w in zip(linears, originals):
        lin.weight.copy_(w)
    best = min(range(config.grid), key=losses.__getitem__)
    return channel_scales(x_mean_abs, best / config.grid), best / config.grid, losses


@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Per-group clipping threshold minimising the group's contribution error; returns [N, groups, 1]."""
    n, k = weight.shape
    g = config.group_size
    x = inputs.reshape(-1, k)[: config.clip_tokens].float().reshape(-1, k // g, g)  # [tokens, groups, g]
    w = weight.float().reshape(n, k // g, g)
    reference = torch.einsum("tgc,ngc->tng", x, w)
    best_max = w.abs().amax(-1, keepdim=True)
    original_max = best_max.clone()
    best_err = torch.full((n, k // g), float("inf"))
    for i in range(int(config.max_shrink * config.clip_grid)):
        max_val = original_max * (1 - i / config.clip_grid)
        clipped = torch.maximum(torch.minimum(w, max_val), -max_val).reshape(n, k)
        q = fake_quantize(clipped, config.w_bits, g).reshape(n, k // g, g)
        err = (torch.einsum("tgc,ngc->tng", x, q) - reference).pow(2).mean(0)  # [N, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], max_val, best_max)
    return best_max


def apply_clip(linear: torch.nn.Linear, inputs: torch.Tensor, config: AWQConfig) -> None:
    n, k = linear.weight.shape
    max_val = search_clip(linear.weight, inputs, config)
    w = linear.weight.float().reshape(n, k // config.group_size, config.group_size)
    linear.weight.copy_(torch.maximum(torch.minimum(w, max_val), -max_val).reshape(n, k))


@torch.no_grad()
def awq_layer(cal: LayerCalibration, config: AWQConfig) -> dict:
    """Scale and clip one layer in place (float weights); returns the alphas and loss curves."""
    model, layer, x = cal.model, cal.layer, cal.x
    c = model.config
    hidden = x.shape[-1]
    report = {}

    # input_layernorm → q, k, v; scored on the attention block's output.
    x_normed = layer.attn_norm(cal.sub.reshape(-1, hidden))
    s, report["qkv_alpha"], report["qkv_losses"] = search_scale(
        [layer.attn.qkv], x_normed, lambda: cal.attention(x_normed), config)
    layer.attn_norm.weight.div_(s)
    layer.attn.qkv.weight.mul_(s)

    # v → o, only without GQA (see the module docstring).
    if c.num_heads == c.num_kv_heads:
        o_in = cal.o_input(cal.sub.reshape(-1, hidden))
        s, report["vo_alpha"], report["vo_losses"] = search_scale(
            [layer.attn.o], o_in, lambda: layer.attn.o(o_in), config)
        layer.attn.qkv.weight[c.q_size + c.kv_size:].div_(s[:, None])
        layer.attn.o.weight.mul_(s)

    # post_attention_layernorm → gate, up; scored on the MLP's output.
    flat = cal.sub.reshape(-1, hidden)
    attn_out = cal.attention(layer.attn_norm(flat))
    mlp_in, _ = layer.mlp_norm(attn_out, flat)
    s, report["gate_up_alpha"], report["gate_up_losses"] = search_scale(
        [layer.mlp.gate_up], mlp_in, lambda: layer.mlp(mlp_in), config)
    layer.mlp_norm.weight.div_(s)
    layer.mlp.gate_up.weight.mul_(s)

    # up → down; scored on down's output.
    mlp_in, _ = layer.mlp_norm(attn_out, flat)
    gate, up = layer.mlp.gate_up(mlp_in).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    s, report["down_alpha"], report["down_losses"] = search_scale(
        [layer.mlp.down], act, lambda: layer.mlp.down(act), config)
    layer.mlp.gate_up.weight[c.intermediate_size:].div_(s[:, None])
    layer.mlp.down.weight.mul_(s)

    # Clipping: o, gate_up, down. q/k are left alone (their error is amplified by the
    # softmax, as llm-awq observed), hence the fused qkv as a whole.
    mlp_in, _ = layer.mlp_norm(attn_out, flat)
    gate, up = layer.mlp.gate_up(mlp_in).chunk(2, dim=-1)
    apply_clip(layer.attn.o, cal.o_input(flat), config)
    apply_clip(layer.mlp.gate_up, mlp_in, config)
    apply_clip(layer.mlp.down, torch.nn.functional.silu(gate) * up, config)
    return report


@torch.no_grad()
def awq_search_(model: LlamaModel, calib_ids: torch.Tensor, config: AWQConfig,
                progress: bool = True) -> list[dict]:
    """Search AWQ scales and clips layer by layer; the weights stay float (scaled and clipped).

    Quantizing them afterwards (`quant.quantize_model_`, or `fake_quantize_model_`
    to measure) completes AWQ. calib_ids [samples, seq] token ids. Float32 models
    only (the search needs the precision).
    """
    if model.dtype != torch.float32:
        raise ValueError("AWQ calibration runs on a float32 model")
    for name, module in decoder_linears(model):
        check_group_size(module.in_features, config.group_size, name)
    x = model.embed(calib_ids.to(model.device))  # [samples, seq, hidden]
    chunk = min(config.search_samples, x.shape[0])
    cache = KVCache(model.config, chunk, x.shape[1], x.dtype, x.device)
    reports = []
    for i, layer in enumerate(tqdm(model.layers, desc="AWQ", disable=not progress)):
        cal = LayerCalibration(model, layer, x, cache)
        reports.append({"layer": i, **awq_layer(cal, config)})
        x = cal.forward_all()
    return reports
