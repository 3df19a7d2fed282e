"""The per-server state machine (proxy/breaker.py) as tables of timed events, and the choice of a
server for a request (proxy/health.py pick/failover) over real ServerStates. No event loop: the
clock is the `t` of each event."""
from __future__ import annotations

import dataclasses

import pytest

from proxy.breaker import Circuit, CircuitOpen, Failure, ServerState
from proxy.config import BreakerOptions, load_config
from proxy.errors import NoUpstream, PayloadTooLarge, UpstreamProtocolError, UpstreamTimeout
from proxy.health import UpstreamHealth, failure_kind
from proxy.metrics import Metrics
from proxy.target import Target
from proxy.upstream import ConnectRefused, ConnectTimeout, HandshakeFailed, RequestBodyFailed, ResetBeforeSend

C, R = Failure.CONNECT, Failure.RESPONSE
OPTS = BreakerOptions(consecutive_failures=3, ejection_time=5.0, max_ejection_time=20.0, window=10.0,
                      min_requests=4, failure_ratio=0.5, min_clients=3, open_time=5.0, max_open_time=20.0)


def run(events, opts=OPTS):
    """Play events on a fresh state. Events: (t, "ok"), (t, "fail", client, kind), (t, "status", code,
    client), (t, "check", passed), (t, "admit", expected) or (t, "admit_any", expected) (health
    ignored). Returns the state and the circuit transitions seen."""
    seen: list[tuple[str, str]] = []
    ejections: list[float] = []
    st = ServerState(opts, unhealthy_after=2, healthy_after=1,
                     on_transition=lambda a, b: seen.append((a.label, b.label)), on_eject=ejections.append)
    for ev in events:
        t, what, *args = ev
        if what == "ok":
            st.success(t)
        elif what == "fail":
            st.failure(t, args[0], args[1])
        elif what == "status":
            st.answered(args[0], args[1], t)
        elif what == "check":
            st.checked(args[0], t)
        elif what in ("admit", "admit_any"):
            assert st.admit(t, what == "admit") is args[0], ev
        else:
            raise AssertionError(what)
    return st, seen, ejections


def fails(t0, n, clients=("c1",), kind=R, step=0.1):
    return [(t0 + i * step, "fail", clients[i % len(clients)], kind) for i in range(n)]


THREE = ("10.0.0.1", "10.0.0.2", "10.0.0.3")


# ---------------------------------------------------------------------------- outlier ejection
def back(t):
    """The circuit's trial at t succeeds: closed again."""
    return [(t, "admit", True), (t + 0.05, "ok")]


@pytest.mark.parametrize("name,events,ejected_at,until", [
    ("connect failures eject, whoever asked", fails(0, 3, kind=C), 1.0, 5.2),
    ("one client's failed answers never eject", fails(0, 30, kind=R), 1.0, None),
    ("failed answers from three clients eject", fails(0, 3, THREE), 1.0, 5.2),
    ("two clients are not enough", fails(0, 30, THREE[:2]), 1.0, None),
    ("one connect failure in a streak of answers ejects", fails(0, 2) + [(0.2, "fail", "c1", C)], 1.0, 5.2),
    ("an answer in between resets the streak", fails(0, 2, kind=C) + [(0.2, "ok")] + fails(0.3, 2, kind=C),
     1.0, None),
    ("a 4xx answer is an answer", fails(0, 2, kind=C) + [(0.2, "status", 404, "c1")] + fails(0.3, 2, kind=C),
     1.0, None),
    ("a 503 answer is a failure", [(i * 0.1, "status", 503, c) for i, c in enumerate(THREE)], 1.0, 5.2),
    ("501 is not a failure status", [(i * 0.1, "status", 501, c) for i, c in enumerate(THREE)], 1.0, None),
    ("ejected again soon after: twice as long", fails(0, 3, kind=C) + back(5.3) + fails(6, 3, kind=C), 6.5, 16.2),
    ("capped at max_ejection_time", fails(0, 3, kind=C) + back(5.3) + fails(6, 3, kind=C) + back(16.3)
     + fails(17, 3, kind=C) + back(37.3) + fails(38, 3, kind=C), 38.5, 58.2),
    ("back long enough: the backoff starts over", fails(0, 3, kind=C) + back(5.3) + fails(40, 3, kind=C),
     40.5, 45.2),
])
def test_ejection_opens_the_circuit(name, events, ejected_at, until):
    st, seen, ejections = run(events)
    if until is None:
        assert st.circuit is Circuit.CLOSED and ejections == [] and seen == []
        return
    assert st.ejected_until == pytest.approx(until) and st.open_until == pytest.approx(until)
    assert st.circuit is Circuit.OPEN and seen[-1] == ("closed", "open")
    assert not st.admit(ejected_at) and not st.admit(ejected_at, health=False)
    assert st.admit(until + 0.01) and st.circuit is Circuit.HALF_OPEN  # then one trial


