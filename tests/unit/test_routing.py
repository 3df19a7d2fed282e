"""proxy.routing: decision tables, URL validation against poisoned values, residency, the decision
cache with an injected clock. No event loop, no I/O."""
from __future__ import annotations

import pytest

from proxy.identity import Identity
from proxy.routing import (DecisionCache, InvalidRoute, Lookup, NoRoute, ResidencyRefused, Route, Server,
                           UrlRules, apply_residency, home_region, lookup_for, route_from_secret,
                           route_from_urls, server_urls, validate_server)
from proxy.target import Target

RULES = UrlRules(allowed_hosts=("*.mail.example", "127.0.0.1"))
ACME = Lookup("tenant", "acme", "stalwart/tenants/acme")
EU = Lookup("region", "eu-west-1", "stalwart/regions/eu-west-1")


def who(tenant: str | None = None, region: str | None = None) -> Identity:
    roles = frozenset({f"tenant:{tenant}"}) if tenant else frozenset()
    return Identity(subject="u1", email="u1@example.com", tenant=tenant, roles=roles, region=region)


# ---------------------------------------------------------------------------- which route
@pytest.mark.parametrize("mode, tenant, region, tenant_regions, home, key, path", [
    ("tenant", "acme", None, {}, None, ("tenant", "acme"), "stalwart/tenants/acme"),
    ("tenant", "acme", "eu-west-1", {}, "eu-west-1", ("tenant", "acme"), "stalwart/tenants/acme"),
    ("tenant", "acme", None, {"acme": "eu-west-1"}, "eu-west-1", ("tenant", "acme"), "stalwart/tenants/acme"),
    ("region", None, "eu-west-1", {}, "eu-west-1", ("region", "eu-west-1"), "stalwart/regions/eu-west-1"),
    ("region", "acme", None, {"acme": "ap-south-1"}, "ap-south-1", ("region", "ap-south-1"),
     "stalwart/regions/ap-south-1"),
    ("region", "acme", "eu-west-1", {"acme": "ap-south-1"}, "eu-west-1", ("region", "eu-west-1"),
     "stalwart/regions/eu-west-1"),  # not strict: the claim wins
    ("region", None, None, {}, "us-east-1", ("region", "us-east-1"), "stalwart/regions/us-east-1"),
    ("region", "globex", None, {"acme": "ap-south-1"}, "us-east-1", ("region", "us-east-1"),
     "stalwart/regions/us-east-1"),
])
def test_decision_table(mode, tenant, region, tenant_regions, home, key, path):
    ident = who(tenant, region)
    got_home = home_region(ident, mode, tenant_regions=tenant_regions, default_region="us-east-1", strict=False)
    assert got_home == home
    lookup = lookup_for(ident, mode, home=got_home)
    assert (lookup.key, lookup.path) == (key, path)
    assert lookup.target_name == f"{key[0]}:{key[1]}"


def test_tenant_mode_without_a_tenant_has_no_route():
    with pytest.raises(NoRoute) as e:
        lookup_for(who(region="eu-west-1"), "tenant", home="eu-west-1")
    assert e.value.status == 403


@pytest.mark.parametrize("mode, tenant, region", [
    ("tenant", "../../sys/policy", None), ("tenant", "acme/../globex", None), ("tenant", "a" * 65, None),
    ("tenant", "", None), ("region", None, "eu..west"), ("region", None, "eu west"), ("region", None, "-eu"),
])
def test_names_that_are_not_plain_have_no_route(mode, tenant, region):
    ident = Identity(subject="u1", tenant=tenant, region=region)
    with pytest.raises(NoRoute):
        lookup_for(ident, mode, home=region)


def test_custom_paths():
    lookup = lookup_for(who("acme"), "tenant", home=None, tenant_path="mail/{tenant}/route")
    assert lookup.path == "mail/acme/route"


