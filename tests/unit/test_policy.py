"""proxy.policy: evaluation, loading/validation, and the packaged default policy. No event loop."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.identity import Identity
from proxy.policy import Facts, Glob, PolicySet, build_set, evaluate, parse_policy

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"

MON_NOON = datetime(2024, 5, 6, 12, 0, tzinfo=timezone.utc)  # a Monday

ALICE = Identity(subject="alice", roles=frozenset({"user"}), tenant="acme")
ADMIN = Identity(subject="root", roles=frozenset({"admin"}))
BOB_OTHER = Identity(subject="bob", tenant="globex")
KEY_READ = Identity(subject="svc", method="api_key", scopes=frozenset({"mail:read"}))
KEY_NONE = Identity(subject="svc", method="api_key")
JWT_READ = Identity(subject="carol", method="jwt", scopes=frozenset({"mail:read"}))


def policy(text: str, source: str = "t.yaml") -> PolicySet:
    return build_set([parse_policy(text, source)])


def facts(method: str = "GET", path: str = "/", *, calls: tuple[str, ...] | None = None,
          using: tuple[str, ...] | None = None, who: Identity | None = ALICE, ip: str = "192.0.2.1",
          now: datetime = MON_NOON) -> Facts:
    if calls is not None and using is None:
        using = ("urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail")
    return Facts(method=method, path=path, now=now, jmap_methods=calls, using=using, identity=who,
                 source_ip=ip)


def utc(y: int, mo: int, d: int, h: int, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------- evaluation table

RULES = """
name: t
rules:
  - id: deny-blocked-net
    effect: deny
    cidrs: [203.0.113.0/24, "2001:db8:bad::/48"]
    reason: blocked network
  - id: session
    effect: allow
    http_methods: [GET]
    paths: [/jmap/session]
  - id: api
    effect: allow
    http_methods: [POST]
    paths: [/jmap, /jmap/]
  - id: download
    effect: allow
    http_methods: [GET]
    paths: ["/jmap/download/*"]
  - id: mail
    effect: allow
    jmap_methods: ["Email/*", Mailbox/get, "*/echo"]
  - id: deny-import
    effect: deny
    jmap_methods: [Email/import]
    reason: imports are off
  - id: admin-principals
    effect: allow
    roles: [admin, ops]
    jmap_methods: ["Principal/*"]
  - id: tenant-reports
    effect: allow
    tenants: [acme]
    http_methods: [GET]
    paths: ["/reports/**"]
  - id: office-net
    effect: allow
    cidrs: [10.0.0.0/8, "fd00::/8"]
    paths: [/intranet]
  - id: office-hours
    effect: allow
    paths: [/business]
    time: {days: mon-fri, hours: "09:00-17:00"}
  - id: night-shift
    effect: allow
    paths: [/night]
    time: {days: [fri], hours: "22:00-06:00", timezone: Europe/Paris}
  - id: keys
    effect: allow
    auth: [api_key]
    scopes: [mail:read, mail:write]
    paths: [/keys]
  - id: public
    effect: allow
    identity: anonymous
    http_methods: [GET]
    paths: [/.well-known/jmap]
  - id: blobs
    effect: allow
    using: ["urn:ietf:params:jmap:blob"]
    jmap_methods: ["Blob/*"]
