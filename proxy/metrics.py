"""Prometheus metrics, in a registry of our own (never the global one)."""
from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

__all__ = ["Metrics", "LATENCY_BUCKETS", "HotCounter", "HotHistogram", "FastCounter", "aggregate"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HotCounter:
    """A counter family for the per-request path: one dict update, no lock (the proxy's metrics
    are only touched from its event loop thread), exposed through a custom collector."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.label_names = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        v = self.values
        v[key] = v.get(key, 0.0) + amount

    def collect(self) -> Iterable[Any]:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.label_names)
        for key, value in list(self.values.items()):
            fam.add_metric(list(key), value)
        yield fam


class _Child:
    __slots__ = ("_values", "_key")

    def __init__(self, values: dict, key: tuple[str, ...]) -> None:
        self._values, self._key = values, key

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        v = self._values
        v[self._key] = v.get(self._key, 0.0) + amount


class FastCounter(HotCounter):
    """prometheus_client's Counter API (`.labels(...).inc()`, `.inc()`) without its per-call
    validation and lock: what addons get from Metrics.counter(). Single event-loop thread only."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        if name.endswith("_total"):
            name = name[:-6]
        super().__init__(name, doc, tuple(labels))
        self._children: dict[tuple, _Child] = {}
        if not labels:
            self.values[()] = 0.0

    def labels(self, *values: str, **kw: str) -> _Child:
        if kw:
            values = tuple(kw[n] for n in self.labels_names)
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labels_names):
                raise ValueError(f"{self.name}: expected labels {self.labels_names}, got {values}")
            key = tuple(str(v) for v in values)
            self.values.setdefault(key, 0.0)
            child = self._children[values] = _Child(self.values, key)
        return child

    @property
    def labels_names(self) -> tuple[str, ...]:
        return self.label_names

    def inc(self, amount: float = 1.0, key: tuple[str, ...] = ()) -> None:  # type: ignore[override]
        if amount < 0:
            raise ValueError("counters only go up")
        v = self.values
        v[key] = v.get(key, 0.0) + amount

    def get(self, *values: str) -> float:
        return self.values.get(tuple(values), 0.0)


class HotHistogram:
    """A histogram family for the per-request path: bisect into plain lists."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...],
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.label_names = name, doc, labels
        self.bounds = list(buckets)
        self.data: dict[tuple[str, ...], list] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        d = self.data.get(key)
        if d is None:
            d = self.data[key] = [[0] * (len(self.bounds) + 1), 0.0]
        d[0][bisect_left(self.bounds, value)] += 1
        d[1] += value

    def collect(self) -> Iterable[Any]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for key, (counts, total) in list(self.data.items()):
            acc, buckets = 0, []
            for bound, n in zip(self.bounds, counts):
                acc += n
                buckets.append((repr(float(bound)), acc))
            acc += counts[-1]
            buckets.append(("+Inf", acc))
            fam.add_metric(list(key), buckets, total)
        yield fam


class Metrics:
    """The engine's metrics plus get-or-create helpers for addons (reload-safe).

    Labels are bounded: route class, method, status, target name; never a user id.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._made: dict[str, Any] = {}
        self.requests = self._hot(HotCounter("sge_proxy_requests", "Client requests answered.",
                                             ("route", "method", "status")))
        self.request_seconds = self._hot(HotHistogram(
            "sge_proxy_request_duration_seconds", "Time from request head to last response byte.", ("route",)))
        self.upstream_seconds = self._hot(HotHistogram(
            "sge_proxy_upstream_duration_seconds", "Time from upstream request to response head.", ("upstream",)))
        self.upstream_requests = self._hot(HotCounter("sge_proxy_upstream_requests",
                                                      "Requests sent upstream.", ("upstream", "code")))
        self.upstream_errors = self.counter("sge_proxy_upstream_errors_total",
                                            "Upstream failures by kind.", ("upstream", "kind"))
        self.in_flight = self.gauge("sge_proxy_requests_in_flight", "Requests being handled.")
        self.in_flight_value = 0  # read at scrape time: no per-request gauge updates
        self.in_flight.set_function(lambda: self.in_flight_value)
        self.addon_errors = self.counter("sge_proxy_addon_errors_total",
                                         "Exceptions raised by addon hooks.", ("addon", "hook", "closed"))
        self.addon_reloads = self.counter("sge_proxy_addon_reloads_total",
                                          "File addon reloads.", ("result",))
        self.cert_expiry = self.gauge("sge_proxy_client_cert_expiry_timestamp_seconds",
                                      "notAfter of the upstream client certificate in use.")
        self.connections = self.gauge("sge_proxy_upstream_connections",
                                      "Open upstream connections.", ("upstream", "state"))
        self.bytes = self.counter("sge_proxy_bytes_total", "Body bytes moved.", ("direction",))
        self.websocket_messages = self._hot(HotCounter(
            "sge_proxy_websocket_messages", "WebSocket messages relayed, by sender.", ("from",)))
        self.websockets_open = 0
        self.gauge("sge_proxy_websockets_open", "WebSocket sessions being bridged.").set_function(
            lambda: self.websockets_open)

    def _hot(self, family: Any) -> Any:
        self.registry.register(family)
        return family

    # get-or-create, so that addons re-created on reload do not register twice
    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> "FastCounter":
        m = self._made.get(name)
        if m is None:
            m = self._made[name] = FastCounter(name, doc, tuple(labels))
            self.registry.register(m)
        elif not isinstance(m, FastCounter):
            raise ValueError(f"metric {name} already registered as {type(m).__name__}")
        return m

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
        if method not in _METHODS:
            method = "OTHER"
        self.requests.inc((route, method, _STATUS.get(status) or str(status)))
        self.request_seconds.observe((route,), seconds)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS = {n: str(n) for n in range(100, 600)}


def _merge_rule(sample_name: str, kind: str) -> Any:
    """How one sample combines across workers: counts and sums add up; so do gauges, except
    points in time (`*_timestamp_seconds`: the latest; `*_created`: the earliest)."""
    if sample_name.endswith("_created"):
        return min
    if kind in ("gauge", "unknown", "untyped") and sample_name.endswith("_timestamp_seconds"):
        return max
    return lambda a, b: a + b


def aggregate(expositions: Iterable[str]) -> bytes:
    """Several Prometheus text expositions (one per worker) as one: samples with the same name and
    labels combined by `_merge_rule`. Pure."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, Sample]] = {}
    for text in expositions:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            merged = values[fam.name]
            kind = families[fam.name].type
            for smp in fam.samples:
                key = (smp.name, tuple(sorted(smp.labels.items())))
                prev = merged.get(key)
                value = smp.value if prev is None else _merge_rule(smp.name, kind)(prev.value, smp.value)
                merged[key] = Sample(smp.name, smp.labels, value)

    class _Merged:
        def collect(self) -> Iterable[Any]:
            for name, fam in families.items():
                fam.samples = list(values[name].values())
                yield fam

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
