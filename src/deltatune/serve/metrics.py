"""The server's Prometheus metrics (prometheus_client, a registry of its own): requests by
endpoint and status, their latency, and the engine's counts read at each scrape."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/deltas/reload")


class _EngineCounts:
    """Collector of what the engine counts itself (tokens, rows, resident deltas)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        yield CounterMetricFamily("deltatune_prompt_tokens", "Prompt tokens prefilled", value=e.tokens_prefilled)
        yield CounterMetricFamily("deltatune_generated_tokens", "Tokens generated", value=e.tokens_generated)
        counts = e.counts()
        for key, help_text in (("resident", "Deltas loaded on the base model"),
                               ("running", "Requests decoding in the batch"),
                               ("waiting", "Requests waiting for a batch slot")):
            name = "deltatune_resident_deltas" if key == "resident" else f"deltatune_{key}_requests"
            yield GaugeMetricFamily(name, help_text, value=counts[key])


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("deltatune_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("deltatune_request_seconds", "Time from request to the response's last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        r.register(_EngineCounts(engine))

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        if endpoint != "other":
            self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
