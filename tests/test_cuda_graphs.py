"""CUDA-graph decode must produce exactly the tokens of the same loop run eagerly."""
import pytest
import torch

from minideploy import GenerationConfig
from minideploy.config import ModelConfig, QuantConfig
from minideploy.engine import Generator
from minideploy.engine.cuda_graphs import CUDAGraphDecoder
from minideploy.models import KVCache, NoTokenizer, random_model
from minideploy.quant import quantize_model_

TINY = ModelConfig(vocab_size=503, hidden_size=192, intermediate_size=352, num_layers=3, num_heads=6,
                   num_kv_heads=2, head_dim=32, max_position_embeddings=256)


def greedy_tokens(device, dtype, batch, capture: bool, quant=None):
    model = random_model(TINY, dtype, device, seed=1)
    if quant is not None:
        quantize_model_(model, quant)
    cache = KVCache(TINY, 8, 96, dtype, device)
    decoder = CUDAGraphDecoder(model, cache, buckets=(1, 4, 8))
    if capture:
        decoder.capture()
    prompts = torch.randint(0, TINY.vocab_size, (batch, 21), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.inference_mode():
        first = decoder.prefill(prompts)
        rest = decoder.greedy(first, torch.full((batch,), 21, device=device), 40)
    return torch.cat([first[:, None], rest], 1).cpu()


def test_eager_decoder_matches_the_generator():
    """The static-shape loop (attention over the whole row, masked) == the generator's loop."""
    tokens = greedy_tokens("cpu", torch.float32, 3, capture=False)
    prompts = torch.randint(0, TINY.vocab_size, (3, 21), generator=torch.Generator().manual_seed(2))
    model = random_model(TINY, torch.float32, "cpu", seed=1)
    gen = Generator(model, NoTokenizer(), TINY, session_len=96)
    config = GenerationConfig(max_new_tokens=41, ignore_eos=True)
    for seqs in gen.stream(prompts.tolist(), [config] * 3):
        pass
    assert [s.output_ids for s in seqs] == tokens.tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weights", ["float16", "bfloat16", "w4a16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_overlapped_graph_decode_matches_the_serial_eager_loop(weights, batch, monkeypatch):
    """Kernels launched to overlap the one before (csrc/cuda/launch.cuh), replayed from CUDA
    graphs, give the tokens of the eager loop with that overlap off: it changes when a
    kernel starts, never what it reads."""
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float16
    quant = QuantConfig(4, 32) if weights == "w4a16" else None
    monkeypatch.setenv("MINIDEPLOY_PDL", "0")
    serial = greedy_tokens("cuda", dtype, batch, capture=False, quant=quant)
    monkeypatch.delenv("MINIDEPLOY_PDL")
    overlapped = greedy_tokens("cuda", dtype, batch, capture=True, quant=quant)
    assert torch.equal(serial, overlapped)
