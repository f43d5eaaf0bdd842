"""The hand-written Prometheus exposition: parsed back with a small independent reader of the text format."""

import math

from dsinfer.server.metrics import Counter, Gauge, Histogram, ServerMetrics


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = math.inf if value == "+Inf" else float(value)
    return out


def test_counter_with_labels_and_escaping():
    c = Counter("x_requests", "help", ("endpoint", "status"))
    c.inc(1, "/v1/completions", "200")
    c.inc(2, "/v1/completions", "200")
    c.inc(1, 'we"ird\\', "400")
    s = samples("\n".join(c.render()))
    assert s['x_requests_total{endpoint="/v1/completions",status="200"}'] == 3
    assert s['x_requests_total{endpoint="we\\"ird\\\\",status="400"}'] == 1
    assert "# TYPE x_requests counter" in c.render()


def test_histogram_buckets_are_cumulative():
    h = Histogram("lat", "help", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    s = samples("\n".join(h.render()))
    assert s['lat_bucket{le="0.1"}'] == 2          # le is inclusive
    assert s['lat_bucket{le="1"}'] == 3
    assert s['lat_bucket{le="+Inf"}'] == 4 == s["lat_count"]
    assert math.isclose(s["lat_sum"], 3.65)


def test_server_metrics_names():
    m = ServerMetrics()
    m.requests.inc(1, "/health", "200")
    m.kv_cache_usage.set(0.25)
    text = m.render()
    for name in ("dsinfer_requests_total", "dsinfer_prompt_tokens_total", "dsinfer_generation_tokens_total",
                 "dsinfer_num_requests_running", "dsinfer_num_requests_waiting", "dsinfer_kv_cache_usage",
                 "dsinfer_prefix_cache_hit_rate", "dsinfer_time_to_first_token_seconds_bucket",
                 "dsinfer_inter_token_latency_seconds_count"):
        assert name in text
    assert samples(text)["dsinfer_kv_cache_usage"] == 0.25
    assert isinstance(m.running, Gauge)
