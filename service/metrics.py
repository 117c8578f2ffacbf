"""Prometheus metrics, in a registry of the app's own (not the library's global one), so
that every app instance - one per test, say - counts only its own requests."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

# Request latencies from a few milliseconds (one image, idle CPU) to the deadline.
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch, and the largest batch itself."""
    buckets = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        buckets.add(size)
        size *= 2
    return tuple(float(b) for b in sorted(buckets))


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU, memory, open files of this process
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from request start to response end, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds",
            "Time an image waited in the queue before its batch started.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Images per forward pass.",
            buckets=_batch_buckets(max_batch_size),
            registry=self.registry,
        )
        self.inference_time = Histogram(
            "inference_batch_duration_seconds",
            "Time of one batch on the inference thread (stack, forward pass, softmax).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_failures = Counter(
            "inference_batch_failures",
            "Batches whose inference raised; their requests got 500.",
            registry=self.registry,
        )
        self.dropped = Counter(
            "inference_dropped_images",
            "Images dropped before entering a batch, by reason (expired, cancelled).",
            ["reason"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "inference_queue_depth",
            "Images waiting in the queue for a batch.",
            registry=self.registry,
        )
        self.pending = Gauge(
            "inference_pending_images",
            "Images admitted and not yet answered (reading, decoding, queued or running).",
            registry=self.registry,
        )

        self.engine = Info(
            "inference_engine",
            "The engine serving: its name, device and precision (set once it is loaded).",
            registry=self.registry,
        )

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at scrape time rather than updating it on every change."""
        self.queue_depth.set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
