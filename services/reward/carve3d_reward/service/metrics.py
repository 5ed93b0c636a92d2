"""Prometheus metrics of the reward service (``mrc_`` prefix, ``_total`` / ``_seconds`` suffixes).

Each app gets its own registry, so several apps in one process (tests) never
share counters.
"""

from __future__ import annotations

import resource

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Every metric the service exports."""

    def __init__(self, device: str = "cpu", registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mrc_requests_total", "HTTP requests by endpoint and status code.", ["endpoint", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "mrc_request_duration_seconds", "Time from request to response.", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "mrc_queue_wait_seconds", "Time a grid waits before its batch starts.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.compute_seconds = Histogram(
            "mrc_compute_duration_seconds", "Time to score one batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("mrc_batch_size", "Grids per scored batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("mrc_queue_depth", "Grids waiting to be scored.", registry=r)
        self.in_flight = Gauge("mrc_requests_in_flight", "Requests being handled.", registry=r)
        self.grids = Counter("mrc_grids_scored_total", "Grids answered, by status.", ["status"], registry=r)
        self.batch_failures = Counter(
            "mrc_batch_failures_total", "Batches that raised and were split to isolate the failure.", registry=r
        )
        self.build = Info("mrc_build", "Version and metric id of the service.", registry=r)
        memory = Gauge("mrc_device_memory_bytes", "Memory held on the scoring device.", ["device"], registry=r)
        memory.labels(device).set_function(lambda: _device_memory(device))


def _device_memory(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return float(torch.cuda.memory_allocated(torch.device(device)))
    # CPU: the process's peak resident set (ru_maxrss is KiB on Linux).
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
