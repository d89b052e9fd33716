"""The continuous-batching engine: requests in, tokens out, one scheduler step at a time.

Per step: the scheduler picks a prefill or a decode batch; copy-on-write copies
are made; the model runner computes the batch over the paged cache; each row's
logits are sampled with its own settings; every request advances (stop tokens,
stop words, length) and finished ones give their blocks back.

Sessions (TurboMind's interactive mode): a request with a `session_id` keeps
its sequence — tokens and KV blocks — when its turn ends. The next turn with the
same id sends only its new tokens; they are appended and only they (plus the
turn's last generated token) are computed. `end_session` releases the blocks
(full ones become Cached); a session idle longer than `session_timeout_s` is
ended by the next step. `session_len` bounds a whole session.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Optional, Sequence as Seq

import torch

from .. import kernels
from ..cache.block_manager import BlockManager
from ..cache.kv_cache import PagedKVCache, key_calibration_windows, mean_keys, num_blocks_for
from ..config import EngineConfig, GenerationConfig
from ..models import LlamaModel, LoadedModel
from ..quant import tile_linears_
from .cuda_graphs import DecodeGraphs
from .model_runner import ModelRunner, graph_buckets
from .request import new_request
from .sampling import sample
from .scheduler import Scheduler
from .sequence import Sequence, Status

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, engine_config: EngineConfig, session_timeout_s: float = 3600.0):
        model = loaded.model
        if isinstance(model, LlamaModel):  # tensor parallel: each rank tiles its own
            tile_linears_(model)  # decoder linears into the kernels' layouts
        self.tokenizer, self.engine_config = loaded.tokenizer, engine_config
        self.config = model.config  # with tensor parallelism: this rank's share of the heads
        self.vocab_config = loaded.config
        self.device, dtype = model.device, model.dtype
        limit = engine_config.session_len or loaded.config.max_position_embeddings
        self.session_len = min(limit, model.cos_sin.shape[0])
        block_size = engine_config.cache_block_seq_len
        num_blocks = num_blocks_for(self.config, engine_config, dtype, self.device,
                                    max_tokens=engine_config.max_batch_size * self.session_len)
        self.manager = BlockManager(num_blocks, block_size)
        self.cache = PagedKVCache(self.config, num_blocks, block_size, dtype, self.device,
                                  engine_config.quant_policy, self._key_means(loaded, engine_config))
        self.runner = ModelRunner(model, self.cache, self._decode_graphs(model, engine_config))
        self.scheduler = Scheduler(self.manager, engine_config.max_batch_size,
                                   max(engine_config.prefill_tokens(self.device), block_size))
        self.sessions: dict[int, Sequence] = {}  # session_id -> its parked sequence
        self.session_timeout_s = session_timeout_s
        self._ids = itertools.count()
        self.num_generated = 0    # tokens sampled since start
        self.tokens_computed = 0  # tokens the model ran (prefill + decode), for reports and tests
        self.last_batch = None    # the ScheduledBatch of the last step, for reports

    def _key_means(self, loaded: LoadedModel, engine_config: EngineConfig) -> Optional[torch.Tensor]:
        """A quantized cache's key shift, measured on calibration text now (a second or two)."""
        if not engine_config.quant_policy or not isinstance(loaded.model, LlamaModel):
            return None  # tensor parallel: each rank holds other heads; its keys go unshifted
        start = time.perf_counter()
        windows = key_calibration_windows(loaded.tokenizer, self.vocab_config.vocab_size, self.session_len)
        means = mean_keys(loaded.model, windows)
        log.info("KV cache: mean keys measured on %d x %d tokens in %.1f s", *windows.shape,
                 time.perf_counter() - start)
        return means

    def _decode_graphs(self, model, engine_config: EngineConfig) -> Optional[DecodeGraphs]:
        """CUDA graphs of decode steps, captured now (after the cache took its memory)."""
        if (engine_config.eager_mode or self.device.type != "cuda" or not isinstance(model, LlamaModel)
                or not kernels.decode_attention_fits(self.config.head_dim)):
            return None  # tensor parallel: the workers run eagerly
        block_size = self.cache.block_size
        max_blocks = -(-self.session_len // block_size)
        graphs = DecodeGraphs(model, self.cache, engine_config.max_batch_size, max_blocks,
                              max_blocks * block_size, graph_buckets(engine_config.max_batch_size))
        graphs.capture()
        return graphs

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt_ids: Seq[int], gen_config: Optional[GenerationConfig] = None,
                    session_id: Optional[int] = None) -> Sequence:
        """Queue a request. With a session_id that has history, prompt_ids are the new turn only."""
        gen_config = gen_config or GenerationConfig()
        seq = self.sessions.pop(session_id, None) if session_id is not None else None
        if seq is not None and seq.status is not Status.FINISHED:
            self.sessions[session_id] = seq
            raise ValueError(f"session {session_id} is still generating its previous turn")
        history = seq.token_ids if seq is not None else []
        try:
            state = new_request(self.tokenizer, self.vocab_config, self.session_len, self.device,
                                session_id if session_id is not None else 0, history + list(prompt_ids),
                                gen_config)
        except ValueError:
            if seq is not None:
                self.sessions[session_id] = seq  # a bad turn leaves the session as it was
            raise
        if seq is None:
            seq = Sequence(next(self._ids), list(prompt_ids), len(prompt_ids), 0)
        else:
            seq.token_ids = history + list(prompt_ids)
            seq.num_prompt_tokens = seq.num_tokens
        seq.max_tokens, seq.payload, seq.finish_reason = seq.num_tokens + state.max_new_tokens, state, None
        seq.session_id, seq.last_active = session_id, time.monotonic()
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop a request now (a client went away); its blocks go back at once."""
        if seq.status is not Status.FINISHED:
            seq.payload.finish_reason = "abort"
            self._finish(seq, "abort")

    def end_session(self, session_id: int) -> bool:
        seq = self.sessions.pop(session_id, None)
        if seq is None:
            return False
        if seq.status is Status.FINISHED:
            self.manager.free(seq.seq_id)
        else:
            self.abort(seq)
        return True

    # ---- the loop ------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one batch; returns its sequences, each payload holding its new `delta` text."""
        self._expire_sessions()
        batch = self.last_batch = self.scheduler.schedule()
        if batch is None:
            return []
        self.runner.copy_blocks(batch.copies)
        rows = batch.rows(self.manager)
        self.tokens_computed += sum(len(r.token_ids) for r in rows)
        logits = self.runner.forward(rows)
        self.scheduler.computed(batch)
        states = [s.payload for s in batch.seqs]
        tokens = sample(logits, [st.sampling for st in states], [s.token_ids for s in batch.seqs],
                        [len(st.output_ids) for st in states]).tolist()
        for seq, state, token in zip(batch.seqs, states, tokens):
            before = len(state.output_ids)
            state.advance(token)
            if len(state.output_ids) > before:  # a stop token is not kept
                seq.token_ids.append(token)
            self.num_generated += 1
            if state.finished:
                self._finish(seq, state.finish_reason)
        return batch.seqs

    def _finish(self, seq: Sequence, reason: str) -> None:
        session_id = seq.session_id
        if session_id is None or reason == "abort":
            self.scheduler.finish(seq, reason)
            if session_id is not None:
                self.sessions.pop(session_id, None)
            return
        # Park the session: its blocks stay Active for the next turn.
        self.scheduler.park(seq, reason)
        seq.last_active = time.monotonic()
        self.sessions[session_id] = seq

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for session_id, seq in list(self.sessions.items()):
            if seq.status is Status.FINISHED and now - seq.last_active > self.session_timeout_s:
                self.end_session(session_id)

    def generate(self, prompts: Seq[Seq[int]], gen_configs: Seq[GenerationConfig]) -> list[Sequence]:
        """Run these requests to the end (with whatever else is queued)."""
        seqs = [self.add_request(p, g) for p, g in zip(prompts, gen_configs)]
        while any(s.status is not Status.FINISHED for s in seqs):
            self.step()
        return seqs