# ---------------------------------------------------------------------------- secret values
@pytest.mark.parametrize("data, urls, names", [
    ({"server_url": "https://a.mail.example"}, ["https://a.mail.example"], ["tenant:acme"]),
    ({"server_url": "https://a.mail.example:8443/base/"}, ["https://a.mail.example:8443/base"], ["tenant:acme"]),
    ({"server_url": " https://a.mail.example , https://b.mail.example ,"},
     ["https://a.mail.example", "https://b.mail.example"], ["tenant:acme"] * 2),
    ({"server_url": ["https://a.mail.example", "https://b.mail.example"]},
     ["https://a.mail.example", "https://b.mail.example"], ["tenant:acme"] * 2),
    ({"server_url": "https://a.mail.example", "fallback_urls": "https://b.mail.example,https://c.mail.example"},
     ["https://a.mail.example", "https://b.mail.example", "https://c.mail.example"], ["tenant:acme"] * 3),
    ({"server_url": "https://a.mail.example,https://b.mail.example", "fallback_urls": ["https://c.mail.example"]},
     ["https://a.mail.example", "https://b.mail.example", "https://c.mail.example"], ["tenant:acme"] * 3),
])
def test_route_from_secret(data, urls, names):
    route = route_from_secret(data, ACME, RULES)
    assert [str(s.target) for s in route.servers] == urls
    assert [s.target.name for s in route.servers] == names
    assert route.primary is route.servers[0] and route.fallbacks == route.servers[1:]


@pytest.mark.parametrize("data, default, regions", [
    ({"server_url": "https://a.mail.example"}, "eu-west-1", ["eu-west-1"]),
    ({"server_url": "https://a.mail.example", "region": "eu-central-1"}, "eu-west-1", ["eu-central-1"]),
    ({"server_url": "https://a.mail.example,https://b.mail.example"}, None, [None, None]),
    ({"server_url": "https://a.mail.example", "fallback_urls": "https://b.mail.example",
      "fallback_region": "eu-central-1"}, "eu-west-1", ["eu-west-1", "eu-central-1"]),
    ({"server_url": "https://a.mail.example", "fallback_urls": "https://b.mail.example", "region": "ap-south-1"},
     "eu-west-1", ["ap-south-1", "ap-south-1"]),
])
def test_declared_regions(data, default, regions):
    route = route_from_secret(data, EU, RULES, default_region=default)
    assert [s.region for s in route.servers] == regions
    assert {s.target.name for s in route.servers} == {"region:eu-west-1"}


@pytest.mark.parametrize("data", [{}, {"server_url": ""}, {"server_url": " , "}, {"region": "eu-west-1"}])
def test_no_server_url_is_no_route(data):
    with pytest.raises(NoRoute):
        route_from_secret(data, ACME, RULES)


POISONED = [
    ("http://a.mail.example", "plain http"),
    ("https://user:pw@a.mail.example", "credentials"),
    ("https://token@a.mail.example", "credentials"),
    ("https://evil.example", "allow-list"),
    ("https://mail.example", "allow-list"),  # *.mail.example is for subdomains only
    ("https://a.mail.example.evil.example", "allow-list"),
    ("https://10.0.0.1", "allow-list"),
    ("https://a.mail.example/?next=https://evil.example", "query"),
    ("https://a.mail.example/#x", "fragment"),
    ("ftp://a.mail.example", "scheme"),
    ("a.mail.example", "scheme"),
    ("not a url at all", "scheme"),
    ("https://", "no host"),
    ("https://a.mail.example:99999", "not a valid URL"),
    ("https://[::1", "not a valid URL"),
    ("javascript:alert(1)", "scheme"),
    ("https://a.mail.example%2f@evil", "credentials"),
    ("https://a b.mail.example", "not a host name"),
    ("https://a.mail.example,b.mail.example", "not a host name"),
    ("https://a.mail.example\\@evil.example", "credentials"),
]


