"""The LMDeploy-shaped Python API: `pipeline(model)(prompts) -> Response`s."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

from ..config import EngineConfig, GenerationConfig
from ..models import LoadedModel, load_model
from ..parallel import is_workspace, load_parallel
from .generator import Generator, SequenceState

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
            self.loaded: LoadedModel = load_parallel(model_path, self.engine_config)
        else:
            self.loaded = load_model(model_path, dtype=self.engine_config.torch_dtype(), device=self.device)
        self.tokenizer = self.loaded.tokenizer
        session_len = self.engine_config.session_len or self.loaded.config.max_position_embeddings
        # model.config: with tp > 1, rank 0's share of the heads, which sizes its KV cache
        self.generator = Generator(self.loaded.model, self.tokenizer, self.loaded.model.config, session_len)
        self.warm_up()

    def close(self) -> None:
        """Stop tensor-parallel workers, if any (they also stop at exit)."""
        if hasattr(self.loaded.model, "close"):
            self.loaded.model.close()

    def warm_up(self) -> None:
        """One prefill and one decode step, so kernels compile (once per machine) before any timing."""
        config = GenerationConfig(max_new_tokens=2, ignore_eos=True)
        for _ in self.generator.stream([[0]], [config]):
            pass

    @property
    def session_len(self) -> int:
        return self.generator.session_len

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

    def __call__(self, prompts: Union[Prompt, Sequence[Prompt]],
                 gen_config: Union[GenerationConfig, list[GenerationConfig], None] = None,
                 do_preprocess: bool = True):
        """A single prompt gives one Response, a list of prompts a list of Responses."""
        single, ids, configs = self._prepare(prompts, gen_config, do_preprocess)
        final: list[SequenceState] = []
        for final in self.generator.stream(ids, configs):
            pass
        out = [Response(s.text, len(s.output_ids), len(s.prompt_ids), s.finish_reason,
                        list(s.output_ids), s.index) for s in final]
        return out[0] if single else out

    def stream_infer(self, prompts: Union[Prompt, Sequence[Prompt]],
                     gen_config: Union[GenerationConfig, list[GenerationConfig], None] = None,
                     do_preprocess: bool = True) -> Iterator[Response]:
        """Yield incremental Responses (new text and tokens only), tagged with `index`."""
        _, ids, configs = self._prepare(prompts, gen_config, do_preprocess)
        sent, done = [0] * len(ids), set()
        for seqs in self.generator.stream(ids, configs):
            for s in seqs:
                if s.index in done:
                    continue
                new_ids = s.output_ids[sent[s.index]:]
                if s.delta or new_ids or s.finished:
                    yield Response(s.delta, len(s.output_ids), len(s.prompt_ids), s.finish_reason,
                                   new_ids, s.index)
                sent[s.index] = len(s.output_ids)
                if s.finished:
                    done.add(s.index)

    def generate_timed(self, prompt: Prompt, gen_config: Optional[GenerationConfig] = None):
        """One request, with tokens/s of the decode phase (for the CLI and benchmarks)."""
        start = time.perf_counter()
        response = self(prompt, gen_config)
        total = time.perf_counter() - start
        stats = self.generator.stats
        decode_tps = stats.decode_steps / stats.decode_seconds if stats.decode_seconds else float("nan")
        return response, total, decode_tps


def pipeline(model_path: Optional[Union[str, os.PathLike]] = None,
             backend_config: Optional[EngineConfig] = None) -> Pipeline:
    return Pipeline(model_path, backend_config)
