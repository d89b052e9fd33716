"""The OpenAI-compatible server on a tiny random Llama (the real tokenizer and chat template, random
weights: the text does not matter here, the protocol does): the official client, OpenAI-style
errors, API keys, metrics, 200 concurrent streams with disconnects, a schemathesis run, the
terminal client, and SIGINT/SIGTERM on the real command."""
import asyncio
import dataclasses
import io
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from transformers import LlamaConfig, LlamaForCausalLM

from minideploy.cli import build_parser
from minideploy.config import EngineConfig
from minideploy.engine.pipeline import Pipeline
from minideploy.models.loader import load_tokenizer, resolve_model_path
from minideploy.serve.api_client import run_api_client
from minideploy.serve.api_server import create_app
from minideploy.serve.background import BackgroundServer

SESSION_LEN = 256
CONFIG = EngineConfig(device="cpu", dtype="float32", session_len=SESSION_LEN, max_batch_size=64,
                      cache_max_entry_count=320, cache_block_seq_len=16)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random Llama saved as an HF directory, with the default model's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = load_tokenizer(resolve_model_path("default"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_dir):
    app = create_app(Pipeline(tiny_dir, CONFIG), "tiny")
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_until_no_block_is_held(app, timeout_s: float = 30.0) -> None:
    engine = app.state.engine
    deadline = time.monotonic() + timeout_s
    while engine.stats.running or engine.stats.waiting or engine.stats.blocks_active:
        assert time.monotonic() < deadline, f"requests or blocks left behind: {engine.stats}"
        time.sleep(0.02)
    assert engine.engine.manager.num_active == 0
    engine.engine.manager.check()


def test_openai_client_chat(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_openai_client_completions(client):
    kw = dict(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(**{**kw, "stop": [stop]}).choices[0]
    assert (cut.text, cut.finish_reason) == (text[:text.find(stop)], "stop")
    sampled = dict(kw, temperature=1.0, seed=1234, n=2)
    a, b = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed reproduces
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 16


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', None),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 3}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi " * SESSION_LEN}, "prompt"),
])
def test_bad_requests_are_400_error_objects(server, path, body, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = httpx.post(server.url + path, **kw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if param == "prompt":
        assert f"session_len is {SESSION_LEN}" in error["message"]


def test_api_keys(tiny_dir):
    app = create_app(Pipeline(tiny_dir, CONFIG), "tiny", api_keys=["sk-right"])
    with BackgroundServer(app) as keyed:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"}):
            response = httpx.get(keyed.url + "/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-right")
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason


def test_extreme_sampling_values_still_answer(client):
    """Valid but degenerate: a temperature or top_p that underflows float32 must not give NaN probabilities."""
    for sampling in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 5e-324}):
        reply = client.completions.create(model="tiny", prompt="hi", max_tokens=3, **sampling)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_health_and_metrics(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("minideploy_requests_running", "minideploy_requests_waiting", 'minideploy_kv_blocks{state="free"}',
                 "minideploy_generation_tokens_total", "minideploy_generation_tokens_per_second"):
        assert name in text


def test_200_streams_with_a_quarter_disconnecting(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 8,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 1.0}

    async def one(client, i):
        hang_up = i % 4 == 0  # these ask for long answers: only an abort ends them soon
        request = dict(body, seed=i, max_tokens=200 if hang_up else 8)
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if hang_up:
                        return None  # after the first chunk
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["usage"]["completion_tokens"]

    async def all_of_them():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    before = server.app.state.engine.stats.tokens_generated
    results = asyncio.run(all_of_them())
    assert results.count(None) == 50 and all(n == 8 for n in results if n is not None)
    wait_until_no_block_is_held(server.app)
    generated = server.app.state.engine.stats.tokens_generated - before
    assert generated < 150 * 8 + 50 * 100, f"{generated} tokens: the hung-up streams were not aborted"


api_schema = schemathesis.pytest.from_fixture("openapi")
FUZZ_EXAMPLES = 12  # per operation and phase: enough to reach every validator, quick on 2 cores


@pytest.fixture(scope="module")
def openapi(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.generation.update(modes=list(schemathesis.GenerationMode), max_examples=FUZZ_EXAMPLES)
    return schema


@api_schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_5xx(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"  # else every request stops at the model check
        max_tokens = case.body.get("max_tokens")
        if max_tokens is None or (type(max_tokens) is int and max_tokens > 16):
            case.body["max_tokens"] = 16  # long answers take the same paths as short ones, only slower
    response = case.call(timeout=60)
    assert response.status_code < 500, response.text
    assert '"server_error"' not in response.text  # nor an error event inside a 200 stream


def test_terminal_client(server):
    out = io.StringIO()
    assert run_api_client(server.url, turns=["Hi", "", "end", "Again", "exit", "never sent"], out=out,
                          max_tokens=4) == 0
    assert out.getvalue().count("assistant> ") == 2


def test_cli_defaults():
    args = build_parser().parse_args(["serve", "api_server", "--instance-num", "3"])
    assert (args.server_name, args.max_batch_size, args.tp) == ("127.0.0.1", 3, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_shuts_the_server_down_cleanly(tiny_dir, sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minideploy.cli", "serve", "api_server", str(tiny_dir),
                             "--server-port", str(port), "--session-len", "64", "--cache-max-entry-count", "32",
                             "--max-batch-size", "4", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": tiny_dir.name, "prompt": "hi", "max_tokens": 2})
        assert reply.status_code == 200, reply.text
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err + out


def test_notebook_chat_widget_streams_and_keeps_the_conversation(server):
    from minideploy.serve.chat_widget import ChatWidget

    chat = ChatWidget(server.url, max_tokens=8, temperature=0.0)
    assert chat.send("   ") == "" and chat.history == []
    chat.prompt.value = "hello <there>"  # what pressing Enter does
    first = chat.history[-1]["content"]
    assert chat.prompt.value == "" and [m["role"] for m in chat.history] == ["user", "assistant"]
    assert chat.history[0]["content"] == "hello <there>" and first
    assert "hello &lt;there&gt;" in chat.transcript.value  # escaped, not markup
    second = chat.send("and again")
    assert second and len(chat.history) == 4
    chat.clear()
    assert chat.history == [] and "chatting with tiny" in chat.transcript.value


def test_notebook_chat_widget_shows_server_errors(server):
    from minideploy.serve.chat_widget import ChatWidget

    chat = ChatWidget(server.url, max_tokens=-5)  # the server answers 400
    assert chat.send("hi") == ""
    assert chat.history == [] and "server error" in chat.transcript.value


def test_server_with_tensor_parallel_pipeline_answers_as_tp1(tiny_dir, client):
    """`serve api_server --tp 2`: the same app over a tp=2 pipeline (two gloo workers on the CPU)
    gives the tp=1 server's greedy answer, streamed and not."""
    request = dict(model="tiny", max_tokens=12, temperature=0,
                   messages=[{"role": "user", "content": "Split me across two ranks."}])
    expected = client.chat.completions.create(**request).choices[0].message.content
    pipe = Pipeline(tiny_dir, dataclasses.replace(CONFIG, tp=2))
    try:
        with BackgroundServer(create_app(pipe, "tiny")) as tp_server:
            tp_client = openai.OpenAI(base_url=tp_server.url + "/v1", api_key="unused", max_retries=0)
            assert tp_client.chat.completions.create(**request).choices[0].message.content == expected
            streamed = tp_client.chat.completions.create(**request, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    finally:
        pipe.close()