"""

# (case, facts, allowed, rule_id, denied_method)
EVAL_TABLE = [
    ("route allowed", facts("GET", "/jmap/session"), True, "session", None),
    ("anonymous gets only anonymous rules", facts("GET", "/jmap/session", who=None), False, None, None),
    ("anonymous rule", facts("GET", "/.well-known/jmap", who=None), True, "public", None),
    ("anonymous rule skips the authenticated", facts("GET", "/.well-known/jmap"), False, None, None),
    ("http method must match", facts("DELETE", "/jmap/session"), False, None, None),
    ("unmatched path: default deny", facts("GET", "/elsewhere"), False, None, None),
    ("* stays in one segment", facts("GET", "/jmap/download/abc"), True, "download", None),
    ("* does not cross /", facts("GET", "/jmap/download/a/b"), False, None, None),
    ("every call allowed", facts("POST", "/jmap/", calls=("Email/get", "Mailbox/get")), True, "api", None),
    ("no calls: the route decides", facts("POST", "/jmap", calls=()), True, "api", None),
    ("pattern */echo", facts("POST", "/jmap", calls=("Core/echo",)), True, "api", None),
    ("one call unmatched refuses all", facts("POST", "/jmap", calls=("Email/get", "Mailbox/set", "Email/query")),
     False, None, "Mailbox/set"),
    ("deny beats an earlier allow", facts("POST", "/jmap", calls=("Email/get", "Email/import")),
     False, "deny-import", "Email/import"),
    ("route rules never allow calls", facts("POST", "/jmap", calls=("Thread/get",)), False, None, "Thread/get"),
    ("calls need the route too", facts("POST", "/other", calls=("Email/get",)), False, None, None),
    ("role any-of", facts("POST", "/jmap", calls=("Principal/get",), who=ADMIN), True, "api", None),
    ("role missing", facts("POST", "/jmap", calls=("Principal/get",)), False, None, "Principal/get"),
    ("tenant any-of", facts("GET", "/reports/2024/q1"), True, "tenant-reports", None),
    ("** matches the bare prefix", facts("GET", "/reports"), True, "tenant-reports", None),
    ("other tenant", facts("GET", "/reports/2024/q1", who=BOB_OTHER), False, None, None),
    ("tenant needs an identity", facts("GET", "/reports/x", who=None), False, None, None),
    ("cidr v4", facts("GET", "/intranet", ip="10.1.2.3"), True, "office-net", None),
    ("cidr v4 outside", facts("GET", "/intranet", ip="192.168.1.1"), False, None, None),
    ("cidr v6", facts("GET", "/intranet", ip="fd00::1"), True, "office-net", None),
    ("cidr v6 outside", facts("GET", "/intranet", ip="2001:db8::1"), False, None, None),
    ("v4-mapped v6 counts as v4", facts("GET", "/intranet", ip="::ffff:10.0.0.5"), True, "office-net", None),
    ("no source ip", facts("GET", "/intranet", ip=""), False, None, None),
    ("unparsable source ip", facts("GET", "/intranet", ip="not-an-ip"), False, None, None),
    ("deny cidr v4", facts("GET", "/jmap/session", ip="203.0.113.9"), False, "deny-blocked-net", None),
    ("deny cidr v6", facts("GET", "/jmap/session", ip="2001:db8:bad::1"), False, "deny-blocked-net", None),
    ("deny applies to anonymous", facts("GET", "/.well-known/jmap", who=None, ip="203.0.113.1"),
     False, "deny-blocked-net", None),
    ("inside hours", facts("GET", "/business", now=utc(2024, 5, 6, 9, 0)), True, "office-hours", None),
    ("end is exclusive", facts("GET", "/business", now=utc(2024, 5, 6, 17, 0)), False, None, None),
    ("weekend", facts("GET", "/business", now=utc(2024, 5, 11, 10)), False, None, None),
    ("naive time is UTC", facts("GET", "/business", now=datetime(2024, 5, 6, 16, 59)), True, "office-hours", None),
    # Europe/Paris is UTC+2 in May 2024; 2024-05-03 is a Friday
    ("wrap: Friday 23:00 Paris", facts("GET", "/night", now=utc(2024, 5, 3, 21)), True, "night-shift", None),
    ("wrap: Saturday 02:00 Paris", facts("GET", "/night", now=utc(2024, 5, 4, 0)), True, "night-shift", None),
    ("wrap: Friday 02:00 Paris is Thursday's night", facts("GET", "/night", now=utc(2024, 5, 3, 0)),
     False, None, None),
    ("wrap: Saturday 06:00 Paris is over", facts("GET", "/night", now=utc(2024, 5, 4, 4)), False, None, None),
    ("timezone: Friday 22:30 UTC is past midnight in Paris", facts("GET", "/night", now=utc(2024, 5, 3, 22, 30)),
     True, "night-shift", None),
    ("timezone: Friday 21:00 Paris is before the window", facts("GET", "/night", now=utc(2024, 5, 3, 19)),
     False, None, None),
    ("auth and scope", facts("GET", "/keys", who=KEY_READ), True, "keys", None),
    ("scope without api key", facts("GET", "/keys", who=JWT_READ), False, None, None),
    ("api key without scope", facts("GET", "/keys", who=KEY_NONE), False, None, None),
    ("capability present", facts("POST", "/jmap", calls=("Blob/get",),
                                 using=("urn:ietf:params:jmap:core", "urn:ietf:params:jmap:blob")), True, "api", None),
    ("capability absent", facts("POST", "/jmap", calls=("Blob/get",)), False, None, "Blob/get"),
    ("dot segments refused", facts("GET", "/jmap/download/../session"), False, None, None),
    ("encoded dots refused", facts("GET", "/jmap/download/%2e%2e"), False, None, None),
    ("encoded slash refused", facts("GET", "/jmap/download/a%2Fb"), False, None, None),
    ("empty segment refused", facts("GET", "/jmap//session"), False, None, None),
    ("backslash refused", facts("GET", "/jmap/download/a\\b"), False, None, None),
]


@pytest.mark.parametrize("case,f,allowed,rule_id,denied_method", EVAL_TABLE, ids=[r[0] for r in EVAL_TABLE])
def test_evaluate(case, f, allowed, rule_id, denied_method):
    d = evaluate(policy(RULES), f)
    assert (d.allowed, d.rule_id, d.denied_method) == (allowed, rule_id, denied_method)
    assert d.effect == ("allow" if allowed else "deny")
    assert d.policy == ("t" if rule_id else "none")
    assert d.reason or allowed


def test_deny_reason_is_the_rules():
    d = evaluate(policy(RULES), facts("POST", "/jmap", calls=("Email/import",)))
    assert d.reason == "imports are off"


def test_empty_policy_denies_everything():
    assert not evaluate(PolicySet(), facts("GET", "/jmap/session")).allowed


def test_files_merge_in_order_and_deny_from_a_later_file_wins():
    first = parse_policy("name: a\nrules:\n  - {id: s, effect: allow, paths: [/x]}\n", "a.yaml")
    second = parse_policy("name: b\nrules:\n  - {id: d, effect: deny, paths: [/x], reason: not here}\n", "b.yaml")
    merged = build_set([first, second])
    assert [r.id for r in merged.rules] == ["s", "d"]
    d = evaluate(merged, facts("GET", "/x"))
    assert (d.allowed, d.rule_id, d.policy) == (False, "d", "b")


@pytest.mark.parametrize("pattern,path,value,matches", [
    ("/a/*", True, "/a/b", True),
    ("/a/*", True, "/a/", True),
    ("/a/*", True, "/a/b/c", False),
    ("/a/**", True, "/a", True),
    ("/a/**", True, "/a/b/c", True),
    ("/a/**", True, "/ab", False),
    ("/a/**/z", True, "/a/b/c/z", True),
    ("/a.b", True, "/aXb", False),
    ("Email/*", False, "Email/set", True),
    ("Email/*", False, "EmailSubmission/set", False),
    ("*/get", False, "Mailbox/get", True),
    ("*/get", False, "Mailbox/getx", False),
    ("urn:stalwart:*", False, "urn:stalwart:jmap", True),
    ("urn:stalwart:*", False, "urn:ietf:params:jmap:core", False),
])
def test_glob(pattern, path, value, matches):
    assert Glob(pattern, path=path).match(value) is matches


# ---------------------------------------------------------------------------- validation table

def rules_file(*rule_lines: str) -> str:
    return "name: t\nrules:\n" + "".join(line + "\n" for line in rule_lines)


# (case, text, expected line, text in the message)
INVALID = [
    ("unknown rule key", rules_file("  - id: a", "    effect: allow", "    pathz: [/x]"), 5, "unknown key"),
    ("unknown top-level key", "name: t\nrulez: []\n", 2, "unknown key"),
    ("bad cidr", rules_file("  - id: a", "    effect: allow", "    cidrs:", "      - 10.0.0.0/8",
                            "      - 10.0.0.300/24"), 7, "bad CIDR"),
    ("cidr with host bits", rules_file("  - id: a", "    effect: allow", "    cidrs: [10.0.0.1/8]"), 5,
     "bad CIDR"),
    ("bad hours", rules_file("  - id: a", "    effect: allow", "    time:", "      days: [mon]",
                             "      hours: 9-17"), 7, "HH:MM-HH:MM"),
    ("hours out of range", rules_file("  - id: a", "    effect: allow",
                                      "    time: {hours: '08:00-25:00'}"), 5, "out of range"),
    ("empty window", rules_file("  - id: a", "    effect: allow", "    time: {hours: '08:00-08:00'}"), 5,
     "empty window"),
    ("bad day", rules_file("  - id: a", "    effect: allow", "    time:", "      days: [mon, funday]"), 6,
     "not a day"),
    ("bad window timezone", rules_file("  - id: a", "    effect: allow", "    time:",
                                       "      timezone: Mars/Olympus"), 6, "unknown timezone"),
    ("bad effect", rules_file("  - id: a", "    effect: permit"), 4, "allow or deny"),
    ("missing effect", rules_file("  - id: a", "    paths: [/x]"), 3, "allow or deny"),
    ("missing id", rules_file("  - id: a", "    effect: allow", "  - effect: allow", "    paths: [/x]"), 5,
     "needs an id"),
    ("duplicate id", rules_file("  - id: a", "    effect: allow", "  - id: a", "    effect: allow"), 5,
     "duplicate rule id 'a'"),
    ("deny without reason", rules_file("  - id: a", "    effect: deny", "    paths: [/x]"), 3, "needs a reason"),
    ("reason read as a YAML boolean", rules_file("  - id: a", "    effect: deny", "    reason: no"), 5,
     "must be a string"),
    ("lower-case http method", rules_file("  - id: a", "    effect: allow", "    http_methods: [get]"), 5,
     "not an HTTP method"),
    ("relative path", rules_file("  - id: a", "    effect: allow", "    paths: [jmap]"), 5, "starts with '/'"),
    ("empty list", rules_file("  - id: a", "    effect: allow", "    roles: []"), 5, "must not be empty"),
    ("unknown auth", rules_file("  - id: a", "    effect: allow", "    auth: [basic]"), 5, "unknown auth"),
    ("anonymous with roles", rules_file("  - id: a", "    effect: allow", "    identity: anonymous",
                                        "    roles: [x]"), 6, "can never match"),
    ("bad identity", rules_file("  - id: a", "    effect: allow", "    identity: someone"), 5,
     "authenticated, anonymous or any"),
    ("rule not a mapping", rules_file("  - just-a-string"), 3, "must be a mapping"),
    ("duplicate yaml key", rules_file("  - id: a", "    effect: allow", "    effect: deny"), 5, "duplicate key"),
    ("yaml syntax", rules_file("  - id: a", "    effect: allow: x", "    paths: [/x]"), 4, "invalid YAML"),
    ("rules missing", "name: t\n", 1, "missing"),
    ("rules not a list", "name: t\nrules: {}\n", 2, "must be a list"),
    ("bad name", "name: 'has space'\nrules: []\n", 1, "metric label"),
    ("top level not a mapping", "- a\n- b\n", 1, "top level"),
]


@pytest.mark.parametrize("case,text,line,message", INVALID, ids=[r[0] for r in INVALID])
def test_invalid_policy_names_file_and_line(case, text, line, message):
    with pytest.raises(ConfigError) as e:
        parse_policy(text, "/etc/sge/t.yaml")
    assert f"/etc/sge/t.yaml, line {line}" in str(e.value)
    assert message in str(e.value)


def test_empty_file_names_the_file():
    with pytest.raises(ConfigError, match="/etc/sge/t.yaml.*empty"):
        parse_policy("", "/etc/sge/t.yaml")


def test_duplicate_id_across_files_names_both():
    a = parse_policy("name: a\nrules:\n  - {id: x, effect: allow}\n", "a.yaml")
    b = parse_policy("name: b\nrules:\n  - {id: y, effect: allow}\n  - {id: x, effect: allow}\n", "b.yaml")
    with pytest.raises(ConfigError) as e:
        build_set([a, b])
    assert "b.yaml, line 4" in str(e.value) and "a.yaml, line 3" in str(e.value)


def test_duplicate_policy_name_refused():
    a = parse_policy("name: same\nrules: []\n", "a.yaml")
    b = parse_policy("name: same\nrules: []\n", "b.yaml")
    with pytest.raises(ConfigError, match="also used by a.yaml"):
        build_set([a, b])


def test_name_defaults_to_file_stem():
    assert parse_policy("rules: []\n", "/x/tenant-rules.yaml").name == "tenant-rules"


def test_default_timezone_applies_to_windows_without_one():
    text = rules_file("  - id: a", "    effect: allow", "    time: {days: mon, hours: '09:00-10:00'}")
    tokyo = build_set([parse_policy(text, "t.yaml", default_timezone="Asia/Tokyo")])
    assert evaluate(tokyo, facts(now=utc(2024, 5, 6, 0, 30))).allowed      # 09:30 in Tokyo
    assert not evaluate(tokyo, facts(now=utc(2024, 5, 6, 9, 30))).allowed  # 18:30 in Tokyo
    with pytest.raises(ConfigError, match="unknown timezone"):
        parse_policy(text, "t.yaml", default_timezone="Nowhere/City")


# ---------------------------------------------------------------------------- the default policy

CORE_MAIL = ("urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail")

DEFAULT_TABLE = [
    ("well-known", facts("GET", "/.well-known/jmap"), True, "jmap-session", None),
    ("session", facts("GET", "/jmap/session"), True, "jmap-session", None),
    ("session at /jmap", facts("GET", "/jmap"), True, "jmap-session", None),
    ("session anonymous", facts("GET", "/jmap/session", who=None), False, None, None),
    ("well-known anonymous", facts("GET", "/.well-known/jmap", who=None), False, None, None),
    ("mail api", facts("POST", "/jmap/", calls=("Mailbox/get", "Email/query", "Email/get", "Thread/get",
                                                "SearchSnippet/get")), True, "jmap-api", None),
    ("send", facts("POST", "/jmap", calls=("Email/set", "EmailSubmission/set", "Identity/get")),
     True, "jmap-api", None),
    ("vacation, echo, blob, quota", facts("POST", "/jmap", calls=("VacationResponse/set", "Core/echo",
                                                                  "Blob/copy", "Quota/get", "Quota/query")),
     True, "jmap-api", None),
    ("api key user", facts("POST", "/jmap", calls=("Email/get",), who=KEY_NONE), True, "jmap-api", None),
    ("anonymous api", facts("POST", "/jmap", calls=("Email/get",), who=None), False, None, None),
    ("principal/set among mail calls", facts("POST", "/jmap", calls=("Email/get", "Principal/set")),
     False, "deny-principal-admin", "Principal/set"),
    ("principal/get not granted", facts("POST", "/jmap", calls=("Principal/get",)), False, None,
     "Principal/get"),
    ("quota/set not granted", facts("POST", "/jmap", calls=("Quota/set",)), False, None, "Quota/set"),
    ("unknown method", facts("POST", "/jmap", calls=("Calendar/get",)), False, None, "Calendar/get"),
    ("stalwart admin capability", facts("POST", "/jmap", calls=("Email/get",),
                                        using=CORE_MAIL + ("urn:stalwart:admin",)),
     False, "deny-stalwart-admin-capability", None),
    ("api at another path", facts("POST", "/jmap/api", calls=("Email/get",)), False, None, None),
    ("upload", facts("POST", "/jmap/upload/a/"), True, "jmap-upload", None),
    ("upload without slash", facts("POST", "/jmap/upload/a"), True, "jmap-upload", None),
    ("upload by GET", facts("GET", "/jmap/upload/a/"), False, None, None),
    ("download", facts("GET", "/jmap/download/a/Gb4a/report.pdf"), True, "jmap-download", None),
    ("eventsource", facts("GET", "/jmap/eventsource/"), True, "jmap-eventsource", None),
    ("websocket", facts("GET", "/jmap/ws"), True, "jmap-websocket", None),
    ("management api", facts("GET", "/api/principal"), False, "deny-management-api", None),
    ("management root", facts("GET", "/api"), False, "deny-management-api", None),
    ("management v1 non-mail", facts("POST", "/api/v1/reload"), False, "deny-management-api", None),
    ("rest facade read", facts("GET", "/api/v1/mail/messages"), True, "rest-facade", None),
    ("rest facade send", facts("POST", "/api/v1/mail/send"), True, "rest-facade", None),
    ("rest facade delete", facts("DELETE", "/api/v1/mail/messages/M1"), True, "rest-facade", None),
    ("rest facade anonymous", facts("GET", "/api/v1/mail/messages", who=None), False, None, None),
    ("openapi", facts("GET", "/api/v1/openapi.json"), True, "rest-openapi", None),
    ("openapi by POST", facts("POST", "/api/v1/openapi.json"), False, None, None),
    ("health is not proxied", facts("GET", "/healthz/ready"), False, None, None),
    ("web admin", facts("GET", "/admin"), False, None, None),
    ("scanner path", facts("GET", "/jmap/download/../../api/principal"), False, None, None),
]


@pytest.mark.parametrize("case,f,allowed,rule_id,denied_method", DEFAULT_TABLE, ids=[r[0] for r in DEFAULT_TABLE])
def test_default_policy(case, f, allowed, rule_id, denied_method):
    ps = build_set([parse_policy(DEFAULT_YAML.read_text(), str(DEFAULT_YAML))])
    d = evaluate(ps, f)
    assert (d.allowed, d.rule_id, d.denied_method) == (allowed, rule_id, denied_method)


# ------------------------------------------------------------------ DecisionCache (pure)
from proxy.policy import DecisionCache  # noqa: E402

PLAIN = "name: p\nrules:\n  - {id: a, effect: allow, paths: [/x]}\n"
WITH_CIDR = "name: p\nrules:\n  - {id: a, effect: allow, paths: [/x], cidrs: [10.0.0.0/8]}\n"
WITH_TIME = "name: p\nrules:\n  - {id: a, effect: allow, paths: [/x], time: {days: mon-fri}}\n"
ALICE = Identity(subject="alice", roles=frozenset({"r"}), tenant="t", scopes=frozenset({"s"}))


@pytest.mark.parametrize("text, size, enabled, by_ip, windows", [
    (PLAIN, 16, True, False, 0),
    (WITH_CIDR, 16, True, True, 0),
    (WITH_TIME, 16, True, False, 1),
    (PLAIN, 0, False, False, 0),
])
def test_decision_cache_scope(text, size, enabled, by_ip, windows):
    c = DecisionCache(policy(text), size)
    assert (c.enabled, c.by_ip, len(c.windows)) == (enabled, by_ip, windows)
    k = c.key("GET", "/x", None, None, ALICE, "10.0.0.1", datetime(2025, 1, 6, 12, 0, tzinfo=timezone.utc))
    assert (k is not None) == enabled
    # without the time, a set with windows cannot be keyed
    assert (c.key("GET", "/x", None, None, ALICE, "10.0.0.1") is not None) == (enabled and not windows)


def test_decision_cache_key_covers_what_a_decision_reads():
    c = DecisionCache(policy(PLAIN))
    base = c.key("POST", "/jmap", ("Email/get",), ("core",), ALICE, "10.0.0.1")
    same = [c.key("POST", "/jmap", ("Email/get",), ("core",),
                  Identity(subject="bob", email="b@x", roles=frozenset({"r"}), tenant="t",
                           scopes=frozenset({"s"})), "192.0.2.9")]  # no cidr rule: the IP is moot
    other = [c.key("GET", "/jmap", ("Email/get",), ("core",), ALICE, "10.0.0.1"),
             c.key("POST", "/jmap/", ("Email/get",), ("core",), ALICE, "10.0.0.1"),
             c.key("POST", "/jmap", ("Email/set",), ("core",), ALICE, "10.0.0.1"),
             c.key("POST", "/jmap", ("Email/get",), ("mail",), ALICE, "10.0.0.1"),
             c.key("POST", "/jmap", ("Email/get",), ("core",), None, "10.0.0.1"),
             c.key("POST", "/jmap", ("Email/get",), ("core",),
                   Identity(subject="alice", roles=frozenset(), tenant="t", scopes=frozenset({"s"})), ""),
             c.key("POST", "/jmap", ("Email/get",), ("core",),
                   Identity(subject="alice", roles=frozenset({"r"}), tenant="u", scopes=frozenset({"s"})), ""),
             c.key("POST", "/jmap", ("Email/get",), ("core",),
                   Identity(subject="alice", roles=frozenset({"r"}), tenant="t", scopes=frozenset({"s"}),
                            method="api_key"), ""),
             c.key("POST", "/jmap", ("Email/get",), ("core",),
                   Identity(subject="alice", roles=frozenset({"r"}), tenant="t"), "")]
    assert all(k == base for k in same)
    assert all(k != base for k in other) and len(set(other)) == len(other)
    by_ip = DecisionCache(policy(WITH_CIDR))
    assert by_ip.key("GET", "/x", None, None, ALICE, "10.0.0.1") != by_ip.key("GET", "/x", None, None, ALICE,
                                                                               "10.0.0.2")


def test_decision_cache_skips_oversized_requests_and_stays_bounded():
    c = DecisionCache(policy(PLAIN), size=2)
    assert c.key("GET", "/" + "a" * DecisionCache.MAX_PATH, None, None, None, "") is None
    assert c.key("POST", "/jmap", ("Email/get",) * (DecisionCache.MAX_CALLS + 1), (), None, "") is None
    assert c.key("POST", "/jmap", (), ("x",) * (DecisionCache.MAX_CALLS + 1), None, "") is None
    keys = [c.key("GET", f"/{i}", None, None, None, "") for i in range(3)]
    for i, k in enumerate(keys):
        c.put(k, i)
    assert len(c) == 2 and c.get(keys[0]) is None and c.get(keys[2]) == 2


WINDOWED = """name: w
rules:
  - {id: office, effect: allow, paths: [/x], time: {days: mon-fri, hours: "09:00-17:00", timezone: Europe/Paris}}
  - id: night
    effect: deny
    paths: [/x, /y]
    reason: closed at night
    time: [{hours: "22:00-06:00", timezone: America/New_York}, {days: sun, timezone: Asia/Kolkata}]
  - {id: open-y, effect: allow, paths: [/y]}
