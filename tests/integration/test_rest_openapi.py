"""The facade's OpenAPI document is kept true: schemathesis generates requests for every operation
from the document the running proxy serves, sends them through the proxy (full default chain) to
Cyrus (tests/e2e/stack), and checks each answer's status, content type and body against the
document. Bounded: a few examples per operation, well under 30 s.

Runs as bob (the e2e REST tests use alice's mailbox the most); messages it sends go to the SMTP
sink, drafts it saves are destroyed at the end.
"""
from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port
from tests.e2e.conftest import stack  # noqa: F401  (the Cyrus stack fixture)
from tests.harness import start_proxy
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode, checks  # noqa: E402

pytestmark = pytest.mark.e2e

USER = "bob@example.com"
MAX_EXAMPLES = 12
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance]
# what the document says the server may answer with a 5xx, and this one does (Cyrus has no
# JMAP quota capability); every other 5xx is a failure
EXPECTED_5XX = {("GET", "/api/v1/mail/quota"): 501}


def run_schemathesis(base: str, token: str) -> list[str]:
    """Every operation, MAX_EXAMPLES generated cases each. Returns the operations exercised."""
    import requests

    schema = schemathesis.openapi.from_url(base + "/api/v1/openapi.json", headers={"Authorization": f"Bearer {token}"})
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    seen = []
    for result in schema.get_all_operations():
        op = result.ok()
        seen.append(op.label)

        for mode, extra in ((GenerationMode.POSITIVE, []), (GenerationMode.NEGATIVE, [checks.negative_data_rejection])):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def exercise(case: Any) -> None:
                response = case.call(base_url=base, session=http)
                wanted = [*CHECKS, *extra]
                if EXPECTED_5XX.get((case.method.upper(), case.operation.path)) == response.status_code:
                    wanted.remove(checks.not_a_server_error)
                case.validate_response(response, checks=wanted)

            exercise()
    http.close()
    return seen


async def test_openapi_document_matches_the_running_facade(stack):  # noqa: F811
    async with JwksServer() as idp:
        key = SigningKey("openapi")
        idp.publish(key)
        eng = await start_proxy(stack.certs, stack.url, chain=None, listen=f"127.0.0.1:{free_port()}", **{
            "stalwart.health_interval": 3600,
            "addons.auth": {"jwt": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}},
            "addons.upstream_identity": {"mode": "authorize-as", "admin_user": stack.admin[0],
                                         "secret": stack.admin[1]},
            "addons.header_signer": {"key_id": "t", "keys": {"t": base64.b64encode(os.urandom(32)).decode()}},
        })
        base = f"http://127.0.0.1:{eng.port}"
        token = key.token(USER, email=USER, ttl=600)
        try:
            seen = await asyncio.wait_for(asyncio.to_thread(run_schemathesis, base, token), 60)
            assert len(seen) == 11, seen
        finally:
            await _destroy_drafts(base, token)
            await eng.stop(drain_timeout=1)


async def _destroy_drafts(base: str, token: str) -> None:
    """Drafts the generated "send": false requests saved."""
    h = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=h) as http:
        async with http.get(base + "/api/v1/mail/messages?mailbox=drafts&limit=500") as r:
            doc = await r.json()
        for m in doc.get("messages", []):
            async with http.delete(f"{base}/api/v1/mail/messages/{m['id']}?permanent=true"):
                pass
