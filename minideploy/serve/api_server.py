"""`minideploy serve api_server`: an OpenAI-compatible HTTP server over the async engine.

FastAPI parses and validates each request (pydantic, so a bad field is a 400
that names it); the prompt is tokenized on the event loop (Rust tokenizers
only conflict on settings changes, which nothing here makes); the requests go
to `AsyncEngine`, whose thread batches every client together. Streams are
Server-Sent Events (`data: {...}` chunks, then `data: [DONE]`). A client that
disconnects cancels its handler, which aborts its requests in the engine.
Every error is an OpenAI error object: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import secrets
import signal
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional, Sequence

import jinja2
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import EngineConfig
from ..engine.async_engine import AsyncEngine, Delta, RequestStream
from ..engine.pipeline import Pipeline
from .metrics import metrics_registry
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, type: str, param=None, code=None) -> Response:
    # json.dumps escapes to ASCII, so echoed client text (even lone surrogates) always encodes.
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0]
        if first["type"] == "json_invalid":  # loc is (body, character offset)
            return error_response(400, f"the body is not valid JSON ({first['ctx']['error']} at character "
                                  f"{first['loc'][-1]})", "invalid_request_error", None, "json_invalid")
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        return error_response(400, message, "invalid_request_error", param, first["type"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_, err: Exception):
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")


def create_app(pipe: Pipeline, model_name: str, api_keys: Sequence[str] = ()) -> FastAPI:
    """The app; its lifespan starts the engine thread (app.state.engine) and joins it at shutdown."""
    keys = [k.encode() for k in api_keys]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = AsyncEngine(pipe.engine)
        try:
            yield
        finally:
            app.state.engine.close()

    app = FastAPI(title="minideploy api_server", lifespan=lifespan)
    add_error_handlers(app)
    registry = metrics_registry(lambda: app.state.engine)

    def check_key(request: Request) -> None:
        """--api-keys guard /v1/* only: /health and /metrics stay open to probes and scrapers."""
        if not keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(key.encode(), k) for k in keys):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(400, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def encode(prompt, do_preprocess: bool) -> list[int]:
        try:
            ids = pipe.encode(prompt, do_preprocess)
        except (ValueError, TypeError, jinja2.TemplateError) as err:
            raise APIError(400, f"cannot tokenize the prompt: {err}", "messages" if do_preprocess else "prompt")
        if len(ids) >= pipe.session_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens but session_len is {pipe.session_len}: "
                           "it does not fit, with room to generate", "messages" if do_preprocess else "prompt",
                           "context_length_exceeded")
        return ids

    def start(body: SamplingRequest, prompts: list[list[int]]) -> RequestStream:
        if body.max_tokens is not None and body.max_tokens > pipe.session_len:
            raise APIError(400, f"max_tokens {body.max_tokens} is larger than session_len {pipe.session_len}",
                           "max_tokens")
        configs = body.gen_configs(body.max_tokens or pipe.session_len)
        return app.state.engine.submit([ids for ids in prompts for _ in configs], configs * len(prompts))

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "minideploy"}]}

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        ids = encode([m.as_dict() for m in body.messages], do_preprocess=True)
        return await respond(body, [ids], start(body, [ids]), chat=True)

    @router.post("/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        prompts = [encode(p, do_preprocess=False) for p in body.prompts()]
        return await respond(body, prompts, start(body, prompts), chat=False)

    async def respond(body: SamplingRequest, prompts: list[list[int]], stream: RequestStream, chat: bool):
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name}
        num_prompt = sum(map(len, prompts))
        try:  # wait for the first delta, so a refused request is an error status, not a broken stream
            first = await anext(stream)
        except ValueError as err:
            raise APIError(400, str(err))
        if body.stream:  # the SSE generator owns the stream from here (and aborts it if dropped)
            return StreamingResponse(sse(stream, first, head, num_prompt, body.include_usage, chat),
                                     media_type="text/event-stream")
        texts, reasons, used = {}, {}, {}
        async with stream:
            async for delta in prepend(first, stream):
                texts[delta.index] = texts.get(delta.index, "") + delta.text
                reasons[delta.index], used[delta.index] = delta.finish_reason, delta.completion_tokens
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}} if chat
                   else {"index": i, "text": texts[i]} for i in sorted(texts)]
        for c in choices:
            c.update(finish_reason=reasons[c["index"]], logprobs=None)
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage(num_prompt, sum(used.values()))}

    async def sse(stream: RequestStream, first: Delta, head: dict, num_prompt: int, include_usage: bool,
                  chat: bool):
        obj, started, used = "chat.completion.chunk" if chat else "text_completion", set(), {}
        async with stream:
            try:
                async for delta in prepend(first, stream):
                    used[delta.index] = delta.completion_tokens
                    if not delta.text and delta.finish_reason is None:
                        continue
                    if chat:
                        content = {"content": delta.text}
                        if delta.index not in started:
                            content["role"] = "assistant"
                            started.add(delta.index)
                        choice = {"index": delta.index, "delta": content}
                    else:
                        choice = {"index": delta.index, "text": delta.text}
                    choice.update(finish_reason=delta.finish_reason, logprobs=None)
                    yield f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"
                if include_usage:
                    chunk = {**head, "object": obj, "choices": [], "usage": usage(num_prompt, sum(used.values()))}
                    yield f"data: {json.dumps(chunk)}\n\n"
            except Exception as err:  # headers are sent: the error goes into the stream
                error = {"message": f"{type(err).__name__}: {err}", "type": "server_error", "param": None,
                         "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"

    app.include_router(router)

    @app.get("/health")
    async def health():
        if not app.state.engine.alive:
            raise APIError(503, "the engine thread has stopped", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def prepend(first: Delta, stream: RequestStream):
    yield first
    async for delta in stream:
        yield delta


def run_api_server(model_path: str, engine_config: EngineConfig, server_name: str = "127.0.0.1",
                   server_port: int = 23333, api_keys: Sequence[str] = (), model_name: Optional[str] = None,
                   log_level: str = "info") -> int:
    """Load the model, serve until SIGINT/SIGTERM, shut down cleanly (exit status 0)."""
    pipe = Pipeline(model_path, engine_config)
    app = create_app(pipe, model_name or Path(str(model_path)).name, api_keys)
    server = uvicorn.Server(uvicorn.Config(app, host=server_name, port=server_port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    # uvicorn re-raises the signal after its graceful shutdown; make SIGTERM end like SIGINT.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        pipe.close()  # tensor-parallel workers, if any
    return 0
