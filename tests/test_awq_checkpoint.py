"""Chapter 3: W4A16 modules, AutoAWQ-format checkpoints and `minideploy lite auto_awq`."""
import json

import pytest
import torch
from transformers import LlamaConfig

from minideploy.cli import main
from minideploy.config import ModelConfig, QuantConfig
from minideploy.models import ForwardContext, KVCache, load_model, random_model
from minideploy.quant import W4A16Linear, decoder_linears, fake_quantize_model_, quantize_model_
from minideploy.quant.checkpoint import save_awq_checkpoint

TINY = ModelConfig(vocab_size=211, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=32, tie_word_embeddings=False, rms_norm_eps=1e-5)


def logits(model, ids):
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], torch.float32, "cpu")
    ctx = ForwardContext(torch.arange(ids.shape[1]).expand(ids.shape[0], -1), ids.shape[1])
    with torch.inference_mode():
        return model.logits(model(ids, ctx, cache))


def hf_config_dict(c: ModelConfig) -> dict:
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                       tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=256).to_dict()


def autoawq_dequantize(qweight, qzeros, scales, group_size):
    """AutoAWQ's reading of its GEMM format (awq/utils/packing_utils.py: unpack_awq, reverse_awq_order,
    dequantize_gemm), written out here independently of minideploy's packing code: [in, out] float."""
    shifts = torch.arange(0, 32, 4)
    unpack = lambda t: ((t[:, :, None] >> shifts) & 0xF).reshape(t.shape[0], -1)  # noqa: E731
    reverse = torch.arange(qweight.shape[1] * 8).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    iweight, izeros = unpack(qweight)[:, reverse], unpack(qzeros)[:, reverse]
    return (iweight - izeros.repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(group_size, 0)


@pytest.fixture(scope="module")
def quantized_pair():
    float_model = random_model(TINY, torch.float32, seed=3)
    fake = fake_quantize_model_(random_model(TINY, torch.float32, seed=3), 4, 32)
    real = quantize_model_(random_model(TINY, torch.float32, seed=3), QuantConfig(4, 32))
    return float_model, fake, real


def test_w4a16_modules_compute_what_fake_quantization_simulates(quantized_pair):
    _, fake, real = quantized_pair
    assert all(isinstance(m, W4A16Linear) for _, m in decoder_linears(real))
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    torch.testing.assert_close(logits(real, ids), logits(fake, ids), rtol=1e-4, atol=1e-4)


def test_quantized_model_stores_four_bits_per_weight(quantized_pair):
    float_model, _, real = quantized_pair
    for (name, f), (_, q) in zip(decoder_linears(float_model), decoder_linears(real)):
        assert q.qweight.numel() * 8 == f.weight.numel(), name  # int32 words of 8 nibbles
        assert q.scales.shape == (f.out_features, f.in_features // 32)


def test_checkpoint_round_trip_and_autoawq_layout(quantized_pair, default_model, tmp_path):
    _, _, real = quantized_pair
    save_awq_checkpoint(real, default_model.tokenizer, hf_config_dict(TINY), QuantConfig(4, 32), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                             "zero_point": True, "version": "gemm"}
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    c = TINY
    q_proj = {k: tensors[f"model.layers.1.self_attn.q_proj.{k}"] for k in ("qweight", "qzeros", "scales")}
    assert q_proj["qweight"].shape == (c.hidden_size, c.q_size // 8) and q_proj["qweight"].dtype == torch.int32
    assert q_proj["scales"].shape == (c.hidden_size // 32, c.q_size) and q_proj["scales"].dtype == torch.float16
    # What AutoAWQ would compute from the file is our dequantized weight (scales rounded to fp16).
    from minideploy.kernels.reference import dequantize_w4

    qkv = real.layers[1].attn.qkv
    ours = dequantize_w4(qkv.qweight, qkv.scales.half().float(), qkv.zeros)[: c.q_size]
    theirs = autoawq_dequantize(q_proj["qweight"], q_proj["qzeros"], q_proj["scales"], 32).t()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)

    loaded = load_model(tmp_path, dtype=torch.float32)
    assert loaded.config.quant == QuantConfig(4, 32)
    for (name, a), (_, b) in zip(decoder_linears(real), decoder_linears(loaded.model)):
        assert isinstance(b, W4A16Linear) and torch.equal(a.qweight, b.qweight), name
        assert torch.equal(a.zeros, b.zeros), name
    ids = torch.randint(0, c.vocab_size, (1, 7))
    # Only the fp16 storage of scales, norms and embeddings separates the two.
    torch.testing.assert_close(logits(loaded.model, ids), logits(real, ids), rtol=1e-2, atol=1e-2)


def test_quant_config_rejects_other_formats():
    with pytest.raises(ValueError, match="gptq"):
        QuantConfig.from_hf({"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match="gemv"):
        QuantConfig.from_hf({"quant_method": "awq", "version": "gemv"})
    with pytest.raises(ValueError, match="w_bits=8"):
        QuantConfig(w_bits=8)


def test_auto_awq_cli_rejects_a_group_size_that_does_not_fit(default_model, tmp_path, capsys):
    assert main(["lite", "auto_awq", "default", "--work-dir", str(tmp_path / "out")]) == 2  # default g128
    err = capsys.readouterr().err
    assert "group size 128 does not divide in_features=576" in err and "64, 32" in err
    assert not (tmp_path / "out").exists()


def test_auto_awq_cli_rejects_bad_bits_and_non_llama_models(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["lite", "auto_awq", "default", "--work-dir", str(tmp_path), "--w-bits", "5"])
    assert "invalid choice: 5" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    assert main(["lite", "auto_awq", str(gpt2), "--work-dir", str(tmp_path / "out")]) == 2
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err


def test_auto_awq_then_chat_on_the_default_model(tmp_path):
    """The whole chapter on CPU: a small calibration, the checkpoint, a chat that answers."""
    import subprocess
    import sys

    out = tmp_path / "smollm2-w4g64"
    assert main(["lite", "auto_awq", "default", "--work-dir", str(out), "--w-group-size", "64",
                 "--calib-samples", "8", "--calib-seqlen", "128", "--search-samples", "2"]) == 0
    chat = subprocess.run([sys.executable, "-m", "minideploy.cli", "chat", str(out), "--max-new-tokens", "16"],
                          input="What is the capital of France?\nexit\n", capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout
