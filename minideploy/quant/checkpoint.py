"""Quantized checkpoints in AutoAWQ's GEMM format: what `minideploy lite auto_awq` writes.

The directory is an ordinary Hugging Face model directory — config.json with a
`quantization_config` ({"quant_method": "awq", "bits", "group_size",
"zero_point": true, "version": "gemm"}), model.safetensors, tokenizer files —
whose decoder projections are stored as `qweight`/`qzeros`/`scales` under their
transformers names (q_proj, k_proj, ..., down_proj). Tools that read AutoAWQ
checkpoints read it; `load_model` reads it back (and real AutoAWQ outputs).
Float tensors are stored in float16, as AutoAWQ does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import QuantConfig
from .linear import W4A16Linear, W4A16TiledLinear, awq_tensors

CHECKPOINT_FILE = "model.safetensors"


def awq_state_dict(model) -> dict[str, torch.Tensor]:
    """The quantized native model's tensors under transformers' names, AutoAWQ layout."""
    c = model.config
    half = lambda t: t.detach().to(torch.float16).contiguous()  # noqa: E731
    state = {"model.embed_tokens.weight": half(model.embed.weight), "model.norm.weight": half(model.norm.weight)}
    if not c.tie_word_embeddings:
        state["lm_head.weight"] = half(model.lm_head.weight)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = half(layer.attn_norm.weight)
        state[p + "post_attention_layernorm.weight"] = half(layer.mlp_norm.weight)
        for module, parts, rows in (
                (layer.attn.qkv, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 [c.q_size, c.kv_size, c.kv_size]),
                (layer.attn.o, ("self_attn.o_proj",), [c.hidden_size]),
                (layer.mlp.gate_up, ("mlp.gate_proj", "mlp.up_proj"), [c.intermediate_size] * 2),
                (layer.mlp.down, ("mlp.down_proj",), [c.hidden_size])):
            if not isinstance(module, (W4A16Linear, W4A16TiledLinear)):
                raise TypeError(f"{p}{parts[0]}: not quantized (run quant.quantize_model_ first)")
            for part, tensors in zip(parts, awq_tensors(module, rows)):
                state.update({f"{p}{part}.{name}": t.cpu() for name, t in tensors.items()})
    return state


def save_awq_checkpoint(model, tokenizer, hf_config: dict, quant: QuantConfig, work_dir: str | os.PathLike,
                        calibration: dict | None = None) -> Path:
    """Write config.json (+ quantization_config), model.safetensors and the tokenizer to work_dir."""
    from safetensors.torch import save_file

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state = awq_state_dict(model)
    tmp = work_dir / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
    save_file(state, tmp, metadata={"format": "pt", "quant_method": "awq"})
    tmp.replace(work_dir / CHECKPOINT_FILE)  # a crash never leaves half a checkpoint under the real name
    config = dict(hf_config)
    config["quantization_config"] = quant.to_hf()
    config["torch_dtype"] = config["dtype"] = "float16"  # transformers 4 and 5 names
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
    if calibration is not None:
        config["minideploy_calibration"] = calibration
    (work_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(work_dir)
    return work_dir
