"""Prometheus metrics, in a registry of our own (never the global one)."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The engine's metrics plus get-or-create helpers for addons (reload-safe).

    Labels are bounded: route class, method, status, target name; never a user id.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._made: dict[str, Any] = {}
        self.requests = self.counter("sge_proxy_requests_total", "Client requests answered.",
                                     ("route", "method", "status"))
        self.request_seconds = self.histogram("sge_proxy_request_duration_seconds",
                                              "Time from request head to last response byte.", ("route",))
        self.upstream_seconds = self.histogram("sge_proxy_upstream_duration_seconds",
                                               "Time from upstream request to response head.", ("upstream",))
        self.upstream_requests = self.counter("sge_proxy_upstream_requests_total",
                                              "Requests sent upstream.", ("upstream", "code"))
        self.upstream_errors = self.counter("sge_proxy_upstream_errors_total",
                                            "Upstream failures by kind.", ("upstream", "kind"))
        self.in_flight = self.gauge("sge_proxy_requests_in_flight", "Requests being handled.")
        self.addon_errors = self.counter("sge_proxy_addon_errors_total",
                                         "Exceptions raised by addon hooks.", ("addon", "hook", "closed"))
        self.addon_reloads = self.counter("sge_proxy_addon_reloads_total",
                                          "File addon reloads.", ("result",))
        self.cert_expiry = self.gauge("sge_proxy_client_cert_expiry_timestamp_seconds",
                                      "notAfter of the upstream client certificate in use.")
        self.connections = self.gauge("sge_proxy_upstream_connections",
                                      "Open upstream connections.", ("upstream", "state"))
        self.bytes = self.counter("sge_proxy_bytes_total", "Body bytes moved.", ("direction",))
        self._req_children: dict[tuple[str, str, int], Any] = {}
        self._dur_children: dict[str, Any] = {}

    # get-or-create, so that addons re-created on reload do not register twice
    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        m = self._made.get(name)
        if m is None:
            m = self._made[name] = Histogram(name, doc, labels, registry=self.registry, buckets=buckets)
        return m

    def _get(self, kind: type, name: str, doc: str, labels: tuple[str, ...]) -> Any:
        m = self._made.get(name)
        if m is None:
            m = self._made[name] = kind(name, doc, labels, registry=self.registry)
        elif not isinstance(m, kind):
            raise ValueError(f"metric {name} already registered as {type(m).__name__}")
        return m

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Hot path: label children cached by tuple."""
        key = (route, method, status)
        child = self._req_children.get(key)
        if child is None:
            if method not in _METHODS:
                method = "OTHER"
            child = self._req_children[key] = self.requests.labels(route, method, str(status))
        child.inc()
        dur = self._dur_children.get(route)
        if dur is None:
            dur = self._dur_children[route] = self.request_seconds.labels(route)
        dur.observe(seconds)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
