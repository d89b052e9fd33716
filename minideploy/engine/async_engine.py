"""The asyncio face of the continuous-batching engine, for servers.

`LLMEngine` is not thread-safe and its `step()` blocks for a whole forward
pass, so it cannot run on the event loop. One background thread owns it: it
applies the adds and aborts that coroutines queued, steps, and hands each
sequence's new text to its request's `asyncio.Queue` through
`loop.call_soon_threadsafe`. With nothing to do it sleeps on a condition
variable (no busy-spin); a queued operation wakes it.

A consumer that goes away (cancelled task, closed or dropped stream) aborts
its requests, so their KV blocks go back at once. An exception from `step()`
is delivered to every request in flight rather than leaving them waiting.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence as Seq

from ..config import GenerationConfig
from .llm_engine import LLMEngine
from .sequence import Sequence

# When the scheduler can place nothing (e.g. parked sessions hold the blocks a waiting
# request needs), retry after this long instead of spinning.
STALL_WAIT_S = 0.01


class EngineClosed(RuntimeError):
    """The engine was shut down before (or while) the request ran."""


@dataclass(frozen=True)
class Delta:
    """What one request produced since its previous delta."""

    index: int                    # which of the stream's requests (OpenAI's choice index)
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]  # None while generating, then "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int        # generated so far


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after every step, for /metrics."""

    running: int = 0
    waiting: int = 0
    blocks_active: int = 0
    blocks_cached: int = 0
    blocks_free: int = 0
    tokens_generated: int = 0
    preemptions: int = 0


@dataclass(eq=False)
class _Request:
    index: int
    prompt_ids: list[int]
    gen_config: GenerationConfig
    post: Callable[[object], None]  # put an item on the consumer's queue, from any thread
    seq: Optional[Sequence] = None
    sent_text: int = 0
    sent_ids: int = 0
    done: bool = False


class RequestStream:
    """Deltas of a group of requests (n choices of one API call) in arrival order.

    Iterate it with `async for`; leaving early — cancellation, `aclose()`, or
    dropping it — aborts whatever is still running.
    """

    def __init__(self, engine: "AsyncEngine", requests: list[_Request], queue: asyncio.Queue):
        self._engine, self._requests, self._queue = engine, requests, queue
        self._pending = len(requests)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Delta:
        if not self._pending:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:  # the client went away
            self.abort()
            raise
        if isinstance(item, BaseException):
            self.abort()
            raise item
        if item.finish_reason is not None:
            self._pending -= 1
        return item

    def abort(self) -> None:
        if self._pending:
            self._pending = 0
            self._engine._post(("abort", self._requests))

    async def aclose(self) -> None:
        self.abort()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()

    def __del__(self) -> None:
        self.abort()


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.stats = EngineStats()
        self._ops: list[tuple] = []  # ("add", requests, session_id) | ("abort", requests) | ("end", id)
        self._cond = threading.Condition()
        self._closing = False
        self._live: dict[Sequence, _Request] = {}
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="minideploy-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop -------------------------------------------------------
    def submit(self, prompts: Seq[Seq[int]], gen_configs: Seq[GenerationConfig],
               session_id: Optional[int] = None) -> RequestStream:
        """Queue requests (all or none) and return the stream of their deltas.
        Must be called with an event loop running: deltas arrive on it."""
        if len(prompts) != len(gen_configs) or not prompts:
            raise ValueError(f"{len(prompts)} prompts for {len(gen_configs)} generation configs")
        if session_id is not None and len(prompts) != 1:
            raise ValueError("a session continues one conversation: give one prompt")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def post(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        requests = [_Request(i, list(p), g, post) for i, (p, g) in enumerate(zip(prompts, gen_configs))]
        if not self._post(("add", requests, session_id)):
            raise EngineClosed("the engine is shut down")
        return RequestStream(self, requests, queue)

    async def generate(self, prompt_ids: Seq[int], gen_config: Optional[GenerationConfig] = None,
                       session_id: Optional[int] = None) -> AsyncIterator[Delta]:
        """One request's deltas; its last one carries the finish_reason."""
        async with self.submit([prompt_ids], [gen_config or GenerationConfig()], session_id) as stream:
            async for delta in stream:
                yield delta

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def end_session(self, session_id: int) -> None:
        """Release a session's KV blocks (they become Cached)."""
        self._post(("end", session_id))

    def close(self) -> None:
        """Stop the thread; requests still in flight get EngineClosed."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    # ---- the engine thread ----------------------------------------------------------------
    def _post(self, op: tuple) -> bool:
        """Queue an operation for the engine thread; False once it is shut down."""
        with self._cond:
            if self._closing:
                return False
            self._ops.append(op)
            self._cond.notify()
            return True

    def _loop(self) -> None:
        reason: BaseException = EngineClosed("the engine was shut down")
        try:
            self._run()
        except BaseException as err:  # the thread is dying: tell everyone below, then re-raise
            reason = err
            raise
        finally:
            with self._cond:
                self._closing, ops = True, self._ops
            waiting = [r for op in ops if op[0] == "add" for r in op[1]]
            for req in waiting + list(self._live.values()):
                self._send(req, reason)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._ops or self._closing or self.engine.has_work()):
                    self._cond.wait()
                if self._closing:
                    return
                ops, self._ops = self._ops, []
            for op in ops:
                self._apply(op)
            if not self.engine.has_work():
                continue
            try:
                seqs = self.engine.step()
            except Exception as err:  # a bad step fails the requests in it, not the server
                self._fail(list(self._live.values()), err)
                continue
            self._deliver(seqs)
            if not seqs:
                with self._cond:
                    self._cond.wait(STALL_WAIT_S)

    def _apply(self, op: tuple) -> None:
        kind, *args = op
        if kind == "add":
            self._add(*args)
        elif kind == "abort":
            self._abort(*args)
        else:
            self.engine.end_session(*args)
        self._publish()

    def _add(self, requests: list[_Request], session_id: Optional[int]) -> None:
        try:
            for req in requests:
                req.seq = self.engine.add_request(req.prompt_ids, req.gen_config, session_id)
                self._live[req.seq] = req
        except ValueError as err:  # a bad prompt: refuse the whole group
            self._fail(requests, err)

    def _abort(self, requests: list[_Request]) -> None:
        for req in requests:
            if req.seq is not None and not req.done:
                self._live.pop(req.seq, None)
                self.engine.abort(req.seq)
            req.done = True

    def _fail(self, requests: list[_Request], err: BaseException) -> None:
        for req in requests:
            if not req.done:
                self._send(req, err)
        self._abort(requests)

    def _send(self, req: _Request, item) -> None:
        try:
            req.post(item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            self._abort([req])

    def _deliver(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            req = self._live.get(seq)
            if req is None:
                continue
            state = seq.payload
            if len(state.text) == req.sent_text and len(state.output_ids) == req.sent_ids \
                    and not state.finished:
                continue
            if state.finished:
                req.done = True
                del self._live[seq]
            self._send(req, Delta(req.index, state.text[req.sent_text:], state.output_ids[req.sent_ids:],
                                  state.finish_reason, len(state.prompt_ids), len(state.output_ids)))
            req.sent_text, req.sent_ids = len(state.text), len(state.output_ids)
        self._publish()

    def _publish(self) -> None:
        m, s = self.engine.manager, self.engine.scheduler
        self.stats = EngineStats(len(s.running), len(s.waiting), m.num_active, m.num_cached, m.num_free,
                                 self.engine.num_generated, s.num_preempted)
