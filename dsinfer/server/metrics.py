"""Prometheus metrics, written in the text exposition format by hand (three metric kinds need ~80 lines; no
client library to pin). Updated from the event loop and the engine thread, so every update takes a lock."""

from __future__ import annotations

import bisect
import math
import threading

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, labelnames
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        with self._lock:
            return self.header() + [f"{self.name}_total{_labels(self.labelnames, k)} {_num(v)}"
                                    for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(name, help)
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)        # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def render(self) -> list[str]:
        with self._lock:
            lines, total = self.header(), 0
            for bound, count in zip(self.buckets + (math.inf,), self.counts):
                total += count
                lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {total}')
            return lines + [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {total}"]


class ServerMetrics:
    """Every metric the server exports; `render()` is the body of GET /metrics."""

    def __init__(self):
        p = "dsinfer_"
        self.requests = Counter(p + "requests", "HTTP requests answered, by endpoint and status code",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of accepted generation requests")
        self.generation_tokens = Counter(p + "generation_tokens", "tokens generated")
        self.running = Gauge(p + "num_requests_running", "sequences in the running batch")
        self.waiting = Gauge(p + "num_requests_waiting", "sequences waiting to be scheduled")
        self.kv_cache_usage = Gauge(p + "kv_cache_usage", "fraction of KV-cache pages in use, 1 - free/total")
        self.prefix_cache_hit_rate = Gauge(p + "prefix_cache_hit_rate",
                                           "prompt tokens found in the prefix cache / prompt tokens admitted")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "request arrival to its first generated token")
        self.itl = Histogram(p + "inter_token_latency_seconds", "time between consecutive tokens of a request")
        self.all = [self.requests, self.prompt_tokens, self.generation_tokens, self.running, self.waiting,
                    self.kv_cache_usage, self.prefix_cache_hit_rate, self.ttft, self.itl]

    def update_engine(self, engine) -> None:
        """Read the scheduler and block manager (call from the engine thread)."""
        bm = engine.block_manager
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.kv_cache_usage.set(1 - bm.num_free_pages / bm.num_pages if bm.num_pages else 0.0)
        self.prefix_cache_hit_rate.set(bm.num_hit_tokens / bm.num_query_tokens if bm.num_query_tokens else 0.0)

    def render(self) -> str:
        return "\n".join(line for m in self.all for line in m.render()) + "\n"
