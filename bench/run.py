#!/usr/bin/env python3
"""Side-by-side benchmark: the naive baseline, nginx, and this proxy (plain and full chain).

    python bench/run.py [--duration 10] [--runs 2] [--only naive,naive-asyncio,nginx,plain,full,plain-w1,plain-w2]
                        [--workloads get2k,jmap,get1m,upload1g] [--upload-mib 1024] [--out docs-table.md]

One nginx upstream (TLS 1.3, client certificate required) on the load core with wrk; each proxy
alone on the proxy core (plain-w1 and plain-w2, the workers comparison, on both cores). Every cell
starts the proxy, probes it once, warms up, measures, stops it. The upload1g cells stream one 1 GiB
body through the proxy to upload_upstream.py and sample the proxy's RSS meanwhile. Rounds are
interleaved so that all rows share the machine's noise; only same-run ratios mean anything.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CERTS = ROOT / "certs-dev"
CERT_FILES = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")
PY = sys.executable

JWT_SECRET = "sge-bench-hs256-key-not-a-secret-0123456789abcdef"  # the same string is in configs/full.yaml
JWT_ISSUER = "https://auth.bench.invalid"
JWT_AUDIENCE = "sge-mail-proxy"
JWT_KID = "bench"
ACCOUNT_ID = "b"  # the user's primary mail account in the upstream's session (wrk/jmap.lua uses it)

START_TIMEOUT = 20.0
STOP_GRACE = 5.0
WARMUP = 2.0


# ---------------------------------------------------------------- workloads and proxies

@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    method: str
    path: str
    connections: int
    min_bytes: int  # a smaller mean response (headers included) means the proxy answered something else
    script: Path | None = None  # wrk Lua script (method, body, content type)
    upload: bool = False  # not wrk: one client streams UPLOAD_MIB through the proxy to upload_upstream.py
    tls: bool = False  # not wrk: h2load over TLS, HTTP/1.1 or HTTP/2 by the row (ProxyKind.h2load)


WORKLOADS = (
    Workload("get2k", "GET 2 KB JSON (/small.json), 64 connections", "GET", "/small.json", 64, 2000),
    Workload("jmap", "POST /jmap Mailbox/get (2 KB answer), 64 connections", "POST", "/jmap", 64, 2000,
             BENCH / "wrk" / "jmap.lua"),
    Workload("get1m", "GET 1 MiB blob (/jmap/download/...), 16 connections", "GET",
             f"/jmap/download/{ACCOUNT_ID}/Gbench1mib/large.bin?accept=application/octet-stream", 16, 1_000_000),
    Workload("upload1g", "POST 1 GiB upload (/jmap/upload/b/), one client", "POST",
             f"/jmap/upload/{ACCOUNT_ID}/", 1, 0, upload=True),
    Workload("tls2k", "GET 2 KB JSON over a TLS listener (h2load): HTTP/1.1 against HTTP/2", "GET",
             "/small.json", 64, 2000, tls=True),
)

UPLOAD_CHUNK = 1 << 20
FLAT_MIB = 30.0  # "RSS flat across the upload": peak minus start below this
WORKERS_TARGET = 1.8  # plain-w2 / plain-w1 on get2k


@dataclass(frozen=True)
class ProxyKind:
    name: str
    title: str
    workloads: tuple[str, ...]  # the workloads this row is measured on
    ours: bool = False
    workers: int = 1  # SGE_WORKERS
    all_cores: bool = False  # pinned to every core of the harness's mask (shared with wrk and the upstream)
    h2load: tuple[str, ...] = ()  # the h2load options of a TLS row

    @property
    def config(self) -> str:
        return "full" if self.name == "full" else "plain-tls" if self.h2load else "plain"


PROXIES = (
    ProxyKind("naive", "naive_proxy.py (aiohttp, uvloop)", ("get2k", "jmap", "get1m", "upload1g")),
    # the script as shipped runs on asyncio's own loop: the weaker baseline, shown but not divided by
    ProxyKind("naive-asyncio", "naive_proxy.py as shipped (asyncio loop)", ("get2k", "jmap")),
    ProxyKind("nginx", "nginx reverse proxy, 1 worker", ("get2k", "jmap", "get1m")),
    ProxyKind("plain", "sge-mail-proxy, plain forwarding", ("get2k", "jmap", "get1m", "upload1g"), ours=True),
    # the full chain only lets JMAP paths through (path allow-list): no /small.json cell
    ProxyKind("full", "sge-mail-proxy, full default chain", ("jmap", "get1m", "upload1g"), ours=True),
    # the workers comparison: both on every core, so each shares the load core with wrk and the upstream
    ProxyKind("plain-w1", "sge-mail-proxy, plain, 1 process, both cores", ("get2k",), ours=True,
              all_cores=True),
    ProxyKind("plain-w2", "sge-mail-proxy, plain, --workers 2, both cores", ("get2k",), ours=True,
              workers=2, all_cores=True),
    # downstream HTTP/2 against HTTP/1.1 on the same TLS listener (tls.http2), both by h2load
    ProxyKind("tls-h1", "sge-mail-proxy, plain, TLS, HTTP/1.1 (64 connections)", ("tls2k",), ours=True,
              h2load=("--h1", "-c64", "-m1")),
    ProxyKind("tls-h2", "sge-mail-proxy, plain, TLS, HTTP/2 (8 connections x 8 streams)", ("tls2k",), ours=True,
              h2load=("-c8", "-m8")),
)


@dataclass
class Cell:
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    bytes_read: int = 0
    non2xx: int = 0
    socket_errors: int = 0
    rss_mib: float = 0.0
    # upload cells: the proxy tree's summed VmRSS before, at most during, and after the body; MiB/s
    rss_start: float = 0.0
    rss_end: float = 0.0
    mib_s: float = 0.0
    failed: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors


# ---------------------------------------------------------------- bodies the upstream serves

def mailbox_get_answer(size: int = 2200) -> bytes:
    """A JMAP Mailbox/get response (RFC 8621 §2.1) of about `size` bytes, as Stalwart shapes it."""
    names = [("Inbox", "inbox"), ("Drafts", "drafts"), ("Sent Items", "sent"), ("Deleted Items", "trash"),
             ("Junk Mail", "junk"), ("Archive", "archive"), ("Receipts", None), ("Travel", None),
             ("Newsletters", None), ("Family", None), ("Projects", None), ("Invoices", None)]
    rights = {r: True for r in ("mayReadItems", "mayAddItems", "mayRemoveItems", "maySetSeen",
                                 "maySetKeywords", "mayCreateChild", "mayRename", "mayDelete", "maySubmit")}
    boxes: list[dict] = []
    doc = {}
    for i, (name, role) in enumerate(names):
        boxes.append({"id": "abcdefghijklmnop"[i], "name": name, "parentId": None, "role": role,
                      "sortOrder": i * 10, "totalEmails": 1200 - 97 * i, "unreadEmails": 3 * i,
                      "totalThreads": 900 - 71 * i, "unreadThreads": 2 * i, "myRights": rights,
                      "isSubscribed": True})
        doc = {"methodResponses": [["Mailbox/get", {"accountId": ACCOUNT_ID, "state": "sb7",
                                                    "list": boxes, "notFound": []}, "c0"]],
               "sessionState": "3e25b2a0"}
        if len(json.dumps(doc, separators=(",", ":"))) >= size:
            break
    return json.dumps(doc, separators=(",", ":")).encode()


def session_resource(base: str, max_upload: int = 50000000) -> bytes:
    """The JMAP session (RFC 8620 §2) naming ACCOUNT_ID as the user's primary mail account."""
    caps = {"urn:ietf:params:jmap:core": {
        "maxSizeUpload": max_upload, "maxConcurrentUpload": 4, "maxSizeRequest": 10000000,
        "maxConcurrentRequests": 4, "maxCallsInRequest": 16, "maxObjectsInGet": 500,
        "maxObjectsInSet": 500, "collationAlgorithms": ["i;ascii-numeric", "i;ascii-casemap"]},
        "urn:ietf:params:jmap:mail": {}}
    acct = {"name": "bench@example.com", "isPersonal": True, "isReadOnly": False,
            "accountCapabilities": {"urn:ietf:params:jmap:core": {}, "urn:ietf:params:jmap:mail": {
                "maxMailboxesPerEmail": None, "maxMailboxDepth": 10, "maxSizeMailboxName": 255,
                "maxSizeAttachmentsPerEmail": 50000000, "emailQuerySortOptions": ["receivedAt"],
                "mayCreateTopLevelMailbox": True}}}
    return json.dumps({
        "capabilities": caps, "accounts": {ACCOUNT_ID: acct},
        "primaryAccounts": {"urn:ietf:params:jmap:core": ACCOUNT_ID, "urn:ietf:params:jmap:mail": ACCOUNT_ID},
        "username": "bench@example.com", "apiUrl": f"{base}/jmap/",
        "downloadUrl": f"{base}/jmap/download/{{accountId}}/{{blobId}}/{{name}}?accept={{type}}",
        "uploadUrl": f"{base}/jmap/upload/{{accountId}}/",
        "eventSourceUrl": f"{base}/jmap/eventsource/?types={{types}}&closeafter={{closeafter}}&ping={{ping}}",
        "state": "3e25b2a0"}, separators=(",", ":")).encode()


