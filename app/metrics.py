"""Prometheus metrics, on a registry of the app's own (several apps can live in one
process, as in the tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from app.drift import DriftTracker

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self, drift_window: int = 1000) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.top1_probability = Histogram(
            "alexnet_top1_probability", "Top-1 probability of each answer, by version "
            "(calibrated when the version is)", ["version"], buckets=_CONFIDENCE_BUCKETS,
            registry=r)  # fmt: skip
        self.uncertain = Counter(
            "alexnet_uncertain", "Answers marked uncertain (top-1 probability below "
            "min_confidence), by version", ["version"], registry=r)  # fmt: skip
        self.answers = Counter("alexnet_answers", "Answers given, by version", ["version"],
                               registry=r)  # fmt: skip
        self.drift = DriftTracker(drift_window)
        r.register(self.drift)
        self.requests = Counter("alexnet_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("alexnet_request_seconds", "Total request latency by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.stage = Histogram("alexnet_stage_seconds",
                               "Latency per stage: decode, queue (wait), inference (batch)",
                               ["stage"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("alexnet_batch_size", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)  # fmt: skip
        self.queue_depth = Gauge("alexnet_queue_depth", "Images waiting for the model",
                                 registry=r)  # fmt: skip
        self.ready = Gauge("alexnet_ready", "1 while a model is loaded and warm (GET /readyz "
                           "answers 200), else 0", registry=r)  # fmt: skip
        self.rejections = Counter("alexnet_rejections", "Refused uploads and requests by reason",
                                  ["reason"], registry=r)  # fmt: skip
        self.predictions = Counter("alexnet_predictions", "Top-1 predictions by label (drift)",
                                   ["label"], registry=r)  # fmt: skip
        self.model_info = Gauge("alexnet_model_info", "The model being served (value 1)",
                                ["version", "device", "precision", "compiled"], registry=r)  # fmt: skip
        self.memory_returned = Counter("alexnet_memory_returned_bytes",
                                       "Freed heap memory handed back to the OS (malloc_trim)",
                                       registry=r)  # fmt: skip
        self.feedback_kept = Counter("alexnet_feedback_kept", "Answers kept for feedback",
                                     registry=r)  # fmt: skip
        self.feedback_dropped = Counter(
            "alexnet_feedback_dropped",
            "Answers not kept for feedback, by reason: queue_full, store_full, disk_full, error",
            ["reason"], registry=r)  # fmt: skip
        self.feedback_labels = Counter(
            "alexnet_feedback_labels",
            "Labels sent back, by the version that answered and the outcome: right (its top-1), "
            "top5 (in its top-5, not top-1), wrong", ["version", "outcome"], registry=r)  # fmt: skip
        ProcessCollector(registry=r)  # process_resident_memory_bytes, open fds, CPU seconds

    def set_model(self, version: str, device: str, precision: str, compiled: bool) -> None:
        self.model_info.clear()
        self.model_info.labels(version, device, precision, str(compiled).lower()).set(1)

    def answered(self, version: str, reference: list[float] | None, num_classes: int,
                 top1: int, probability: float, uncertain: bool) -> None:  # fmt: skip
        """One answer's confidence signals: the histogram, the counters, the drift window."""
        self.answers.labels(version).inc()
        self.top1_probability.labels(version).observe(probability)
        if uncertain:
            self.uncertain.labels(version).inc()
        self.drift.observe(version, reference, num_classes, top1, uncertain)
