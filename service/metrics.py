"""The service's Prometheus metrics, in a registry of the server's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Prometheus metrics in a registry of the server's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sparc_requests_total", "RPCs by method and status", ["method", "code"], registry=self.registry)
        self.latency = Histogram(
            "sparc_request_seconds",
            "RPC latency by method",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.query_l0 = Histogram(
            "sparc_query_l0", "active latents per query code", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.index_items = Gauge("sparc_index_items", "items per index", ["index"], registry=self.registry)
        self.index_reloads = Counter(
            "sparc_index_reloads_total",
            "new index versions swapped in (reloaded) or refused",
            ["index", "outcome"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "sparc_auth_failures_total", "calls refused for a missing or wrong token", ["method"], registry=self.registry
        )
        self.open_streams = Gauge("sparc_open_streams", "streaming calls open now", registry=self.registry)
        self.streams_refused = Counter(
            "sparc_streams_refused_total", "streaming calls refused by the stream caps", ["reason"], registry=self.registry
        )
        # what the calls cost the models, not only how many hits they asked for
        self.work = Counter(
            "sparc_work_total",
            "model work by unit: texts, text_chars, images, vectors encoded; gradient_calls run",
            ["method", "unit"],
            registry=self.registry,
        )
        self.gradient_busy = Gauge(
            "sparc_gradient_calls_busy", "Localize / AttributeText / ExplainPair calls queued or running", registry=self.registry
        )

    def count_queries(self, method: str, queries: list) -> None:
        """Add the encoding work of validated queries (engine QuerySpecs) to ``sparc_work_total``."""
        texts = [q.text for q in queries if q.text is not None]
        if texts:
            self.work.labels(method, "texts").inc(len(texts))
            self.work.labels(method, "text_chars").inc(sum(len(t) for t in texts))
        images = sum(q.pixels is not None for q in queries)
        if images:
            self.work.labels(method, "images").inc(images)
        vectors = len(queries) - len(texts) - images
        if vectors:
            self.work.labels(method, "vectors").inc(vectors)
