"""Text for calibration and perplexity, from the standard library.

`pydoc_data.topics` ships ~500 KB of English prose (Python's reference
documentation, one text per topic). Sorted by key, the first 40 topics are the
calibration split and the rest the evaluation split, so quantization is never
scored on the text it was calibrated on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

CALIBRATION_TOPICS = 40


def topics_text(split: str) -> str:
    """'calib' (first 40 topics by key) or 'eval' (the rest), joined by blank lines."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if split == "calib":
        keys = keys[:CALIBRATION_TOPICS]
    elif split == "eval":
        keys = keys[CALIBRATION_TOPICS:]
    else:
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    return "\n\n".join(topics[k] for k in keys)


def token_windows(tokenizer, text: str, num_windows: int, window: int,
                  source: Optional[Path] = None) -> torch.Tensor:
    """The first `num_windows` non-overlapping windows of `window` tokens: [num_windows, window]."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    have = len(ids) // window
    if have == 0:
        raise ValueError(f"{source or 'the text'}: {len(ids)} tokens, fewer than one window of {window}")
    if num_windows > have:
        raise ValueError(f"{source or 'the text'}: {len(ids)} tokens give {have} windows of {window}, "
                         f"not the {num_windows} asked for")
    return torch.tensor(ids[: num_windows * window]).view(num_windows, window)
