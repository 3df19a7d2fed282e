"""Calendars and contacts through the proxy: CalDAV and CardDAV against Cyrus (tests/e2e/stack)
with the full default chain, the user's JWT, and the dav_guard keeping each user to their own
collections."""
from __future__ import annotations

import base64
import os
import uuid

import aiohttp
import pytest

from tests.conftest import free_port
from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.com", "bob@example.com"
PROPFIND_PRINCIPAL = (b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:prop><D:current-user-principal/>'
                      b'</D:prop></D:propfind>')


@pytest.fixture
async def dav(stack, idp):
    port = free_port()
    eng = await start_proxy(stack.certs, stack.url, chain=None, listen=f"127.0.0.1:{port}", **{
        "stalwart.health_interval": 3600,
        "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
        "addons.upstream_identity": {"mode": "authorize-as", "admin_user": stack.admin[0], "secret": stack.admin[1]},
        "addons.header_signer": {"key_id": "e2e", "keys": {"e2e": base64.b64encode(os.urandom(32)).decode()}}})
    async with aiohttp.ClientSession() as http:
        def call(user: str, method: str, path: str, **kw):
            headers = {"Authorization": "Bearer " + idp.keys[0].token(user, email=user), **kw.pop("headers", {})}
            return http.request(method, f"http://127.0.0.1:{eng.port}{path}", headers=headers,
                                allow_redirects=False, **kw)
        yield call
    await eng.stop(drain_timeout=1)


def event(uid: str, summary: str) -> bytes:
    return (f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//sge//e2e//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\n"
            f"DTSTAMP:20261127T030000Z\r\nDTSTART:20261201T090000Z\r\nDTEND:20261201T100000Z\r\n"
            f"SUMMARY:{summary}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n").encode()


async def test_discovery_leads_to_the_users_own_home(dav):
    async with dav(ALICE, "GET", "/.well-known/caldav") as r:
        assert r.status in (301, 302, 307, 308)
        location = r.headers["Location"]
        assert location.startswith("/dav/")  # the upstream's own origin made relative
    async with dav(ALICE, "PROPFIND", location, data=PROPFIND_PRINCIPAL,
                   headers={"Depth": "0", "Content-Type": "application/xml"}) as r:
        assert r.status == 207
        assert f"/dav/principals/user/{ALICE}/".encode() in await r.read()


async def test_events_round_trip_in_the_users_calendar(dav):
    uid = uuid.uuid4().hex
    path = f"/dav/calendars/user/{ALICE}/Default/{uid}.ics"
    async with dav(ALICE, "PUT", path, data=event(uid, "Edge planning"),
                   headers={"Content-Type": "text/calendar; charset=utf-8"}) as r:
        assert r.status == 201, await r.text()
    async with dav(ALICE, "GET", path) as r:
        assert r.status == 200 and b"SUMMARY:Edge planning" in await r.read()
    query = (b'<?xml version="1.0"?><C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
             b'<D:prop><D:getetag/></D:prop><C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/>'
             b'</C:comp-filter></C:filter></C:calendar-query>')
    async with dav(ALICE, "REPORT", f"/dav/calendars/user/{ALICE}/Default/", data=query,
                   headers={"Depth": "1", "Content-Type": "application/xml"}) as r:
        assert r.status == 207 and f"{uid}.ics".encode() in await r.read()
    async with dav(ALICE, "DELETE", path) as r:
        assert r.status in (200, 204)


async def test_contacts_round_trip(dav):
    uid = uuid.uuid4().hex
    card = f"BEGIN:VCARD\r\nVERSION:3.0\r\nUID:{uid}\r\nFN:Carol Example\r\nN:Example;Carol;;;\r\nEND:VCARD\r\n"
    path = f"/dav/addressbooks/user/{ALICE}/Default/{uid}.vcf"
    async with dav(ALICE, "PUT", path, data=card.encode(), headers={"Content-Type": "text/vcard"}) as r:
        assert r.status == 201, await r.text()
    async with dav(ALICE, "GET", path) as r:
        assert r.status == 200 and b"FN:Carol Example" in await r.read()
    async with dav(ALICE, "DELETE", path) as r:
        assert r.status in (200, 204)


@pytest.mark.parametrize("method, path, headers", [
    ("PROPFIND", f"/dav/calendars/user/{BOB}/", {"Depth": "1"}),
    ("GET", f"/dav/addressbooks/user/{BOB}/Default/x.vcf", {}),
    ("PROPFIND", "/dav/calendars/user/", {"Depth": "1"}),              # everyone's homes
    ("MOVE", f"/dav/calendars/user/{ALICE}/Default/x.ics", {"Destination": f"/dav/calendars/user/{BOB}/Default/x.ics"}),
])
async def test_other_users_collections_are_refused_before_the_server(dav, method, path, headers):
    async with dav(ALICE, method, path, headers=headers) as r:
        assert r.status == 403 and r.content_type == "application/problem+json"
        doc = await r.json()
        assert doc["requestId"] == r.headers["X-Request-ID"]
