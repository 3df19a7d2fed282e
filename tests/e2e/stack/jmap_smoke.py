#!/usr/bin/python3
"""End-to-end JMAP smoke test against the Cyrus set up by setup.sh.
Stdlib only (urllib + ssl), so it runs on a bare Debian python3.

  jmap_smoke.py [--base URL] [--cacert F --cert F --key F]
                [--user U --password P] [--admin A --admin-password P]
                [--smtp-dir DIR] [--authorize-as] [--quiet]

Default base is http://127.0.0.1:18080 (Cyrus directly).  With
--base https://127.0.0.1:18443 and --cacert/--cert/--key it goes through the
nginx mTLS front.  Every check prints "PASS name" or "FAIL name: why";
exit status = number of failures.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid

USING = ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail",
         "urn:ietf:params:jmap:submission"]

p = argparse.ArgumentParser()
p.add_argument("--base", default="http://127.0.0.1:18080")
p.add_argument("--cacert")
p.add_argument("--cert")
p.add_argument("--key")
p.add_argument("--user", default="alice@example.com")
p.add_argument("--password", default="alicepw")
p.add_argument("--rcpt", default="bob@example.com")
p.add_argument("--admin", default="admin")
p.add_argument("--admin-password", default="adminpw")
p.add_argument("--smtp-dir", default="/var/lib/sge-jmap-stack/smtp-sink")
p.add_argument("--authorize-as", action="store_true",
               help="also test admin Basic auth + 'Authorize-As: USER'")
p.add_argument("--jwt-key", help="raw HS256 key file (setup.sh: $BASE/etc/jwt.key); "
               "tests 'Authorization: Bearer <JWT sub=user>'")
p.add_argument("--no-submission", action="store_true")
p.add_argument("--quiet", action="store_true")
args = p.parse_args()

ctx = None
if args.base.startswith("https"):
    ctx = ssl.create_default_context(cafile=args.cacert)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))

failures = 0


def check(name, cond, why=""):
    global failures
    if cond:
        print(f"PASS {name}")
    else:
        failures += 1
        print(f"FAIL {name}: {why}")
    return cond


def http(method, url, body=None, ctype="application/json", user=None, pw=None,
         headers=None):
    user = user or args.user
    pw = pw or args.password
    if not url.startswith("http"):
        url = args.base + url
    h = {"Authorization": "Basic " +
         base64.b64encode(f"{user}:{pw}".encode()).decode()}
    if headers:
        h.update(headers)
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h["Content-Type"] = ctype
    r = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with opener.open(r, timeout=30) as resp:
            return resp.status, resp.headers, resp.read(), resp.geturl()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read(), url


def api(calls, **kw):
    st, _h, b, _u = http("POST", session["apiUrl"],
                         {"using": USING, "methodCalls": calls}, **kw)
    if st != 200:
        raise SystemExit(f"API call failed: HTTP {st}: {b[:500]!r}")
    return json.loads(b)["methodResponses"]


def show(title, obj):
    if not args.quiet:
        print(f"--- {title}\n" + json.dumps(obj, indent=1)[:4000])


# 1. session resource via the well-known URL (Cyrus answers 301 -> /jmap)
st, h, b, final = http("GET", "/.well-known/jmap")
check("GET /.well-known/jmap -> session", st == 200, f"HTTP {st} {b[:200]!r}")
session = json.loads(b)
show(f"session (fetched {final})", session)
# Cyrus gives relative apiUrl/uploadUrl/downloadUrl; resolve against base
for k in ("apiUrl", "uploadUrl", "downloadUrl"):
    if session[k].startswith("/"):
        session[k] = args.base + session[k]
acct = session["primaryAccounts"]["urn:ietf:params:jmap:mail"]
check("capabilities include core+mail+submission",
      all(c in session["capabilities"] for c in USING),
      list(session["capabilities"]))

# 2. Mailbox/get
r = api([["Mailbox/get", {"accountId": acct, "ids": None}, "m"]])
boxes = {m["role"]: m["id"] for m in r[0][1]["list"] if m.get("role")}
show("Mailbox/get roles", boxes)
check("Mailbox/get has inbox/drafts/sent/trash",
      all(x in boxes for x in ("inbox", "drafts", "sent", "trash")), boxes)

# 3. upload a RFC 5322 message as a blob, then Email/import it into Inbox
token = uuid.uuid4().hex[:12]
msg = (f"From: Bob <{args.rcpt}>\r\nTo: Alice <{args.user}>\r\n"
       f"Subject: smoke {token}\r\nDate: Thu, 01 Jan 2026 10:00:00 +0000\r\n"
       f"Message-ID: <{token}@example.com>\r\nMIME-Version: 1.0\r\n"
       "Content-Type: text/plain; charset=utf-8\r\n\r\n"
       f"hello from the smoke test {token}\r\n").encode()
upurl = session["uploadUrl"].replace("{accountId}", acct)
st, h, b, _ = http("POST", upurl, msg, ctype="message/rfc822")
up = json.loads(b) if b else {}
check("blob upload", st in (200, 201) and "blobId" in up, f"HTTP {st} {b[:300]!r}")
show("upload response", up)
blob_id = up["blobId"]

dlurl = (session["downloadUrl"].replace("{accountId}", acct)
         .replace("{blobId}", blob_id).replace("{name}", "msg.eml")
         .replace("{type}", "message/rfc822"))
st, h, b, _ = http("GET", dlurl)
check("blob download returns the uploaded bytes", st == 200 and b == msg,
      f"HTTP {st}, {len(b)} bytes vs {len(msg)}")

r = api([["Email/import", {"accountId": acct, "emails": {
    "i1": {"blobId": blob_id, "mailboxIds": {boxes["inbox"]: True},
           "keywords": {"$seen": True}}}}, "imp"]])
imp = r[0][1]
check("Email/import", "i1" in (imp.get("created") or {}), imp)
imported_id = (imp.get("created") or {}).get("i1", {}).get("id")

# 4. Email/set create a draft
r = api([["Email/set", {"accountId": acct, "create": {"d1": {
    "mailboxIds": {boxes["drafts"]: True},
    "keywords": {"$draft": True, "$seen": True},
    "from": [{"name": "Alice", "email": args.user}],
    "to": [{"name": "Bob", "email": args.rcpt}],
    "subject": f"draft {token}",
    "bodyValues": {"b": {"value": f"draft body {token}\n"}},
    "textBody": [{"partId": "b", "type": "text/plain"}]}}}, "set"]])
cr = r[0][1]
check("Email/set create draft", "d1" in (cr.get("created") or {}), cr)
draft_id = (cr.get("created") or {}).get("d1", {}).get("id")

# 5. Email/query + Email/get with a back-reference
r = api([
    ["Email/query", {"accountId": acct,
                     "filter": {"inMailbox": boxes["inbox"]},
                     "sort": [{"property": "receivedAt", "isAscending": False}],
                     "limit": 10}, "q"],
    ["Email/get", {"accountId": acct,
                   "#ids": {"resultOf": "q", "name": "Email/query",
                            "path": "/ids"},
                   "properties": ["id", "subject", "from", "receivedAt",
                                  "blobId", "preview"]}, "g"]])
q, g = r[0][1], r[1][1]
show("Email/query + Email/get(#ids)", r)
check("Email/query finds imported email", imported_id in q.get("ids", []), q)
check("Email/get via #ids back-reference",
      any(e["subject"] == f"smoke {token}" for e in g.get("list", [])), g)

# full-text search: Xapian index is filled by the rolling squatter, so a
# just-imported message shows up after a short delay -> poll
t0 = time.time()
while True:
    r = api([["Email/query", {"accountId": acct, "filter": {"text": token}}, "t"]])
    found = imported_id in r[0][1].get("ids", [])
    if found or time.time() - t0 > 15 or "error" == r[0][0]:
        break
    time.sleep(0.2)
check(f"Email/query text filter (indexed after {time.time() - t0:.1f}s)",
      found, r[0])

# download the imported email's own blob
blob2 = next((e["blobId"] for e in g.get("list", []) if e["id"] == imported_id), None)
dl2 = (session["downloadUrl"].replace("{accountId}", acct)
       .replace("{blobId}", blob2 or "x").replace("{name}", "m.eml")
       .replace("{type}", "message/rfc822"))
st, h, b, _ = http("GET", dl2)
check("download Email blobId", st == 200 and token.encode() in b, f"HTTP {st}")

# 6. EmailSubmission/set (needs the SMTP sink)
if not args.no_submission:
    r = api([["Identity/get", {"accountId": acct}, "i"]])
    idents = r[0][1].get("list", [])
    show("Identity/get", idents)
    check("Identity/get returns an identity", bool(idents), r)
    before = set(os.listdir(args.smtp_dir)) if os.path.isdir(args.smtp_dir) else set()
    r = api([["EmailSubmission/set", {
        "accountId": acct,
        "create": {"s1": {"identityId": idents[0]["id"] if idents else "x",
                          "emailId": draft_id,
                          "envelope": {"mailFrom": {"email": args.user},
                                       "rcptTo": [{"email": args.rcpt}]}}},
        "onSuccessUpdateEmail": {"#s1": {
            f"mailboxIds/{boxes['drafts']}": None,
            f"mailboxIds/{boxes['sent']}": True,
            "keywords/$draft": None}}}, "sub"]])
    show("EmailSubmission/set", r)
    sub = r[0][1]
    check("EmailSubmission/set created", "s1" in (sub.get("created") or {}), sub)
    check("onSuccessUpdateEmail moved draft to Sent",
          len(r) > 1 and draft_id in (r[1][1].get("updated") or {}), r[1:] or r)
    got = None
    for _ in range(50):
        new = sorted(set(os.listdir(args.smtp_dir)) - before) if os.path.isdir(args.smtp_dir) else []
        emls = [f for f in new if f.endswith(".eml")]
        if emls:
            got = open(os.path.join(args.smtp_dir, emls[0]), "rb").read()
            env = json.load(open(os.path.join(args.smtp_dir, emls[0][:-4] + ".json")))
            break
        time.sleep(0.1)
    check("SMTP sink received the submitted message",
          got is not None and f"draft {token}".encode() in got,
          f"nothing new in {args.smtp_dir}")
    if got is not None:
        show("SMTP envelope", env)

# 7. admin impersonation via Authorize-As
if args.authorize_as:
    st, h, b, _ = http("GET", "/jmap/", user=args.admin, pw=args.admin_password,
                       headers={"Authorize-As": args.user})
    ok = st == 200 and json.loads(b).get("username") == args.user
    check(f"admin + 'Authorize-As: {args.user}' -> user's session", ok,
          f"HTTP {st} {b[:200]!r}")
    if ok:
        r = api([["Mailbox/get", {"accountId": acct, "ids": None,
                                  "properties": ["name", "role"]}, "m"]],
                user=args.admin, pw=args.admin_password,
                headers={"Authorize-As": args.user})
        check("Mailbox/get as admin impersonating user",
              any(m.get("role") == "inbox" for m in r[0][1].get("list", [])), r)
    st, h, b, _ = http("GET", "/jmap/", user=args.rcpt, pw="bobpw",
                       headers={"Authorize-As": args.user})
    check("non-admin 'Authorize-As' is refused", st in (401, 403), f"HTTP {st}")

# 8. JWT bearer (http_jwt_key_dir): a proxy holding the HMAC key acts as user
if args.jwt_key:
    key = open(args.jwt_key, "rb").read()

    def b64u(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    def jwt(sub, iat=None):
        h = b64u(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        pl = b64u(json.dumps({"sub": sub, "iat": int(time.time()) if iat is None
                              else iat}).encode())
        sig = b64u(hmac.new(key, f"{h}.{pl}".encode(), hashlib.sha256).digest())
        return f"{h}.{pl}.{sig}"

    def bearer_get(token):
        r = urllib.request.Request(args.base + "/jmap/",
                                   headers={"Authorization": "Bearer " + token})
        try:
            with opener.open(r, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, None

    st, body = bearer_get(jwt(args.user))
    check("JWT Bearer (sub=user) -> user's session",
          st == 200 and body and body.get("username") == args.user, f"HTTP {st}")
    st, _ = bearer_get(jwt(args.user, iat=int(time.time()) - 3600))
    check("JWT with stale iat refused", st == 401, f"HTTP {st}")
    st, _ = bearer_get(jwt(args.user)[:-4] + "AAAA")
    check("JWT with bad signature refused", st == 401, f"HTTP {st}")

print(f"{failures} failed")
sys.exit(failures)
