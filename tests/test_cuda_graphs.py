"""CUDA-graph decode must produce exactly the tokens of the same loop run eagerly."""
import pytest
import torch

from minideploy import GenerationConfig
from minideploy.config import ModelConfig
from minideploy.engine import Generator
from minideploy.engine.cuda_graphs import CUDAGraphDecoder
from minideploy.models import KVCache, NoTokenizer, random_model

TINY = ModelConfig(vocab_size=503, hidden_size=192, intermediate_size=344, num_layers=3, num_heads=6,
                   num_kv_heads=2, head_dim=32, max_position_embeddings=256)


def greedy_tokens(device, dtype, batch, capture: bool):
    model = random_model(TINY, dtype, device, seed=1)
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
