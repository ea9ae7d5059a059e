"""Prometheus metrics under the `skipserve:` prefix (seconds, never milliseconds), and the standard
`process_*` ones (resident memory, CPU seconds) as every Prometheus client exports them.

Engine-wide counters (tokens, FFN blocks per layer) and gauges are read from the engine at
scrape time by a collector, so the step loop pays nothing for them; per-request histograms
are observed once per request (and per token for ITL) on the event loop.
"""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "skipserve:"
# from ~1 ms (GPU) to minutes (a long CPU generation)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)
RATIO_BUCKETS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
THROUGHPUT_WINDOW_S = 10.0
FINISHED_REASONS = ("stop", "length", "abort", "error")


class EngineCollector:
    """Reads the engine's cumulative counters and current gauges when Prometheus scrapes."""

    def __init__(self, async_engine):
        self.async_engine = async_engine
        self.steps: deque = deque()  # (time, generated tokens) of recent steps

    def record_step(self, generated_tokens: int) -> None:
        now = time.monotonic()
        self.steps.append((now, generated_tokens))
        while self.steps and self.steps[0][0] < now - THROUGHPUT_WINDOW_S:
            self.steps.popleft()

    def throughput(self) -> float:
        now = time.monotonic()
        tokens = sum(n for t, n in self.steps if t >= now - THROUGHPUT_WINDOW_S)
        return tokens / THROUGHPUT_WINDOW_S

    def collect(self):
        snap = self.async_engine.snapshot()
        engine = self.async_engine.engine
        yield GaugeMetricFamily(P + "num_requests_running", "Sequences in the running batch.", snap["running"])
        yield GaugeMetricFamily(P + "num_requests_waiting", "Sequences waiting for KV blocks or a batch row.",
                                snap["waiting"])
        yield GaugeMetricFamily(P + "kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0-1).",
                                snap["kv_usage"])
        yield GaugeMetricFamily(P + "generation_tokens_per_second",
                                f"Decode throughput over the last {THROUGHPUT_WINDOW_S:.0f} s.", self.throughput())
        yield GaugeMetricFamily(P + "kv_cache_bytes", "KV cache memory, allocated at load (bytes; 0 before).",
                                snap["kv_cache_bytes"])
        if "lora" in snap:  # vLLM's LoRA info gauge: the adapters in its labels, the time as its value
            running, waiting, served = snap["lora"]
            info = GaugeMetricFamily(P + "lora_requests_info", "LoRA adapters of the running and waiting requests "
                                     "(comma-separated names); max_lora: the adapters served, any of which may share "
                                     "a batch. The value is the scrape's Unix time.",
                                     labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            info.add_metric([str(served), ",".join(running), ",".join(waiting)], snap["time"])
            yield info
        prompt = CounterMetricFamily(P + "prompt_tokens", "Prefilled prompt tokens.")
        cached = CounterMetricFamily(P + "prefix_cache_hit_tokens",
                                     "Prompt tokens not prefilled: their K/V came from the prefix cache.")
        gen = CounterMetricFamily(P + "generation_tokens", "Generated tokens.")
        preempted = CounterMetricFamily(P + "num_preemptions", "Sequences preempted (KV blocks ran out); each "
                                        "resumes later by recomputing its K/V.")
        drafts = CounterMetricFamily(P + "spec_draft_tokens", "Speculative draft tokens checked (--speculative-tokens).")
        accepted = CounterMetricFamily(P + "spec_accepted_tokens", "Draft tokens the model produced too: "
                                       "generated without a step of their own.")
        total = CounterMetricFamily(P + "ffn_blocks", "FFN blocks of generated tokens, per layer.", labels=["layer"])
        skipped = CounterMetricFamily(P + "ffn_blocks_skipped", "FFN blocks skipped, per layer.", labels=["layer"])
        if engine is not None:
            prompt.add_metric([], engine.prompt_tokens_total)
            cached.add_metric([], engine.prompt_tokens_cached_total)
            gen.add_metric([], engine.generation_tokens_total)
            preempted.add_metric([], engine.num_preemptions_total)
            drafts.add_metric([], engine.draft_tokens_total)
            accepted.add_metric([], engine.accepted_draft_tokens_total)
            for layer, (n, s) in enumerate(zip(list(engine.layer_ffn_total), list(engine.layer_ffn_skipped))):
                total.add_metric([str(layer)], n)
                skipped.add_metric([str(layer)], s)
        yield from (prompt, cached, gen, preempted, drafts, accepted, total, skipped)


class Metrics:
    def __init__(self, async_engine):
        self.registry = CollectorRegistry()
        self.engine_collector = EngineCollector(async_engine)
        self.registry.register(self.engine_collector)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co. (Linux /proc)
        self.request_success = Counter(P + "request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        for reason in FINISHED_REASONS:  # exported at 0 from the start: `increase` sees the first of each
            self.request_success.labels(finished_reason=reason)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between tokens of one choice.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.skip_ratio = Histogram(P + "request_ffn_skip_ratio", "Realized FFN skip ratio per request.",
                                    buckets=RATIO_BUCKETS, registry=r)
        self.gen_tokens = Histogram(P + "request_generation_tokens", "Generated tokens per request.",
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Histogram(P + "request_prompt_tokens", "Prompt tokens per request.",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.embedding_inputs = Counter(P + "embedding_inputs", "Inputs embedded (/v1/embeddings).", registry=r)

    def on_step(self, stats, outputs) -> None:
        self.engine_collector.record_step(stats.generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one request, observed into the histograms as tokens arrive; `start`
    (time.monotonic) the request's arrival at its route, before its prompt is rendered and tokenized
    (on a thread pool, where requests may queue under load)."""

    def __init__(self, metrics: Metrics, start: float):
        self.metrics = metrics
        self.start = start
        self.first: float | None = None
        self.last: dict[int, float] = {}
        self.done = False

    def on_tokens(self, index: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        elif index in self.last:
            self.metrics.itl.observe(now - self.last[index])
        self.last[index] = now

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, skipped: int, total: int) -> None:
        self.done = True
        m = self.metrics
        m.request_success.labels(finished_reason=reason).inc()
        m.e2e.observe(time.monotonic() - self.start)
        m.gen_tokens.observe(completion_tokens)
        m.prompt_tokens.observe(prompt_tokens)
        m.skip_ratio.observe(skipped / total if total else 0.0)

    def end(self, reason: str) -> None:
        """A request that ends without finishing: "abort" (its client left, or the server stopped it)
        or "error" (its generation failed). Counted once, in request_success by that reason (as vLLM
        counts aborts), and in no latency histogram; nothing if it had finished."""
        if not self.done:
            self.done = True
            self.metrics.request_success.labels(finished_reason=reason).inc()

    def fail(self, status: int) -> None:
        """A request whose generation failed after it was taken, answered with `status`: counted as
        "error" where the server failed it (5xx); one that its own settings failed (a 400: say, a
        grammar and an allowed-token list that leave no token) counts nowhere, as refusals do."""
        if status >= 500:
            self.end("error")
        else:
            self.done = True

    def finish_embeddings(self, prompt_tokens: int) -> None:
        """An embeddings request, done: counted and timed as a request, but not in the per-request
        generation and skip histograms (it generates nothing, and prefill skips no FFN)."""
        self.done = True
        m = self.metrics
        m.request_success.labels(finished_reason="stop").inc()
        m.e2e.observe(time.monotonic() - self.start)
        m.prompt_tokens.observe(prompt_tokens)
