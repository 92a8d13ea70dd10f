"""Prometheus metrics, one registry per app (so several apps can live in one test process).
Gauges that the store knows (queue depth) are read at scrape time."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs_submitted = Counter(
            "fluxserve_jobs_submitted", "Jobs accepted into the queue", ["model"], registry=self.registry
        )
        self.jobs_finished = Counter(
            "fluxserve_jobs_finished", "Jobs finished, by outcome", ["outcome"], registry=self.registry
        )
        self.generation_seconds = Histogram(
            "fluxserve_generation_seconds", "Generation time of succeeded jobs", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "fluxserve_queue_wait_seconds", "Time jobs waited in the queue before running", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "fluxserve_webhook_deliveries", "Webhook delivery attempts, by result (delivered, retry, failed, dead)",
            ["result"], registry=self.registry
        )
        self.webhook_dead_letters = Gauge(
            "fluxserve_webhook_dead_letters", "Webhook deliveries whose retry window ended (dead, not replayed)",
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "fluxserve_worker_restarts", "Times the worker process was (re)started after dying", registry=self.registry
        )
        self.rejected = Counter(
            "fluxserve_requests_rejected", "Requests refused before queueing, by reason", ["reason"],
            registry=self.registry,
        )
        self.queue_depth = Gauge("fluxserve_queue_depth", "Jobs waiting in the queue", registry=self.registry)
        self.running = Gauge("fluxserve_jobs_running", "Jobs being generated", registry=self.registry)
        self.workers_busy = Gauge(
            "fluxserve_workers_busy", "Worker processes of this server with a job in hand", registry=self.registry)
        self.workers_alive = Gauge(
            "fluxserve_workers_alive", "Worker processes of this server that are running", registry=self.registry)
        self.gpu_memory = Gauge(
            "fluxserve_gpu_memory_bytes", "GPU memory as last reported by the worker", ["kind"], registry=self.registry
        )

    def bind_workers(self, busy: Callable[[], float], alive: Callable[[], float]) -> None:
        """The workers this process hosts (``supervisor.WorkerPool``)."""
        self.workers_busy.set_function(busy)
        self.workers_alive.set_function(alive)

    def bind(self, queue_depth: Callable[[], float], running: Callable[[], float],
             dead_letters: Callable[[], float] | None = None) -> None:
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)
        if dead_letters is not None:
            self.webhook_dead_letters.set_function(dead_letters)

    def set_gpu_memory(self, memory: dict[str, int] | None) -> None:
        for kind, value in (memory or {}).items():
            self.gpu_memory.labels(kind.removesuffix("_bytes")).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
