"""Sampling, streaming detokenization, the pipeline API and the CLI on the default model."""
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minideploy as md
from minideploy.engine.detokenizer import IncrementalDetokenizer
from minideploy.engine.sampling import SamplingState, filter_top_k_top_p, greedy_tokens, sample


@pytest.fixture(scope="module")
def pipe():
    return md.pipeline(backend_config=md.EngineConfig(cache_max_entry_count=256, cache_block_seq_len=32))


def states(*configs, stop=()):
    return [SamplingState(c, set(stop), torch.device("cpu")) for c in configs]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 50), seed=st.integers(0, 2**16),
       specials=st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0]), max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float16]), stride=st.integers(1, 2))
def test_greedy_tokens_are_torchs_argmax(rows, vocab, seed, specials, dtype, stride):
    """NumPy's argmax on float32 CPU logits (the fast path) picks what torch's does: the first
    maximum, NaN counting as the maximum, ties and infinities included; strided rows too."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 3, (rows, vocab * stride), generator=gen).float()  # many ties
    for i, value in enumerate(specials):
        logits.view(-1)[(i * 7919 + seed) % logits.numel()] = value
    logits = logits.to(dtype)[:, ::stride]
    out = greedy_tokens(logits)
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(-1))


def test_greedy_rows_take_argmax_and_sampled_rows_follow_their_seed():
    logits = torch.randn(3, 50)
    greedy = md.GenerationConfig()
    seeded = md.GenerationConfig(do_sample=True, temperature=1.0, top_k=0, random_seed=7)
    first = sample(logits, states(greedy, seeded, seeded), [[1]] * 3, [0] * 3)
    assert first[0] == logits[0].argmax()
    # the seeded row draws the same token whatever else is in the batch
    alone = sample(logits[1:2], states(seeded), [[1]], [0])
    assert alone[0] == first[1]


def test_min_new_tokens_masks_stop_tokens_and_repetition_penalty_lowers_seen_tokens():
    logits = torch.ones(1, 10)
    logits[0, 3] = 5.0
    cfg = md.GenerationConfig(min_new_tokens=2)
    assert sample(logits, states(cfg, stop=[3]), [[0]], [1])[0] != 3
    assert sample(logits, states(cfg, stop=[3]), [[0]], [2])[0] == 3
    penalized = md.GenerationConfig(repetition_penalty=100.0)
    assert sample(logits, states(penalized), [[3]], [0])[0] != 3


@given(st.integers(1, 20), st.floats(0.05, 1.0))
@settings(max_examples=30, deadline=None)
def test_top_k_top_p_keep_the_most_likely_tokens(k, p):
    logits = torch.randn(40)
    kept = filter_top_k_top_p(logits, k, p).isfinite()
    assert 1 <= kept.sum() <= k
    assert kept[logits.argmax()]
    # the kept set is a prefix of the ranking; top-p applies to the top-k renormalised
    # distribution (as in transformers), whose kept mass reaches p unless top-k cut first
    ranked = kept[logits.argsort(descending=True)]
    assert ranked[: kept.sum()].all()
    if kept.sum() < k:
        assert filter_top_k_top_p(logits, k, 1.0).softmax(-1)[kept].sum() >= p - 1e-6


def test_bad_generation_config_is_rejected():
    with pytest.raises(ValueError, match="top_p"):
        md.GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        md.GenerationConfig(max_new_tokens=0)


@pytest.mark.parametrize("text", ["Hello, wörld! 你好，世界 🚀🎉 naïve café", "  leading spaces\n\tand tabs ",
                                  "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ ∫ ≈ ≠ — “quotes”"])
def test_streaming_detokenizer_is_utf8_safe(pipe, text):
    tok = pipe.tokenizer
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_words_are_cut_and_never_streamed(pipe):
    tok = pipe.tokenizer
    ids = tok.encode("one two three STOP four five", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop_words=["STOP"])
    streamed = ""
    for i in ids:
        streamed += detok.add(i)
        if detok.stopped:
            break
    streamed += detok.flush()
    assert streamed == "one two three "
    assert detok.stopped


def test_pipeline_answers_and_reports_lengths(pipe):
    out = pipe(["What is the capital of France?"], md.GenerationConfig(max_new_tokens=32))
    assert len(out) == 1 and isinstance(out[0], md.Response)
    assert "Paris" in out[0].text
    assert out[0].generate_token_len == len(out[0].token_ids) > 0
    assert out[0].finish_reason in ("stop", "length")
    assert out[0].text == pipe.tokenizer.decode(out[0].token_ids, skip_special_tokens=True)


def test_stream_infer_concatenates_to_the_batch_result(pipe):
    prompts = ["Name a color.", [{"role": "user", "content": "Count from 1 to 5."}]]
    config = md.GenerationConfig(max_new_tokens=24)
    whole = pipe(prompts, config)
    texts, ids, reasons = ["", ""], [[], []], [None, None]
    for r in pipe.stream_infer(prompts, config):
        texts[r.index] += r.text
        ids[r.index] += r.token_ids
        reasons[r.index] = r.finish_reason
    assert texts == [w.text for w in whole]
    assert ids == [w.token_ids for w in whole]
    assert reasons == [w.finish_reason for w in whole]


def test_length_limit_and_stop_words(pipe):
    out = pipe("Tell me a long story about a cat.", md.GenerationConfig(max_new_tokens=5))
    assert out.finish_reason == "length" and out.generate_token_len == 5
    full = pipe("List the numbers from 1 to 10, comma separated.", md.GenerationConfig(max_new_tokens=40))
    assert "5" in full.text
    cut = pipe("List the numbers from 1 to 10, comma separated.",
               md.GenerationConfig(max_new_tokens=40, stop_words=["5"]))
    assert cut.finish_reason == "stop" and "5" not in cut.text
    assert full.text.startswith(cut.text)


def test_bad_prompts_give_clear_errors(pipe):
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe("")
    with pytest.raises(ValueError, match="empty message list"):
        pipe([[]])
    with pytest.raises(TypeError, match="role"):
        pipe([[{"text": "hi"}]])
    with pytest.raises(ValueError, match="session_len"):
        pipe.engine.add_request([1] * pipe.session_len, md.GenerationConfig())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pipe.engine.add_request([1, 10**6], md.GenerationConfig())


def test_turbomind_facade_streams_token_ids(pipe):
    instance = md.TurboMind(pipe).create_instance()
    ids = pipe.encode("What is 2 + 2?")
    outputs = list(instance.stream_infer(session_id=1, input_ids=ids,
                                         gen_config=md.GenerationConfig(max_new_tokens=8)))
    assert outputs[-1].status == "finish" and all(o.status == "ok" for o in outputs[:-1])
    assert outputs[-1].token_ids == pipe("What is 2 + 2?", md.GenerationConfig(max_new_tokens=8)).token_ids
    with pytest.raises(ValueError, match="session_id"):
        next(instance.stream_infer(session_id=-1, input_ids=ids))


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "minideploy.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_chat_cli_answers_piped_input_and_exits():
    result = run_cli("chat", "--max-new-tokens", "32",
                     stdin="What is the capital of France?\nend\nAnd of Italy?\nexit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "session reset" in result.stderr



def test_generate_cli_with_the_lm_head_in_int8():
    """--lm-head-int8: the engine swaps the LM head for int8 rows and still answers."""
    result = run_cli("generate", "--lm-head-int8", "--max-new-tokens", "16", "-p", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    with pytest.raises(ValueError, match="lm_head_int8 needs tp=1"):
        md.EngineConfig(lm_head_int8=True, tp=2)

def test_cli_reports_bad_model_paths(tmp_path):
    missing = run_cli("chat", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "nope: no such file or directory" in missing.stderr
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"")
    other = run_cli("generate", str(tmp_path / "gpt2"), "-p", "hi")
    assert other.returncode == 2 and "model_type 'gpt2'" in other.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    broken = run_cli("chat", str(tmp_path / "broken"))
    assert broken.returncode == 2 and "not valid JSON" in broken.stderr


def test_extreme_temperature_and_top_p_fall_back_to_the_top_token():
    logits = torch.randn(2, 30)
    configs = [md.GenerationConfig(do_sample=True, temperature=1e-300, top_k=0),
               md.GenerationConfig(do_sample=True, temperature=1.0, top_p=5e-324, top_k=0, random_seed=0)]
    assert configs[0].greedy and not configs[1].greedy
    out = sample(logits, states(*configs), [[1], [1]], [0, 0])
    assert out.tolist() == logits.argmax(-1).tolist()
