"""Prometheus export of the engine's stats (the only module that imports prometheus_client).

Every series has the label `model` (the served model name); the others come from small fixed sets:
`status_class` (2xx/4xx/5xx), `finish_reason` (stop/length/abort/error), `layer` (0..L-1), `decision`
(skip/execute/repeat). Per-choice series (layers, decisions, finish reasons, latencies, budget) count
each sequence once when it finishes; a request with n choices over k prompts counts n*k times.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from routing.plan import DECISIONS

from .stats import ChoiceStats, StepStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
FINISH_REASONS = ("stop", "length", "abort", "error")
STATUS_CLASSES = ("2xx", "4xx", "5xx")
BUDGET_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 1.75, 2.0)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model = model_name  # provisional until on_ready names the loaded model
        r, m = self.registry, ["model"]
        self.requests = Counter("drllm_requests", "HTTP completion requests by status class", [*m, "status_class"],
                                registry=r)
        self.finished = Counter("drllm_request_finished", "Finished choices by finish reason",
                                [*m, "finish_reason"], registry=r)
        self.prompt_tokens = Counter("drllm_prompt_tokens", "Prompt tokens prefilled", m, registry=r)
        self.generation_tokens = Counter("drllm_generation_tokens", "Tokens generated", m, registry=r)
        self.e2e = Histogram("drllm_e2e_request_latency_seconds", "Submit to finish, per choice", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("drllm_time_to_first_token_seconds", "Submit to first token, per choice", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("drllm_inter_token_latency_seconds", "Gap between consecutive tokens of a choice",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.queue = Histogram("drllm_request_queue_time_seconds", "Submit to admission into the batch", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.budget = Histogram("drllm_request_budget", "Requested compute budget (fraction of L), per choice",
                                m, buckets=BUDGET_BUCKETS, registry=r)
        self.running = Gauge("drllm_num_requests_running", "Sequences in the batch", m, registry=r)
        self.waiting = Gauge("drllm_num_requests_waiting", "Sequences waiting for a batch row", m, registry=r)
        self.decisions = Counter("drllm_routing_decisions", "Per-layer plan decisions, per finished choice",
                                 [*m, "layer", "decision"], registry=r)
        self._layer_hists: tuple[Histogram, Histogram, Histogram] | None = None
        self._lock = threading.Lock()

    # --- engine side (engine thread) -------------------------------------------------------------
    def on_ready(self, model_name: str, n_layers: int) -> None:
        """Name the model and create the per-request layer histograms (buckets 0..2L need L)."""
        with self._lock:
            self.model = model_name
            if self._layer_hists is None:
                buckets = tuple(float(b) for b in range(2 * n_layers + 1))
                r, m = self.registry, ["model"]
                self._layer_hists = (
                    Histogram("drllm_request_layers_executed", "Block executions per token (a repeat counts 2), "
                              "per choice", m, buckets=buckets, registry=r),
                    Histogram("drllm_request_layers_skipped", "Skipped blocks, per choice", m, buckets=buckets,
                              registry=r),
                    Histogram("drllm_request_layers_repeated", "Repeated blocks, per choice", m, buckets=buckets,
                              registry=r),
                )
            # series a dashboard expects exist from the start, at zero
            for metric in (self.running, self.waiting):
                metric.labels(self.model).set(0)
            for reason in FINISH_REASONS:
                self.finished.labels(self.model, reason)
            for status_class in STATUS_CLASSES:
                self.requests.labels(self.model, status_class)
            for layer in range(n_layers):
                for decision in DECISIONS:
                    self.decisions.labels(self.model, str(layer), decision)

    def on_step(self, stats: StepStats) -> None:
        model = self.model
        self.running.labels(model).set(stats.running)
        self.waiting.labels(model).set(stats.waiting)
        if stats.prompt_tokens:
            self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        if stats.generation_tokens:
            self.generation_tokens.labels(model).inc(stats.generation_tokens)
        if stats.inter_token_s:
            itl = self.itl.labels(model)
            for gap in stats.inter_token_s:
                itl.observe(gap)
        for choice in stats.finished:
            self._on_finished(model, choice)

    def _on_finished(self, model: str, c: ChoiceStats) -> None:
        self.finished.labels(model, c.finish_reason).inc()
        self.e2e.labels(model).observe(c.e2e_s)
        if c.queue_s is not None:
            self.queue.labels(model).observe(c.queue_s)
        if c.ttft_s is not None:
            self.ttft.labels(model).observe(c.ttft_s)
        if c.budget is not None:
            self.budget.labels(model).observe(c.budget)
        if c.plan is None or self._layer_hists is None:
            return
        executed, skipped, repeated = self._layer_hists
        executed.labels(model).observe(c.plan.executions)
        skipped.labels(model).observe(c.plan.skipped)
        repeated.labels(model).observe(c.plan.repeated)
        for layer, count in enumerate(c.plan.counts):
            self.decisions.labels(model, str(layer), DECISIONS[count]).inc()

    # --- HTTP side (event loop) ------------------------------------------------------------------
    def on_response(self, status: int) -> None:
        self.requests.labels(self.model, f"{status // 100}xx").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
