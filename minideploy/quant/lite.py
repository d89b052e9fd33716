"""`minideploy lite auto_awq`: calibrate, search AWQ scales, quantize, write a checkpoint.

LMDeploy's flags and defaults (`lmdeploy lite auto_awq`): --w-bits 4,
--w-group-size 128, --calib-samples 128, --calib-seqlen 512. The calibration text
is the held-in split of `pydoc_data.topics` (no dataset hub here) or a user's
UTF-8 file (--calib-dataset). The output directory loads anywhere a model path
is accepted (`minideploy chat DIR`, `pipeline(DIR)`).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import QuantConfig
from ..models import load_model
from ..models.loader import load_hf_config
from . import _check_all, quantize_model_
from .awq import AWQConfig, awq_search_
from .checkpoint import save_awq_checkpoint
from .data import topics_text

log = logging.getLogger(__name__)


def calibration_windows(tokenizer, text: str, samples: int, seqlen: int, source: str) -> torch.Tensor:
    """Up to `samples` windows of `seqlen` tokens; fewer (with a message) if the text is short."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    have = len(ids) // seqlen
    if have == 0:
        raise ValueError(f"{source}: {len(ids)} tokens, fewer than one calibration window of {seqlen}")
    if samples > have:
        log.warning("%s gives %d windows of %d tokens; calibrating on %d instead of --calib-samples %d",
                    source, have, seqlen, have, samples)
        samples = have
    return torch.tensor(ids[: samples * seqlen]).view(samples, seqlen)


def auto_awq(model_path: Optional[str], work_dir: str | Path, w_bits: int = 4, w_group_size: int = 128,
             calib_samples: int = 128, calib_seqlen: int = 512, calib_dataset: Optional[str | Path] = None,
             search_samples: int = 16, device: str = "cpu") -> Path:
    quant = QuantConfig(w_bits=w_bits, group_size=w_group_size)  # checks the bit width
    if calib_samples < 1 or calib_seqlen < 2:
        raise ValueError(f"--calib-samples must be >= 1 and --calib-seqlen >= 2, got {calib_samples}, {calib_seqlen}")
    loaded = load_model(model_path, dtype=torch.float32, device=device)
    if loaded.config.quant is not None:
        raise ValueError(f"{loaded.source.path}: already quantized ({loaded.config.quant})")
    _check_all(loaded.model, w_group_size)  # before the long calibration: name the layer that does not fit
    if calib_dataset is None:
        text, source = topics_text("calib"), "pydoc_data.topics (calibration split)"
    else:
        text, source = Path(calib_dataset).read_text(encoding="utf-8"), str(calib_dataset)
    calib = calibration_windows(loaded.tokenizer, text, calib_samples, calib_seqlen, source)
    start = time.perf_counter()
    awq_search_(loaded.model, calib, AWQConfig(w_bits=w_bits, group_size=w_group_size,
                                               search_samples=search_samples))
    quantize_model_(loaded.model, quant)
    seconds = time.perf_counter() - start
    hf_config = load_hf_config(loaded.source).to_dict()
    calibration = {"text": source, "samples": int(calib.shape[0]), "seqlen": calib_seqlen,
                   "search_samples": min(search_samples, int(calib.shape[0])), "seconds": round(seconds, 1)}
    out = save_awq_checkpoint(loaded.model, loaded.tokenizer, hf_config, quant, work_dir, calibration)
    generation = loaded.source.directory / "generation_config.json"
    if loaded.source.kind == "hf" and generation.is_file():
        shutil.copy(generation, out / generation.name)
    return out
