"""The `sge-mail-proxy` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Sequence

from .errors import ConfigError

__all__ = ["main", "serve"]

log = logging.getLogger("sge.proxy")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML configuration file")
    p.add_argument("--dev", action="store_true",
                   help="the embedded development default: certs-dev certificates, the local JMAP stack")
    p.add_argument("--listen", help="HOST:PORT of the proxy (SGE_LISTEN)")
    p.add_argument("--admin-listen", help="HOST:PORT of the admin listener (SGE_ADMIN_LISTEN)")
    p.add_argument("--upstream", help="the official server's base URL (STALWART_URL)")
    p.add_argument("--chain", help="comma-separated addon names replacing the default chain ('' = none)")
    p.add_argument("--addon", action="append", default=[], metavar="FILE",
                   help="an addon file (repeatable); hot-reloaded when it changes")
    p.add_argument("--access-log", help="'-' (stdout), 'off', or a file")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--workers", type=int, help="processes sharing the listener, under a supervisor (SGE_WORKERS)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # INDEX:SOCKET, set by the supervisor for its workers


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {
        "listen": ns.listen, "admin_listen": ns.admin_listen, "stalwart.url": ns.upstream,
        "access_log": ns.access_log, "log_level": ns.log_level, "workers": ns.workers,
    }
    if ns.chain is not None:
        o["chain"] = [c.strip() for c in ns.chain.split(",") if c.strip()]
    return o


def build_config(ns: argparse.Namespace):
    from .config import load_config
    base = None
    if ns.dev:
        from .devconfig import dev_base
        base = dev_base()
    return load_config(ns.config, overrides=_overrides(ns), base=base)


async def serve(config, addon_files: Sequence[str] = (), *, on_ready=None, loader=None,
                worker: tuple[int, str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; drain; return the exit status. `loader` re-reads the configuration
    for a reload (SIGHUP, POST /reload). `worker` (index, unix socket) runs it as one of a
    supervisor's workers: on the shared port, its admin listener on that private socket."""
    from .admin import AdminServer
    from .engine import Engine

    engine = Engine(config, addon_files=tuple(addon_files), config_loader=loader)
    if worker is not None:
        engine.worker = engine.audit.worker = worker[0]
    await engine.start()
    admin = AdminServer(engine, unix_path=worker[1] if worker is not None else None)
    await admin.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task] = set()

    def keep(coro) -> None:
        t = loop.create_task(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, lambda: keep(engine.reload()))
    proto = "https" if config.tls.enabled else "http"
    chain = ", ".join(type(a).__name__ for a in engine.addons.addons)
    if worker is None:
        log.info("listening on %s:%d (%s), admin on %s, upstream %s, chain [%s]",
                 config.listen_addr[0], engine.port, proto, f"{config.admin_addr[0]}:{admin.port}",
                 engine.default_target, chain)
    else:
        log.info("worker %d (pid %d) serving on %s:%d (%s), upstream %s, chain [%s]", worker[0], os.getpid(),
                 config.listen_addr[0], engine.port, proto, engine.default_target, chain)
        keep(_watch_parent(os.getppid(), stop))
    if on_ready is not None:
        on_ready(engine, admin)
    await stop.wait()
    log.info("shutting down: draining %d in-flight requests (at most %.0fs)", engine.in_flight,
             engine.config.drain_timeout)
    clean = await engine.stop()
    await admin.stop()
    for t in list(tasks):
        t.cancel()
    log.info("stopped%s", "" if clean else " (drain timed out)")
    return 0


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor is gone (killed outright) drains and exits instead of serving on."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the supervisor (pid %d) is gone: stopping", parent)
    stop.set()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _loop_runner():
    try:
        import uvloop
        return uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run


def cmd_run(ns: argparse.Namespace) -> int:
    # a SIGHUP before the reload handler is installed must not kill a starting proxy (or worker:
    # the disposition is inherited; a worker reads the newest configuration as it starts anyway)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = build_config(ns)
    _setup_logging(cfg.log_level)

    def loader():
        return build_config(ns)

    if ns.worker is not None:  # one of a supervisor's workers
        index, _, path = ns.worker.partition(":")
        return _loop_runner()(serve(cfg, ns.addon, loader=loader, worker=(int(index), path)))
    if cfg.workers > 1:
        from .workers import Supervisor
        return _loop_runner()(Supervisor(cfg, ns.run_args, loader).run())
    on_ready = None
    if ns.dev:
        from .devconfig import print_welcome
        on_ready = print_welcome
    return _loop_runner()(serve(cfg, ns.addon, on_ready=on_ready, loader=loader))


def cmd_check_config(ns: argparse.Namespace) -> int:
    """Validate everything that can be validated without serving: values, files, addons' options."""
    cfg = build_config(ns)

    async def check() -> None:
        from .engine import Engine
        engine = Engine(cfg, addon_files=tuple(ns.addon))
        try:
            await engine.load_addons()
        finally:
            await engine.addons.done()

    asyncio.run(check())
    print(f"configuration OK ({cfg.source or 'defaults'}): upstream {cfg.default_target()}, "
          f"listen {cfg.listen}, admin {cfg.admin_listen}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = {
        "dev-certs": ("proxy.devcerts", "main"),
        "verify-signature": ("proxy.signing", "verify_signature_main"),
        "hash-api-key": ("addons.auth", "hash_api_key_main"),
        "dev-token": ("proxy.devconfig", "dev_token_main"),
    }
    if argv and argv[0] in passthrough:
        import importlib
        mod, fn = passthrough[argv[0]]
        return getattr(importlib.import_module(mod), fn)(argv[1:])
    parser = argparse.ArgumentParser(prog="sge-mail-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    _run_args(sub.add_parser("run", help="run the proxy (the default)"))
    _run_args(sub.add_parser("check-config", help="validate the configuration and exit"))
    for name in passthrough:
        sub.add_parser(name, help=f"see `sge-mail-proxy {name} --help`")
    if not argv or argv[0].startswith("-"):
        argv = ["run", *argv]
    ns = parser.parse_args(argv)
    ns.run_args = argv[1:]  # what a --workers supervisor starts its workers with
    try:
        if ns.cmd == "check-config":
            return cmd_check_config(ns)
        return cmd_run(ns)
    except ConfigError as e:
        print(f"sge-mail-proxy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
