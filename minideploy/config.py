"""Configuration as data: frozen dataclasses, validated once, never mutated.

`ModelConfig` is what the native model needs from a Hugging Face config;
`EngineConfig` and `GenerationConfig` carry LMDeploy's names and defaults so
that code written for one reads naturally against the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

LLAMA_FAMILY = ("llama", "mistral")
GREEDY_TEMPERATURE = 1e-5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the decoder linears: AutoAWQ's `quantization_config`.

    Values are stored one per 4-bit nibble (AutoAWQ's GEMM layout), so 3- and 4-bit
    weights load; 8-bit weights are a different format that this engine does not run.
    """

    w_bits: int = 4
    group_size: int = 128
    method: str = "awq"

    STORED_BITS = (3, 4)

    def __post_init__(self):
        if self.w_bits not in self.STORED_BITS:
            raise ValueError(f"quantized checkpoints hold {' or '.join(map(str, self.STORED_BITS))}-bit "
                             f"weights (one per 4-bit nibble), got w_bits={self.w_bits}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @classmethod
    def from_hf(cls, quantization_config: dict) -> "QuantConfig":
        q = dict(quantization_config)
        method = q.get("quant_method", q.get("method"))
        if method != "awq":
            raise ValueError(f"unsupported quantization {method!r}: minideploy loads AWQ checkpoints")
        if str(q.get("version", "gemm")).lower() != "gemm" or not q.get("zero_point", True):
            raise ValueError(f"unsupported AWQ variant (version={q.get('version')!r}, "
                             f"zero_point={q.get('zero_point')!r}): expected version 'gemm' with zero points")
        return cls(w_bits=int(q.get("bits", q.get("w_bit", 4))),
                   group_size=int(q.get("group_size", q.get("q_group_size", 128))))

    def to_hf(self) -> dict:
        """The `quantization_config` AutoAWQ and transformers read."""
        return {"quant_method": self.method, "bits": self.w_bits, "group_size": self.group_size,
                "zero_point": True, "version": "gemm"}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    quant: Optional[QuantConfig] = None  # None: float decoder linears

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Read a transformers `PretrainedConfig` (v4 or v5 naming) of a Llama-family model."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in LLAMA_FAMILY:
            raise ValueError(f"unsupported model_type {model_type!r}: minideploy runs Llama-family "
                             f"models ({', '.join(LLAMA_FAMILY)})")
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            raise ValueError("unsupported config: attention_bias/mlp_bias are not Llama-family")
        if getattr(hf, "sliding_window", None):
            raise ValueError(f"unsupported config: sliding_window={hf.sliding_window}")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                  float(rope["high_freq_factor"]),
                                  int(rope["original_max_position_embeddings"]))
        elif rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        heads = hf.num_attention_heads
        quant = getattr(hf, "quantization_config", None)
        if quant is not None and not isinstance(quant, dict):
            quant = quant.to_dict()
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            bos_token_id=hf.bos_token_id,
            eos_token_ids=eos_ids,
            quant=QuantConfig.from_hf(quant) if quant else None,
        )


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model (LMDeploy's `TurbomindEngineConfig` names).

    dtype: "auto" picks bfloat16 on a GPU that supports it, else float32.
    session_len: the longest sequence (prompt + output) one session may hold;
    None means the model's `max_position_embeddings`.
    max_batch_size: the most sequences decoded together.
    cache_max_entry_count: KV-cache size; a float in (0, 1) is the fraction of the device
        memory left free after the weights, an int >= 1 a number of blocks.
    cache_block_seq_len: tokens per KV block.
    quant_policy: KV-cache quantization, 0 (none), 8 (int8) or 4 (int4).
    tp: tensor-parallel degree (number of devices or processes).
    max_prefill_token_num: new prompt tokens one prefill step may compute (a longer
        prompt runs alone); None: 8192 on a GPU (LMDeploy's default), 2048 on a CPU, where
        a step's activations then stay in the caches (the default model's linears: ~15%
        more FLOP/s at 1024-2048 rows than at 4096, and 32 prompts of 32-256 tokens
        prefilled in 3 steps instead of 1 took 6% less time, 2 cores, interleaved runs).
    eager_mode: on a GPU, launch every decode step's kernels from Python instead of
        replaying CUDA graphs captured per batch bucket (graphs are the default, as in
        LMDeploy's PyTorch engine; single device only).
    lm_head_int8: hold the LM head in int8, one scale per vocabulary row
        (`quant.quantize_lm_head_`; not an LMDeploy option): on a CPU a small model's
        largest matrix then streams a quarter of its float32 bytes (the default model's
        GGUF stores it in 8 bits too). tp 1 only.
    """

    dtype: str = "auto"
    device: str = "auto"
    session_len: Optional[int] = None
    max_batch_size: int = 8
    cache_max_entry_count: float = 0.8
    cache_block_seq_len: int = 64
    quant_policy: int = 0
    tp: int = 1
    max_prefill_token_num: Optional[int] = None
    eager_mode: bool = False
    lm_head_int8: bool = False

    QUANT_POLICIES = (0, 4, 8)

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be 'auto' or one of {sorted(DTYPES)}, "
                             f"got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"EngineConfig.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.session_len is not None and self.session_len < 2:
            raise ValueError(f"EngineConfig.session_len must be >= 2, got {self.session_len}")
        if self.max_batch_size < 1:
            raise ValueError(f"EngineConfig.max_batch_size must be >= 1, got {self.max_batch_size}")
        count = self.cache_max_entry_count
        if isinstance(count, bool) or not (0 < count < 1 or (count >= 1 and float(count).is_integer())):
            raise ValueError("EngineConfig.cache_max_entry_count must be a fraction in (0, 1) of the free "
                             f"memory or a whole number of blocks >= 1, got {count!r}")
        if self.cache_block_seq_len < 1:
            raise ValueError(f"EngineConfig.cache_block_seq_len must be >= 1, got {self.cache_block_seq_len}")
        if self.quant_policy not in self.QUANT_POLICIES:
            raise ValueError(f"EngineConfig.quant_policy must be one of {self.QUANT_POLICIES} "
                             f"(none, int4 KV, int8 KV), got {self.quant_policy!r}")
        if self.tp < 1:
            raise ValueError(f"EngineConfig.tp must be >= 1, got {self.tp}")
        if self.lm_head_int8 and self.tp > 1:
            raise ValueError("EngineConfig.lm_head_int8 needs tp=1 (the tensor-parallel LM head is split by "
                             f"vocabulary rows and stays float), got tp={self.tp}")
        if self.max_prefill_token_num is not None and self.max_prefill_token_num < 1:
            raise ValueError(f"EngineConfig.max_prefill_token_num must be >= 1, got {self.max_prefill_token_num}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def prefill_tokens(self, device: torch.device) -> int:
        """max_prefill_token_num, or its default for an engine on `device`."""
        if self.max_prefill_token_num is not None:
            return self.max_prefill_token_num
        return 8192 if device.type == "cuda" else 2048

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        device = self.torch_device()
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and stopping for one request (LMDeploy's names and defaults)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    min_new_tokens: Optional[int] = None
    stop_words: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    random_seed: Optional[int] = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"GenerationConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError("GenerationConfig.repetition_penalty must be > 0, "
                             f"got {self.repetition_penalty}")
        if self.min_new_tokens is not None and not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"GenerationConfig.min_new_tokens must be in [0, max_new_tokens], "
                             f"got {self.min_new_tokens}")

    @property
    def greedy(self) -> bool:
        # Below GREEDY_TEMPERATURE sampling is argmax in all but name, and logits / temperature
        # could overflow float32 to inf (then NaN probabilities).
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
