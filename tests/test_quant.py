"""Chapter 3 pure functions: RTN round trips, AWQ packing, the group-size contract."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minideploy.config import ModelConfig
from minideploy.models import random_model
from minideploy.quant import Int8Linear, decoder_linears, fake_quantize_model_, quantize_lm_head_
from minideploy.quant.pack import ORDER, from_awq, pack_int4, to_awq, unpack_int4
from minideploy.quant.rtn import dequantize, quantize, quantize_rows_int8


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_error_is_at_most_half_a_step(bits, group_size):
    w = torch.randn(24, 256) * torch.rand(24, 1) * 3
    q, scales, zeros = quantize(w, bits, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    assert scales.shape == zeros.shape == (24, 256 // group_size)
    err = (dequantize(q, scales, zeros) - w).abs().reshape(24, -1, group_size)
    assert (err <= scales[..., None] / 2 + 1e-6).all()
    # group extremes are representable: the error at max and min is within rounding of zero points
    assert err.max() > 0


def test_rtn_is_exact_on_grid_values():
    scale, zero = 0.25, 3
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    q[:, ::32] = 0  # each group spans the whole grid: min and max present
    q[:, 1::32] = 15
    w = (q.float() - zero) * scale
    q2, s2, z2 = quantize(w, 4, 32)
    assert torch.equal(dequantize(q2, s2, z2), w)


@pytest.mark.parametrize("bad", [128, 100, 0])
def test_group_size_must_divide_in_features(bad):
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.down: group size .* in_features=576.*64, 32"):
        quantize(torch.randn(8, 576), 4, bad, "layers.3.mlp.down")


def test_bits_are_checked():
    with pytest.raises(ValueError, match="w_bits"):
        quantize(torch.randn(8, 64), 5, 32)


@given(st.integers(1, 6), st.integers(1, 5))
@settings(max_examples=25, deadline=None)
def test_pack_unpack_round_trip(rows, words):
    values = torch.randint(0, 16, (rows, 8 * words), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_int4(packed), values)


def test_pack_follows_awq_nibble_order():
    values = torch.arange(8, dtype=torch.uint8)[None]  # column c holds the value c
    word = int(pack_int4(values)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == list(ORDER)


def test_awq_format_round_trip():
    q, scales, zeros = quantize(torch.randn(48, 128), 4, 64)
    awq = to_awq(q, scales, zeros)
    assert awq["qweight"].shape == (128, 6) and awq["qzeros"].shape == (2, 6)
    assert awq["scales"].shape == (2, 48) and awq["scales"].dtype == torch.float16
    q2, scales2, zeros2 = from_awq(**awq)
    assert torch.equal(q2, q) and torch.equal(zeros2, zeros)
    assert torch.allclose(scales2, scales, rtol=1e-3)


def test_fake_quantize_model_touches_only_decoder_linears():
    config = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=32)
    model = random_model(config, torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake_quantize_model_(model, 4, 32)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{name}.weight" for name, _ in decoder_linears(model)}
    with pytest.raises(ValueError, match="layers.0.attn.qkv: group size 128"):
        fake_quantize_model_(random_model(config, torch.float32), 4, 128)


def test_int8_rows_error_is_at_most_half_a_step():
    w = torch.randn(50, 77) * torch.rand(50, 1) * 10
    w[3] = 0.0  # a zero row: scale 0, codes 0, no division by zero
    q, scales = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (50,) and scales[3] == 0
    assert q.abs().amax(1)[torch.arange(50) != 3].eq(127).all()  # each row's largest weight is +-127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_quantize_lm_head_unties_it_and_keeps_the_embedding():
    """The default model ties its LM head to the embedding: after the swap the lookup still
    reads the float rows, and each logit is off by at most |h| . (half a step of its row)."""
    from minideploy.models import ForwardContext, KVCache

    config = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=32, tie_word_embeddings=True)
    model = random_model(config, torch.float32)
    embedding = model.embed.weight.detach().clone()
    quantize_lm_head_(model)
    assert isinstance(model.lm_head, Int8Linear) and torch.equal(model.embed.weight, embedding)
    with pytest.raises(TypeError, match="must be a float linear, got Int8Linear"):
        quantize_lm_head_(model)
    ids = torch.randint(0, 100, (2, 9))
    with torch.inference_mode():
        hidden = model(ids, ForwardContext(torch.arange(9).expand(2, -1), 9), KVCache(config, 2, 9, torch.float32, "cpu"))
        error = (model.logits(hidden) - hidden @ embedding.T).abs()
    bound = hidden.abs() @ (model.lm_head.scales / 2).expand(64, -1) + 1e-4
    assert (error <= bound).all() and error.max() > 0


CPU_OR_CUDA = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", CPU_OR_CUDA)
def test_tiled_w4a16_linears_give_the_same_logits_and_checkpoint(device, kernel_mode):
    """tile_linears_ (what the engine's runners call) swaps every int4 linear for its
    device kernel's tile layout: hidden states bit for bit as before (prefill of 18 tokens:
    on a CPU dequantize + matmul, on a GPU the GEMV in chunks; decode: the GEMV) and the
    logits up to float rounding (on a CPU the float32 LM head is tiled too), the same
    AutoAWQ tensors out, and a second call changes nothing. On a GPU a layer whose
    in_features is no multiple of the kernel's 128-weight k-step keeps the row layout."""
    import copy

    from minideploy.config import QuantConfig
    from minideploy.models import ForwardContext, KVCache
    from minideploy.quant import W4A16Linear, W4A16TiledLinear, quantize_model_, tile_linears_
    from minideploy.quant.checkpoint import awq_state_dict

    kernel_mode("compiled")
    dtype = torch.float32 if device == "cpu" else torch.float16
    config = ModelConfig(vocab_size=100, hidden_size=128, intermediate_size=160, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=32, max_position_embeddings=32)
    rows = quantize_model_(random_model(config, dtype, device), QuantConfig(4, 32))
    tiled = tile_linears_(copy.deepcopy(rows))
    kinds = {name.split(".")[-1]: type(module) for name, module in decoder_linears(tiled)}
    # down's in_features, 160, is no multiple of 128: the CUDA kernel's tiles do not fit it.
    assert kinds == {"qkv": W4A16TiledLinear, "o": W4A16TiledLinear, "gate_up": W4A16TiledLinear,
                     "down": W4A16TiledLinear if device == "cpu" else W4A16Linear}
    assert "tiles of" in repr(tiled.layers[0].mlp.gate_up)
    ids = torch.randint(0, 100, (2, 10), device=device)

    def outputs(model):
        cache = KVCache(config, 2, 10, dtype, device)
        positions = torch.arange(9, device=device).expand(2, -1)
        with torch.inference_mode():
            prompt = model(ids[:, :9], ForwardContext(positions, 9), cache)
            step = model(ids[:, 9:], ForwardContext(torch.full((2, 1), 9, device=device), 10), cache)
            return prompt, step, model.logits(prompt), model.logits(step)

    for i, (before, after) in enumerate(zip(outputs(rows), outputs(tiled))):
        if i < 2:  # hidden states
            assert torch.equal(before, after)
        else:
            assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
            assert torch.equal(before.argmax(-1), after.argmax(-1))
    expected = awq_state_dict(rows)
    assert all(torch.equal(t, expected[name]) for name, t in awq_state_dict(tiled).items())
    modules = [module for _, module in decoder_linears(tiled)]
    assert [module for _, module in decoder_linears(tile_linears_(tiled))] == modules


