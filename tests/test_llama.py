"""The native model against transformers on tiny random Llamas (fast) and the real default model."""
import pytest
import torch

from minideploy import GenerationConfig
from minideploy.config import ModelConfig
from minideploy.engine import Generator
from minideploy.models import ForwardContext, KVCache, LlamaModel
from minideploy.models.llama import rope_cos_sin


def tiny_hf_llama(tied: bool, rope_scaling: dict | None = None, heads=(6, 2)):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=301, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=heads[0], num_key_value_heads=heads[1],
                      max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                      rope_theta=5000.0, rope_scaling=rope_scaling)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # norms start at 1.0: perturb them so the mapping is tested
        p.data.add_(torch.randn_like(p) * 0.02)
    return model


def native_from_hf(hf, dtype=torch.float32) -> LlamaModel:
    config = ModelConfig.from_hf(hf.config)
    model = LlamaModel(config).to(dtype)
    model.cos_sin = rope_cos_sin(config, config.max_position_embeddings)
    model.load_hf_state_dict(hf.state_dict())
    return model.eval()


def native_logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], model.embed.weight.dtype, "cpu")
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.inference_mode():
        return model.logits(model(ids, ForwardContext(positions, ids.shape[1]), cache))


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["rope", "llama3-rope"])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (3, 1)], ids=["gqa", "mha", "mqa"])
def test_tiny_llama_logits_match_hf(tied, scaling, heads):
    hf = tiny_hf_llama(tied, scaling, heads)
    model = native_from_hf(hf)
    ids = torch.randint(0, 301, (3, 37))
    with torch.inference_mode():
        ref = hf(ids).logits
    assert (native_logits(model, ids) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_llama_half_precision_close_to_fp32(dtype):
    hf = tiny_hf_llama(tied=False)
    ids = torch.randint(0, 301, (2, 19))
    ref = native_logits(native_from_hf(hf), ids)
    out = native_logits(native_from_hf(hf, dtype), ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def test_incremental_decode_matches_full_forward():
    """Prefill + one-token decode steps through the cache == one forward over everything."""
    model = native_from_hf(tiny_hf_llama(tied=True))
    ids = torch.randint(0, 301, (1, 24))
    full = native_logits(model, ids)[0]
    cache = KVCache(model.config, 1, 24, torch.float32, "cpu")
    steps = [model.logits(model(ids[:, :10], ForwardContext(torch.arange(10)[None], 10), cache))[0, -1]]
    for pos in range(10, 23):
        ctx = ForwardContext(torch.tensor([[pos]]), pos + 1)
        steps.append(model.logits(model(ids[:, pos:pos + 1], ctx, cache))[0, -1])
    assert torch.allclose(torch.stack(steps), full[9:23], atol=1e-5)


@pytest.mark.parametrize("weights", ["float32", "int4"])
def test_cpu_decode_layers_in_one_call_match_the_python_loop(kernel_mode, monkeypatch, weights):
    """On a CPU a tiled model's decode step runs its layers in one C++ call
    (kernels.decode_layers, csrc/cpu/decoder.cpp) that calls the kernels the Python loop
    calls: hidden states and the cache bit for bit as the loop's, over rows at different
    positions (ragged context lengths), step after step. Prefill, untiled linears and
    batches above the GEMV's token bound stay in the loop."""
    import copy

    from minideploy import kernels
    from minideploy.config import QuantConfig
    from minideploy.models import random_model
    from minideploy.quant import quantize_model_, tile_linears_

    kernel_mode("compiled")
    config = ModelConfig(vocab_size=100, hidden_size=128, intermediate_size=160, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=32, max_position_embeddings=64)
    untiled = random_model(config, torch.float32, "cpu", seed=5)
    if weights == "int4":
        quantize_model_(untiled, QuantConfig(4, 32))
    model = tile_linears_(copy.deepcopy(untiled))
    real, calls = kernels.decode_layers, []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    def run(net, one_call: bool, batch: int = 3):
        monkeypatch.setattr(kernels, "decode_layers", spy if one_call else (lambda *args, **kwargs: None))
        cache = KVCache(config, batch, 24, torch.float32, "cpu")
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 100, (batch, 16), generator=gen)
        outs = []
        with torch.inference_mode():
            outs.append(net(ids, ForwardContext(torch.arange(16).expand(batch, -1), 16), cache))
            positions = torch.tensor([[5], [11], [15]]).repeat(batch // 3, 1)  # rows see 6, 12, 16 keys
            for step in range(3):
                token = torch.randint(0, 100, (batch, 1), generator=gen)
                outs.append(net(token, ForwardContext(positions + step, 16 + step), cache))
        return outs, cache

    (loop, loop_cache), (fused, fused_cache) = run(model, False), run(model, True)
    assert calls == [True] * 3  # the three decode steps, not the prefill
    assert all(torch.equal(a, b) for a, b in zip(loop, fused))
    assert torch.equal(loop_cache.k, fused_cache.k) and torch.equal(loop_cache.v, fused_cache.v)
    calls.clear()
    run(untiled, True)  # row-layout linears: the loop
    run(model, True, batch=3 * (kernels.GEMV_MAX_TOKENS // 3 + 1))  # more tokens than the GEMV takes
    assert calls == []


def test_cpu_decode_layers_reject_a_malformed_layer_list():
    from minideploy import kernels

    runner = kernels.build.load(kernels.DECODER, "cpu")
    h, w = torch.randn(1, 8), torch.ones(8)

    def call(norms, caches, linears, out_features):
        slots = torch.zeros(1, dtype=torch.long)
        runner.decode_layers(h, norms, caches, linears, out_features, slots, slots,
                             torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), w, 1, 1,
                             1e-6, 1.0, ["a"] * 5)

    layer_list = "per layer 2 norms, 2 caches, 4 linears and their 4 out_features"
    with pytest.raises(RuntimeError, match=layer_list):
        call([], [], [], [])  # no layer at all
    with pytest.raises(RuntimeError, match=layer_list):
        call([w, w], [w, w], [[w]] * 3, [8] * 3)
    with pytest.raises(RuntimeError, match=r"a linear is 1 tensor \(float32 tiles\) or 3"):
        call([w, w], [w, w], [[w, w]] * 4, [8] * 4)
    with pytest.raises(RuntimeError, match="a::rms_norm"):  # an operator no extension registered
        call([w, w], [w, w], [[w]] * 4, [8] * 4)


def test_non_llama_config_is_rejected():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf(GPT2Config())


CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Translate 'good morning' into Spanish and German.",
    "List three prime numbers greater than 100.",
]
RAW = [
    "The quick brown fox",
    "def quicksort(items):",
    "In 1969, the first humans",
    "Once upon a time, in a small village by the river,",
    "1, 1, 2, 3, 5, 8,",
    "import torch\nx = torch.randn(",
]


def test_greedy_matches_hf_token_for_token(default_model, hf_default):
    """64 greedy tokens, fp32, 11 prompts (chat-templated and raw), decoded together as one batch."""
    tok = default_model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in CHAT]
    prompts += [tok.encode(p) for p in RAW]
    # min_new_tokens on both sides: EOS is masked identically, so every prompt yields 64 tokens.
    config = GenerationConfig(max_new_tokens=64, min_new_tokens=64)
    gen = Generator(default_model.model, tok, default_model.config, session_len=512)
    for seqs in gen.stream(prompts, [config] * len(prompts)):
        pass
    for ids, seq in zip(prompts, seqs):
        with torch.inference_mode():
            ref = hf_default.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=64, min_new_tokens=64, do_sample=False)
        assert seq.output_ids == ref[0, len(ids):].tolist(), f"prompt {tok.decode(ids)!r}"


def test_default_model_logits_match_hf(default_model, hf_default):
    tok = default_model.tokenizer
    ids = torch.tensor([tok.encode("Paris is the capital of France. Berlin is the capital of")])
    with torch.inference_mode():
        ref = hf_default(ids).logits
    diff = (native_logits(default_model.model, ids) - ref).abs().max().item()
    assert diff < 1e-3, diff
