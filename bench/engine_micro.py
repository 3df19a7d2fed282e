#!/usr/bin/env python3
"""Microbenchmark of the engine's own Python per request: plain forwarding (no addons), without
sockets or TLS. Not a test.

    python bench/engine_micro.py [-n 50000] [-c 16] [--access-log off|FILE] [--profile] [--full]

A real Engine from bench/configs/plain.yaml, and `-c` pairs of a real HttpProtocol and a real
pooled UpstreamConnection, joined by in-memory transports. Each round feeds every client
connection the bytes wrk sends for GET /small.json, turns the event loop once (the deferred
starts run), feeds every upstream connection the bytes the bench nginx answers (a 2.2 KB body)
and turns it again (the answers go out): `-c` requests per turn, as under load. It prints
microseconds per request (an empty round of the same harness is measured alongside, to subtract)
and, with --profile, cProfile's view of one run. With --full it is the bench row "full" instead:
bench/configs/full.yaml's default chain, wrk/jmap.lua's POST /jmap with bench/run.py's token, and
the bench upstream's Mailbox/get answer (the JMAP guard's session comes from chain_micro.py's
fetcher during the warm-up, as the bench nginx would serve it). For instruction counts that do not depend on the
machine's noise, run it under valgrind:

    python bench/engine_micro.py -n 10 --quiet          # first: compile the .pyc files
    valgrind --tool=callgrind python bench/engine_micro.py -n 100 --quiet
    valgrind --tool=callgrind python bench/engine_micro.py -n 300 --quiet

and divide the difference of the two totals by 200 x c. (Without the first line the 100 run also
pays for compiling whatever changed, and the difference comes out too small.)
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REQUEST = b"GET /small.json HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer x\r\n\r\n"
BODY = b"x" * 2200
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 15:40:00 GMT\r\n"
          b"Content-Type: application/json\r\nContent-Length: 2200\r\n"
          b"Last-Modified: Thu, 26 Nov 2026 15:20:00 GMT\r\nConnection: keep-alive\r\n"
          b"ETag: \"6a8f-898\"\r\nAccept-Ranges: bytes\r\n\r\n") + BODY


class MemoryTransport:
    """What the protocols write goes to a list."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading


async def main(args: argparse.Namespace) -> None:
    from proxy.config import load_config
    from proxy.engine import Engine
    from proxy.server import HttpProtocol
    from proxy.upstream import UpstreamConnection

    certs = ROOT / "certs-dev"
    if not (certs / "client.crt").exists():
        from proxy import devcerts
        devcerts.generate(certs)
    env = {"STALWART_URL": "https://127.0.0.1:8443", "SGE_ACCESS_LOG": args.access_log,
           "STALWART_CLIENT_CERT": str(certs / "client.crt"), "STALWART_CLIENT_KEY": str(certs / "client.key"),
           "STALWART_CA_CERT": str(certs / "ca.crt")}
    if not args.full:
        env["SGE_CHAIN"] = ""
    global REQUEST, ANSWER
    if args.full:
        sys.path.insert(0, str(ROOT / "bench"))
        import chain_micro
        import run as bench_run
        REQUEST = (b"POST /jmap HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer "
                   + bench_run.mint_jwt().encode() + b"\r\nContent-Type: application/json\r\n"
                   b"Accept: application/json\r\nContent-Length: " + str(len(chain_micro.BODY)).encode()
                   + b"\r\n\r\n" + chain_micro.BODY)
        answer = bench_run.mailbox_get_answer()
        ANSWER = ANSWER.replace(b"Content-Length: 2200", b"Content-Length: %d" % len(answer))[:-len(BODY)] + answer
    eng = Engine(load_config(ROOT / "bench" / "configs" / ("full.yaml" if args.full else "plain.yaml"), env=env))
    await eng.load_addons()
    if args.full:  # the session the guard fetches once, as the bench upstream serves it
        eng.addons.fetcher = chain_micro.Upstream()
    await eng.addons.running()
    eng.access_log.start()
    target = eng.default_target
    idle = eng.pool._idle[target.key] = []
    eng.pool._count[target.key] = args.c
    pairs = []
    conns = []
    for _ in range(args.c):
        conn = UpstreamConnection(eng.pool, target, eng.tls.generation)
        conn.connection_made(MemoryTransport())  # type: ignore[arg-type]
        idle.append(conn)
        conns.append(conn)
        proto = HttpProtocol(eng, "http")
        proto.connection_made(MemoryTransport())  # type: ignore[arg-type]
        pairs.append(proto)
    turn = asyncio.sleep

    async def request() -> None:
        for proto in pairs:
            proto.data_received(REQUEST)
        await turn(0)
        if warming:  # the first requests may wait (token verification, the session fetch): their
            # Tasks take connections from the pool; answer those
            for _ in range(20):
                await asyncio.sleep(0.001)
            for conn in conns:
                if conn not in idle:
                    conn.data_received(ANSWER)
            for _ in range(20):
                await asyncio.sleep(0.001)
            return
        for proto in pairs:
            proto._upstream.data_received(ANSWER)  # the connection this request took
        await turn(0)

    async def empty() -> None:
        await turn(0)
        await turn(0)

    warming = True
    for _ in range(500):
        await request()
        warming = False
    for proto in pairs:
        if not proto.transport.out[-1].endswith(ANSWER[-len(BODY):]):
            raise SystemExit("the engine did not forward the request and answer as expected")
    results = {}
    for label, fn in (("empty turns", empty), ("request", request)) * (1 if args.quiet else 2):
        for proto in pairs:
            proto.transport.out.clear()
        t0 = time.perf_counter()
        for _ in range(args.n):
            await fn()
        results[label] = (time.perf_counter() - t0) / args.n / args.c * 1e6
        if not args.quiet:
            print(f"{label:12s} {results[label]:7.2f} µs")
    if not args.quiet:
        print(f"engine per request: {results['request'] - results['empty turns']:.2f} µs "
              f"(request minus empty turns)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.n):
            await request()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    await eng.access_log.close()
    await eng.pool.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="rounds per measurement")
    ap.add_argument("-c", type=int, default=16, help="connections: requests per round (per loop turn)")
    ap.add_argument("--access-log", default=os.devnull, help="off, or a file (default: /dev/null)")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's view of one run")
    ap.add_argument("--full", action="store_true", help="the full default chain and POST /jmap (row 'full')")
    ap.add_argument("--quiet", action="store_true", help="one measurement, no output (for callgrind)")
    import uvloop
    uvloop.run(main(ap.parse_args()))