@pytest.mark.parametrize("tied", [True, False])
def test_tiled_float_linears_on_a_cpu(kernel_mode, tied):
    """On a CPU tile_linears_ also puts every float32 decoder linear and the LM head in the
    GEMV kernel's tiles (TiledLinear): the same logits up to float rounding (the tiled GEMV
    sums each output in one chain over k, the row kernel in lanes), greedy tokens alike,
    `weight` gives the weight back; an embedding tied to the head looks its rows up in the
    head's tiles (one tensor, no copy); float16 models stay as they are."""
    import copy

    from minideploy.models import ForwardContext, KVCache
    from minideploy.models.llama import Linear, TiledEmbedding, TiledLinear
    from minideploy.quant import tile_linears_

    kernel_mode("compiled")
    config = ModelConfig(vocab_size=100, hidden_size=128, intermediate_size=160, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=32, max_position_embeddings=32, tie_word_embeddings=tied)
    rows = random_model(config, torch.float32, "cpu")
    assert (rows.lm_head.weight is rows.embed.weight) == tied
    tiled = tile_linears_(copy.deepcopy(rows))
    assert {type(module) for _, module in decoder_linears(tiled)} == {TiledLinear}
    assert type(tiled.lm_head) is TiledLinear
    assert torch.equal(tiled.lm_head.weight, rows.lm_head.weight)
    assert type(tiled.embed) is (TiledEmbedding if tied else torch.nn.Embedding)
    assert torch.equal(tiled.embed.weight, rows.embed.weight)
    if tied:  # one tensor for both
        assert tiled.embed.tiles is tiled.lm_head.tiles
    assert (tiled.device, tiled.dtype) == (torch.device("cpu"), torch.float32)
    for (_, a), (_, b) in zip(decoder_linears(rows), decoder_linears(tiled)):
        assert torch.equal(a.weight, b.weight)
    half = tile_linears_(random_model(config, torch.float16, "cpu"))
    assert {type(module) for _, module in decoder_linears(half)} | {type(half.lm_head)} == {Linear}
    ids = torch.randint(0, 100, (3, 10))

    def logits(model):
        cache = KVCache(config, 3, 10, torch.float32, "cpu")
        positions = torch.arange(9).expand(3, -1)
        with torch.inference_mode():
            prompt = model(ids[:, :9], ForwardContext(positions, 9), cache)
            step = model(ids[:, 9:], ForwardContext(torch.full((3, 1), 9), 10), cache)
            return model.logits(prompt), model.logits(step)

    for before, after in zip(logits(rows), logits(tiled)):
        assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
        assert torch.equal(before.argmax(-1), after.argmax(-1))


