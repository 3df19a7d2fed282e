"""The addon chain: hook order, short-circuit, sync/async, fail-closed, file hot reload."""
from __future__ import annotations

import os
import textwrap
import time

import pytest
from multidict import CIMultiDict

from proxy.addonmanager import AddonManager, resolve_spec
from proxy.config import load_config
from proxy.errors import ConfigError, Forbidden, InternalError
from proxy.flow import Flow, Request, Response
from proxy.metrics import Metrics


def make_flow(method="GET", target="/jmap/") -> Flow:
    return Flow(Request(method, target, CIMultiDict()), id="req-00000001")


@pytest.fixture
def mgr():
    return AddonManager(load_config(None, env={}), Metrics())


class Recorder:
    def __init__(self, name, log, *, is_async=False, answer=False, security=False):
        self.name, self.log, self.answer, self.security = name, log, answer, security
        if is_async:
            async def request(flow):
                self.log.append((self.name, "request"))
                if self.answer:
                    flow.response = Response.make(204)
            self.request = request
        else:
            def request(flow):
                self.log.append((self.name, "request"))
                if self.answer:
                    flow.response = Response.make(204)
            self.request = request

    def response(self, flow):
        self.log.append((self.name, "response"))


async def test_hooks_run_in_chain_order_sync_and_async(mgr):
    log = []
    await mgr.add(Recorder("a", log), Recorder("b", log, is_async=True), Recorder("c", log))
    flow = make_flow()
    await mgr.run("request", flow)
    await mgr.run("response", flow)
    assert log == [("a", "request"), ("b", "request"), ("c", "request"),
                   ("a", "response"), ("b", "response"), ("c", "response")]


@pytest.mark.parametrize("answering", ["a", "b"])
async def test_setting_response_short_circuits_the_request_hooks(mgr, answering):
    log = []
    await mgr.add(*(Recorder(n, log, is_async=(n == "b"), answer=(n == answering)) for n in "abc"))
    flow = make_flow()
    await mgr.run("request", flow)
    assert flow.response is not None and flow.response.status == 204
    assert [n for n, _ in log] == list("abc"[: "abc".index(answering) + 1])


async def test_lifecycle_hooks_called_with_loader_and_updated(mgr):
    seen = {}

    class A:
        name = "lifecycle"

        def load(self, loader):
            seen["loader"] = loader

        async def configure(self, updated):
            seen["updated"] = updated

        def done(self):
            seen["done"] = True

    await mgr.add(A())
    assert seen["loader"].config is mgr.config and seen["updated"] == {"*"}
    await mgr.done()
    assert seen["done"]


class Boom:
    def __init__(self, security):
        self.security = security
        self.name = "boom_sec" if security else "boom"

    def request(self, flow):
        raise ValueError("bug")


async def test_security_addon_exception_fails_closed_and_is_counted(mgr):
    after = []
    await mgr.add(Boom(True), Recorder("after", after))
    with pytest.raises(InternalError) as ei:
        await mgr.run("request", make_flow())
    assert ei.value.status == 500
    assert after == []  # nothing after it ran: never open
    assert mgr.metrics.registry.get_sample_value(
        "sge_proxy_addon_errors_total", {"addon": "boom_sec", "hook": "request", "closed": "true"}) == 1


async def test_ordinary_addon_exception_is_logged_and_chain_continues(mgr):
    after = []
    await mgr.add(Boom(False), Recorder("after", after))
    await mgr.run("request", make_flow())
    assert after == [("after", "request")]
    assert mgr.metrics.registry.get_sample_value(
        "sge_proxy_addon_errors_total", {"addon": "boom", "hook": "request", "closed": "false"}) == 1


async def test_proxy_error_passes_through_as_an_answer(mgr):
    class Deny:
        security = True

        def request(self, flow):
            raise Forbidden("no")

    await mgr.add(Deny())
    with pytest.raises(Forbidden):
        await mgr.run("request", make_flow())


@pytest.mark.parametrize("entry,kind,ref", [
    ("auth", "object", "addons.auth:Auth"),
    ("mypkg.mod:Thing", "object", "mypkg.mod:Thing"),
    ("./my_addon.py", "file", "./my_addon.py"),
    ("/abs/x.py", "file", "/abs/x.py"),
])
def test_resolve_spec(entry, kind, ref):
    spec = resolve_spec(entry, {"auth": "addons.auth:Auth"})
    assert (spec.kind, spec.ref) == (kind, ref)


def test_resolve_spec_unknown_name_names_the_builtins():
    with pytest.raises(ConfigError, match="unknown addon 'nope'.*auth"):
        resolve_spec("nope", {"auth": "addons.auth:Auth"})


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    # make sure the mtime moves even on coarse-grained filesystems
    t = time.time() + (os.stat(path).st_mtime_ns % 7) + 1
    os.utime(path, (t, t))


async def test_file_addon_hot_reload_good_then_broken_keeps_previous(mgr, tmp_path):
    f = tmp_path / "tagger.py"
    _write(f, """
        class Tagger:
            name = "tagger"
            def request(self, flow):
                flow.request.headers["X-Tag"] = "v1"
        addons = [Tagger()]
    """)
    from proxy.addonmanager import AddonSpec
    await mgr.add_spec(AddonSpec("file", str(f)))
    flow = make_flow()
    await mgr.run("request", flow)
    assert flow.request.headers["X-Tag"] == "v1"

    _write(f, """
        class Tagger:
            name = "tagger"
            def request(self, flow):
                flow.request.headers["X-Tag"] = "v2"
        addons = [Tagger()]
    """)
    assert await mgr.check_files() == [f]
    flow = make_flow()
    await mgr.run("request", flow)
    assert flow.request.headers["X-Tag"] == "v2"

    _write(f, "this is not python(\n")
    assert await mgr.check_files() == []
    flow = make_flow()
    await mgr.run("request", flow)
    assert flow.request.headers["X-Tag"] == "v2"  # the previous version keeps running
    assert mgr.metrics.registry.get_sample_value("sge_proxy_addon_reloads_total", {"result": "failed"}) == 1


async def test_file_addon_that_fails_at_start_is_a_config_error(mgr, tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("raise RuntimeError('nope')\n")
    from proxy.addonmanager import AddonSpec
    with pytest.raises(ConfigError, match="bad.py failed to load: RuntimeError: nope"):
        await mgr.add_spec(AddonSpec("file", str(f)))


def test_flow_on_done_callbacks_run_once_in_order_and_survive_errors():
    flow = make_flow()
    seen = []
    flow.on_done(lambda f: seen.append(("a", f.id)))
    flow.on_done(lambda f: 1 / 0)
    flow.on_done(lambda f: seen.append(("c", f.id)))
    flow.finish()
    flow.finish()
    assert seen == [("a", "req-00000001"), ("c", "req-00000001")]
