"""Chapter 5: tensor parallelism — sharding, row-parallel and vocab-parallel layers, workers.

`load_parallel(path, EngineConfig(tp=N))` is what `pipeline(..., backend_config)`
and `minideploy chat --tp N` use; `convert` writes a pre-split workspace.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..config import EngineConfig
from ..models import LoadedModel
from ..models.loader import ModelSource, load_tokenizer, model_config_of, resolve_model_path
from .build import Checkpoint, RandomWeights, build_rank_model, rank_device
from .engine import TensorParallelModel
from .group import WorkerError, check_devices, run_spmd
from .linear import RowParallel
from .shard import check_tp, rank_config, shard_state_dict
from .workspace import convert, is_workspace, read_workspace, workspace_tp

__all__ = ["Checkpoint", "RandomWeights", "RowParallel", "TensorParallelModel", "WorkerError",
           "build_rank_model", "check_devices", "check_tp", "convert", "is_workspace", "load_parallel",
           "rank_config", "rank_device", "read_workspace", "run_spmd", "shard_state_dict"]


def load_parallel(model_path: Optional[str | os.PathLike], engine_config: EngineConfig) -> LoadedModel:
    """Load a model (or a converted workspace) split `engine_config.tp` ways.

    Everything that can be checked in this process — devices, head counts,
    group sizes, the workspace's tp — is checked before any worker starts.
    """
    tp, device = engine_config.tp, engine_config.torch_device()
    check_devices(device.type, tp)
    if tp > 1 and device.index is not None:
        raise ValueError(f"with tp={tp} rank r runs on cuda:r; pass device 'cuda', not '{device}'")
    if is_workspace(model_path):
        source = ModelSource("hf", Path(model_path))
        if workspace_tp(source.path) != tp:
            raise ValueError(f"{source.path} was converted for tp={workspace_tp(source.path)}, but "
                             f"tp={tp} was asked for: pass --tp {workspace_tp(source.path)}, "
                             f"or convert again with --tp {tp}")
    else:
        source = resolve_model_path(model_path)
    config = model_config_of(source)
    check_tp(config, tp)
    build = Checkpoint(str(source.path), engine_config.torch_dtype(), device.type)
    model = build(0, 1) if tp == 1 else TensorParallelModel(build, tp, device.type)
    return LoadedModel(model, load_tokenizer(source), config, source)