def outlier_model(heads=(4, 2)):
    """A tiny random Llama whose residual stream has a few large channels, as trained LLMs do."""
    from minideploy.models.llama import rope_cos_sin

    config = ModelConfig(vocab_size=211, hidden_size=128, intermediate_size=192, num_layers=2,
                         num_heads=heads[0], num_kv_heads=heads[1], head_dim=32, max_position_embeddings=64)
    model = random_model(config, torch.float32, seed=3)
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # embeddings of norm ~ 1 before the RMSNorms
        for layer in model.layers:
            layer.attn_norm.weight[:4] *= 30.0  # salient input channels of q/k/v
            layer.mlp_norm.weight[:4] *= 30.0   # ... and of gate/up
    model.cos_sin = rope_cos_sin(config, 64)
    return model


def logits_error(model, reference, ids):
    from minideploy.models import KVCache, ForwardContext

    def logits(m):
        cache = KVCache(m.config, ids.shape[0], ids.shape[1], torch.float32, "cpu")
        ctx = ForwardContext(torch.arange(ids.shape[1]).expand(ids.shape[0], -1), ids.shape[1])
        return m.logits(m(ids, ctx, cache))
    with torch.inference_mode():
        return (logits(model) - logits(reference)).pow(2).mean().item()


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_awq_beats_rtn_when_activations_have_outliers(heads):
    import copy

    from minideploy.quant.awq import AWQConfig, awq_search_

    reference = outlier_model(heads)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 211, (8, 32), generator=gen)
    held_out = torch.randint(0, 211, (4, 32), generator=gen)
    rtn = fake_quantize_model_(copy.deepcopy(reference), 3, 32)
    awq = copy.deepcopy(reference)
    reports = awq_search_(awq, calib, AWQConfig(w_bits=3, group_size=32, search_samples=4), progress=False)
    fake_quantize_model_(awq, 3, 32)
    assert ("vo_alpha" in reports[0]) == (heads[0] == heads[1])  # v→o only without GQA
    assert any(r["qkv_alpha"] > 0 for r in reports)  # the outliers were found worth protecting
    assert logits_error(awq, reference, held_out) < logits_error(rtn, reference, held_out)


def test_awq_rejects_group_sizes_that_do_not_divide():
    from minideploy.quant.awq import AWQConfig, awq_search_

    with pytest.raises(ValueError, match="group size 48"):
        awq_search_(outlier_model(), torch.zeros(2, 8, dtype=torch.long), AWQConfig(group_size=48))
