"""metrics.aggregate: the workers' expositions summed into one (the supervisor's /metrics)."""
from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics, aggregate


def samples(text: bytes) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def exposition(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_counters_histograms_and_gauges_sum_timestamps_take_the_latest():
    a, b = Metrics(), Metrics()
    a.observe_request("api", "GET", 200, 0.004)
    b.observe_request("api", "GET", 200, 0.3)
    b.observe_request("session", "GET", 401, 0.002)
    a.counter("sge_proxy_config_reloads_total", "r", ("result",)).labels("ok").inc()
    b.counter("sge_proxy_config_reloads_total", "r", ("result",)).labels("ok").inc(2)
    a.in_flight_value, b.in_flight_value = 2, 5
    a.cert_expiry.set(1000)
    b.cert_expiry.set(3000)
    h = a.histogram("sge_test_seconds", "t")  # prometheus_client's own: with a _created sample
    h.observe(1.0)
    out = samples(aggregate([exposition(a), exposition(b)]))
    assert out[("sge_proxy_requests_total", (("method", "GET"), ("route", "api"), ("status", "200")))] == 2
    assert out[("sge_proxy_requests_total", (("method", "GET"), ("route", "session"), ("status", "401")))] == 1
    assert out[("sge_proxy_request_duration_seconds_bucket", (("le", "0.005"), ("route", "api")))] == 1
    assert out[("sge_proxy_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "api")))] == 2
    assert out[("sge_proxy_request_duration_seconds_count", (("route", "api"),))] == 2
    assert abs(out[("sge_proxy_request_duration_seconds_sum", (("route", "api"),))] - 0.304) < 1e-9
    assert out[("sge_proxy_config_reloads_total", (("result", "ok"),))] == 3
    assert out[("sge_proxy_requests_in_flight", ())] == 7
    assert out[("sge_proxy_client_cert_expiry_timestamp_seconds", ())] == 3000
    assert out[("sge_test_seconds_count", ())] == 1


def test_one_exposition_round_trips_and_none_is_empty():
    a = Metrics()
    a.observe_request("api", "POST", 502, 0.1)
    assert samples(aggregate([exposition(a)])) == samples(exposition(a).encode())
    assert aggregate([]) == b""
