"""Chapter 2: roofline arithmetic checked by hand, and the timing harness checked for sanity."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minideploy import memory, roofline
from minideploy.bench import common, timing
from minideploy.config import ModelConfig
from minideploy.models.shapes import MODEL_SHAPES

LLAMA_7B = MODEL_SHAPES["llama2-7b"]
A100 = roofline.PUBLISHED["a100"].roof()
H100 = roofline.PUBLISHED["h100"].roof()


def tiny_config(tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=72, num_layers=3,
                       num_heads=6, num_kv_heads=2, head_dim=10, tie_word_embeddings=tie)


# ------------------------------------------------------------ arithmetic

def test_fp16_gemv_does_one_flop_per_byte():
    # 2·N·K FLOPs over 2·N·K weight bytes (+ two tiny activation vectors).
    assert roofline.arithmetic_intensity(1, 4096, 4096, "fp16") == pytest.approx(1.0, rel=1e-3)
    assert roofline.linear_flops(3, 5, 7) == 2 * 3 * 5 * 7
    assert roofline.linear_bytes(3, 5, 7, "fp16") == 2 * 5 * 7 + 3 * (5 + 7) * 2


def test_smaller_weights_raise_intensity():
    fp16 = roofline.arithmetic_intensity(1, 4096, 4096, "fp16")
    int8 = roofline.arithmetic_intensity(1, 4096, 4096, "int8", group_size=None)
    int4 = roofline.arithmetic_intensity(1, 4096, 4096, "int4")
    assert int8 / fp16 == pytest.approx(2.0, rel=0.01)
    # Group scales and packed zeros (g128) cost 2.5 bytes per 128 weights: a bit under 4x.
    assert 3.7 < int4 / fp16 < 4.0
    w = memory.quantized_linear_bytes(4096, 4096, 4, 128, "packed")
    assert roofline.linear_bytes(1, 4096, 4096, "int4") == w + (4096 + 4096) * 2


def test_intensity_saturates_at_nk_over_n_plus_k():
    # At huge batch the weight is free and only activations count: 2BNK / 2B(N+K).
    n, k = 4096, 11008
    assert roofline.arithmetic_intensity(10**9, n, k) == pytest.approx(n * k / (n + k), rel=1e-3)


def test_ridge_points_from_the_table():
    assert A100.ridge == pytest.approx(312e12 / 2039e9)  # ~153 FLOP/B
    assert 290 < H100.ridge < 300
    assert A100.bound(1.0) == "memory" and A100.bound(1000.0) == "compute"
    assert A100.attainable(1.0) == pytest.approx(2039e9)
    assert A100.attainable(1e6) == 312e12


def test_a100_decode_turns_compute_bound_near_batch_150():
    # The seed's point: 312 TFLOP/s over ~2 TB/s means batch >~ 150 before FLOPs matter.
    assert 140 <= roofline.decode_crossover_batch(LLAMA_7B, A100) <= 180
    assert 140 <= roofline.crossover_batch(A100, 4096, 4096) <= 180
    # int4 weights are 4x fewer bytes: compute-bound about 4x sooner.
    assert 30 <= roofline.decode_crossover_batch(LLAMA_7B, A100, weights="int4") <= 50


def test_long_context_keeps_mha_decode_memory_bound():
    # Llama-2-7B at 4k context reads 2 GB of KV per sequence for 15 GFLOPs.
    assert roofline.decode_crossover_batch(LLAMA_7B, A100, context_len=4096) is None


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20000), k=st.integers(1, 20000),
       peak=st.floats(1e11, 2e15), bw=st.floats(1e10, 1e13))
def test_crossover_batch_is_the_first_compute_bound_batch(n, k, peak, bw):
    roof = roofline.Roof(peak, bw)
    batch = roofline.crossover_batch(roof, n, k)
    if batch is None:
        assert roofline.arithmetic_intensity(10**12, n, k) < roof.ridge * (1 + 1e-9)
    else:
        assert roofline.arithmetic_intensity(batch, n, k) >= roof.ridge * (1 - 1e-9)
        if batch > 1:
            assert roofline.arithmetic_intensity(batch - 1, n, k) < roof.ridge * (1 + 1e-9)


@pytest.mark.parametrize("context_len", [0, 512, 4096])
def test_predicted_step_time_grows_with_batch(context_len):
    times = [roofline.predict_step_time(LLAMA_7B, A100, b, context_len) for b in range(1, 600, 7)]
    assert all(a <= b for a, b in zip(times, times[1:]))


def test_small_batch_decode_is_memory_bound():
    cost = roofline.decode_step_cost(LLAMA_7B, batch=1)
    assert cost.intensity < A100.ridge
    assert roofline.predict_step_time(LLAMA_7B, A100, 1) == pytest.approx(cost.bytes / A100.bandwidth)
    # 13.2 GB of weights at 2.039 TB/s: ~6.5 ms per token on an A100.
    assert 6e-3 < roofline.predict_step_time(LLAMA_7B, A100, 1) < 7e-3
    big = roofline.decode_step_cost(LLAMA_7B, batch=1024)
    assert roofline.predict_step_time(LLAMA_7B, A100, 1024) == pytest.approx(big.flops / A100.peak_flops)
    # Below the crossover, 4x the batch costs (almost) nothing: same weights, more tokens.
    assert roofline.predict_step_time(LLAMA_7B, A100, 64) == pytest.approx(
        roofline.predict_step_time(LLAMA_7B, A100, 1))
    int4 = roofline.predict_step_time(LLAMA_7B, A100, 1, weights="int4")
    assert 3.0 < roofline.predict_step_time(LLAMA_7B, A100, 1) / int4 < 4.0


def test_step_cost_counts_kv_reads_and_attention_flops():
    c0 = roofline.decode_step_cost(LLAMA_7B, 3, 0)
    c1 = roofline.decode_step_cost(LLAMA_7B, 3, 100)
    assert c1.bytes - c0.bytes == 3 * 100 * memory.kv_bytes_per_token(LLAMA_7B)
    assert c1.flops - c0.flops == 3 * 32 * 4 * 4096 * 100


def test_untied_embedding_table_is_not_read():
    untied, tied = tiny_config(False), tiny_config(True)
    assert roofline.weights_read_per_step(tied) == memory.weight_bytes(tied)
    assert roofline.weights_read_per_step(untied) == memory.weight_bytes(untied) - 97 * 48 * 2
    assert (roofline.weights_read_per_step(untied, "int4", group_size=12)
            == memory.weight_bytes(untied, "int4", group_size=12) - 97 * 48 * 2)


@pytest.mark.parametrize("name, tag", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100-SXM4-40GB", None),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA L40S", "l40s"), ("NVIDIA L40", None)])
def test_published_spec_matches_only_the_listed_variant(name, tag):
    spec = roofline.published_spec(name)
    assert (spec.tag if spec else None) == tag


def test_roof_rejects_nonsense():
    with pytest.raises(ValueError, match="Roof.bandwidth"):
        roofline.Roof(1e12, 0.0)


# -------------------------------------------------- measuring (sanity only)

def test_time_fn_returns_one_sample_per_repeat():
    calls = []
    samples = timing.time_fn(lambda: calls.append(1), warmup=2, repeats=5, device="cpu", inner=3)
    assert len(samples) == 5 and len(calls) == 2 + 5 * 3
    assert all(s >= 0 and math.isfinite(s) for s in samples)
    stats = timing.describe(samples)
    assert stats["min"] <= stats["p25"] <= stats["median"] <= stats["p75"] <= stats["max"]


def test_rotating_overflows_the_cache_with_distinct_copies():
    w = torch.randn(64, 64)  # 16 KiB
    rot = timing.Rotating(w, cache=100_000, factor=2.0)
    assert len(rot) == math.ceil(200_000 / w.nbytes) and rot.bytes >= 200_000
    seen = [rot.next()[0] for _ in range(len(rot) + 1)]
    assert seen[0] is w and seen[-1] is w
    assert len({t.data_ptr() for t in seen}) == len(rot)
    assert all(torch.equal(t, w) for t in seen)
    assert timing.cache_bytes("cpu") > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_read_floors_annotate_graph_points_once_per_size():
    device = torch.device("cuda")
    stats = timing.describe([2e-6, 3e-6])
    points = [{"method": "kernel_graph", "bytes": 1 << 22, "stats": stats},
              {"method": "kernel", "bytes": 1 << 22, "stats": stats},
              {"method": "w4a16_graph", "bytes": 1 << 22, "stats": stats},
              {"method": "w4a16_graph", "bytes": 1 << 24, "stats": stats}]
    timing.add_read_floors(points, device, repeats=3, read_bytes_per_s=3e12)
    assert "read_floor" not in points[1]
    assert points[0]["read_floor"] is not points[2]["read_floor"]
    assert points[0]["read_floor"]["stats"] == points[2]["read_floor"]["stats"]  # one measurement a size
    for p in (points[0], points[2], points[3]):
        floor = p["read_floor"]
        assert floor["stats"]["n"] == 3 and 0 < floor["fraction_of_read_bandwidth"] < 2
        assert p["fraction_of_read_floor"] == floor["stats"]["median"] / stats["median"]


def test_measured_cpu_ceilings_are_positive():
    bw = roofline.measure_bandwidth("cpu", nbytes=16 * 2**20, warmup=1, repeats=3)
    mm = roofline.measure_matmul("cpu", sizes=(64, 256), warmup=1, repeats=3)
    assert len(bw["read_seconds"]) == 3 and [len(run["seconds"]) for run in mm["runs"]] == [3, 3]
    assert mm["flops_per_s"] == max(run["flops_per_s"] for run in mm["runs"])
    for value in (bw["read_bytes_per_s"], bw["copy_bytes_per_s"], mm["flops_per_s"]):
        assert value > 0 and math.isfinite(value)
    assert common.device_tag("cpu") == "cpu"


def test_bench_writes_json_and_png_on_cpu(tmp_path, monkeypatch):
    from minideploy.bench import roofline as bench

    monkeypatch.setattr(common, "FIGURES", tmp_path)
    monkeypatch.setattr(bench, "FIGURES", tmp_path)
    monkeypatch.setattr(bench, "SHAPES_7B", [("q/o", 512, 512), ("down", 1024, 512)])
    monkeypatch.setattr(bench, "measure_roof",
                        lambda device, **kw: roofline.measure_roof(device, nbytes=2**24, sizes=(256,), repeats=2))
    bench.main(["--device", "cpu", "--batches", "1,16", "--repeats", "2"])
    result = json.loads((tmp_path / "roofline_cpu.json").read_text())
    assert (tmp_path / "roofline_cpu.png").stat().st_size > 0
    assert result["small_shapes"] and result["command"]
    assert len(result["points"]) == 4 and all(len(p["seconds"]) == 2 for p in result["points"])
    assert result["points"][0]["k"] == 512 // bench.CPU_SCALE


def test_bench_help_exits_cleanly(capsys):
    from minideploy.bench import roofline as bench

    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    assert exit_.value.code == 0 and "--batches" in capsys.readouterr().out
