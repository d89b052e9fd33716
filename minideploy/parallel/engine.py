"""The tensor-parallel model as the engine sees it: rank 0 here, ranks 1..tp-1 in workers.

`TensorParallelModel` has the model's interface — `model(input_ids, ctx,
cache)` and `model.logits(hidden)` — so the generator drives it unchanged.
Each call first sends the step (token ids, positions, the forward context) to
every worker over its pipe, then runs rank 0's shard; inside the forward the
ranks meet in the all-reduces. Workers block on their pipe between steps, so
an idle chat never trips a collective's timeout; a worker whose driver died
sees the pipe close and exits.

Each rank keeps its own KV cache for its own KV heads: when the engine
allocates a cache, the workers allocate one of the same class and geometry
(`cache.geometry()`) for their heads, and copy-on-write block copies are
replayed on them too (`copy_blocks`).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..models import ForwardContext, KVCache, LlamaModel
from .build import rank_device
from .group import (WorkerError, check_devices, connect, drain_errors, join_group, limit_threads,
                    open_store, report_failure, wait_reports)

Builder = Callable[[int, int], LlamaModel]  # (rank, tp) → that rank's model


def on_device(ctx: ForwardContext, device: torch.device | str) -> ForwardContext:
    tensors = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    return dataclasses.replace(ctx, **{k: v.to(device) for k, v in tensors.items()
                                       if isinstance(v, torch.Tensor)})


def serve(model: LlamaModel, conn, device: torch.device) -> None:
    """A worker's loop: replay each step rank 0 sends until 'stop' or the pipe closes."""
    cache = None
    with torch.inference_mode():
        while True:
            try:
                op, *args = conn.recv()
            except EOFError:  # the driver is gone
                return
            if op == "stop":
                return
            if op == "cache":
                cache_class, geometry = args
                cache = None  # free the old one first
                cache = cache_class(model.config, device=device, **geometry)
            elif op == "copy":
                cache.copy_blocks(args[0])
            elif op == "forward":
                input_ids, ctx = args
                model(input_ids.to(device), on_device(ctx, device), cache)
            elif op == "logits":
                model.logits(args[0].to(device))
            else:
                raise ValueError(f"unknown step {op!r} from rank 0")


def _worker_entry(build: Builder, rank: int, tp: int, device_type: str, port: int, timeout_s: float,
                  conn, reports) -> None:
    try:
        limit_threads(device_type, tp)
        model = build(rank, tp)
        reports.put(("ready", rank, None))
        connect(rank, tp, device_type, port, timeout_s)
        serve(model, conn, rank_device(device_type, rank))
    except BaseException:
        report_failure(reports, rank)
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _shutdown(pipes, procs, group: dict) -> None:
    for pipe in pipes:
        try:
            pipe.send(("stop",))
        except OSError:  # that worker is already gone
            pass
    for p in procs.values():
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
    if group.get("joined") and dist.is_initialized():
        dist.destroy_process_group()
    group["joined"] = False


class TensorParallelModel:
    """Rank 0 of `tp` (this process) plus tp - 1 spawned workers, driven step by step."""

    def __init__(self, build: Builder, tp: int, device_type: str, timeout_s: float = 300.0):
        check_devices(device_type, tp)
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group (another "
                               "tensor-parallel model?): close() it before starting a new one")
        ctx = mp.get_context("spawn")
        store = open_store(timeout_s)
        self.reports, self.pipes, self.procs, self._group = ctx.Queue(), [], {}, {"joined": False}
        self._finalizer = weakref.finalize(self, _shutdown, self.pipes, self.procs, self._group)
        for rank in range(1, tp):
            recv, send = ctx.Pipe(duplex=False)
            self.procs[rank] = ctx.Process(target=_worker_entry, daemon=True, args=(
                build, rank, tp, device_type, store.port, timeout_s, recv, self.reports))
            self.procs[rank].start()
            recv.close()  # the worker's end: only the worker keeps it open
            self.pipes.append(send)
        try:
            self.model = build(0, tp)  # while the workers load their shards
            wait_reports(self.reports, self.procs, "ready", tp - 1, timeout_s)
            join_group(0, tp, device_type, store, timeout_s)
            self._group["joined"] = True
        except BaseException:
            self.close()
            raise
        self.tp, self.config = tp, self.model.config
        self.embed, self.cos_sin = self.model.embed, self.model.cos_sin
        self.device, self.dtype = self.model.device, self.model.dtype
        self._cache = lambda: None  # weak reference to the cache the workers mirror

    def __call__(self, input_ids: torch.Tensor, ctx: ForwardContext, cache: KVCache) -> torch.Tensor:
        if self._cache() is not cache:
            self._send("cache", type(cache), cache.geometry())
            self._cache = weakref.ref(cache)
        self._send("forward", input_ids.cpu(), on_device(ctx, "cpu"))
        return self._run(self.model, input_ids, ctx, cache)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write in every worker's cache (rank 0's is copied by its owner)."""
        self._send("copy", copies)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._send("logits", hidden.cpu())
        return self._run(self.model.logits, hidden)

    def close(self) -> None:
        """Stop the workers and leave the process group (also at exit or garbage collection)."""
        self._finalizer()

    def _send(self, *step) -> None:
        if not self._finalizer.alive:
            raise WorkerError("the tensor-parallel workers were shut down")
        try:
            for pipe in self.pipes:
                pipe.send(step)
        except OSError as err:
            raise self._failure(err) from err

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as err:  # a collective failed or timed out: a peer is gone
            raise self._failure(err) from err

    def _failure(self, err: BaseException) -> WorkerError:
        """Shut everything down and explain, with the workers' tracebacks where they sent one."""
        tracebacks = drain_errors(self.reports)
        exits = {r: p.exitcode for r, p in self.procs.items() if not p.is_alive()}
        self.close()
        detail = "\n".join(tracebacks) or f"no traceback reported; exited ranks: {exits or 'none'}"
        return WorkerError(f"tensor-parallel step failed ({err}):\n{detail}")
