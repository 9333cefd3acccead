"""``/metrics``: the server's counters and histograms in Prometheus' text format."""

from __future__ import annotations

from trainlab.chat.serve.engine import Engine, Job


class Metrics:
    """What ``/metrics`` shows, in Prometheus' text format (prometheus-client), in a registry of
    this server's own (so that two servers in one process do not share counts)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("trainlab_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        Gauge("trainlab_queue_length", "requests waiting for a row", registry=r).set_function(lambda: engine.queued)
        Gauge("trainlab_busy_rows", "rows decoding a request", registry=r).set_function(lambda: engine.busy)
        Gauge("trainlab_rows", "rows decoded together", registry=r).set(engine.limits.slots)
        self.characters = Counter("trainlab_characters_generated", "characters generated", registry=r)
        self.first = Histogram("trainlab_time_to_first_character_seconds", "from request to first character",
                               buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.rate = Histogram("trainlab_characters_per_second", "characters per second of each request after its "
                              "first", buckets=(10, 25, 50, 100, 150, 250, 400, 600, 1000, 2000), registry=r)

    def finished(self, job: Job) -> None:
        self.characters.inc(job.generated)
        if job.first_at is not None:
            self.first.observe(job.first_at - job.submitted_at)
            if job.generated > 1 and job.ended_at is not None and job.ended_at > job.first_at:
                self.rate.observe((job.generated - 1) / (job.ended_at - job.first_at))
