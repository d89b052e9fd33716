"""The continuous-batching engine on the default model: same greedy text as the static
engine, sessions that prefill only their new tokens, aborts that give every block back."""
import pytest
import torch

from minideploy.config import EngineConfig, GenerationConfig, ModelConfig
from minideploy.engine import Generator
from minideploy.engine.llm_engine import LLMEngine
from minideploy.engine.sequence import Status
from minideploy.models import LoadedModel, NoTokenizer, random_model


@pytest.fixture(scope="module")
def engine(default_model):
    return LLMEngine(default_model, EngineConfig(device="cpu", dtype="float32", session_len=512, max_batch_size=4,
                                                 cache_max_entry_count=40, cache_block_seq_len=16))


def prompts_of(tok, questions):
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                    return_dict=False) for q in questions]


def test_greedy_equals_the_static_engine(engine, default_model):
    ids = prompts_of(default_model.tokenizer, ["What is 2+2?", "Name a colour.", "Say hi.", "What is a cat?",
                                               "Count to three."])
    config = GenerationConfig(max_new_tokens=10)
    seqs = engine.generate(ids, [config] * len(ids))  # 5 requests, 4 batch slots: one joins later
    gen = Generator(default_model.model, default_model.tokenizer, default_model.config, session_len=512)
    for final in gen.stream(ids, [config] * len(ids)):
        pass
    assert [s.payload.output_ids for s in seqs] == [f.output_ids for f in final]
    assert [s.payload.text for s in seqs] == [f.text for f in final]
    assert engine.manager.num_active == 0
    engine.manager.check()


def test_session_turns_prefill_only_new_tokens(engine, default_model):
    tok = default_model.tokenizer
    first = prompts_of(tok, ["My name is Ada. Remember it."])[0]
    seq = engine.add_request(first, GenerationConfig(max_new_tokens=8), session_id=7)
    while seq.status is not Status.FINISHED:
        engine.step()
    held = list(engine.manager.block_table(seq.seq_id))
    assert held and engine.sessions[7] is seq  # the blocks stay with the session
    turn = tok.encode("<|im_start|>user\nWhat is my name?<|im_end|>\n<|im_start|>assistant\n")
    before, computed_before = seq.num_tokens, engine.tokens_computed
    engine.add_request(turn, GenerationConfig(max_new_tokens=4), session_id=7)
    engine.step()  # the new turn's prefill
    assert engine.tokens_computed - computed_before <= len(turn) + 1  # not the history again
    assert engine.manager.block_table(seq.seq_id)[:len(held)] == held
    while seq.status is not Status.FINISHED:
        engine.step()
    assert seq.num_prompt_tokens == before + len(turn)
    assert engine.end_session(7) and 7 not in engine.sessions
    assert engine.manager.num_active == 0
    engine.manager.check()


def test_session_len_bounds_the_whole_session(engine, default_model):
    seq = engine.add_request([1] * 400, GenerationConfig(max_new_tokens=2, ignore_eos=True), session_id=9)
    while seq.status is not Status.FINISHED:
        engine.step()
    with pytest.raises(ValueError, match="session_len is 512"):
        engine.add_request([1] * 200, GenerationConfig(max_new_tokens=2), session_id=9)
    assert engine.sessions[9] is seq  # the refused turn left the session as it was
    engine.end_session(9)


def test_abort_releases_blocks_mid_answer(engine, default_model):
    ids = prompts_of(default_model.tokenizer, ["Tell me a long story.", "Tell me another story."])
    seqs = [engine.add_request(p, GenerationConfig(max_new_tokens=50, ignore_eos=True)) for p in ids]
    for _ in range(4):
        engine.step()
    engine.abort(seqs[0])
    assert seqs[0].finish_reason == "abort"
    while engine.has_work():
        engine.step()
    assert seqs[1].finish_reason == "length" and len(seqs[1].payload.output_ids) == 50
    assert engine.manager.num_active == 0
    engine.manager.check()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant_policy", [0, 8])
def test_cuda_graph_decode_gives_the_eager_engine_tokens(quant_policy):
    """Decode steps replayed from CUDA graphs (batches of 1..6 in buckets 1/2/4/8) == eager steps."""
    config = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=64, max_position_embeddings=512)
    loaded = LoadedModel(random_model(config, torch.float16, "cuda", seed=4), NoTokenizer(), config, source=None)
    gen = torch.Generator().manual_seed(5)
    ids = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (5, 17, 33, 40, 64, 9)]
    configs = [GenerationConfig(max_new_tokens=6 + 7 * i, ignore_eos=True) for i in range(len(ids))]
    outputs = {}
    for eager in (True, False):
        engine = LLMEngine(loaded, EngineConfig(device="cuda", dtype="float16", session_len=512, max_batch_size=8,
                                                cache_max_entry_count=64, cache_block_seq_len=16,
                                                quant_policy=quant_policy, eager_mode=eager))
        assert (engine.runner.graphs is None) == eager
        outputs[eager] = [s.payload.output_ids for s in engine.generate(ids, configs)]
        assert engine.manager.num_active == 0
    assert outputs[True] == outputs[False]
    assert [len(o) for o in outputs[True]] == [c.max_new_tokens for c in configs]


def test_a_quantized_cache_gets_the_models_mean_keys():
    """quant_policy 4: the engine measures each layer's and KV head's mean key once (seeded
    random ids beside a random model) and the cache takes it off every key it stores."""
    from minideploy.cache.kv_cache import key_calibration_windows, mean_keys

    config = ModelConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    loaded = LoadedModel(random_model(config, torch.float32, seed=6), NoTokenizer(), config, source=None)
    engine = LLMEngine(loaded, EngineConfig(device="cpu", dtype="float32", session_len=96, max_batch_size=2,
                                            cache_max_entry_count=16, cache_block_seq_len=16, quant_policy=4))
    expected = mean_keys(loaded.model, key_calibration_windows(NoTokenizer(), config.vocab_size, 96))
    assert key_calibration_windows(NoTokenizer(), config.vocab_size, 96).shape[1] == 96  # session_len bounds it
    torch.testing.assert_close(engine.cache.key_means, expected)
    torch.testing.assert_close(engine.cache.key_shift, (expected @ engine.cache.key_rotation).to(torch.float32))
    seqs = engine.generate([[5, 6, 7, 8]], [GenerationConfig(max_new_tokens=5, ignore_eos=True)])
    assert len(seqs[0].payload.output_ids) == 5 and engine.manager.num_active == 0
