"""Processes and the process group: spawn tp ranks, join them, surface their failures.

Ranks are `torch.multiprocessing` spawn processes (a fresh interpreter: safe
with CUDA and threads). They meet through a TCPStore that the parent opens on
a free port (port 0: the OS picks it), then form a torch.distributed group —
gloo on CPU, NCCL on GPU — whose collectives time out instead of hanging. A
rank that fails puts its traceback on a queue before it exits; the parent
raises `WorkerError` with it.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
HOST = "127.0.0.1"


class WorkerError(RuntimeError):
    """A tensor-parallel rank failed; the message holds its traceback."""


def check_devices(device_type: str, tp: int) -> None:
    """GPU ranks need a GPU each; CPU ranks are processes sharing the host's cores."""
    if device_type not in BACKENDS:
        raise ValueError(f"tensor parallelism runs on 'cpu' or 'cuda', got device {device_type!r}")
    if device_type == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(f"tp={tp} needs {tp} CUDA devices (one per rank), but "
                         f"{torch.cuda.device_count()} are visible")


def open_store(timeout_s: float) -> dist.TCPStore:
    """The rendezvous store, on a port the OS picks."""
    return dist.TCPStore(HOST, 0, None, True, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_group(rank: int, tp: int, device_type: str, store: dist.Store, timeout_s: float) -> None:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(BACKENDS[device_type], store=store, rank=rank, world_size=tp,
                            timeout=datetime.timedelta(seconds=timeout_s))


def connect(rank: int, tp: int, device_type: str, port: int, timeout_s: float) -> None:
    """Join the group from a spawned process (a client of the parent's store)."""
    store = dist.TCPStore(HOST, port, None, False, datetime.timedelta(seconds=timeout_s))
    join_group(rank, tp, device_type, store, timeout_s)


def limit_threads(device_type: str, ranks_on_host: int) -> None:
    """CPU ranks split the cores between them instead of fighting over all of them."""
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_host))


def report_failure(reports, rank: int) -> None:
    reports.put(("error", rank, traceback.format_exc()))


def wait_reports(reports, procs: dict[int, Any], want: str, count: int, timeout_s: float) -> list:
    """Collect `count` (want, rank, payload) reports; raise WorkerError on an error report,
    a rank that died without one, or the timeout."""
    got, deadline, dead_since = [], time.monotonic() + timeout_s, None
    while len(got) < count:
        try:
            kind, rank, payload = reports.get(timeout=0.2)
        except queue.Empty:
            silent = {r: p.exitcode for r, p in procs.items()
                      if not p.is_alive() and r not in dict(got)}
            dead_since = (dead_since or time.monotonic()) if silent else None
            if silent and time.monotonic() - dead_since > 1.0:  # its last report had time to arrive
                raise WorkerError(f"tensor-parallel rank(s) exited without a report (exit codes "
                                  f"{silent}); their stderr says why") from None
            if time.monotonic() > deadline:
                raise WorkerError(f"no '{want}' from {count - len(got)} tensor-parallel rank(s) "
                                  f"within {timeout_s:.0f} s") from None
            continue
        if kind == "error":
            raise WorkerError(f"tensor-parallel rank {rank} failed:\n{payload}")
        got.append((rank, payload))
    return got


def drain_errors(reports, wait_s: float = 5.0) -> list[str]:
    """Tracebacks that failed ranks reported (waiting briefly for one to arrive)."""
    found, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            kind, rank, payload = reports.get(timeout=0.2)
        except queue.Empty:
            if found:
                break
            continue
        if kind == "error":
            found.append(f"rank {rank}:\n{payload}")
    return found


def _spmd_entry(fn, rank, tp, device_type, port, timeout_s, reports):
    try:
        limit_threads(device_type, tp)
        connect(rank, tp, device_type, port, timeout_s)
        result = fn(rank, tp)
        dist.barrier()
        # Sent by value: a tensor shared by file descriptor dies with this process, which may
        # exit before the driver reads it.
        payload = io.BytesIO()
        torch.save(result if rank == 0 else None, payload)
        reports.put(("result", rank, payload.getvalue()))
        dist.destroy_process_group()
    except BaseException:
        report_failure(reports, rank)
        raise SystemExit(1)


def run_spmd(fn: Callable[[int, int], Any], tp: int, device_type: str = "cpu",
             timeout_s: float = 600.0) -> Any:
    """Run fn(rank, tp) on tp fresh processes in one group; return rank 0's result.

    `fn` must be picklable (a module-level function or a functools.partial of one).
    """
    check_devices(device_type, tp)
    ctx = mp.get_context("spawn")
    store, reports = open_store(timeout_s), ctx.Queue()
    procs = {rank: ctx.Process(target=_spmd_entry, daemon=True,
                               args=(fn, rank, tp, device_type, store.port, timeout_s, reports))
             for rank in range(tp)}
    for p in procs.values():
        p.start()
    try:
        results = dict(wait_reports(reports, procs, "result", tp, timeout_s))
    finally:
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return torch.load(io.BytesIO(results[0]), weights_only=False)
