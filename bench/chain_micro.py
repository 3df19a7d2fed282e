#!/usr/bin/env python3
"""Microbenchmark of the full default addon chain per request, steady state (warm caches). Not a test.

    python bench/chain_micro.py [-n 20000] [--calls 2000] [--profile]

The chain is the one bench/configs/full.yaml gives (no `chain:` key: addons.default_chain()), loaded
through the real AddonManager with that file's addon options. No upstream runs: the manager's
fetcher (what the engine attaches as `pool.fetch`) answers the session resource the way the bench
nginx does (a 307 from /.well-known/jmap to /jmap/session, then bench/run.py's session.json), so
the JMAP guard fills its session cache by its own miss path during one warm-up request, which also
verifies bench/run.py's HS256 token once. The request is the bench row "full": wrk/jmap.lua's
POST /jmap Mailbox/get, its headers as bytes the way server.py's on_headers_complete builds them
(raw=[(lname, name, value)], no Connection header, route via proxy.jmap.route_class); then a
nginx-like 200 with the ~2.2 KB answer (Response with raw bytes, raw_connection False).

Per request it runs requestheaders -> (body) -> request -> responseheaders -> (body) -> response,
and reports:
- the whole chain through AddonManager.run, each hook's coroutine driven by hand: a hook that
  waits in the steady state is an error here;
- per addon and hook: microseconds and Python function calls (sys.setprofile 'call' events,
  builtins counted apart), and whether the hook returned None (synchronous);
- whether request.headers_read / response.headers_read stayed False (the engine then forwards
  the parser's bytes), and that the upstream head's X-SGE-* signature verifies.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import run as bench_run  # noqa: E402  bench/run.py: the token, the session and the answer it serves

from addons import BUILTIN, default_chain  # noqa: E402
from proxy.addonmanager import AddonManager, addon_name, resolve_spec  # noqa: E402
from proxy.config import load_config  # noqa: E402
from proxy.flow import Flow, Request, Response  # noqa: E402
from proxy.jmap import route_class  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402

CONFIG = ROOT / "bench" / "configs" / "full.yaml"
REQUEST_HOOKS = ("requestheaders", "request")
RESPONSE_HOOKS = ("responseheaders", "response")
HOOKS = REQUEST_HOOKS + RESPONSE_HOOKS
# wrk/jmap.lua's body, byte for byte
BODY = (b'{"using":["urn:ietf:params:jmap:core","urn:ietf:params:jmap:mail"],'
        b'"methodCalls":[["Mailbox/get",{"accountId":"b","ids":null},"c0"]]}')
PEER = "127.0.0.1"
HOST = "127.0.0.1:8080"


class Upstream:
    """The manager's fetcher: the bench nginx's answers to the JMAP guard's session fetch."""

    def __init__(self) -> None:
        self.session = bench_run.session_resource("https://127.0.0.1:8443")
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, target: Any, method: str, path: str, *, headers: Any = None,
                       body: bytes | None = None, cap: int = 10 << 20) -> Response:
        self.calls.append((method, path))
        if method == "GET" and path == "/.well-known/jmap":
            return Response.make(307, b"", [("Location", "/jmap/session")])
        if method == "GET" and path == "/jmap/session":
            return Response.make(200, self.session, [("Content-Type", "application/json")])
        return Response.make(404, b"not found")


def request_raw(token: str) -> list[tuple[bytes, bytes, bytes]]:
    """wrk's request head for wrk/jmap.lua, as the parser hands it over."""
    pairs = [(b"Host", HOST.encode()), (b"Authorization", b"Bearer " + token.encode()),
             (b"Content-Type", b"application/json"), (b"Accept", b"application/json"),
             (b"Content-Length", str(len(BODY)).encode())]
    return [(n.lower(), n, v) for n, v in pairs]


