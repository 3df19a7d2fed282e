"""X-SGE-* signing: canonical form, published vectors, every verification failure, the CLI, and
the header_signer addon through a real AddonManager."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from multidict import CIMultiDict

from addons.header_signer import HeaderSigner
from proxy.addonmanager import AddonManager
from proxy.config import Config
from proxy.errors import ConfigError, InternalError, Unauthorized
from proxy.flow import Flow, Request
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.signing import (EMPTY_SHA256, H_CONTENT, H_REQUEST, H_SESSION, H_SIGNATURE, H_TENANT,
                           H_TIMESTAMP, H_USER, SGE_HEADERS, UNSIGNED_PAYLOAD, KeyRing, ReplayCache,
                           SignatureError, canonical_string, content_sha256, decode_value,
                           encode_value, parse_http_request, parse_keys, sign, verify,
                           verify_signature_main)
from proxy.target import Target

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "signing.json").read_text())["vectors"]
SECRET = bytes(range(32))
SECRET_B64 = base64.b64encode(SECRET).decode()
OTHER = bytes(range(100, 132))
T0 = 1_700_000_000


# ---------------------------------------------------------------------------- independent reference
def _ref_encode(v: str | None) -> str:
    """docs/signing.md's value encoding, written independently: UTF-8, %XX for all but
    visible ASCII other than '%'."""
    visible = "".join(chr(c) for c in range(0x21, 0x7F) if c != 0x25)
    return quote(v or "", safe=visible)


def _ref_signature(vec: dict) -> tuple[str, str]:
    """The canonical string and signature header computed straight from the documented format."""
    body = vec["body"]
    content = "UNSIGNED-PAYLOAD" if body is None else hashlib.sha256(body.encode()).hexdigest()
    canonical = (f"SGE-HMAC-SHA256-V1\n{vec['method']}\n{vec['path']}\n{_ref_encode(vec['user_id'])}\n"
                 f"{_ref_encode(vec['tenant'])}\n{_ref_encode(vec['session_id'])}\n"
                 f"{_ref_encode(vec['request_id'])}\n{vec['timestamp']}\n{content}")
    mac = hmac.new(base64.b64decode(vec["secret"]), canonical.encode("utf-8"), hashlib.sha256).digest()
    sig = base64.urlsafe_b64encode(mac).decode().rstrip("=")
    return canonical, f"v1,kid={vec['key_id']},sig={sig}"


def _vec_body(vec: dict) -> bytes | None:
    return None if vec["body"] is None else vec["body"].encode()


# ---------------------------------------------------------------------------- canonical form
@pytest.mark.parametrize("raw,encoded", [
    (None, ""),
    ("", ""),
    ("alice@example.com", "alice@example.com"),
    ("8d5e7c1a-4b1f", "8d5e7c1a-4b1f"),
    ("a b", "a%20b"),
    ("50%", "50%25"),
    ("jürgen", "j%C3%BCrgen"),
    ("x\r\ny", "x%0D%0Ay"),
    ("tab\there", "tab%09here"),
    ("~!$&'()*+,;=:@[]{}|^`\"<>?/\\#", "~!$&'()*+,;=:@[]{}|^`\"<>?/\\#"),
    ("\x7f", "%7F"),
])
def test_encode_value_table(raw, encoded):
    assert encode_value(raw) == encoded
    assert decode_value(encoded) == (raw or "")
    assert encode_value(raw) == _ref_encode(raw)


@pytest.mark.parametrize("bad", ["a b", "%zz", "%c3%bc", "%41", "%C3", "50%", "x\ny", "é"])
def test_decode_value_refuses_non_canonical(bad):
    with pytest.raises(ValueError):
        decode_value(bad)


def test_encode_value_refuses_lone_surrogate():
    with pytest.raises(ValueError):
        encode_value("\ud800")


@pytest.mark.parametrize("args,expected", [
    (("GET", "/jmap/session", "alice", "", "", "r1", 5, EMPTY_SHA256),
     f"SGE-HMAC-SHA256-V1\nGET\n/jmap/session\nalice\n\n\nr1\n5\n{EMPTY_SHA256}"),
    (("POST", "/jmap/?x=1&y=%2F", "u", "acme", "s%201", "r2", 1700000000, UNSIGNED_PAYLOAD),
     "SGE-HMAC-SHA256-V1\nPOST\n/jmap/?x=1&y=%2F\nu\nacme\ns%201\nr2\n1700000000\nUNSIGNED-PAYLOAD"),
    (("get", "/", "", "", "", "r3", "0", UNSIGNED_PAYLOAD),  # method case kept as given
     "SGE-HMAC-SHA256-V1\nget\n/\n\n\n\nr3\n0\nUNSIGNED-PAYLOAD"),
])
def test_canonical_string_table(args, expected):
    assert canonical_string(*args) == expected
    assert not expected.endswith("\n")


@pytest.mark.parametrize("method,target", [("GET", "/a\nb"), ("GET", "/a\rb"), ("G\nET", "/")])
def test_canonical_string_and_sign_refuse_line_breaks(method, target):
    with pytest.raises(ValueError):
        canonical_string(method, target, "", "", "", "r", 1, UNSIGNED_PAYLOAD)
    with pytest.raises(ValueError):
        sign(KeyRing({"k1": SECRET}), method, target, user_id=None, tenant=None, session_id=None,
             request_id="r", timestamp=1, body=None)


@pytest.mark.parametrize("body,expected", [
    (None, "UNSIGNED-PAYLOAD"),
    (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
])
def test_content_sha256(body, expected):
    assert content_sha256(body) == expected


# ---------------------------------------------------------------------------- vectors
@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_sign(vec):
    ring = KeyRing({vec["key_id"]: base64.b64decode(vec["secret"])})
    headers = sign(ring, vec["method"], vec["path"], user_id=vec["user_id"], tenant=vec["tenant"],
                   session_id=vec["session_id"], request_id=vec["request_id"],
                   timestamp=vec["timestamp"], body=_vec_body(vec))
    assert dict(headers) == vec["expected"]["headers"]
    assert [n for n, _ in headers] == list(SGE_HEADERS)
    ref_canonical, ref_sig = _ref_signature(vec)
    assert ref_canonical == vec["expected"]["canonical"]
    assert ref_sig == vec["expected"]["headers"][H_SIGNATURE]


@pytest.mark.parametrize("request_id", [
    "abc-0001", "", "a b", "50%", "tab\there", "del\x7f", "nul\x00", "caf\u00e9", "~!$&'()*+,;=",
    "\"quoted\"", "x" * 200])
@pytest.mark.parametrize("body", [None, b"", b"{}", bytes(range(256))])
@pytest.mark.parametrize("target", ["/jmap", "/jmap/download/a/b?x=%2F&y=1", "/d/\udcff\udcfe"])
def test_sign_matches_the_documented_form(request_id, body, target):
    content = "UNSIGNED-PAYLOAD" if body is None else hashlib.sha256(body).hexdigest()
    canonical = "\n".join(("SGE-HMAC-SHA256-V1", "POST", target, _ref_encode("u 1"), "", _ref_encode("s%9"),
                           _ref_encode(request_id), str(T0), content))
    mac = hmac.new(SECRET, canonical.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    headers = sign(KeyRing({"k1": SECRET}), "POST", target, user_id="u 1", tenant=None, session_id="s%9",
                   request_id=request_id, timestamp=T0, body=body)
    assert headers == [(H_USER, "u%201"), (H_TENANT, ""), (H_SESSION, "s%259"),
                       (H_REQUEST, _ref_encode(request_id)), (H_TIMESTAMP, str(T0)), (H_CONTENT, content),
                       (H_SIGNATURE, f"v1,kid=k1,sig={base64.urlsafe_b64encode(mac).decode().rstrip('=')}")]


@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_verify(vec):
    keys = {vec["key_id"]: base64.b64decode(vec["secret"]), "unused": OTHER}
    got = verify(vec["method"], vec["path"], vec["expected"]["headers"], _vec_body(vec), keys,
                 now=vec["timestamp"])
    assert (got.user_id, got.tenant, got.session_id, got.request_id, got.timestamp, got.key_id) == (
        vec["user_id"], vec["tenant"], vec["session_id"], vec["request_id"], vec["timestamp"], vec["key_id"])
    # the same through a KeyRing (prepared pads) whose active key is another one
    ring = KeyRing(keys, "unused")
    assert verify(vec["method"], vec["path"], vec["expected"]["headers"], _vec_body(vec), ring,
                  now=vec["timestamp"]) == got


def test_vectors_cover_the_cases_the_doc_promises():
    names = {v["name"] for v in VECTORS}
    assert {"get-without-body", "streamed-upload-unsigned-payload", "anonymous",
            "encoded-values-and-query"} <= names
    contents = {v["expected"]["headers"][H_CONTENT] for v in VECTORS}
    assert UNSIGNED_PAYLOAD in contents and EMPTY_SHA256 in contents


# ---------------------------------------------------------------------------- verification failures
def _signed(body: bytes | None = b'{"x":1}', *, ts: int = T0, ring: KeyRing | None = None,
            target: str = "/jmap/", user: str | None = "alice") -> dict[str, str]:
    ring = ring or KeyRing({"k1": SECRET})
    return dict(sign(ring, "POST", target, user_id=user, tenant="acme", session_id="s1",
                     request_id="req-1", timestamp=ts, body=body))


def _reason(headers, body=b'{"x":1}', *, method="POST", target="/jmap/", keys=None, now=T0, **kw) -> str:
    with pytest.raises(SignatureError) as ei:
        verify(method, target, headers, body, keys or {"k1": SECRET}, now=now, **kw)
    assert isinstance(ei.value, Unauthorized) and ei.value.status == 401
    return ei.value.reason


def _with(headers: dict, **changes: str | None) -> dict:
    h = dict(headers)
    for k, v in changes.items():
        name = {"user": H_USER, "tenant": H_TENANT, "session": H_SESSION, "rid": H_REQUEST,
                "ts": H_TIMESTAMP, "content": H_CONTENT, "sig": H_SIGNATURE}[k]
        if v is None:
            del h[name]
        else:
            h[name] = v
    return h


@pytest.mark.parametrize("name", [H_REQUEST, H_TIMESTAMP, H_CONTENT, H_SIGNATURE])
def test_missing_header(name):
    h = _signed()
    del h[name]
    assert _reason(h) == "missing_header"


def test_absent_empty_identity_header_reads_as_empty():
    h = dict(sign(KeyRing({"k1": SECRET}), "GET", "/", user_id="u", tenant=None, session_id=None,
                  request_id="r", timestamp=T0, body=b""))
    del h[H_TENANT], h[H_SESSION]
    assert verify("GET", "/", h, b"", {"k1": SECRET}, now=T0).tenant is None
    h2 = dict(h)
    del h2[H_USER]  # a non-empty value dropped: the signature no longer matches
    assert _reason(h2, b"", method="GET", target="/") == "bad_signature"


def test_duplicate_header():
    h = CIMultiDict(_signed())
    h.add("x-sge-user-id", "admin")
    assert _reason(h) == "duplicate_header"


@pytest.mark.parametrize("sig", [
    "", "v2,kid=k1,sig=" + "A" * 43, "v1,kid=k1", "v1,sig=" + "A" * 43 + ",kid=k1",
    "v1,kid=k1,sig=" + "A" * 42, "v1,kid=k1,sig=" + "A" * 43 + "=", "v1,kid=k 1,sig=" + "A" * 43,
    "v1, kid=k1,sig=" + "A" * 43, "v1,kid=k1,sig=" + "+" * 43,
])
def test_malformed_signature(sig):
    assert _reason(_with(_signed(), sig=sig)) == "malformed_signature"


@pytest.mark.parametrize("change", [
    {"ts": "17e8"}, {"ts": "-1"}, {"ts": "0170"}, {"ts": ""},
    {"content": "ABC"}, {"content": EMPTY_SHA256.upper()}, {"content": "unsigned-payload"},
    {"user": "a b"}, {"tenant": "%zz"}, {"session": "%41"}, {"rid": ""},
])
def test_malformed_header(change):
    assert _reason(_with(_signed(), **change)) == "malformed_header"


def test_unknown_key():
    assert _reason(_signed(ring=KeyRing({"k9": SECRET}))) == "unknown_key"


@pytest.mark.parametrize("now", [T0 + 301, T0 - 301, T0 + 10_000])
def test_timestamp_out_of_window(now):
    assert _reason(_signed(), now=now) == "timestamp_out_of_window"


@pytest.mark.parametrize("now", [T0 + 300, T0 - 300, T0])
def test_timestamp_edges_inside_window(now):
    assert verify("POST", "/jmap/", _signed(), b'{"x":1}', {"k1": SECRET}, now=now).user_id == "alice"


def test_window_is_configurable():
    assert _reason(_signed(), now=T0 + 31, window=30) == "timestamp_out_of_window"


@pytest.mark.parametrize("kw,headers", [
    ({"method": "PUT"}, None),
    ({"target": "/jmap/?accountId=b"}, None),
    ({"target": "/jmap"}, None),
    ({"keys": {"k1": OTHER}}, None),
    ({}, {"user": "mallory"}),
    ({}, {"tenant": "globex"}),
    ({}, {"session": "s2"}),
    ({}, {"rid": "req-2"}),
    ({}, {"ts": str(T0 + 1)}),
    ({}, {"content": UNSIGNED_PAYLOAD}),
    ({}, {"sig": "v1,kid=k1,sig=" + "A" * 43}),
])
def test_bad_signature(kw, headers):
    h = _with(_signed(), **(headers or {}))
    assert _reason(h, **kw) == "bad_signature"


def test_bad_signature_for_non_canonical_base64_of_the_right_mac():
    h = _signed()
    sig = h[H_SIGNATURE]
    last = sig[-1]
    # the 43rd char carries 2 padding bits; a different char with the same 4 high bits decodes
    # to the same MAC but is not the signer's encoding
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 1]
    assert _reason(_with(h, sig=sig[:-1] + twin)) == "bad_signature"


def test_body_mismatch_and_required():
    h = _signed(b'{"x":1}')
    assert _reason(h, b'{"x":2}') == "body_mismatch"
    assert _reason(h, None) == "body_required"


def test_unsigned_payload_accepts_any_or_no_body():
    h = _signed(None)
    for body in (None, b"", b"anything"):
        assert verify("POST", "/jmap/", h, body, {"k1": SECRET}, now=T0).content_sha256 == UNSIGNED_PAYLOAD


def test_replay_within_window_then_expiry():
    seen = ReplayCache()
    h = _signed()
    verify("POST", "/jmap/", h, b'{"x":1}', {"k1": SECRET}, now=T0, seen=seen)
    assert _reason(h, now=T0 + 100, seen=seen) == "replay"
    # once the timestamp has left the window the window check refuses it, and the entry may go
    assert _reason(h, now=T0 + 301, seen=seen) == "timestamp_out_of_window"
    other = _signed(ts=T0 + 1)  # same request id, new timestamp: a different signature
    assert verify("POST", "/jmap/", other, b'{"x":1}', {"k1": SECRET}, now=T0 + 1, seen=seen)


def test_failed_verifications_are_not_remembered():
    seen = ReplayCache()
    h = _signed()
    assert _reason(h, b"tampered", seen=seen) == "body_mismatch"
    assert len(seen) == 0
    verify("POST", "/jmap/", h, b'{"x":1}', {"k1": SECRET}, now=T0, seen=seen)


def test_replay_cache_expiry_and_bound():
    c = ReplayCache(max_entries=3)
    assert c.add(("k", "a", "s"), expires=10, now=0)
    assert not c.add(("k", "a", "s"), expires=10, now=5)
    assert c.add(("k", "a", "s"), expires=30, now=11)  # expired: accepted again
    assert c.add(("k", "b", "s"), expires=30, now=11)
    assert c.add(("k", "c", "s"), expires=30, now=11)
    assert c.add(("k", "d", "s"), expires=30, now=11)  # full of live entries: oldest dropped
    assert len(c) == 3 and c.evicted == 1
    assert c.add(("k", "e", "s"), expires=50, now=31)  # full of expired entries: purged, not evicted
    assert len(c) == 1 and c.evicted == 1


# ---------------------------------------------------------------------------- keys
@pytest.mark.parametrize("mapping,key", [
    ({"k1": "short"}, "x.k1"),
    ({"k1": "!!notbase64!!"}, "x.k1"),
    ({"k 1": SECRET_B64}, "x.k 1"),
    ({"k1": 12}, "x.k1"),
    (["k1"], "x"),
])
def test_parse_keys_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError) as ei:
        parse_keys(mapping, "x")
    assert ei.value.key == key


def test_parse_keys_accepts_both_alphabets_without_padding():
    raw = bytes([0xfb, 0xff] * 16)
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert parse_keys({"a": std, "b": url}, "x") == {"a": raw, "b": raw}


def test_key_ring():
    with pytest.raises(ValueError):
        KeyRing({"a": SECRET, "b": OTHER})
    with pytest.raises(ValueError):
        KeyRing({"a": SECRET}, "b")
    ring = KeyRing({"a": SECRET, "b": OTHER}, "b")
    assert ring.active == "b" and set(ring) == {"a", "b"} and ring["a"] == SECRET
    assert ring.mac("a", b"m") == hmac.new(SECRET, b"m", hashlib.sha256).digest()
    assert ring.mac("a", b"m") == ring.mac("a", b"m")  # the prepared object is not consumed
    assert SECRET.hex() not in repr(ring) and "AAEC" not in repr(ring)


# ---------------------------------------------------------------------------- CLI
def _raw_request(vec: dict, *, chunked: bool = False) -> bytes:
    body = (vec["body"] or "streamed bytes").encode()
    lines = [f"{vec['method']} {vec['path']} HTTP/1.1", "Host: mail.example"]
    lines += [f"{k}: {v}" for k, v in vec["expected"]["headers"].items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
        payload += b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@pytest.mark.parametrize("chunked", [False, True])
def test_cli_ok(tmp_path, capsys, chunked):
    vec = VECTORS[0]
    req = tmp_path / "req.http"
    req.write_bytes(_raw_request(vec, chunked=chunked))
    rc = verify_signature_main([str(req), "--key", f"{vec['key_id']}={vec['secret']}",
                                "--now", str(vec["timestamp"] + 5)])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("OK ")
    ident = json.loads(out[3:])
    assert ident["user_id"] == vec["user_id"] and ident["tenant"] == "acme"


def test_cli_keys_file_and_failure_reasons(tmp_path, capsys):
    vec = VECTORS[0]
    req = tmp_path / "req.http"
    req.write_bytes(_raw_request(vec))
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"{vec['key_id']}: {vec['secret']}\n")
    assert verify_signature_main([str(req), "--keys-file", str(keys), "--now", str(vec["timestamp"])]) == 0
    capsys.readouterr()
    assert verify_signature_main([str(req), "--keys-file", str(keys)]) == 1  # the clock: years late
    assert capsys.readouterr().out.startswith("FAIL timestamp_out_of_window")
    assert verify_signature_main([str(req), "--key", f"other={SECRET_B64}", "--now", str(vec["timestamp"])]) == 1
    assert capsys.readouterr().out.startswith("FAIL unknown_key")
    req.write_bytes(_raw_request(vec).replace(b"Mailbox/get", b"Mailbox/set"))
    assert verify_signature_main([str(req), "--keys-file", str(keys), "--now", str(vec["timestamp"])]) == 1
    assert capsys.readouterr().out.startswith("FAIL body_mismatch")
    req.write_bytes(b"garbage")
    assert verify_signature_main([str(req), "--keys-file", str(keys)]) == 1
    assert capsys.readouterr().out.startswith("FAIL malformed_request")
    assert verify_signature_main([str(req)]) == 1
    assert capsys.readouterr().out.startswith("FAIL config")


def test_parse_http_request_bare_lf_and_no_body():
    m, t, h, b = parse_http_request(b"GET /x?y=1 HTTP/1.1\nHost: a\nX-SGE-Tenant: \n\n")
    assert (m, t, b) == ("GET", "/x?y=1", b"")
    assert h == [("Host", "a"), ("X-SGE-Tenant", "")]
    with pytest.raises(ValueError):
        parse_http_request(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort")


# ---------------------------------------------------------------------------- the addon
def _flow(method="POST", target="/jmap/", headers=(), body: bytes | None = b'{"using":[]}', *,
          identity: Identity | None = Identity(subject="u-1", email="alice@example.com",
                                               tenant="acme", session_id="sid-9"),
          content_length: int | None = None, upstream: Target | None = None) -> Flow:
    req = Request(method, target, CIMultiDict(headers), body=body)
    req.content_length = content_length if content_length is not None else (len(body) if body else None)
    f = Flow(req, id="req-42", upstream=upstream)
    f.identity = identity
    return f


async def _signer(section: dict, tmp_path: Path | None = None, clock=lambda: T0 + 0.75) -> AddonManager:
    cfg = Config(addons={"header_signer": section}, **({"base_dir": tmp_path} if tmp_path else {}))
    mgr = AddonManager(cfg, Metrics())
    await mgr.add(HeaderSigner(clock=clock))
    return mgr


async def _run(mgr: AddonManager, flow: Flow) -> Flow:
    await mgr.run("requestheaders", flow)
    await mgr.run("request", flow)
    return flow


async def test_addon_sets_headers_and_replaces_spoofed_ones():
    mgr = await _signer({"keys": {"k1": SECRET_B64}})
    f = await _run(mgr, _flow(headers=[("X-SGE-User-ID", "admin"), ("x-sge-user-id", "root"),
                                       ("X-Sge-Signature", "v1,kid=k1,sig=forged"),
                                       ("X-SGE-Something-Else", "1"), ("Accept", "*/*")]))
    h = f.request.headers
    assert h.getall(H_USER) == ["u-1"]
    assert h.getall(H_SIGNATURE) != ["v1,kid=k1,sig=forged"] and len(h.getall(H_SIGNATURE)) == 1
    assert "X-SGE-Something-Else" not in h and h["Accept"] == "*/*"
    assert (h[H_TENANT], h[H_SESSION], h[H_REQUEST], h[H_TIMESTAMP]) == ("acme", "sid-9", "req-42", str(T0))
    assert h[H_CONTENT] == hashlib.sha256(b'{"using":[]}').hexdigest()
    got = verify("POST", "/jmap/", h, b'{"using":[]}', {"k1": SECRET}, now=T0)
    assert (got.user_id, got.tenant, got.session_id, got.request_id) == ("u-1", "acme", "sid-9", "req-42")
    assert h.getall(H_USER) == ["u-1"]


async def test_addon_body_modes():
    mgr = await _signer({"keys": {"k1": SECRET_B64}})
    streamed = await _run(mgr, _flow(body=None, content_length=5000))
    assert streamed.request.body_cap is None  # auto does not force buffering
    assert streamed.request.headers[H_CONTENT] == UNSIGNED_PAYLOAD
    empty = await _run(mgr, _flow("GET", "/jmap/session", body=None))
    assert empty.request.headers[H_CONTENT] == EMPTY_SHA256
    assert verify("GET", "/jmap/session", empty.request.headers, b"", {"k1": SECRET}, now=T0)

    never = await _signer({"keys": {"k1": SECRET_B64}, "sign_body": "never"})
    f = await _run(never, _flow())
    assert f.request.headers[H_CONTENT] == UNSIGNED_PAYLOAD

    always = await _signer({"keys": {"k1": SECRET_B64}, "sign_body": "always", "body_cap": "1MiB"})
    f = _flow(body=None, content_length=10)
    await always.run("requestheaders", f)
    assert f.request.body_cap == 1 << 20
    f.request.body = b"0123456789"  # what the engine does between the two hooks
    await always.run("request", f)
    assert f.request.headers[H_CONTENT] == hashlib.sha256(b"0123456789").hexdigest()
    unbuffered = _flow(body=None, content_length=10)
    with pytest.raises(InternalError):
        await _run(always, unbuffered)
    assert H_SIGNATURE not in unbuffered.request.headers


async def test_addon_signs_anonymous_requests_and_upstream_base_path():
    mgr = await _signer({"keys": {"k1": SECRET_B64}})
    target = Target("https", "mail.example", 443, "/stalwart", "official")
    f = await _run(mgr, _flow("GET", "/.well-known/jmap", body=None, identity=None, upstream=target))
    h = f.request.headers
    assert (h[H_USER], h[H_TENANT], h[H_SESSION]) == ("", "", "")
    got = verify("GET", "/stalwart/.well-known/jmap", h, b"", {"k1": SECRET}, now=T0)
    assert got.user_id is None
    assert _reason(h, b"", method="GET", target="/.well-known/jmap") == "bad_signature"


async def test_addon_key_rotation_with_keys_file(tmp_path):
    (tmp_path / "keys.yaml").write_text(f"old: {base64.b64encode(OTHER).decode()}\nnew: {SECRET_B64}\n")
    mgr = await _signer({"keys_file": "keys.yaml", "key_id": "new"}, tmp_path)
    f = await _run(mgr, _flow())
    assert f.request.headers[H_SIGNATURE].startswith("v1,kid=new,")
    verifier_keys = {"old": OTHER, "new": SECRET}  # the server accepts both during rotation
    assert verify("POST", "/jmap/", f.request.headers, b'{"using":[]}', verifier_keys, now=T0).key_id == "new"
    signer = mgr.get("header_signer")
    signer.set_key_ring(KeyRing({"newer": OTHER}))
    f2 = await _run(mgr, _flow())
    assert f2.request.headers[H_SIGNATURE].startswith("v1,kid=newer,")


@pytest.mark.parametrize("section,key", [
    ({}, "addons.header_signer.keys"),
    ({"keys": {"k1": "c2hvcnQ="}}, "addons.header_signer.keys.k1"),
    ({"keys": {"a": SECRET_B64, "b": SECRET_B64}}, "addons.header_signer.key_id"),
    ({"keys": {"a": SECRET_B64}, "key_id": "b"}, "addons.header_signer.key_id"),
    ({"keys": {"a": SECRET_B64}, "key_id": "b c"}, "addons.header_signer.key_id"),
    ({"keys": {"a": SECRET_B64}, "sign_body": "sometimes"}, "addons.header_signer.sign_body"),
    ({"keys_file": "missing.yaml"}, "addons.header_signer.keys_file"),
])
async def test_addon_config_errors_name_the_key(section, key, tmp_path):
    with pytest.raises(ConfigError) as ei:
        await _signer(section, tmp_path)
    assert ei.value.key == key


async def test_addon_signs_the_wire_octets_of_a_non_ascii_target(tmp_path, capsys):
    """The engine decodes the request line as latin-1; the signature covers the octets it sends."""
    mgr = await _signer({"keys": {"k1": SECRET_B64}})
    wire = b"/jmap/download/a/b/caf\xc3\xa9.txt?x=\xff"
    f = await _run(mgr, _flow("GET", wire.decode("latin-1"), body=None))
    h = f.request.headers
    assert verify("GET", wire, h, b"", {"k1": SECRET}, now=T0).user_id == "u-1"
    assert verify("GET", wire.decode("utf-8", "surrogateescape"), h, b"", {"k1": SECRET}, now=T0)
    # and the CLI, reading the request as the upstream server would receive it
    head = "GET {} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    req = tmp_path / "req.http"
    req.write_bytes(head.encode().replace(b"{}", wire))
    assert verify_signature_main([str(req), "--key", f"k1={SECRET_B64}", "--now", str(T0)]) == 0
    assert capsys.readouterr().out.startswith("OK ")


@pytest.mark.parametrize("key_len", [1, 32, 43, 63, 64, 65, 200])
@pytest.mark.parametrize("msg", [b"", b"m", b"SGE-HMAC-SHA256-V1\nPOST\n/jmap/\n" * 9])
def test_hmac_pads_give_hmac_sha256(key_len, msg):
    from proxy.signing import hmac_digest, hmac_pads
    key = bytes(range(256))[:key_len] if key_len <= 256 else b""
    pads = hmac_pads(key)
    assert hmac_digest(pads, msg) == hmac.new(key, msg, hashlib.sha256).digest()
    assert hmac_digest(pads, msg) == hmac_digest(pads, msg)  # the pads are not consumed


def _raw_flow(headers=(), body: bytes | None = b'{"using":[]}') -> Flow:
    """A request as the engine builds it: the parser's bytes, no Connection header."""
    from proxy.flow import Request as Req
    req = Req("POST", "/jmap/", raw=[(n.lower().encode(), n.encode(), v.encode()) for n, v in headers],
              body=body, peer="127.0.0.1")
    req.raw_connection = False
    req.content_length = len(body) if body else None
    f = Flow(req, id="req-42")
    f.identity = Identity(subject="u-1", email="alice@example.com", tenant="acme", session_id="sid-9")
    return f


async def test_addon_signs_parser_bytes_without_building_the_headers():
    mgr = await _signer({"keys": {"k1": SECRET_B64}})
    f = _raw_flow([("Accept", "*/*"), ("X-SGE-User-ID", "admin")])  # a client's (the engine drops it)
    f.request.set_header("X-SGE-Tenant", "spoofed-by-an-addon")  # an earlier addon's edit
    f.request.set_header("X-SGE-Extra", "1")
    await _run(mgr, f)
    req = f.request
    assert not req.headers_read
    assert req.header("X-SGE-Extra") is None and req.header(H_TENANT) == "acme"
    h = req.headers  # the view the engine would forward: parser bytes scrubbed, edits applied
    assert [k for k in h if k.lower().startswith("x-sge-")] == [H_TENANT, H_USER, H_SESSION, H_REQUEST,
                                                                 H_TIMESTAMP, H_CONTENT, H_SIGNATURE]
    got = verify("POST", "/jmap/", h, b'{"using":[]}', {"k1": SECRET}, now=T0)
    assert (got.user_id, got.tenant, got.session_id, got.request_id) == ("u-1", "acme", "sid-9", "req-42")
    assert h.getall(H_USER) == ["u-1"]
