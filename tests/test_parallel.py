"""Tensor parallelism on CPU (gloo): sharded layers against the unsplit ones, tp runs against tp=1."""
import dataclasses

import pytest
import torch
from test_awq_checkpoint import hf_config_dict

import minideploy as md
from minideploy.config import ModelConfig, QuantConfig
from minideploy.models import ForwardContext, KVCache, load_model, random_model
from minideploy.parallel import (Checkpoint, RandomWeights, RowParallel, TensorParallelModel, WorkerError,
                                 check_devices, check_tp, convert, run_spmd, shard_state_dict)
from minideploy.quant import W4A16Linear, quantize_model_
from minideploy.quant.checkpoint import save_awq_checkpoint

# 8 heads / 4 KV heads; vocab 301 is odd, so the vocabulary shards need padding.
TINY = ModelConfig(vocab_size=301, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=8,
                   num_kv_heads=4, head_dim=16, max_position_embeddings=128)
MQA = dataclasses.replace(TINY, num_heads=4, num_kv_heads=1, head_dim=32)  # tp=2 replicates the KV head
W4 = dataclasses.replace(TINY, quant=QuantConfig(group_size=32))


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens through the model interface the generator uses (any model, any tp)."""
    cache = KVCache(model.config, 1, len(prompt) + steps, model.embed.weight.dtype, model.embed.weight.device)
    ctx = ForwardContext(torch.arange(len(prompt))[None], len(prompt))
    out = []
    with torch.inference_mode():
        logits = model.logits(model(torch.tensor([prompt]), ctx, cache)[:, -1])
        for pos in range(len(prompt), len(prompt) + steps):
            out.append(int(logits.argmax(-1)))
            ctx = ForwardContext(torch.tensor([[pos]]), pos + 1)
            logits = model.logits(model(torch.tensor([[out[-1]]]), ctx, cache)[:, -1])
    return out


def test_column_split_by_heads_gives_each_rank_its_heads():
    full = RandomWeights(TINY, torch.float32, "cpu")(0, 1)
    x = torch.randn(5, TINY.hidden_size)
    q, k, v = full.layers[0].attn.qkv(x).split([TINY.q_size, TINY.kv_size, TINY.kv_size], -1)
    for rank in range(2):
        w = shard_state_dict({"layers.0.attn.qkv.weight": full.layers[0].attn.qkv.weight}, TINY, 2, rank)
        qr, kr, vr = (x @ w["layers.0.attn.qkv.weight"].T).split([64, 32, 32], -1)  # 4 heads, 2 KV heads
        assert torch.allclose(qr, q[:, rank * 64:(rank + 1) * 64], atol=1e-6)
        assert torch.allclose(kr, k[:, rank * 32:(rank + 1) * 32], atol=1e-6)
        assert torch.allclose(vr, v[:, rank * 32:(rank + 1) * 32], atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "w4a16"])
def test_row_split_partial_sums_add_up_to_the_unsplit_layer(quantized):
    down = RandomWeights(W4 if quantized else TINY, torch.float32, "cpu")(0, 1).layers[0].mlp.down
    x = torch.randn(3, TINY.intermediate_size)
    ranks = []
    for rank in range(2):
        shard = shard_state_dict({f"layers.0.mlp.down.{k}": v for k, v in down.state_dict().items()}, TINY, 2, rank)
        local = (W4A16Linear(96, TINY.hidden_size, 4, 32) if quantized
                 else torch.nn.Linear(96, TINY.hidden_size, bias=False))
        local.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in shard.items()})
        ranks.append((local, x[:, rank * 96:(rank + 1) * 96]))  # each rank sees its block of features
    (local0, x0), (local1, x1) = ranks
    # In a group the reduce is an all-reduce; here it adds the other rank's partial sum directly.
    y = RowParallel(local0, reduce=lambda partial: partial + local1(x1))(x0)
    assert torch.allclose(y, down(x), atol=1e-4)


def test_bad_sizes_and_devices_are_clear_errors(default_model):
    with pytest.raises(ValueError, match=r"tp=2 does not divide num_heads=9.*fit this model: 1, 3, 9"):
        check_tp(default_model.config, 2)
    with pytest.raises(ValueError, match="must divide num_kv_heads=4 or be a multiple"):
        check_tp(dataclasses.replace(TINY, num_heads=12, num_kv_heads=4, intermediate_size=192 * 3), 6)
    with pytest.raises(ValueError, match=r"down in_features per rank, 192/2 = 96, is not a multiple of the group size 64"):
        check_tp(dataclasses.replace(TINY, quant=QuantConfig(group_size=64)), 2)
    gpus = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"tp={gpus + 1} needs {gpus + 1} CUDA devices"):
        check_devices("cuda", gpus + 1)


def _spmd_logits(rank, tp):
    """Every rank runs the same prefill; rank 0 returns the gathered logits per config."""
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    out = {}
    for name, config in (("mqa", MQA), ("w4a16", W4)):
        model = RandomWeights(config, torch.float32, "cpu", seed=2)(rank, tp)
        cache = KVCache(model.config, 1, ids.shape[1], torch.float32, "cpu")
        with torch.inference_mode():
            out[name] = model.logits(model(ids, ForwardContext(torch.arange(8)[None], 8), cache))
    return out


def test_replicated_kv_heads_and_w4a16_match_tp1_in_a_gloo_group():
    got = run_spmd(_spmd_logits, 2, "cpu", timeout_s=120)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    for name, config in (("mqa", MQA), ("w4a16", W4)):
        ref = RandomWeights(config, torch.float32, "cpu", seed=2)(0, 1)
        cache = KVCache(config, 1, 8, torch.float32, "cpu")
        with torch.inference_mode():
            expected = ref.logits(ref(ids, ForwardContext(torch.arange(8)[None], 8), cache))
        assert got[name].shape == expected.shape  # the vocabulary padding is cut off
        assert torch.allclose(got[name], expected, atol=1e-4), name


def test_tp2_random_llama_greedy_equals_tp1_and_a_killed_worker_does_not_hang():
    build = RandomWeights(TINY, torch.float32, "cpu", seed=1)
    expected = greedy(build(0, 1), [1, 5, 7, 9], 12)
    model = TensorParallelModel(build, 2, "cpu", timeout_s=60)
    try:
        assert greedy(model, [1, 5, 7, 9], 12) == expected
        model.procs[1].kill()
        with pytest.raises(WorkerError, match="tensor-parallel step failed"):
            greedy(model, [1, 5, 7, 9], 4)
    finally:
        model.close()
    assert not any(p.is_alive() for p in model.procs.values())


class FailOnRank1(RandomWeights):
    def __call__(self, rank, tp):
        if rank == 1:
            raise RuntimeError("rank 1 could not load its shard")
        return super().__call__(rank, tp)


def test_a_worker_that_raises_surfaces_its_traceback():
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed:.*Traceback.*rank 1 could not load its shard"):
        TensorParallelModel(FailOnRank1(TINY, torch.float32, "cpu"), 2, "cpu", timeout_s=60)


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
GEN = md.GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def tp1_texts():
    pipe = md.pipeline("default", md.EngineConfig(device="cpu", dtype="float32"))
    return [r.text for r in pipe(PROMPTS, GEN)]


def run_pipeline(path, tp):
    pipe = md.pipeline(path, md.EngineConfig(device="cpu", dtype="float32", tp=tp))
    try:
        return [r.text for r in pipe(PROMPTS, GEN)]
    finally:
        pipe.close()


def test_default_model_tp3_greedy_text_equals_tp1(tp1_texts):
    assert run_pipeline("default", 3) == tp1_texts


def test_converted_tp3_workspace_gives_the_same_text_and_checks_tp(tp1_texts, tmp_path):
    ws = convert("default", tmp_path / "ws", 3, dtype="float32")
    names = set(__import__("safetensors").safe_open(ws / "weights" / "rank2.safetensors", "pt").keys())
    assert {"layers.0.attention.w_qkv.2.weight", "layers.0.attention.wo.2.weight",
            "layers.29.feed_forward.w1.2.weight", "layers.29.feed_forward.w2.2.weight",
            "layers.29.feed_forward.w3.2.weight"} <= names
    assert run_pipeline(ws, 3) == tp1_texts
    with pytest.raises(ValueError, match="converted for tp=3, but tp=1 was asked for: pass --tp 3"):
        md.pipeline(ws, md.EngineConfig(device="cpu", dtype="float32"))


def test_awq_checkpoint_converts_to_a_tp2_workspace_with_int4_shards(default_model, tmp_path):
    config = dataclasses.replace(TINY, vocab_size=default_model.config.vocab_size)
    quant = QuantConfig(4, 32)
    awq = quantize_model_(random_model(config, torch.float32, seed=4), quant)
    save_awq_checkpoint(awq, default_model.tokenizer, hf_config_dict(config), quant, tmp_path / "awq")
    ws = convert(tmp_path / "awq", tmp_path / "ws", 2, dtype="float32")
    names = set(__import__("safetensors").safe_open(ws / "weights" / "rank1.safetensors", "pt").keys())
    assert {"layers.1.attention.w_qkv.1.qweight", "layers.1.attention.wo.1.scales",
            "layers.1.feed_forward.w2.1.zeros"} <= names
    expected = greedy(load_model(tmp_path / "awq").model, [1, 5, 7, 9], 8)
    model = TensorParallelModel(Checkpoint(str(ws), torch.float32, "cpu"), 2, "cpu", timeout_s=60)
    try:
        assert greedy(model, [1, 5, 7, 9], 8) == expected
    finally:
        model.close()