@pytest.mark.parametrize("url, why", POISONED)
def test_poisoned_urls_are_refused(url, why):
    with pytest.raises(InvalidRoute) as e:
        validate_server(url, RULES, "tenant:acme")
    assert e.value.status == 503
    assert why in e.value.reason
    assert url not in e.value.detail  # the client learns nothing about the configuration


@pytest.mark.parametrize("url, why", POISONED)
def test_a_poisoned_fallback_poisons_the_route(url, why):
    with pytest.raises(InvalidRoute):
        route_from_secret({"server_url": "https://a.mail.example", "fallback_urls": url}, ACME, RULES)


@pytest.mark.parametrize("value", [{"url": "https://a.mail.example"}, 42, ["https://a.mail.example", 7]])
def test_garbage_secret_values(value):
    with pytest.raises(InvalidRoute):
        route_from_secret({"server_url": value}, ACME, RULES)


def test_without_an_allow_list_any_https_host_is_accepted_and_http_only_when_insecure():
    assert validate_server("https://anywhere.example", UrlRules(), "official").host == "anywhere.example"
    assert validate_server("https://[::1]:8443", UrlRules(), "official").host == "::1"
    for junk in ("https://a b.example", "https://a;b.example", "https://exa%41mple.com"):
        with pytest.raises(InvalidRoute):
            validate_server(junk, UrlRules(), "official")
    with pytest.raises(InvalidRoute):
        validate_server("http://127.0.0.1:8080", UrlRules(), "official")
    t = validate_server("http://127.0.0.1:8080", UrlRules(allow_insecure=True), "official")
    assert (t.scheme, t.port, t.tls) == ("http", 8080, False)


def test_allow_list_by_cidr():
    rules = UrlRules(allowed_hosts=("10.1.0.0/16",))
    assert validate_server("https://10.1.2.3", rules, "x").host == "10.1.2.3"
    with pytest.raises(InvalidRoute):
        validate_server("https://10.2.0.1", rules, "x")


def test_server_urls():
    assert server_urls(None, "k") == ()
    assert server_urls("a, b,,c ", "k") == ("a", "b", "c")
    assert server_urls(("a",), "k") == ("a",)


# ---------------------------------------------------------------------------- custom answers
@pytest.mark.parametrize("answer, names", [
    ("https://a.mail.example", ["custom:a.mail.example"]),
    (["https://a.mail.example", "https://b.mail.example:8443"], ["custom:a.mail.example", "custom:b.mail.example"]),
])
def test_custom_answers(answer, names):
    assert [s.target.name for s in route_from_urls(answer, RULES).servers] == names


def test_custom_string_answer_is_one_url():
    with pytest.raises(InvalidRoute) as e:  # not a list: "a.mail.example, https" is no host name
        route_from_urls("https://a.mail.example, https://b.mail.example", UrlRules())
    assert "not a host name" in e.value.reason


@pytest.mark.parametrize("answer", [None, "", [], "  "])
def test_custom_nothing_is_no_route(answer):
    with pytest.raises(NoRoute):
        route_from_urls(answer, RULES)


@pytest.mark.parametrize("answer", ["http://a.mail.example", "https://evil.example", ["https://a.mail.example",
                                                                                      "https://x:y@b.mail.example"], 3])
def test_custom_poisoned_is_invalid(answer):
    with pytest.raises(InvalidRoute):
        route_from_urls(answer, RULES)


# ---------------------------------------------------------------------------- residency
def srv(host: str, region: str | None) -> Server:
    return Server(Target("https", host, 443, "", "region:x"), region)


