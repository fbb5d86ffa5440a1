"""The server's Prometheus metrics, in a registry of its own (several apps in one process, as in the tests,
do not collide in prometheus_client's global one)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a tiny model's milliseconds to a large one's minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("glm_requests", "Requests answered, by endpoint and outcome (ok, bad_request, "
                                "unauthorized, overloaded, timeout, disconnected, error).",
                                ["endpoint", "outcome"], registry=self.registry)  # fmt: skip
        self.tokens = Counter("glm_generated_tokens", "Answer tokens generated.", registry=self.registry)
        self.latency = Histogram("glm_request_latency_seconds", "From a request's arrival to its last byte.",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.ttft = Histogram("glm_time_to_first_token_seconds", "From a generation request's arrival to its first "
                              "text (a beam answer's, when decided).", buckets=_LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.step_rows = Histogram("glm_batch_rows", "Rows (beams, answer copies) decoded by one batched step.",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)  # fmt: skip
        queue = Gauge("glm_queue_depth", "Requests waiting to join the batch.", registry=self.registry)
        queue.set_function(lambda: engine.queue_depth)
        rows = Gauge("glm_live_rows", "Rows in the running batch now.", registry=self.registry)
        rows.set_function(lambda: engine.live_rows)
        self.ready = Gauge("glm_ready", "1 while the model is loaded and the server accepts requests.", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