def mint_jwt() -> str:
    import jwt  # PyJWT
    now = int(time.time())
    claims = {"sub": "user-bench-0001", "email": "bench@example.com", "iss": JWT_ISSUER,
              "aud": JWT_AUDIENCE, "iat": now, "nbf": now - 5, "exp": now + 6 * 3600,
              "sid": "bench-session", "roles": ["user"], "scope": "mail"}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256", headers={"kid": JWT_KID})


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(template: Path, out: Path, values: dict[str, str]) -> None:
    text = template.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise SystemExit(f"{template}: unfilled placeholders {sorted(set(left))}")
    out.write_text(text)


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (through /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def tree_rss_kib(pid: int) -> int:
    """The summed VmRSS of pid and its descendants, in KiB."""
    return sum(_status_kib(p, "VmRSS:") for p in process_tree(pid))


class RssSampler:
    """Peak resident memory of a process tree: the sum of VmRSS sampled every 100 ms, and the sum
    of VmHWM (each process's own peak) read at the end; the larger of the two is reported.
    `sampled_peak_kib` is the sampled figure alone (the upload cells' peak: VmHWM would include
    whatever the proxy reached before the sampler started)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self.sampled_peak_kib = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        hwm = sum(_status_kib(p, "VmHWM:") for p in process_tree(self.pid))
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, hwm)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_kib(self.pid)
            self.sampled_peak_kib = max(self.sampled_peak_kib, rss)
            self.peak_kib = max(self.peak_kib, rss)
            self._stop.wait(0.1)


class Processes:
    """Every process the harness starts, each in its own process group, stopped in reverse order."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "wb") as f:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 cwd=ROOT, env=env, start_new_session=True)
        self._procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> int | None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        else:  # the leader is gone; make sure nothing it left in its group lingers
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p in self._procs:
            self._procs.remove(p)
        return p.returncode

    def stop_all(self) -> None:
        for p in reversed(list(self._procs)):
            self.stop(p)


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited rc={proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout:.0f} s")


def log_reason(log: Path) -> str:
    """The most telling line of a failed process's output: an exception's message when there is a
    traceback, else the first non-empty line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    if not lines:
        return "no output"
    if any(ln.startswith("Traceback") for ln in lines):
        return lines[-1][:160]
    return lines[0][:160]


# ---------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_latency(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unreadable latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Cell:
    """Parse `wrk --latency` output into a Cell (req/s, p50, p99 in ms, error counts)."""
    cell = Cell()
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m:
        raise ValueError("no Requests/sec line in wrk output")
    cell.rps = float(m.group(1))
    m = re.search(r"^\s+(\d+) requests in [^,]+, ([\d.]+)([KMGT]?B) read", out, re.M)
    if m:
        cell.requests = int(m.group(1))
        cell.bytes_read = int(float(m.group(2)) * 1024 ** "BKMGT".index(m.group(3)[0]))
    for pct, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        if m:
            setattr(cell, attr, parse_latency(m.group(1)))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        cell.socket_errors = sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        cell.non2xx = int(m.group(1))
    return cell


def wrk_argv(cpu: int, port: int, w: Workload, seconds: float, token: str) -> list[str]:
    argv = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{w.connections}", f"-d{max(1, round(seconds))}s",
            "--latency", "--timeout", "5s", "-H", f"Authorization: Bearer {token}"]
    if w.script is not None:
        argv += ["-s", str(w.script)]
    return argv + [f"http://127.0.0.1:{port}{w.path}"]


def h2load_argv(cpu: int, port: int, w: Workload, kind: ProxyKind, seconds: float, token: str,
                log: Path | None = None) -> list[str]:
    argv = ["taskset", "-c", str(cpu), "h2load", "-t1", *kind.h2load, "-D", str(max(1, round(seconds))),
            "-H", f"Authorization: Bearer {token}"]
    if log is not None:
        argv.append(f"--log-file={log}")
    return argv + [f"https://127.0.0.1:{port}{w.path}"]


def parse_h2load(out: str, log: Path) -> Cell:
    """h2load's summary (req/s, bytes, failures, status codes) and its per-request log (p50, p99)."""
    cell = Cell()
    m = re.search(r"^finished in [\d.]+s, ([\d.]+) req/s", out, re.M)
    if not m:
        raise ValueError("no 'finished in' line in h2load output")
    cell.rps = float(m.group(1))
    m = re.search(r"^requests: (\d+) total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", out, re.M)
    if m:
        cell.requests = int(m.group(1))
        cell.socket_errors = int(m.group(2)) + int(m.group(3)) + int(m.group(4))
    m = re.search(r"^status codes: \d+ 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    if m:
        cell.non2xx = int(m.group(1)) + int(m.group(2))
    m = re.search(r"^traffic: .*?\((\d+)\) total", out, re.M)
    if m:
        cell.bytes_read = int(m.group(1))
    durations = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.count("\t") >= 2)
    if durations:
        cell.p50_ms = durations[len(durations) // 2] / 1000
        cell.p99_ms = durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1000
    return cell


def run_wrk(argv: list[str], seconds: float) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[3]} failed rc={r.returncode}: {(r.stderr or r.stdout).strip()[:200]}")
    return r.stdout


def probe(port: int, w: Workload, token: str) -> tuple[int, bytes]:
    """One request like the workload's, so that a rejecting proxy shows why before wrk hides it."""
    if w.tls:
        import ssl
        ctx = ssl.create_default_context(cafile=str(CERTS / "ca.crt"))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
        try:
            conn.request(w.method, w.path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()
    body = None
    headers = {"Authorization": f"Bearer {token}"}
    if w.script is not None:
        m = re.search(r"wrk\.body\s*=\s*'(.*?)'\s*\.\.\s*'(.*?)'", w.script.read_text(), re.S)
        body = (m.group(1) + m.group(2)).encode() if m else b""
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(w.method, w.path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def upload(port: int, path: str, token: str, nbytes: int) -> tuple[int, bytes, float]:
    """POST nbytes (Content-Length, sent in 1 MiB writes of one reused buffer) and read the answer.
    Returns (status, body, seconds from the first byte sent to the whole answer read)."""
    chunk = memoryview(os.urandom(UPLOAD_CHUNK))

    def body():
        left = nbytes
        while left > 0:
            n = min(left, UPLOAD_CHUNK)
            yield chunk[:n]
            left -= n

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        t0 = time.perf_counter()
        conn.request("POST", path, body=body(), headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream",
            "Content-Length": str(nbytes)})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.perf_counter() - t0
    finally:
        conn.close()


# ---------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
        self.args, self.tmp, self.procs = args, tmp, procs
        cpus = sorted(os.sched_getaffinity(0))
        self.proxy_cpu = cpus[0]
        self.load_cpu = cpus[1] if len(cpus) > 1 else cpus[0]
        self.single_core = len(cpus) < 2
        self.token = mint_jwt()
        self.upstream_port = 0
        self.upload_port = 0  # upload_upstream.py, the upstream of the upload cells
        self.workloads = {w.name: w for w in WORKLOADS}

    # -- the upstream
    def start_upstream(self) -> None:
        prefix = self.tmp / "upstream"
        www = prefix / "www"
        for d in (prefix / "logs", prefix / "tmp", www):
            d.mkdir(parents=True)
        self.upstream_port = free_port()
        answer = mailbox_get_answer()
        if any(c in answer for c in (b"'", b"$", b"\\")):
            raise SystemExit("the JMAP answer cannot be inlined in nginx.conf")
        (www / "small.json").write_bytes(answer)
        (www / "large.bin").write_bytes(os.urandom(1 << 20))
        (www / "session.json").write_bytes(session_resource(f"https://127.0.0.1:{self.upstream_port}"))
        conf = prefix / "nginx.conf"
        render(BENCH / "nginx" / "upstream.conf.tmpl", conf,
               {"prefix": str(prefix), "www": str(www), "certs": str(CERTS), "port": str(self.upstream_port),
                "jmap_answer": answer.decode()})
        _world_readable(self.tmp)
        log = prefix / "logs" / "stdout.log"
        p = self.procs.start(["taskset", "-c", str(self.load_cpu), "nginx", "-p", str(prefix), "-c", str(conf),
                              "-e", str(prefix / "logs" / "error.log")], log=log)
        try:
            wait_listening(self.upstream_port, p)
        except RuntimeError as e:
            raise SystemExit(f"upstream nginx did not start ({e}): {_tail(prefix / 'logs' / 'error.log')}"
                             f" {log_reason(log)}")
        # mTLS check straight to the upstream: a broken certificate set shows here, not as N failed rows
        ctx = ssl.create_default_context(cafile=str(CERTS / "ca.crt"))
        ctx.load_cert_chain(str(CERTS / "client.crt"), str(CERTS / "client.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", self.upstream_port, context=ctx, timeout=5)
        try:
            conn.request("GET", "/small.json")
            resp = conn.getresponse()
            if resp.status != 200 or resp.read() != answer:
                raise SystemExit(f"upstream check: GET /small.json answered {resp.status}")
        finally:
            conn.close()

    def start_upload_upstream(self) -> None:
        """bench/upload_upstream.py on the load core: reads each upload to its end, then answers."""
        prefix = self.tmp / "upload-upstream"
        prefix.mkdir()
        self.upload_port = free_port()
        session = prefix / "session.json"
        session.write_bytes(session_resource(f"https://127.0.0.1:{self.upload_port}",
                                             max_upload=2 * self.args.upload_mib << 20))
        log = prefix / "stdout.log"
        p = self.procs.start(["taskset", "-c", str(self.load_cpu), PY, str(BENCH / "upload_upstream.py"),
                              str(self.upload_port), str(CERTS), str(session)], log=log)
        try:
            wait_listening(self.upload_port, p)
        except RuntimeError as e:
            raise SystemExit(f"upload upstream did not start ({e}): {log_reason(log)}")

    # -- one proxy process
    def launch(self, kind: ProxyKind, cell_dir: Path, upstream_port: int) -> tuple[subprocess.Popen, int, Path]:
        port = free_port()
        cores = sorted(os.sched_getaffinity(0) | {self.proxy_cpu, self.load_cpu}) if kind.all_cores else [
            self.proxy_cpu]
        pin = ["taskset", "-c", ",".join(map(str, cores))]
        upstream = f"https://127.0.0.1:{upstream_port}"
        log = cell_dir / "proxy.log"
        # the proxy's own variables from the caller's shell must not leak into a row
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SGE_", "STALWART_"))}
        if kind.name == "naive":
            argv = pin + [PY, str(BENCH / "naive_proxy.py"), str(port), upstream, str(CERTS), "--uvloop"]
        elif kind.name == "naive-asyncio":
            argv = pin + [PY, str(BENCH / "naive_proxy.py"), str(port), upstream, str(CERTS)]
        elif kind.name == "nginx":
            prefix = cell_dir / "nginx"
            for d in (prefix / "logs", prefix / "tmp"):
                d.mkdir(parents=True)
            conf = prefix / "nginx.conf"
            render(BENCH / "nginx" / "proxy.conf.tmpl", conf,
                   {"prefix": str(prefix), "certs": str(CERTS), "port": str(port),
                    "upstream_port": str(self.upstream_port)})
            _world_readable(cell_dir)
            argv = pin + ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")]
        else:
            env.update({
                "STALWART_URL": upstream,
                "STALWART_CLIENT_CERT": str(CERTS / "client.crt"),
                "STALWART_CLIENT_KEY": str(CERTS / "client.key"),
                "STALWART_CA_CERT": str(CERTS / "ca.crt"),
                "SGE_LISTEN": f"127.0.0.1:{port}",
                "SGE_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
                "SGE_PUBLIC_URL": f"http://127.0.0.1:{port}",
                "SGE_ACCESS_LOG": str(cell_dir / "access.log"),
                "SGE_WORKERS": str(kind.workers),
            })
            if kind.config.startswith("plain"):
                env["SGE_CHAIN"] = ""  # plain forwarding: no addons
            if kind.h2load:
                env["SGE_PUBLIC_URL"] = f"https://127.0.0.1:{port}"
            argv = pin + [PY, "-m", "proxy.cli", "run", "--config", str(BENCH / "configs" / f"{kind.config}.yaml")]
        return self.procs.start(argv, log=log, env=env), port, log

    def upload_cell(self, kind: ProxyKind, w: Workload, rnd: int) -> Cell:
        """One client streams the upload through the proxy; the proxy tree's RSS is sampled
        every 100 ms meanwhile."""
        cell_dir = self.tmp / f"r{rnd}-{kind.name}-{w.name}"
        cell_dir.mkdir()
        proc, port, log = self.launch(kind, cell_dir, self.upload_port)
        nbytes = self.args.upload_mib << 20
        try:
            try:
                wait_listening(port, proc)
            except RuntimeError as e:
                return Cell(failed=f"{e}: {log_reason(log)}")
            try:  # a 1 MiB upload first: the failure shows before a GiB goes nowhere, and pools warm up
                status, body, _ = upload(port, w.path, self.token, UPLOAD_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                return Cell(failed=f"probe: {type(e).__name__}: {e}"[:160])
            if status != 201:
                detail = body[:120].decode(errors="replace").replace("\n", " ").replace("|", "/")
                return Cell(failed=f"probe answered {status}: {detail}")
            time.sleep(0.3)
            start = tree_rss_kib(proc.pid)
            with RssSampler(proc.pid) as rss:
                try:
                    status, body, seconds = upload(port, w.path, self.token, nbytes)
                except (OSError, http.client.HTTPException) as e:
                    return Cell(failed=f"upload: {type(e).__name__}: {e}"[:160])
                time.sleep(0.3)
                end = tree_rss_kib(proc.pid)
            if proc.poll() is not None:
                return Cell(failed=f"exited rc={proc.returncode} under load: {log_reason(log)}")
            if status != 201:
                detail = body[:120].decode(errors="replace").replace("\n", " ").replace("|", "/")
                return Cell(failed=f"upload answered {status}: {detail}")
            cell = Cell(rps=1 / seconds, requests=1, mib_s=nbytes / (1 << 20) / seconds,
                        rss_start=start / 1024, rss_end=end / 1024,
                        rss_mib=max(rss.sampled_peak_kib, start, end) / 1024)
            try:
                got = json.loads(body).get("size")
            except (ValueError, AttributeError):
                got = None
            if got != nbytes:
                cell.notes.append(f"upstream received {got} bytes, not {nbytes}")
            if kind.ours:
                access = cell_dir / "access.log"
                if not access.exists() or access.stat().st_size == 0:
                    cell.notes.append("access log empty")
            return cell
        finally:
            self.procs.stop(proc)
            (cell_dir / "access.log").unlink(missing_ok=True)

    def cell(self, kind: ProxyKind, w: Workload, rnd: int) -> Cell:
        if w.upload:
            return self.upload_cell(kind, w, rnd)
        cell_dir = self.tmp / f"r{rnd}-{kind.name}-{w.name}"
        cell_dir.mkdir()
        proc, port, log = self.launch(kind, cell_dir, self.upstream_port)
        try:
            try:
                wait_listening(port, proc)
            except RuntimeError as e:
                return Cell(failed=f"{e}: {log_reason(log)}")
            try:
                status, body = probe(port, w, self.token)
            except (OSError, http.client.HTTPException) as e:
                return Cell(failed=f"probe: {type(e).__name__}: {e}"[:160])
            if not 200 <= status < 300:
                detail = body[:120].decode(errors="replace").replace("\n", " ").replace("|", "/")
                return Cell(failed=f"probe answered {status}: {detail}")
            with RssSampler(proc.pid) as rss:
                if w.tls:
                    run_wrk(h2load_argv(self.load_cpu, port, w, kind, WARMUP, self.token), WARMUP)
                    latencies = cell_dir / "h2load.tsv"
                    out = run_wrk(h2load_argv(self.load_cpu, port, w, kind, self.args.duration, self.token,
                                              latencies), self.args.duration)
                else:
                    run_wrk(wrk_argv(self.load_cpu, port, w, WARMUP, self.token), WARMUP)
                    out = run_wrk(wrk_argv(self.load_cpu, port, w, self.args.duration, self.token),
                                  self.args.duration)
                if proc.poll() is not None:
                    return Cell(failed=f"exited rc={proc.returncode} under load: {log_reason(log)}")
            cell = parse_h2load(out, latencies) if w.tls else parse_wrk(out)
            cell.rss_mib = rss.peak_kib / 1024
            if cell.requests and cell.bytes_read / cell.requests < w.min_bytes:
                cell.notes.append(f"short responses: {cell.bytes_read // cell.requests} bytes on average")
            if kind.ours:
                access = cell_dir / "access.log"
                if not access.exists() or access.stat().st_size == 0:
                    cell.notes.append("access log empty")
            return cell
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            return Cell(failed=str(e)[:160])
        finally:
            self.procs.stop(proc)
            for big in ("access.log", "h2load.tsv"):
                (cell_dir / big).unlink(missing_ok=True)

    def run(self, kinds: list[ProxyKind], workloads: list[str]) -> dict[tuple[str, str], list[Cell]]:
        results: dict[tuple[str, str], list[Cell]] = {}
        for rnd in range(1, self.args.runs + 1):
            for kind in kinds:
                for wname in workloads:
                    if wname not in kind.workloads:
                        continue
                    c = self.cell(kind, self.workloads[wname], rnd)
                    results.setdefault((kind.name, wname), []).append(c)
                    print(f"round {rnd} {kind.name:8} {wname:8} {_brief(c)}", flush=True)
        return results


def _world_readable(path: Path) -> None:
    """nginx workers drop to an unprivileged user when started as root: let them read the tree."""
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            if not f.endswith(".key"):
                os.chmod(os.path.join(dirpath, f), 0o644)


def _tail(path: Path) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return ""


def _brief(c: Cell) -> str:
    if c.failed:
        return f"FAILED {c.failed}"
    if c.mib_s:
        note = f"  ({'; '.join(c.notes)})" if c.notes else ""
        return (f"{c.mib_s:8,.0f} MiB/s  rss start {c.rss_start:.0f} peak {c.rss_mib:.0f} end {c.rss_end:.0f} MiB"
                f"{note}")
    err = f"  ERRORS non2xx={c.non2xx} socket={c.socket_errors}" if c.errors else ""
    note = f"  ({'; '.join(c.notes)})" if c.notes else ""
    return f"{c.rps:10,.0f} req/s  p50 {c.p50_ms:6.2f} ms  p99 {c.p99_ms:6.2f} ms  rss {c.rss_mib:5.0f} MiB{err}{note}"


# ---------------------------------------------------------------- report

def _mean_rps(cells: list[Cell]) -> float | None:
    ok = [c.rps for c in cells if not c.failed]
    return statistics.mean(ok) if ok and len(ok) == len(cells) else None


def tables(results: dict[tuple[str, str], list[Cell]], kinds: list[ProxyKind], workloads: list[str],
           runs: int) -> str:
    out = []
    rounds = " / ".join(f"r{i}" for i in range(1, runs + 1))
    for w in WORKLOADS:
        if w.name not in workloads or w.upload:
            continue
        rows = [k for k in kinds if (k.name, w.name) in results]
        if not rows:
            continue
        base = _mean_rps(results.get(("naive", w.name), []))
        out += [f"### {w.title}", "",
                f"| proxy | req/s ({rounds}) | mean | ratio to naive | p50 ms | p99 ms | peak RSS MiB | errors |",
                "|---|--:|--:|--:|--:|--:|--:|---|"]
        for k in rows:
            cells = results[(k.name, w.name)]
            failed = [c for c in cells if c.failed]
            if failed and len(failed) == len(cells):
                out.append(f"| {k.title} | failed: {failed[0].failed} | | | | | | |")
                continue
            rps = " / ".join("failed" if c.failed else f"{c.rps:,.0f}" for c in cells)
            mean = _mean_rps(cells)
            ratio = f"{mean / base:.2f}x" if mean is not None and base else "—"
            ok = [c for c in cells if not c.failed]
            p50 = " / ".join(f"{c.p50_ms:.2f}" for c in ok)
            p99 = " / ".join(f"{c.p99_ms:.2f}" for c in ok)
            rss = f"{max(c.rss_mib for c in ok):.0f}"
            errs = []
            for i, c in enumerate(cells, 1):
                if c.failed:
                    errs.append(f"r{i} failed: {c.failed}")
                elif c.errors:
                    errs.append(f"**r{i}: {c.non2xx} non-2xx, {c.socket_errors} socket**")
                errs += [f"r{i}: {n}" for n in c.notes]
            out.append(f"| {k.title} | {rps} | {mean:,.0f} | {ratio} | {p50} | {p99} | {rss} | "
                       f"{'; '.join(errs) or 'none'} |" if mean is not None else
                       f"| {k.title} | {rps} | — | — | {p50} | {p99} | {rss} | {'; '.join(errs)} |")
        out.append("")
    out += upload_table(results, kinds, workloads, runs)
    out += workers_table(results)
    out += targets(results)
    return "\n".join(out)


def _growth(c: Cell) -> float:
    return c.rss_mib - c.rss_start


def upload_table(results: dict[tuple[str, str], list[Cell]], kinds: list[ProxyKind], workloads: list[str],
                 runs: int) -> list[str]:
    out: list[str] = []
    rounds = " / ".join(f"r{i}" for i in range(1, runs + 1))
    for w in WORKLOADS:
        if not w.upload or w.name not in workloads:
            continue
        rows = [k for k in kinds if (k.name, w.name) in results]
        if not rows:
            continue
        out += [f"### {w.title}: the proxy's RSS", "",
                "The proxy tree's summed VmRSS just before the body, its sampled maximum (every 100 ms) "
                "while the body streams, and just after the answer; the round with the larger growth "
                f"is shown. Flat: peak - start < {FLAT_MIB:.0f} MiB in every round.", "",
                f"| proxy | MiB/s ({rounds}) | start MiB | peak MiB | end MiB | peak - start | flat | notes |",
                "|---|--:|--:|--:|--:|--:|---|---|"]
        for k in rows:
            cells = results[(k.name, w.name)]
            ok = [c for c in cells if not c.failed]
            if not ok:
                out.append(f"| {k.title} | failed: {cells[0].failed} | | | | | | |")
                continue
            worst = max(ok, key=_growth)
            flat = len(ok) == len(cells) and all(_growth(c) < FLAT_MIB for c in ok)
            speeds = " / ".join("failed" if c.failed else f"{c.mib_s:,.0f}" for c in cells)
            notes = [f"r{i} failed: {c.failed}" if c.failed else "" for i, c in enumerate(cells, 1)]
            notes += [f"r{i}: {n}" for i, c in enumerate(cells, 1) for n in c.notes]
            out.append(f"| {k.title} | {speeds} | {worst.rss_start:.0f} | {worst.rss_mib:.0f} | "
                       f"{worst.rss_end:.0f} | {_growth(worst):+.0f} | {'yes' if flat else 'NO'} | "
                       f"{'; '.join(n for n in notes if n) or 'none'} |")
        out.append("")
    return out


def workers_table(results: dict[tuple[str, str], list[Cell]]) -> list[str]:
    w1, w2 = results.get(("plain-w1", "get2k")), results.get(("plain-w2", "get2k"))
    if not w1 or not w2:
        return []
    a, b = _mean_rps(w1), _mean_rps(w2)
    c = _mean_rps(results.get(("plain", "get2k"), []))
    ratio = f"{b / a:.2f}x" if a and b else "—"
    return ["### Workers: plain forwarding, 1 process against --workers 2 (GET 2 KB, 64 connections)", "",
            "Both rows may run on both cores, which wrk (one thread) and the nginx upstream share with them, "
            "so a second worker competes with the load generator for the second core. Peak RSS sums the "
            "supervisor and its workers.", "",
            f"plain-w2 / plain-w1 = **{ratio}** (target >= {WORKERS_TARGET}x), see the GET 2 KB table for the "
            "per-round figures." + (f" Against `plain` pinned alone to the proxy core: plain-w2 / plain = "
                                    f"{b / c:.2f}x, plain-w1 / plain = {a / c:.2f}x." if a and b and c else ""), ""]


def targets(results: dict[tuple[str, str], list[Cell]]) -> list[str]:
    """The project's performance targets, checked against this run."""
    def mean(k: str, w: str) -> float | None:
        return _mean_rps(results.get((k, w), [])) if results.get((k, w)) else None

    def clean(k: str, w: str) -> bool:
        return all(not c.failed and not c.errors for c in results.get((k, w), []))

    lines = ["### Targets", "", "| target | measured | met |", "|---|---|---|"]

    def ratio_row(label: str, k: str, w: str, need: float, base: str = "naive") -> None:
        a, b = mean(k, w), mean(base, w)
        if a is None or b is None:
            lines.append(f"| {label} | not measured | — |")
            return
        r = a / b
        met = r >= need and clean(k, w)
        lines.append(f"| {label} | {r:.2f}x{'' if clean(k, w) else ' (with errors)'} | {'yes' if met else 'NO'} |")

    ratio_row("plain forwarding >= 4x naive, GET 2 KB", "plain", "get2k", 4.0)
    ratio_row("plain forwarding >= 5x naive, GET 2 KB (the hot-path issue's bar)", "plain", "get2k", 5.0)
    ratio_row("full chain >= 4x naive, POST /jmap", "full", "jmap", 4.0)
    ratio_row("(plain against naive_proxy.py as shipped, asyncio loop, GET 2 KB: >= 4x)", "plain", "get2k", 4.0,
              base="naive-asyncio")
    ratio_row("(full chain against naive_proxy.py as shipped, POST /jmap: >= 4x)", "full", "jmap", 4.0,
              base="naive-asyncio")
    for k in ("plain", "full"):
        p99s = [c.p99_ms for w in ("get2k", "jmap") for c in results.get((k, w), []) if not c.failed]
        if p99s:
            worst = max(p99s)
            lines.append(f"| {k}: p99 at 64 connections <= 20 ms | worst {worst:.2f} ms | "
                         f"{'yes' if worst <= 20 else 'NO'} |")
        else:
            lines.append(f"| {k}: p99 at 64 connections <= 20 ms | not measured | — |")
    ratio_row("plain forwarding, 1 MiB no worse than naive", "plain", "get1m", 1.0)
    ratio_row("full chain, 1 MiB no worse than naive", "full", "get1m", 1.0)
    ratio_row("plain forwarding, 1 MiB >= 0.9x nginx", "plain", "get1m", 0.9, base="nginx")
    ratio_row("full chain, 1 MiB >= 0.9x nginx", "full", "get1m", 0.9, base="nginx")
    for k in ("plain", "full"):
        cells = results.get((k, "upload1g"), [])
        label = f"{k}: RSS flat across a 1 GiB upload (peak - start < {FLAT_MIB:.0f} MiB)"
        if not cells or any(c.failed for c in cells):
            lines.append(f"| {label} | {'failed' if cells else 'not measured'} | — |")
            continue
        worst = max(_growth(c) for c in cells)
        clean = all(not c.notes for c in cells)
        lines.append(f"| {label} | {worst:+.0f} MiB{'' if clean else ' (see notes)'} | "
                     f"{'yes' if worst < FLAT_MIB and clean else 'NO'} |")
    a, b = mean("plain-w1", "get2k"), mean("plain-w2", "get2k")
    label = f"2 workers >= {WORKERS_TARGET}x one worker, GET 2 KB (2 cores shared with wrk and the upstream)"
    if a is None or b is None:
        lines.append(f"| {label} | not measured | — |")
    else:
        ok = b / a >= WORKERS_TARGET and clean("plain-w1", "get2k") and clean("plain-w2", "get2k")
        lines.append(f"| {label} | {b / a:.2f}x ({b:,.0f} / {a:,.0f} req/s) | {'yes' if ok else 'NO'} |")
    return lines


def machine(args: argparse.Namespace, bench: Bench) -> str:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__} available (naive runs with --uvloop)"
    except ImportError:
        loop = "uvloop not installed"
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1:2]
    lines = [
        f"- machine: {os.cpu_count()} CPUs (nproc), {model}; {platform.system()} {platform.release()}",
        f"- python {platform.python_version()} ({PY}); {loop}",
        f"- nginx {nginx_v}, wrk {' '.join(wrk_v)}",
        f"- proxy on core {bench.proxy_cpu}; wrk (-t1) and the nginx upstream on core {bench.load_cpu}"
        + ("  **single core: proxy and load share it, not comparable to the targets**" if bench.single_core else ""),
        f"- plain-w1 and plain-w2 may use cores {bench.proxy_cpu},{bench.load_cpu} (shared with wrk and the upstream)",
        f"- upload: {args.upload_mib} MiB from the harness (core {bench.load_cpu}) through the proxy to "
        f"upload_upstream.py (core {bench.load_cpu})",
        f"- {args.runs} round(s), {args.duration:g} s per cell after a {WARMUP:g} s warm-up; rounds interleaved",
        f"- date {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- prerequisites

def check_prerequisites(tools: tuple[str, ...] = ("nginx", "wrk", "taskset")) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = {"nginx": "nginx", "wrk": "wrk", "taskset": "util-linux", "h2load": "nghttp2-client"}
        raise SystemExit(
            f"missing tools: {', '.join(missing)}.\n"
            f"Debian/Ubuntu: apt-get install -y --no-install-recommends {' '.join(pkgs[m] for m in missing)}")
    for mod in ("jwt", "uvloop", "aiohttp"):
        try:
            __import__(mod)
        except ImportError:
            raise SystemExit(f"{PY} lacks the '{mod}' package: run the bench with the project's virtualenv "
                             f"(pip install -e .[dev])") from None
    if not all((CERTS / f).exists() for f in CERT_FILES):
        if (ROOT / "proxy" / "devcerts.py").exists():
            print("certs-dev incomplete: running python -m proxy.devcerts", flush=True)
            subprocess.run([PY, "-m", "proxy.devcerts"], cwd=ROOT, check=True)
        if not all((CERTS / f).exists() for f in CERT_FILES):
            raise SystemExit(f"certs-dev/ lacks {', '.join(f for f in CERT_FILES if not (CERTS / f).exists())}: "
                             f"run `python -m proxy.devcerts` from {ROOT}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per cell (default 10)")
    ap.add_argument("--runs", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--only", default=None,
                    help="proxies to run, comma-separated: naive,nginx,plain,full,plain-w1,plain-w2,"
                         "tls-h1,tls-h2 (ratios need naive)")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                    help="workloads, comma-separated: get2k,jmap,get1m,upload1g,tls2k")
    ap.add_argument("--upload-mib", type=int, default=1024, help="size of the upload1g body in MiB (default 1024)")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, proxy logs) for inspection")
    args = ap.parse_args(argv)
    if args.only is None:  # every row; the h2load ones only where h2load is installed
        args.only = ",".join(p.name for p in PROXIES if not p.h2load or shutil.which("h2load"))
        if not shutil.which("h2load"):
            print("h2load not found: the tls-h1 and tls-h2 rows are left out (apt-get install nghttp2-client)",
                  flush=True)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - {p.name for p in PROXIES}
    wnames = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown |= set(wnames) - {w.name for w in WORKLOADS}
    if unknown:
        ap.error(f"unknown names: {', '.join(sorted(unknown))}")
    if args.runs < 1 or args.duration < 1 or args.upload_mib < 1:
        ap.error("--runs, --duration and --upload-mib must be at least 1")
    kinds = [p for p in PROXIES if p.name in names]
    tls_cells = any(k.h2load and "tls2k" in wnames for k in kinds)
    check_prerequisites(("nginx", "wrk", "taskset", "h2load") if tls_cells else ("nginx", "wrk", "taskset"))

    # SIGTERM unwinds like Ctrl-C so that the finally below stops every process
    signal.signal(signal.SIGTERM, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="sge-bench-"))
    procs = Processes()
    try:
        bench = Bench(args, tmp, procs)
        # the harness itself (its RSS sampler included) stays off the proxy's core
        os.sched_setaffinity(0, {bench.load_cpu})
        bench.start_upstream()
        if any(w in k.workloads for k in kinds for w in wnames if bench.workloads[w].upload):
            bench.start_upload_upstream()
        print(f"upstream nginx on 127.0.0.1:{bench.upstream_port} (core {bench.load_cpu}); "
              f"proxies on core {bench.proxy_cpu}; temp dir {tmp}", flush=True)
        results = bench.run(kinds, wnames)
        report = "\n".join([machine(args, bench), "", tables(results, kinds, wnames, args.runs)])
        print("\n" + report)
        if args.out:
            args.out.write_text("## Benchmark\n\n" + report + "\n")
            print(f"\nwritten to {args.out}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
