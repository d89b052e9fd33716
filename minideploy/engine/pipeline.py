"""The LMDeploy-shaped Python API: `pipeline(model)(prompts) -> Response`s.

It drives the continuous-batching engine (`LLMEngine`): every prompt is queued,
then the engine steps until they are done, streaming deltas as they come.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

from ..config import EngineConfig, GenerationConfig
from ..models import LoadedModel, load_model
from ..parallel import is_workspace, load_parallel
from ..quant import quantize_lm_head_
from .llm_engine import LLMEngine
from .sequence import Sequence as EngineSequence, Status

Messages = list[dict]
Prompt = Union[str, Messages]


@dataclass
class Response:
    """One request's result; in a stream, `text` and `token_ids` hold the new part only."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: Optional[str] = None  # "stop" | "length" | None while streaming
    token_ids: list[int] = field(default_factory=list)
    index: int = 0


class Pipeline:
    def __init__(self, model_path: Optional[Union[str, os.PathLike]] = None,
                 backend_config: Optional[EngineConfig] = None):
        self.engine_config = backend_config or EngineConfig()
        self.device = self.engine_config.torch_device()
        if self.engine_config.tp > 1 or is_workspace(model_path):
            if self.engine_config.lm_head_int8:
                raise ValueError(f"{model_path}: lm_head_int8 applies to a model loaded whole, not to a "
                                 "tensor-parallel workspace")
            self.loaded: LoadedModel = load_parallel(model_path, self.engine_config)
        else:
            self.loaded = load_model(model_path, dtype=self.engine_config.torch_dtype(), device=self.device)
            if self.engine_config.lm_head_int8:
                quantize_lm_head_(self.loaded.model)
        self.tokenizer = self.loaded.tokenizer
        # With tp > 1 the engine sizes its KV cache from rank 0's share of the heads (model.config).
        self.engine = LLMEngine(self.loaded, self.engine_config)
        self.warm_up()

    def close(self) -> None:
        """Stop tensor-parallel workers, if any (they also stop at exit)."""
        if hasattr(self.loaded.model, "close"):
            self.loaded.model.close()

    def warm_up(self) -> None:
        """One prefill and one decode step, so kernels compile (once per machine) before any timing."""
        self.engine.generate([[0]], [GenerationConfig(max_new_tokens=2, ignore_eos=True)])

    @property
    def session_len(self) -> int:
        return self.engine.session_len

    def encode(self, prompt: Prompt, do_preprocess: bool = True) -> list[int]:
        """Prompt → token ids, through the model's own chat template when it has one."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            if not (do_preprocess and self.tokenizer.chat_template):
                return self.tokenizer.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                   for m in prompt):
            raise TypeError("a prompt is a string or a list of {'role': ..., 'content': ...} messages")
        if not prompt:
            raise ValueError("prompt is an empty message list")
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.loaded.source.path}: the tokenizer has no chat template, "
                             "so message lists cannot be formatted; pass a string")
        return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))

    def _prepare(self, prompts, gen_config, do_preprocess):
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                              and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        configs = gen_config if isinstance(gen_config, list) else [gen_config or GenerationConfig()] * len(batch)
        if len(configs) != len(batch):
            raise ValueError(f"{len(configs)} generation configs for {len(batch)} prompts")
        ids = [self.encode(p, do_preprocess) for p in batch]
        return single, ids, configs

    def submit(self, ids, configs, session_id=None) -> list[EngineSequence]:
        """Queue every request, or none: a bad prompt aborts the ones queued before it."""
        seqs = []
        try:
            for i, (prompt_ids, config) in enumerate(zip(ids, configs)):
                seqs.append(self.engine.add_request(prompt_ids, config, session_id))
        except BaseException:
            for seq in seqs:
                self.engine.abort(seq)
            raise
        return seqs

    def stream_sequences(self, seqs: list[EngineSequence]) -> Iterator[Response]:
        """Step the engine until `seqs` finish, yielding each step's new text per request.
        A consumer that stops early aborts what is left, so no blocks stay held."""
        sent_ids, sent_text, done = [0] * len(seqs), [0] * len(seqs), set()
        self.last_timing = {"start": time.perf_counter(), "first_token": None, "end": None, "tokens": 0}
        try:
            while len(done) < len(seqs):
                self.engine.step()
                if self.last_timing["first_token"] is None:
                    self.last_timing["first_token"] = time.perf_counter()
                for i, seq in enumerate(seqs):
                    state = seq.payload
                    if i in done or (len(state.text) == sent_text[i] and len(state.output_ids) == sent_ids[i]
                                     and not state.finished):
                        continue
                    yield Response(state.text[sent_text[i]:], len(state.output_ids), len(state.prompt_ids),
                                   state.finish_reason, state.output_ids[sent_ids[i]:], i)
                    sent_ids[i], sent_text[i] = len(state.output_ids), len(state.text)
                    if state.finished:
                        done.add(i)
        finally:
            for seq in seqs:
                self.engine.abort(seq)
            self.last_timing["end"] = time.perf_counter()
            self.last_timing["tokens"] = sum(len(s.payload.output_ids) for s in seqs)

    def __call__(self, prompts: Union[Prompt, Sequence[Prompt]],
                 gen_config: Union[GenerationConfig, list[GenerationConfig], None] = None,
                 do_preprocess: bool = True):
        """A single prompt gives one Response, a list of prompts a list of Responses."""
        single, ids, configs = self._prepare(prompts, gen_config, do_preprocess)
        seqs = self.submit(ids, configs)
        for _ in self.stream_sequences(seqs):
            pass
        out = [Response(s.payload.text, len(s.payload.output_ids), len(s.payload.prompt_ids),
                        s.payload.finish_reason, list(s.payload.output_ids), i) for i, s in enumerate(seqs)]
        return out[0] if single else out

    def stream_infer(self, prompts: Union[Prompt, Sequence[Prompt]],
                     gen_config: Union[GenerationConfig, list[GenerationConfig], None] = None,
                     do_preprocess: bool = True) -> Iterator[Response]:
        """Yield incremental Responses (new text and tokens only), tagged with `index`."""
        _, ids, configs = self._prepare(prompts, gen_config, do_preprocess)
        yield from self.stream_sequences(self.submit(ids, configs))

    def chat(self, messages: Messages, gen_config: Optional[GenerationConfig] = None,
             session_id: int = 0) -> Iterator[Response]:
        """One turn of an interactive session: only what the session has not seen is prefilled.

        The whole conversation is formatted with the chat template; if the session's tokens are
        its prefix, just the rest is sent, else the session restarts with the whole prompt.
        """
        ids = self.encode(messages)
        held = self.engine.sessions.get(session_id)
        if held is not None and ids[:held.num_tokens] != held.token_ids:
            self.end_session(session_id)
            held = None
        new = ids[held.num_tokens:] if held is not None else ids
        yield from self.stream_sequences(self.submit([new], [gen_config or GenerationConfig()], session_id))

    def end_session(self, session_id: int) -> bool:
        """Release a session's KV blocks (they become Cached, then evictable)."""
        return self.engine.end_session(session_id)

    def generate_timed(self, prompt: Prompt, gen_config: Optional[GenerationConfig] = None):
        """One request, with tokens/s of the decode phase (for the CLI and benchmarks)."""
        response = self(prompt, gen_config)
        t = self.last_timing
        decode = t["end"] - t["first_token"]
        decode_tps = (t["tokens"] - 1) / decode if t["tokens"] > 1 and decode > 0 else float("nan")
        return response, t["end"] - t["start"], decode_tps


def pipeline(model_path: Optional[Union[str, os.PathLike]] = None,
             backend_config: Optional[EngineConfig] = None) -> Pipeline:
    return Pipeline(model_path, backend_config)