@pytest.mark.parametrize("servers, home, kept, dropped", [
    ([("a", "eu")], "eu", ["a"], []),
    ([("a", "eu"), ("b", "eu")], "eu", ["a", "b"], []),
    ([("a", "eu"), ("b", "us"), ("c", "eu"), ("d", None)], "eu", ["a", "c"], ["b", "d"]),
    ([("a", "us")], None, ["a"], []),  # no home region: nothing to hold to
    ([("a", None), ("b", "us")], None, ["a", "b"], []),
])
def test_residency_keeps_the_home_region(servers, home, kept, dropped):
    route = Route(tuple(srv(h, r) for h, r in servers))
    got, gone = apply_residency(route, home)
    assert [s.target.host for s in got.servers] == kept
    assert [s.target.host for s in gone] == dropped


@pytest.mark.parametrize("servers, home", [
    ([("a", "us")], "eu"),
    ([("a", "us"), ("b", "eu")], "eu"),  # never fail over across: the primary itself is elsewhere
    ([("a", None)], "eu"),               # undeclared: not proven to be in the region
])
def test_residency_refuses_a_primary_elsewhere(servers, home):
    with pytest.raises(ResidencyRefused) as e:
        apply_residency(Route(tuple(srv(h, r) for h, r in servers)), home)
    assert e.value.status == 403


@pytest.mark.parametrize("region, tenant_regions, strict, outcome", [
    ("eu-west-1", {"acme": "eu-west-1"}, True, "eu-west-1"),
    ("eu-west-1", {"acme": "ap-south-1"}, True, ResidencyRefused),
    ("eu-west-1", {"acme": "ap-south-1"}, False, "eu-west-1"),
    (None, {"acme": "ap-south-1"}, True, "ap-south-1"),
    ("eu-west-1", {}, True, "eu-west-1"),
])
def test_claim_against_tenant_mapping(region, tenant_regions, strict, outcome):
    ident = who("acme", region)
    if outcome is ResidencyRefused:
        with pytest.raises(ResidencyRefused):
            home_region(ident, "tenant", tenant_regions=tenant_regions, default_region="us-east-1", strict=strict)
    else:
        assert home_region(ident, "tenant", tenant_regions=tenant_regions, default_region="us-east-1",
                           strict=strict) == outcome


# ---------------------------------------------------------------------------- the cache
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def a_route(host: str = "a.mail.example") -> Route:
    return route_from_secret({"server_url": f"https://{host}"}, ACME, RULES)


def test_positive_ten_minutes_negative_thirty_seconds():
    clock = Clock()
    cache = DecisionCache(clock=clock)
    ok, gone = a_route(), NoRoute("No mail server for this tenant.")
    cache.put(("tenant", "acme"), ok)
    cache.put(("tenant", "nope"), gone)
    clock.now += 29.9
    assert cache.get(("tenant", "acme")) is ok
    assert cache.get(("tenant", "nope")) is gone
    clock.now += 0.1
    assert cache.get(("tenant", "nope")) is None
    clock.now += 569.9  # 599.9 s after the put
    assert cache.get(("tenant", "acme")) is ok
    clock.now += 0.1
    assert cache.get(("tenant", "acme")) is None
    assert cache.stale(("tenant", "acme")) is ok  # kept for when the source is down
    assert cache.stale(("tenant", "nope")) is None


def test_refusals_are_raised_fresh():
    first = NoRoute("No mail server for this tenant.")
    again = first.again()
    assert again is not first and (again.status, again.detail) == (403, first.detail)
    bad = InvalidRoute("tenant:acme: plain http upstream refused")
    assert (bad.again().reason, bad.again().status) == (bad.reason, 503)


def test_bounded_least_recently_used_first():
    clock = Clock()
    cache = DecisionCache(size=2, clock=clock)
    cache.put("a", a_route("a.mail.example"))
    cache.put("b", a_route("b.mail.example"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", a_route("c.mail.example"))
    assert len(cache) == 2
    assert cache.get("b") is None and cache.stale("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None


def test_zero_ttl_asks_every_time():
    cache = DecisionCache(positive_ttl=0, clock=Clock())
    cache.put("k", a_route())
    assert cache.get("k") is None
