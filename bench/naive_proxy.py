#!/usr/bin/env python3
# THE NAIVE BASELINE, not part of the proxy: a verbatim copy of the calibration yardstick
# (aiohttp server + ClientSession). bench/run.py measures the project against it in the same run;
# keep it unchanged so ratios stay comparable with the calibration figures in bench/README.md.
"""Naive aiohttp reverse proxy: plain HTTP in, HTTPS + client cert (mTLS) out.

One shared ClientSession (TCPConnector(limit=100), keep-alive to the upstream),
bodies streamed in both directions, one trivial "addon" that adds a header.
Usage: naive_proxy.py PORT UPSTREAM_URL CERT_DIR [--uvloop]
"""
import asyncio
import ssl
import sys

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
       "trailer", "transfer-encoding", "upgrade", "host", "content-length"}


def addon_request(headers):  # the "addon chain": one addon that adds a header
    headers["X-Edge"] = "1"


async def main(port, upstream, certdir):
    ctx = ssl.create_default_context(cafile=f"{certdir}/ca.crt")
    ctx.load_cert_chain(f"{certdir}/client.crt", f"{certdir}/client.key")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    session = ClientSession(
        connector=TCPConnector(limit=100, ssl=ctx, keepalive_timeout=60),
        timeout=ClientTimeout(total=None, sock_connect=5, sock_read=60),
        auto_decompress=False, cookie_jar=DummyCookieJar(), skip_auto_headers=("User-Agent",))

    async def handler(req: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP}
        addon_request(headers)
        async with session.request(req.method, upstream + req.raw_path, headers=headers,
                                   data=req.content if req.body_exists else None,
                                   allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    resp.headers.add(k, v)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(req)
            async for chunk in up.content.iter_chunked(65536):
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    server = web.Server(handler, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print(f"aiohttp proxy on 127.0.0.1:{port} -> {upstream} "
          f"loop={type(asyncio.get_running_loop()).__module__}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    coro = main(int(args[0]), args[1].rstrip("/"), args[2])
    if "--uvloop" in sys.argv:
        import uvloop
        uvloop.run(coro)
    else:
        asyncio.run(coro)
