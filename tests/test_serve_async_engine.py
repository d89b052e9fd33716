"""AsyncEngine on the default model: the same text as the sync engine, cancellation that gives the
blocks back, errors that reach the caller, an idle thread that sleeps, a clean close."""
import asyncio
import time

import pytest

from minideploy.config import EngineConfig, GenerationConfig
from minideploy.engine.async_engine import AsyncEngine, EngineClosed
from minideploy.engine.llm_engine import LLMEngine

CONFIG = EngineConfig(device="cpu", dtype="float32", session_len=256, max_batch_size=4,
                      cache_max_entry_count=40, cache_block_seq_len=16)
LONG = GenerationConfig(max_new_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(default_model):
    engine = AsyncEngine(LLMEngine(default_model, CONFIG))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(default_model):
    return [default_model.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                        return_dict=False) for q in ("Say hi.", "What is 2+2?")]


def wait_idle(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    """Until the engine thread has no request and holds no KV block (else fail: a leak)."""
    deadline = time.monotonic() + timeout_s
    while engine.stats.running or engine.stats.waiting or engine.stats.blocks_active:
        assert time.monotonic() < deadline, f"engine still busy or leaking blocks: {engine.stats}"
        time.sleep(0.01)
    engine.engine.manager.check()


async def collect(engine, prompt, config):
    deltas = [d async for d in engine.generate(prompt, config)]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas[-1]


def test_streams_the_same_text_as_the_sync_engine(engine, default_model, prompts):
    config = GenerationConfig(max_new_tokens=12)
    reference = LLMEngine(default_model, CONFIG).generate(prompts, [config] * 2)

    async def both():
        return await asyncio.gather(*(collect(engine, p, config) for p in prompts))

    for (text, ids, last), seq in zip(asyncio.run(both()), reference):
        assert (text, ids) == (seq.payload.text, seq.payload.output_ids)
        assert last.finish_reason == seq.payload.finish_reason
        assert last.completion_tokens == len(ids) and last.prompt_tokens == len(seq.payload.prompt_ids)
    wait_idle(engine)


def test_cancelled_consumer_aborts_its_request(engine, prompts):
    async def run():
        got = asyncio.Event()

        async def consume():
            async for _ in engine.generate(prompts[0], LONG):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    wait_idle(engine)


def test_dropped_and_closed_streams_abort(engine, prompts):
    async def run():
        async for _ in engine.generate(prompts[0], LONG):
            break  # the generator is finalized (and the request aborted) once dropped
        stream = engine.submit(prompts, [LONG, LONG])
        await anext(stream)
        await stream.aclose()
        await asyncio.sleep(0.05)

    asyncio.run(run())
    wait_idle(engine)


def test_bad_prompt_and_engine_errors_reach_the_caller(engine, prompts, monkeypatch):
    with pytest.raises(ValueError, match="session_len is 256"):
        asyncio.run(collect(engine, [1] * 300, LONG))
    real_step = engine.engine.step

    def broken_step():
        monkeypatch.setattr(engine.engine, "step", real_step)  # fail once, then work again
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.engine, "step", broken_step)
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(collect(engine, prompts[0], LONG))
    wait_idle(engine)
    text, _, last = asyncio.run(collect(engine, prompts[1], GenerationConfig(max_new_tokens=4)))
    assert last.finish_reason in ("stop", "length") and engine.alive


def test_sessions_keep_blocks_until_ended(engine, prompts):
    asyncio.run(collect_session(engine, prompts[0]))
    assert engine.stats.blocks_active > 0  # the parked session holds its KV blocks
    engine.end_session(5)
    wait_idle(engine)


async def collect_session(engine, prompt):
    return [d async for d in engine.generate(prompt, GenerationConfig(max_new_tokens=4), session_id=5)]


def test_idle_engine_thread_sleeps(engine):
    wait_idle(engine)
    clock = time.pthread_getcpuclockid(engine._thread.ident)
    before = time.clock_gettime(clock)
    time.sleep(1.0)
    assert time.clock_gettime(clock) - before < 0.05  # CPU seconds in one wall second: it is not spinning


def test_close_fails_pending_requests_and_joins(default_model, prompts):
    engine = AsyncEngine(LLMEngine(default_model, CONFIG))

    async def run():
        stream = engine.submit([prompts[0]], [LONG])
        await anext(stream)
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(EngineClosed):
            async for _ in stream:
                pass
        with pytest.raises(EngineClosed):
            engine.submit([prompts[0]], [LONG])

    asyncio.run(run())
    assert not engine.alive