def test_a_failed_trial_after_an_ejection_reopens_for_twice_open_time():
    st, seen, ejections = run(fails(0, 3, kind=C) + [(5.3, "admit", True), (5.4, "fail", "c1", C)])
    assert ejections == [5.0] and st.open_until == pytest.approx(15.4)
    assert seen == [("closed", "open"), ("open", "half-open"), ("half-open", "open")]


# ---------------------------------------------------------------------------- the circuit
@pytest.mark.parametrize("name,events,state", [
    ("one client failing everything cannot open it", fails(0, 50), Circuit.CLOSED),
    ("three failing clients over the ratio open it", fails(0, 4, THREE), Circuit.OPEN),
    ("below min_requests it stays closed", fails(0, 3, THREE), Circuit.CLOSED),
    ("under the failure ratio it stays closed", [(i * 0.01, "ok") for i in range(20)] + fails(1, 6, THREE),
     Circuit.CLOSED),
    ("at the ratio it opens", [(i * 0.01, "ok") for i in range(6)] + fails(1, 6, THREE), Circuit.OPEN),
    ("failures older than the window are forgotten", fails(0, 2, THREE) + fails(15, 2, (THREE[2], "c4")),
     Circuit.CLOSED),
    ("clients older than the window are forgotten", fails(0, 2, THREE[:2]) + [(11, "ok")] + fails(12, 8, ("c4",)),
     Circuit.CLOSED),
])
def test_circuit_opens_only_on_failures_of_several_clients(name, events, state):
    opts = dataclasses.replace(OPTS, consecutive_failures=1000)  # the circuit alone
    st, _, _ = run(events, opts)
    assert st.circuit is state


OPEN_AT_0 = fails(0, 4, THREE)  # opens at t=0.3 until 5.3


@pytest.mark.parametrize("name,events,state,transitions", [
    ("open: nothing passes", OPEN_AT_0 + [(1, "admit", False), (5.2, "admit_any", False)], Circuit.OPEN,
     [("closed", "open")]),
    ("after open_time one trial passes", OPEN_AT_0 + [(5.4, "admit", True), (5.5, "admit", False)],
     Circuit.HALF_OPEN, [("closed", "open"), ("open", "half-open")]),
    ("the trial's success closes it", OPEN_AT_0 + [(5.4, "admit", True), (5.6, "ok"), (5.7, "admit", True),
                                                  (5.8, "admit", True)],
     Circuit.CLOSED, [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]),
    ("the trial's failure opens it for twice as long", OPEN_AT_0 + [(5.4, "admit", True),
                                                                   (5.6, "fail", "c9", R), (15.5, "admit", False),
                                                                   (15.7, "admit", True)],
     Circuit.HALF_OPEN, [("closed", "open"), ("open", "half-open"), ("half-open", "open"), ("open", "half-open")]),
    ("a trial that never reports is given up after open_time", OPEN_AT_0 + [(5.4, "admit", True),
                                                                           (10.3, "admit", False),
                                                                           (10.5, "admit", True)],
     Circuit.HALF_OPEN, [("closed", "open"), ("open", "half-open")]),
    ("a passed health check closes it once open_time is over", OPEN_AT_0 + [(2, "check", True), (6, "check", True)],
     Circuit.CLOSED, [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]),
    ("a success that was in flight does not close an open circuit", OPEN_AT_0 + [(1, "ok")], Circuit.OPEN,
     [("closed", "open")]),
    ("closing starts a fresh window", OPEN_AT_0 + [(5.4, "admit", True), (5.5, "ok")] + fails(5.6, 1, THREE),
     Circuit.CLOSED, [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]),
])
def test_open_half_open_closed(name, events, state, transitions):
    opts = dataclasses.replace(OPTS, consecutive_failures=1000)
    st, seen, _ = run(events, opts)
    assert st.circuit is state
    assert seen == transitions


