#!/usr/bin/env python3
"""The bench upstream for the 1 GiB upload workload: reads every upload body to its end, keeps none of it.

    upload_upstream.py PORT CERT_DIR SESSION_JSON_FILE

TLS 1.3 only, client certificate required (trusting CERT_DIR/ca.crt), keep-alive, uvloop. nginx cannot
stand in here: `return` answers before the body has arrived (it discards the body afterwards), and
`proxy_pass` or `client_body_in_file_only` would put the upstream's own buffering or disk in the
measurement. This server answers only once it has read the whole body, so the client's timing covers
the body's whole way through the proxy.

- POST /jmap/upload/{accountId}/  -> 201 {"accountId", "blobId", "type", "size"} once the body is read
  (Content-Length or chunked; `size` is the byte count received, which run.py checks)
- GET /.well-known/jmap, /jmap/session -> SESSION_JSON_FILE (its maxSizeUpload must exceed the upload)
- any other GET                   -> 200 {"status":"ok"} (health probes)
- anything else                   -> 404
"""
from __future__ import annotations

import asyncio
import json
import ssl
import sys

import httptools
import uvloop

OK = b'{"status":"ok"}'


def _answer(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


class Discard(asyncio.Protocol):
    def __init__(self, session: bytes) -> None:
        self.session = session
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.size = 0
        self.ctype = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(_answer("400 Bad Request", b'{"error":"bad request"}'))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.size, self.ctype = b"", 0, b"application/octet-stream"

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.ctype = value

    def on_body(self, body: bytes) -> None:
        self.size += len(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        parts = path.split(b"/")
        if method == b"POST" and path.startswith(b"/jmap/upload/") and len(parts) >= 4 and parts[3]:
            body = json.dumps({"accountId": parts[3].decode(), "blobId": f"Gup{self.size:x}",
                               "type": self.ctype.decode(errors="replace"), "size": self.size}).encode()
            out = _answer("201 Created", body)
        elif method == b"GET" and path in (b"/jmap/session", b"/.well-known/jmap"):
            out = _answer("200 OK", self.session)
        elif method == b"GET":
            out = _answer("200 OK", OK)
        else:
            out = _answer("404 Not Found", b'{"error":"not found"}')
        self.transport.write(out)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def main(port: int, certdir: str, session: bytes) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=f"{certdir}/ca.crt")
    ctx.load_cert_chain(f"{certdir}/server.crt", f"{certdir}/server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Discard(session), "127.0.0.1", port, ssl=ctx, backlog=128)
    print(f"upload upstream on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with open(sys.argv[3], "rb") as f:
        doc = f.read()
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], doc))