def response_raw(answer: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """nginx 1.22's head for `return 200 '...'` with default_type application/json."""
    pairs = [(b"Server", b"nginx/1.22.1"), (b"Date", b"Wed, 26 Nov 2026 14:47:00 GMT"),
             (b"Content-Type", b"application/json"), (b"Content-Length", str(len(answer)).encode())]
    return [(n.lower(), n, v) for n, v in pairs]


class Bench:
    def __init__(self, mgr: AddonManager, token: str, answer: bytes, jmap_path: str, target: Any) -> None:
        self.mgr = mgr
        self.raw = request_raw(token)
        self.answer = answer
        self.resp_raw = response_raw(answer)
        self.jmap_path = jmap_path
        self.target = target
        self.n = 0

    def new_flow(self) -> Flow:
        """What on_headers_complete and _cycle make before the first hook."""
        self.n += 1
        req = Request("POST", "/jmap", raw=list(self.raw), http_version="1.1", scheme="http", host=HOST,
                      peer=PEER)
        req.raw_connection = False
        req.content_length = len(BODY)
        flow = Flow(req, id=f"bench-{self.n:08d}", client_addr=PEER)
        flow.route = route_class(req.path, self.jmap_path)
        flow.upstream = self.target
        return flow

    def upstream_answer(self, flow: Flow) -> None:
        resp = Response(200, None, None, reason="OK", raw=list(self.resp_raw))
        resp.raw_connection = False
        flow.response = resp

    def after_requestheaders(self, flow: Flow) -> None:
        req = flow.request
        if req.body_cap is not None:
            req.body = BODY

    def after_responseheaders(self, flow: Flow) -> None:
        resp = flow.response
        if resp is not None and resp.body_cap is not None and resp.body is None:
            resp.body = self.answer

    def finish(self, flow: Flow) -> None:
        if flow._finalizers is not None:
            flow.finish()

    # ------------------------------------------------------------------ the chain through the manager
    def via_manager(self, flow: Flow) -> None:
        run = self.mgr.run
        _sync(run("requestheaders", flow))
        self.after_requestheaders(flow)
        _sync(run("request", flow))
        self.upstream_answer(flow)
        _sync(run("responseheaders", flow))
        self.after_responseheaders(flow)
        _sync(run("response", flow))
        self.finish(flow)

    # ------------------------------------------------------------------ hook by hook
    def entries(self) -> dict[str, list[tuple[str, Any]]]:
        out: dict[str, list[tuple[str, Any]]] = {}
        for hook in HOOKS:
            out[hook] = [(addon_name(a), getattr(a, hook)) for a in self.mgr.addons
                         if getattr(a, hook, None) is not None]
        return out

    def per_hook(self, flow: Flow, entries: dict, on_call: Any) -> None:
        for hook in HOOKS:
            if hook == "responseheaders":
                self.upstream_answer(flow)
            for name, fn in entries[hook]:
                on_call(name, hook, fn, flow)
            if hook == "requestheaders":
                self.after_requestheaders(flow)
            elif hook == "responseheaders":
                self.after_responseheaders(flow)
        self.finish(flow)


def _sync(coro: Any) -> None:
    """Run one AddonManager.run coroutine that must not wait: the steady state never does."""
    _await_now(coro)


async def build(verbose: bool) -> tuple[Bench, Upstream]:
    config = load_config(CONFIG, env={}, overrides={"access_log": "off"})
    metrics = Metrics()
    mgr = AddonManager(config, metrics)
    upstream = Upstream()
    mgr.fetcher = upstream
    chain = config.chain if config.chain is not None else tuple(default_chain())
    for entry in chain:
        await mgr.add_spec(resolve_spec(entry, BUILTIN))
    await mgr.running()
    bench = Bench(mgr, bench_run.mint_jwt(), bench_run.mailbox_get_answer(), config.stalwart.jmap_path,
                  config.default_target())
    # warm-up: one request the engine's way (hooks may wait: token verification, session fetch)
    for _ in range(2):
        flow = bench.new_flow()
        await mgr.run("requestheaders", flow)
        bench.after_requestheaders(flow)
        await mgr.run("request", flow)
        bench.upstream_answer(flow)
        await mgr.run("responseheaders", flow)
        bench.after_responseheaders(flow)
        await mgr.run("response", flow)
        bench.finish(flow)
    if verbose:
        print(f"chain: {', '.join(addon_name(a) for a in mgr.addons)}")
        print(f"warm-up upstream fetches: {upstream.calls}")
    return bench, upstream


def check(bench: Bench) -> list[str]:
    """One steady-state request: what the engine would forward, and whether it is right."""
    from addons.header_signer import upstream_target
    from proxy.http1 import scrub_request
    from proxy.signing import verify
    from multidict import CIMultiDict

    flow = bench.new_flow()
    bench.via_manager(flow)
    req, resp = flow.request, flow.response
    notes = [f"request.headers_read after the chain: {req.headers_read}",
             f"response.headers_read after the chain: {resp.headers_read if resp else None}"]
    # the upstream request's headers as the engine's raw path writes them: scrubbed parser bytes
    # minus the edited names, plus the edits
    if req.headers_read:  # the engine serialises the dict
        h = req.headers
    else:
        h = CIMultiDict([(n.decode("latin-1"), v.decode("latin-1")) for _, n, v in req.raw])
        scrub_request(h, PEER, "http")
        for name, value in (req.edits or {}).values():
            h.popall(name, None)
            if value is not None:
                h.add(name, value)
    signer = next(a for a in bench.mgr.addons if addon_name(a) == "header_signer")
    ident = verify("POST", upstream_target(flow), h, req.body, signer.key_ring)
    notes.append(f"upstream Authorization: {h.get('Authorization', '')[:24]}...; X-SGE signature verifies "
                 f"(user {ident.user_id}, payload {ident.content_sha256[:12]}...)")
    return notes


def measure(bench: Bench, n: int, calls_n: int) -> dict[str, Any]:
    entries = bench.entries()
    out: dict[str, Any] = {}

    # construction alone (what the engine pays anyway)
    def construct_only() -> None:
        flow = bench.new_flow()
        bench.upstream_answer(flow)
    out["construct_us"] = _timeit(construct_only, n)
    out["manager_us"] = _timeit(lambda: bench.via_manager(bench.new_flow()), n)

    # what the chain's choices cost the engine afterwards: the upstream request head, from the
    # parser's bytes (+ edits) or from the header dict (server.py's own method, its `self` stood in)
    from types import SimpleNamespace
    from proxy.server import HttpProtocol
    conn = SimpleNamespace(peer=PEER, scheme="http",  # what connection_made sets
                           _forwarded=f"X-Forwarded-For: {PEER}\r\nX-Forwarded-Proto: http\r\n".encode())
    framing = [("Content-Length", str(len(BODY)))]
    done = []
    for _ in range(n):
        flow = bench.new_flow()
        bench.via_manager(flow)
        done.append(flow)
    head = HttpProtocol._request_head
    it = iter(done * 3)
    out["head_us"] = _timeit(lambda: head(conn, next(it), bench.target, framing), n)
    del done

    # per addon and hook: time
    times: dict[tuple[str, str], int] = defaultdict(int)
    sync: dict[tuple[str, str], bool] = {}
    clock = time.perf_counter_ns

    def timed(name: str, hook: str, fn: Any, flow: Flow) -> None:
        t0 = clock()
        r = fn(flow)
        if r is not None:  # an awaitable: awaited the way the engine would, counted with the hook
            _await_now(r)
        times[(name, hook)] += clock() - t0
        if r is not None:
            sync[(name, hook)] = False
        else:
            sync.setdefault((name, hook), True)

    gc.collect()
    for _ in range(n):
        bench.per_hook(bench.new_flow(), entries, timed)
    out["times"] = {k: v / n / 1000 for k, v in times.items()}
    out["sync"] = sync

    # per addon and hook: Python function calls (and builtin calls)
    py: dict[tuple[str, str], int] = defaultdict(int)
    cc: dict[tuple[str, str], int] = defaultdict(int)
    cur: list[tuple[str, str]] = [("", "")]

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            py[cur[0]] += 1
        elif event == "c_call":
            cc[cur[0]] += 1

    def counted(name: str, hook: str, fn: Any, flow: Flow) -> None:
        cur[0] = (name, hook)
        sys.setprofile(prof)
        r = fn(flow)
        if r is not None:
            _await_now(r)
        sys.setprofile(None)

    for _ in range(calls_n):
        bench.per_hook(bench.new_flow(), entries, counted)
    # each addon's count includes the call to the hook itself, minus sys.setprofile's own c_call
    out["py_calls"] = {k: v / calls_n for k, v in py.items()}
    out["c_calls"] = {k: v / calls_n - 1 for k, v in cc.items()}

    # the whole chain through the manager: calls
    total = [0, 0]

    def prof_all(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            total[0] += 1
        elif event == "c_call":
            total[1] += 1

    for _ in range(calls_n):
        flow = bench.new_flow()
        sys.setprofile(prof_all)
        bench.via_manager(flow)
        sys.setprofile(None)
    cflow = [0, 0]

    def prof_c(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            cflow[0] += 1
        elif event == "c_call":
            cflow[1] += 1

    for _ in range(calls_n):
        sys.setprofile(prof_c)
        construct_only()
        sys.setprofile(None)
    out["manager_py_calls"] = (total[0] - cflow[0]) / calls_n
    out["manager_c_calls"] = (total[1] - cflow[1]) / calls_n
    return out


def _await_now(aw: Any) -> None:
    """Await a hook's awaitable that must complete without waiting (the steady state)."""
    it = aw.__await__()
    try:
        it.send(None)
    except StopIteration:
        return
    raise RuntimeError("a hook waited in the steady state")


def _timeit(fn: Any, n: int) -> float:
    gc.collect()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def report(bench: Bench, m: dict[str, Any]) -> None:
    print(f"whole chain via AddonManager.run: {m['manager_us'] - m['construct_us']:.1f} us/request "
          f"(plus {m['construct_us']:.1f} us building Flow/Request/Response), "
          f"{m['manager_py_calls']:.0f} Python calls + {m['manager_c_calls']:.0f} builtin calls/request")
    print(f"engine, upstream request head after the chain: {m['head_us']:.1f} us/request")
    print(f"{'addon':<18}{'hook':<16}{'us':>8}{'py calls':>10}{'c calls':>9}  sync")
    by_addon: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    entries = bench.entries()
    for hook in HOOKS:
        for name, _ in entries[hook]:
            k = (name, hook)
            t, p, c = m["times"].get(k, 0.0), m["py_calls"].get(k, 0.0), m["c_calls"].get(k, 0.0)
            by_addon[name][0] += t
            by_addon[name][1] += p
            by_addon[name][2] += c
            print(f"{name:<18}{hook:<16}{t:8.2f}{p:10.1f}{c:9.1f}  {'yes' if m['sync'].get(k) else 'NO'}")
    print("per addon (all hooks):")
    tot = [0.0, 0.0, 0.0]
    for name, (t, p, c) in by_addon.items():
        tot = [tot[0] + t, tot[1] + p, tot[2] + c]
        print(f"  {name:<18}{t:8.2f} us{p:8.1f} py calls{c:8.1f} c calls")
    print(f"  {'sum':<18}{tot[0]:8.2f} us{tot[1]:8.1f} py calls{tot[2]:8.1f} c calls")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20000, help="timed requests per measurement (best of 3)")
    p.add_argument("--calls", type=int, default=2000, help="requests counted with sys.setprofile")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the chain (via the manager)")
    args = p.parse_args(argv)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    bench, upstream = loop.run_until_complete(build(verbose=True))
    fetched = len(upstream.calls)
    for line in check(bench):
        print(line)
    m = measure(bench, args.n, args.calls)
    report(bench, m)
    if len(upstream.calls) != fetched:
        print(f"WARNING: {len(upstream.calls) - fetched} upstream fetches during the measurement")
    if args.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.calls):
            bench.via_manager(bench.new_flow())
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