# ---------------------------------------------------------------------------- health checks
@pytest.mark.parametrize("checks,healthy,admit,admit_any", [
    ([], None, True, True),
    ([True], True, True, True),
    ([False], None, True, True),             # one failed check is not a verdict (unhealthy_after 2)
    ([False, False], False, False, True),    # unhealthy: only taken when nothing else is
    ([False, False, True], True, True, True),
    ([False, True, False], True, True, True),    # one failure does not undo a verdict
])
def test_health_verdicts(checks, healthy, admit, admit_any):
    st, _, _ = run([(i, "check", ok) for i, ok in enumerate(checks)])
    assert st.healthy is healthy
    assert st.admit(100, health=False) is admit_any
    assert st.admit(100) is admit


def test_snapshot_reports_times_from_now():
    st, _, _ = run(fails(0, 3, kind=C) + fails(0.3, 1, THREE[1:], kind=C) + [(0.5, "ok"), (0.6, "check", False)])
    snap = st.snapshot(1.0)
    assert snap["circuit"] == "open" and snap["health"] == "unknown"
    assert snap["ejected_for"] == pytest.approx(4.2) and snap["open_for"] == pytest.approx(4.2)
    assert snap["ejections"] == 1 and snap["failures"] == 4 and snap["successes"] == 1
    assert snap["window"] == {"requests": 5, "failures": 4, "failing_clients": 2}
    assert st.snapshot(6.0)["circuit"] == "half-open" and st.snapshot(6.0)["ejected_for"] is None


# ---------------------------------------------------------------------------- errors -> failures
@pytest.mark.parametrize("err,kind", [
    (ConnectRefused(), C), (ConnectTimeout(), C), (HandshakeFailed(), C), (ResetBeforeSend(), C),
    (UpstreamTimeout(), R), (UpstreamProtocolError(), R),
    (RequestBodyFailed(), None),   # the client's body broke: not the server's fault
    (NoUpstream(), None),          # the pool's own limit
    (PayloadTooLarge(), None),
])
def test_failure_kind(err, kind):
    assert failure_kind(err) is kind


# ---------------------------------------------------------------------------- picking a server
def _target(port: int) -> Target:
    return Target("https", "127.0.0.1", port, "", "tenant:acme")


A, B, D = _target(1001), _target(1002), _target(1003)


def _health() -> tuple[UpstreamHealth, list[float]]:
    clock = [100.0]
    config = load_config(None, env={}, overrides={"stalwart.url": "https://127.0.0.1:1000",
                                                  "breaker.consecutive_failures": 2, "breaker.max_targets": 3})
    return UpstreamHealth(None, lambda: config, Metrics(), clock=lambda: clock[0]), clock  # type: ignore[arg-type]


def _eject(h: UpstreamHealth, t: Target, now: float) -> None:
    st = h.state(t)
    for _ in range(2):
        st.failure(now, "c", C)


def _unhealthy(h: UpstreamHealth, t: Target, now: float) -> None:
    st = h.state(t)
    st.checked(False, now)
    st.checked(False, now)


@pytest.mark.parametrize("name,prepare,route,picked", [
    ("the primary when it may", [], (A, B), A),
    ("a fallback when the primary is ejected", [(_eject, A)], (A, B, D), B),
    ("the next fallback when the first is unhealthy", [(_eject, A), (_unhealthy, B)], (A, B, D), D),
    ("failing health checks everywhere: the primary anyway", [(_unhealthy, A), (_unhealthy, B)], (A, B), A),
    ("unhealthy primary, ejected fallback: the primary", [(_unhealthy, A), (_eject, B)], (A, B), A),
])
def test_pick(name, prepare, route, picked):
    h, clock = _health()
    for fn, t in prepare:
        fn(h, t, clock[0])
    target, st = h.pick(route[0], route[1:], clock[0])
    assert target is picked and st is h.state(picked)


def test_pick_refuses_when_every_server_is_out_and_says_when_to_retry():
    h, clock = _health()
    _eject(h, A, clock[0])
    _eject(h, B, clock[0] + 2)
    with pytest.raises(CircuitOpen) as e:
        h.pick(A, (B,), clock[0] + 3)
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "2"
    assert h.pick(A, (B,), clock[0] + 5.1)[0] is A


def test_failover_skips_servers_already_tried():
    h, clock = _health()
    assert h.failover((A, B), [A.key], clock[0])[0] is B
    assert h.failover((A, B), [A.key, B.key], clock[0]) is None


def test_tracked_servers_are_bounded():
    h, clock = _health()  # max_targets 3: the default target and two more
    h.set_default(Target("https", "127.0.0.1", 1000, "", "official"))
    assert h.state(A) is not None and h.state(B) is not None
    assert h.state(D) is None
    assert h.pick(D, (), clock[0]) == (D, None)  # untracked: served, never refused
