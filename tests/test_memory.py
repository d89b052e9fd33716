"""Chapter 1 arithmetic, checked exactly against hand computation and real tensors."""
import pytest
import torch

from minideploy import memory
from minideploy.config import ModelConfig
from minideploy.models import KVCache, LlamaModel
from minideploy.models.shapes import MODEL_SHAPES

LLAMA_7B = MODEL_SHAPES["llama2-7b"]
LLAMA_70B = MODEL_SHAPES["llama2-70b"]


def tiny_config(tie: bool) -> ModelConfig:
    # Odd sizes on purpose: nothing may rely on powers of two.
    return ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=72, num_layers=3,
                       num_heads=6, num_kv_heads=2, head_dim=10, max_position_embeddings=64,
                       tie_word_embeddings=tie)


def test_kv_cache_llama7b_2k_tokens_fp16_is_one_gib():
    assert memory.kv_cache_bytes(LLAMA_7B, seq_len=2048, dtype="fp16") == 2**30
    assert memory.mha_block_bytes(32, 32, 128, 2048, 2) == 2**30
    assert memory.kv_bytes_per_token(LLAMA_7B) == 2 * 32 * 32 * 128 * 2  # 512 KiB


def test_kv_cache_is_gqa_aware():
    # 70B: 80 layers, 8 KV heads of 128 → 8x smaller than the all-heads formula says.
    assert memory.kv_bytes_per_token(LLAMA_70B, "fp16") == 2 * 80 * 8 * 128 * 2
    assert memory.mha_block_bytes(80, 64, 128, 1, 2) == 8 * memory.kv_bytes_per_token(LLAMA_70B)
    assert memory.kv_cache_bytes(LLAMA_70B, 100, 3, "fp32") == 2 * 80 * 8 * 128 * 100 * 3 * 4


def test_known_parameter_counts():
    # Published totals of the Llama-2 checkpoints.
    assert memory.param_count(LLAMA_7B) == 6_738_415_616
    assert memory.param_count(MODEL_SHAPES["llama2-13b"]) == 13_015_864_320
    assert memory.param_count(LLAMA_70B) == 68_976_648_192


def test_70b_fp16_weights_are_about_138_gb_not_14():
    fp16 = memory.weight_bytes(LLAMA_70B, "fp16")
    assert fp16 == 2 * 68_976_648_192
    assert round(fp16 / memory.GB) == 138
    assert memory.weight_bytes(LLAMA_70B, "fp32") == 2 * fp16
    assert memory.weight_bytes(LLAMA_70B, "bf16") == fp16


def test_int4_group128_layer_from_first_principles():
    out_features = in_features = 4096
    weights = out_features * in_features // 2           # two 4-bit weights per byte
    groups = out_features * (in_features // 128)         # 32 groups per row
    scales = groups * 2                                  # one fp16 scale per group
    packed_zeros = groups // 2                           # one 4-bit zero per group
    assert (memory.quantized_linear_bytes(4096, 4096, 4, 128, "packed")
            == weights + scales + packed_zeros)
    assert memory.quantized_linear_bytes(4096, 4096, 4, 128, "fp16") == weights + 2 * scales
    assert memory.quantized_linear_bytes(4096, 4096, 4, 128, None) == weights + scales
    # Overhead of fp16 scale + 4-bit zero per 128 weights: 20/128 bits per weight.
    assert (weights + scales + packed_zeros) * 8 / (4096 * 4096) == 4 + 20 / 128
    # Per-channel int8: one scale and one 8-bit zero per row.
    assert memory.quantized_linear_bytes(4096, 4096, 8, None) == 4096 * 4096 + 4096 * 3


def test_group_size_must_divide_in_features():
    # The default model's hidden size 576 = 4.5 x 128: AWQ there uses group size 64.
    with pytest.raises(ValueError, match="group_size 128 must divide in_features 576"):
        memory.quantized_linear_bytes(576, 576, 4, 128)
    assert memory.quantized_linear_bytes(576, 576, 4, 64) > 0
    assert memory.group_size_for(LLAMA_7B) == 128
    assert memory.group_size_for(tiny_config(tie=True)) == 4  # in_features 48, 60, 72


def test_int_weights_quantize_only_linears():
    c = tiny_config(tie=False)
    parts = memory.param_breakdown(c)
    kept_fp16 = 2 * (parts["embed"] + parts["norms"] + parts["lm_head"])
    linears = c.num_layers * sum(memory.quantized_linear_bytes(o, i, 4, 4)
                                 for o, i in memory.linear_shapes(c).values())
    assert memory.weight_bytes(c, "int4", group_size=4) == linears + kept_fp16
    kept_without_head = 2 * (parts["embed"] + parts["norms"])
    head = memory.quantized_linear_bytes(c.vocab_size, c.hidden_size, 4, 4)
    assert memory.weight_bytes(c, "int4", group_size=4, quantize_lm_head=True,
                               keep_fmt="bf16") == linears + head + kept_without_head
    assert memory.weight_bytes(c, "int4", group_size=4, keep_fmt="fp32") == linears + 2 * kept_fp16


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_native_model(tie):
    config = tiny_config(tie)
    model = LlamaModel(config)
    assert memory.param_count(config) == sum(p.numel() for p in model.parameters())
    for dtype, fmt in [(torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")]:
        actual = sum(p.numel() * p.element_size() for p in model.to(dtype).parameters())
        assert memory.weight_bytes(config, fmt) == actual
        assert memory.weight_bytes(config, dtype) == actual


@pytest.mark.parametrize("batch, seq, dtype", [(1, 1, torch.float32), (3, 7, torch.float16),
                                               (5, 13, torch.bfloat16), (2, 33, torch.int8)])
def test_kv_cache_tensor_bytes_match_formula(batch, seq, dtype):
    config = tiny_config(tie=True)
    cache = KVCache(config, max_batch_size=batch, max_seq_len=seq, dtype=dtype, device="cpu")
    expected = memory.kv_cache_bytes(config, seq_len=seq, batch_size=batch, dtype=dtype)
    assert cache.nbytes == cache.k.nbytes + cache.v.nbytes == expected
    assert expected == batch * seq * memory.kv_bytes_per_token(config, dtype)


def test_what_fits_on_an_80gb_gpu():
    memory_bytes = 80 * memory.GB
    free = memory_bytes - memory.weight_bytes(LLAMA_7B, "fp16")
    tokens = memory.max_kv_tokens(LLAMA_7B, memory_bytes)
    assert tokens == free // (512 * 1024)
    assert memory.max_batch_size(LLAMA_7B, memory_bytes, 4096) == tokens // 4096 == 30
    half = memory.max_kv_tokens(LLAMA_7B, memory_bytes, kv_fraction=0.5)
    assert half == (free // 2) // (512 * 1024)
    # 70B in fp16 does not fit on one 80 GB GPU at all; in int4 it does, with room for a cache.
    assert memory.max_kv_tokens(LLAMA_70B, memory_bytes) == 0
    assert memory.max_batch_size(LLAMA_70B, memory_bytes, 4096, weights="int4") > 0


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        memory.weight_bytes(LLAMA_7B, "int3")
    with pytest.raises(ValueError, match="zero must be one of"):
        memory.quantized_linear_bytes(8, 8, 4, 8, zero="int")
    with pytest.raises(ValueError, match="kv_fraction"):
        memory.max_kv_tokens(LLAMA_7B, 80 * memory.GB, kv_fraction=0)
