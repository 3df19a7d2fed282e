"""The end-to-end stack: Cyrus JMAP behind the nginx mTLS terminator (tests/e2e/stack).

.ci/run starts it and sets SGE_E2E_REQUIRED=1, so a stack that is down fails these tests instead
of skipping them.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "tests" / "e2e" / "stack"


@dataclass(frozen=True)
class Stack:
    base: Path           # the stack's state dir
    url: str             # nginx mTLS front
    certs: Path          # certs-dev: the stack trusts its CA
    admin: tuple[str, str]
    users: dict[str, str]

    @property
    def jwt_key(self) -> bytes:
        return (self.base / "etc" / "jwt.key").read_bytes()

    @property
    def smtp_sink(self) -> Path:
        return self.base / "smtp-sink"


@pytest.fixture(scope="session")
def stack() -> Stack:
    base = Path(os.environ.get("CYRUS_BASE", "/var/lib/sge-jmap-stack"))
    port = os.environ.get("TLS_PORT", "18443")
    r = subprocess.run(["bash", str(STACK / "status.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"e2e stack is not up ({r.stdout.strip()} {r.stderr.strip()}); start it: sudo {STACK}/setup.sh"
        if os.environ.get("SGE_E2E_REQUIRED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return Stack(base=base, url=f"https://127.0.0.1:{port}", certs=ROOT / "certs-dev",
                 admin=("admin", "adminpw"),
                 users={"alice@example.com": "alicepw", "bob@example.com": "bobpw"})