"""
UTC = timezone.utc


@pytest.mark.parametrize("now, states", [
    # (office: Paris mon-fri 09-17, night: New York 22-06, Sunday in Kolkata)
    (datetime(2025, 1, 6, 7, 59, 59, 999999, tzinfo=UTC), (False, True, False)),  # Paris 08:59:59.999999, NY 02:59
    (datetime(2025, 1, 6, 8, 0, tzinfo=UTC), (True, True, False)),                  # Paris 09:00, NY 03:00
    (datetime(2025, 1, 6, 15, 59, 59, tzinfo=UTC), (True, False, False)),           # Paris 16:59:59, NY 10:59:59
    (datetime(2025, 1, 6, 16, 0, tzinfo=UTC), (False, False, False)),               # Paris 17:00: the end is open
    (datetime(2025, 1, 7, 2, 59, 59, tzinfo=UTC), (False, False, False)),           # NY 21:59:59 (EST)
    (datetime(2025, 1, 7, 3, 0, tzinfo=UTC), (False, True, False)),                 # NY 22:00 (EST)
    (datetime(2025, 1, 7, 11, 0, tzinfo=UTC), (True, False, False)),                # NY 06:00: over; Paris 12:00
    (datetime(2025, 3, 31, 7, 0, tzinfo=UTC), (True, True, False)),                 # Paris 09:00 CEST, NY 03:00 EDT
    (datetime(2025, 3, 28, 7, 0, tzinfo=UTC), (False, True, False)),                # Paris 08:00 CET
    (datetime(2025, 3, 28, 10, 0, tzinfo=UTC), (True, False, False)),               # NY 06:00 EDT: over
    (datetime(2025, 1, 4, 18, 30, tzinfo=UTC), (False, False, True)),               # Sunday 00:00 in Kolkata
    (datetime(2025, 1, 4, 18, 29, 59, 999999, tzinfo=UTC), (False, False, False)),
    (datetime(2025, 1, 6, 8, 0), (True, True, False)),                              # naive: taken as UTC
])
def test_window_states(now, states):
    assert DecisionCache(policy(WINDOWED)).window_states(now) == states


def _instants() -> list[datetime]:
    """A week of instants every 7 min 13.5 s across a DST change, plus both sides of every
    minute edge a window has."""
    from datetime import timedelta
    start = datetime(2025, 3, 27, 0, 0, tzinfo=UTC)
    out = [start + timedelta(seconds=433.5 * i) for i in range(7 * 24 * 8)]
    for day in range(27, 34):
        for h, m in ((8, 0), (7, 0), (16, 0), (15, 0), (2, 0), (3, 0), (10, 0), (11, 0), (18, 30)):
            edge = datetime(2025, 3, 1, h, m, tzinfo=UTC) + timedelta(days=day - 1)
            out += [edge - timedelta(microseconds=1), edge, edge + timedelta(microseconds=999999)]
    return out


@pytest.mark.parametrize("order", ["chronological", "reversed", "shuffled"])
def test_cached_decisions_equal_evaluate_across_time(order):
    import random
    ps = policy(WINDOWED)
    c = DecisionCache(ps)
    instants = _instants()
    if order == "reversed":
        instants.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(instants)
    for now in instants:
        for path in ("/x", "/y"):
            f = Facts(method="GET", path=path, now=now, identity=ALICE)
            key = c.key("GET", path, None, None, ALICE, "", now)
            cached = c.get(key)
            if cached is None:
                cached = evaluate(ps, f)
                c.put(key, cached)
            assert cached == evaluate(ps, f), (now, path)
    assert len(c) <= 2 * 2 ** 3  # entries per window state, not per instant
