"""Prometheus metrics of one server: requests by status, tokens, batch occupancy, queue depth, latencies.
Each app has its own registry (several apps in one process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("leanvlm_requests", "Chat-completion requests by HTTP status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("leanvlm_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter("leanvlm_completion_tokens", "Generated tokens", registry=r)
        self.running = Gauge("leanvlm_batch_occupancy", "Requests in the running decode batch", registry=r)
        self.max_batch = Gauge("leanvlm_batch_slots", "Slots of the decode batch (--max-batch)", registry=r)
        self.max_batch.set(max_batch)
        self.queue = Gauge("leanvlm_queue_depth", "Requests waiting for a slot", registry=r)
        self.step_rows = Histogram("leanvlm_decode_step_requests", "Requests per decode step", registry=r,
                                   buckets=tuple(range(1, max(2, max_batch) + 1)))
        self.latency = Histogram("leanvlm_request_latency_seconds", "Request latency, arrival to last token",
                                 registry=r, buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("leanvlm_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=LATENCY_BUCKETS)

    def bind(self, scheduler) -> None:
        """Gauges read the scheduler when scraped."""
        self.running.set_function(lambda: scheduler.running)
        self.queue.set_function(lambda: scheduler.queue_depth)

    def on_step(self, rows: int, running: int) -> None:
        self.step_rows.observe(running)

    def finished(self, event) -> None:
        self.prompt_tokens.inc(event.prompt_tokens)
        self.completion_tokens.inc(event.completion_tokens)
        if event.timings:
            self.latency.observe(event.timings["total_s"])
            self.ttft.observe(event.timings["ttft_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
