"""Prometheus metrics read from the engine's published snapshot at scrape time.

The engine is not thread-safe, so the collector never touches it: it reads the
`EngineStats` the engine thread publishes after every step. Each app gets its
own registry, so several servers (tests) can live in one process.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.async_engine import AsyncEngine


class EngineCollector:
    def __init__(self, get_engine: Callable[[], AsyncEngine]):
        self.get_engine = get_engine
        self.last = (time.monotonic(), 0)  # (when, tokens generated) at the previous scrape

    def collect(self):
        stats = self.get_engine().stats
        yield GaugeMetricFamily("minideploy_requests_running", "Requests in the running batch",
                                value=stats.running)
        yield GaugeMetricFamily("minideploy_requests_waiting", "Requests queued for admission",
                                value=stats.waiting)
        blocks = GaugeMetricFamily("minideploy_kv_blocks", "KV-cache blocks by state", labels=["state"])
        for state, n in (("active", stats.blocks_active), ("cached", stats.blocks_cached),
                         ("free", stats.blocks_free)):
            blocks.add_metric([state], n)
        yield blocks
        yield CounterMetricFamily("minideploy_generation_tokens", "Tokens generated since start",
                                  value=stats.tokens_generated)
        yield CounterMetricFamily("minideploy_preemptions", "Sequences preempted (recomputed later)",
                                  value=stats.preemptions)
        now = time.monotonic()
        then, before = self.last
        self.last = (now, stats.tokens_generated)
        yield GaugeMetricFamily("minideploy_generation_tokens_per_second",
                                "Tokens generated per second since the previous scrape",
                                value=(stats.tokens_generated - before) / max(now - then, 1e-9))


def metrics_registry(get_engine: Callable[[], AsyncEngine]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(get_engine))
    return registry
