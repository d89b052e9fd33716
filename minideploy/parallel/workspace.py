"""`minideploy convert`: a model pre-split for tp ranks, with TurboMind's tensor names.

LMDeploy's `lmdeploy convert` writes a *workspace*: the weights already cut
for a given tensor-parallel degree, so each rank reads only its own part at
start-up. Ours is a directory with

    workspace.json                  {"tp": N, "dtype": ...}
    config.json, tokenizer files    the model's Hugging Face config and tokenizer
    weights/shared.safetensors      tok_embeddings, norm, output, layers.{i}.attention_norm / ffn_norm
    weights/rank{r}.safetensors     layers.{i}.attention.w_qkv.{r}.*, attention.wo.{r}.*,
                                    feed_forward.w1.{r}.* (gate), w3.{r}.* (up), w2.{r}.* (down)

where `*` is `weight`, or `qweight`/`scales`/`zeros` for W4A16 layers (the
kernels' layout). A workspace loads only with the tp it was converted for.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from ..config import DTYPES, ModelConfig
from ..models import load_model
from ..models.loader import ModelSource, load_hf_config, model_config_of
from .shard import check_tp, shard_state_dict, shard_tensor

WORKSPACE_FILE = "workspace.json"
SHARED = {"embed.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
          "lm_head.weight": "output.weight"}
LAYER_SHARED = {"attn_norm": "attention_norm", "mlp_norm": "ffn_norm"}
LAYER_SPLIT = {"attn.qkv": "attention.w_qkv", "attn.o": "attention.wo", "mlp.down": "feed_forward.w2"}
GATE_UP = ("feed_forward.w1", "feed_forward.w3")  # gate, up: stored apart, fused again on load


def is_workspace(path: Optional[str | os.PathLike]) -> bool:
    return path is not None and (Path(path) / WORKSPACE_FILE).is_file()


def workspace_tp(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / WORKSPACE_FILE).read_text())["tp"])


def turbomind_name(native: str, rank: int) -> list[str]:
    """Native name → TurboMind name(s); gate_up gives two (w1, w3), halves of its rows."""
    if native in SHARED:
        return [SHARED[native]]
    m = re.fullmatch(r"layers\.(\d+)\.(attn_norm|mlp_norm|attn\.qkv|attn\.o|mlp\.gate_up|mlp\.down)\.(\w+)",
                     native)
    if m is None:
        raise KeyError(f"{native}: no TurboMind name for this tensor")
    i, module, suffix = m.groups()
    if module in LAYER_SHARED:
        return [f"layers.{i}.{LAYER_SHARED[module]}.{suffix}"]
    targets = GATE_UP if module == "mlp.gate_up" else (LAYER_SPLIT[module],)
    return [f"layers.{i}.{t}.{rank}.{suffix}" for t in targets]


def convert(model_path: Optional[str | os.PathLike], dst_path: str | os.PathLike, tp: int,
            dtype: str = "float16") -> Path:
    """Load a model (HF directory, GGUF, 'default', AWQ checkpoint) and write its tp-way workspace."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    loaded = load_model(model_path, dtype=DTYPES[dtype], device="cpu")
    config = loaded.config
    check_tp(config, tp)
    dst = Path(dst_path)
    (dst / "weights").mkdir(parents=True, exist_ok=True)
    state = loaded.model.state_dict()
    shared = {SHARED[n]: t for n, t in state.items()
              if n in SHARED and not (n == "lm_head.weight" and config.tie_word_embeddings)}
    shared.update({turbomind_name(n, 0)[0]: t for n, t in state.items() if "_norm." in n})
    save_file({k: v.contiguous() for k, v in shared.items()}, dst / "weights" / "shared.safetensors")
    split = {n: t for n, t in state.items() if n not in SHARED and "_norm." not in n}
    for rank in range(tp):
        tensors = {}
        for name, t in shard_state_dict(split, config, tp, rank).items():
            names = turbomind_name(name, rank)
            for target, part in zip(names, t.chunk(len(names))):
                tensors[target] = part.contiguous()
        save_file(tensors, dst / "weights" / f"rank{rank}.safetensors")
    load_hf_config(loaded.source).save_pretrained(dst)
    loaded.tokenizer.save_pretrained(dst)
    (dst / WORKSPACE_FILE).write_text(json.dumps({"tp": tp, "dtype": dtype}, indent=2) + "\n")
    return dst


def read_workspace(path: str | os.PathLike, tp: int, rank: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(full config, rank's tensors under native names) — what `build_rank_model` takes."""
    from safetensors.torch import load_file

    path = Path(path)
    converted = workspace_tp(path)
    if converted != tp:
        raise ValueError(f"{path} was converted for tp={converted}, but tp={tp} was asked for: "
                         f"pass --tp {converted}, or convert again with --tp {tp}")
    config = model_config_of(ModelSource("hf", path))
    shared = load_file(path / "weights" / "shared.safetensors")
    mine = load_file(path / "weights" / f"rank{rank}.safetensors")
    state = {}
    for native, stored in SHARED.items():
        if stored in shared:
            state[native] = shard_tensor(native, shared[stored], config, tp, rank)
    for i in range(config.num_layers):
        for native, stored in LAYER_SHARED.items():
            state[f"layers.{i}.{native}.weight"] = shared[f"layers.{i}.{stored}.weight"]
    split_native = {stored: native for native, stored in LAYER_SPLIT.items()}
    for name, t in mine.items():
        m = re.fullmatch(rf"layers\.(\d+)\.(attention\.\w+|feed_forward\.w\d)\.{rank}\.(\w+)", name)
        if m is None:
            raise KeyError(f"{path}: unexpected tensor {name} in rank{rank}.safetensors")
        i, module, suffix = m.groups()
        if module == GATE_UP[0]:
            state[f"layers.{i}.mlp.gate_up.{suffix}"] = torch.cat(
                [t, mine[f"layers.{i}.{GATE_UP[1]}.{rank}.{suffix}"]])
        elif module != GATE_UP[1]:
            state[f"layers.{i}.{split_native[module]}.{suffix}"] = t
    return config, state
