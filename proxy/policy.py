"""Declarative access policy: the rule model, loading from YAML text, and evaluation. Sans-IO.

A policy file is YAML (see docs/policy.md for the full reference):

    name: default
    rules:
      - id: mail-api
        effect: allow
        jmap_methods: ["Email/*", "Mailbox/*"]

`parse_policy(text, source)` validates one file (every error names the file and line),
`build_set(...)` merges files in order, `evaluate(policy_set, facts)` decides one request.

Combining rule (deny-overrides, default deny). A request has subjects: its HTTP route, and for a
JMAP API request each method call. A rule without `jmap_methods` is a route rule and only ever
matches the route subject; a rule with `jmap_methods` is a method rule and only ever matches
method-call subjects. The request is denied if any deny rule matches any subject; otherwise it is
allowed only if every subject matches at least one allow rule.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from .errors import ConfigError
from .identity import Identity

__all__ = ["Facts", "Decision", "Rule", "TimeWindow", "Glob", "PolicyFile", "PolicySet",
           "parse_policy", "build_set", "evaluate", "DecisionCache", "AUTH_METHODS"]

AUTH_METHODS = frozenset({"jwt", "api_key"})
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_ALIASES = {d: i for i, d in enumerate(_DAYS)} | {
    full: i for i, full in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday",
                                      "saturday", "sunday"))}
_RULE_KEYS = frozenset({
    "id", "effect", "reason", "description", "identity", "http_methods", "paths", "except_paths",
    "jmap_methods", "using", "roles", "tenants", "cidrs", "time", "auth", "scopes"})
_FILE_KEYS = frozenset({"name", "description", "version", "rules"})
_WINDOW_KEYS = frozenset({"days", "hours", "timezone"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_HTTP_METHOD_RE = re.compile(r"^[A-Z]{1,20}$")
_HOURS_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


# ---------------------------------------------------------------------------------------- model

@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What the policy knows about one request. Built by the policy addon; pure data.

    jmap_methods / using: the method names and capabilities of a JMAP API request, in order;
    None for any other request. identity: None means anonymous. now: when the request arrived
    (a naive datetime is taken as UTC).
    """

    method: str
    path: str
    now: datetime
    jmap_methods: tuple[str, ...] | None = None
    using: tuple[str, ...] | None = None
    identity: Identity | None = None
    source_ip: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome. rule_id is the deciding rule (None for the default deny); policy is the name
    of the file that rule came from ("none" for the default deny); denied_method names the JMAP
    method call that was refused, when a method call (not the route) was the reason."""

    allowed: bool
    effect: Literal["allow", "deny"]
    rule_id: str | None
    reason: str
    denied_method: str | None = None
    policy: str = "none"


class Glob:
    """A pattern. For paths, `*` matches within one segment and `**` across segments (a trailing
    `/**` also matches the bare prefix); for names and capabilities `*` matches anything."""

    __slots__ = ("text", "_re")

    def __init__(self, text: str, *, path: bool) -> None:
        self.text = text
        self._re = re.compile(_glob_regex(text, path=path))

    def match(self, value: str) -> bool:
        return self._re.fullmatch(value) is not None

    def __repr__(self) -> str:
        return f"Glob({self.text!r})"


def _glob_regex(text: str, *, path: bool) -> str:
    if not path:
        return ".*".join(re.escape(part) for part in text.split("*"))
    out = []
    tail = text.endswith("/**")
    body = text[:-3] if tail else text
    i = 0
    while i < len(body):
        if body.startswith("**", i):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(body[i]))
            i += 1
    if tail:
        out.append("(?:/.*)?")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Days of the week on which the window starts (0 = Monday) and [start, end) in minutes.
    When end <= start the window wraps midnight: its early-morning part belongs to the day
    before."""

    days: frozenset[int]
    start: int
    end: int
    tz: ZoneInfo | timezone

    def contains(self, now: datetime) -> bool:
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        local = now.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. Every condition left as None matches anything; the conditions given must all
    match (and within one condition, any listed value will do)."""

    id: str
    effect: Literal["allow", "deny"]
    reason: str
    policy: str
    source: str  # "file, line N" of the rule, for messages
    identity: Literal["authenticated", "anonymous", "any"]
    http_methods: frozenset[str] | None = None
    paths: tuple[Glob, ...] | None = None
    except_paths: tuple[Glob, ...] = ()
    jmap_methods: tuple[Glob, ...] | None = None
    using: tuple[Glob, ...] | None = None
    roles: frozenset[str] | None = None
    tenants: frozenset[str] | None = None
    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    time: tuple[TimeWindow, ...] | None = None
    auth: frozenset[str] | None = None
    scopes: frozenset[str] | None = None

    @property
    def is_method_rule(self) -> bool:
        return self.jmap_methods is not None

    def matches_request(self, facts: Facts, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        """Every condition except the JMAP method name."""
        ident = facts.identity
        if ident is None:
            if self.identity == "authenticated":
                return False
        elif self.identity == "anonymous":
            return False
        if self.http_methods is not None and facts.method not in self.http_methods:
            return False
        if self.paths is not None and not any(g.match(facts.path) for g in self.paths):
            return False
        if self.except_paths and any(g.match(facts.path) for g in self.except_paths):
            return False
        if self.using is not None:
            if not facts.using or not any(g.match(u) for u in facts.using for g in self.using):
                return False
        if self.roles is not None and (ident is None or not (self.roles & ident.roles)):
            return False
        if self.tenants is not None and (ident is None or ident.tenant not in self.tenants):
            return False
        if self.auth is not None and (ident is None or ident.method not in self.auth):
            return False
        if self.scopes is not None and (ident is None or not (self.scopes & ident.scopes)):
            return False
        if self.cidrs is not None and (ip is None or not any(ip in n for n in self.cidrs)):
            return False
        if self.time is not None and not any(w.contains(facts.now) for w in self.time):
            return False
        return True

    def matches_method(self, name: str) -> bool:
        return self.jmap_methods is not None and any(g.match(name) for g in self.jmap_methods)


@dataclass(frozen=True, slots=True)
class PolicyFile:
    name: str
    source: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Policy files merged: rules concatenated in file order."""

    files: tuple[PolicyFile, ...] = ()
    rules: tuple[Rule, ...] = field(default=())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)


# ------------------------------------------------------------------------------------ evaluate

def evaluate(policy_set: PolicySet, facts: Facts) -> Decision:
    """Decide one request (deny-overrides, default deny; see the module docstring)."""
    ip = _parse_ip(facts.source_ip)
    if not _canonical(facts.path):
        return Decision(False, "deny", None,
                        "the path is not in canonical form (dot segments, empty segments or "
                        "encoded separators)")
    live = [r for r in policy_set.rules if r.matches_request(facts, ip)]
    route_rules = [r for r in live if not r.is_method_rule]
    method_rules = [r for r in live if r.is_method_rule]
    calls = facts.jmap_methods or ()

    for r in route_rules:
        if r.effect == "deny":
            return Decision(False, "deny", r.id, r.reason, None, r.policy)
    for name in calls:
        for r in method_rules:
            if r.effect == "deny" and r.matches_method(name):
                return Decision(False, "deny", r.id, r.reason, name, r.policy)

    route_allow = next((r for r in route_rules if r.effect == "allow"), None)
    if route_allow is None:
        return Decision(False, "deny", None, "no policy rule allows this route")
    for name in calls:
        if not any(r.effect == "allow" and r.matches_method(name) for r in method_rules):
            return Decision(False, "deny", None, "no policy rule allows this method", name)
    return Decision(True, "allow", route_allow.id, route_allow.reason, None, route_allow.policy)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SECOND = timedelta(seconds=1)


class DecisionCache:
    """Decisions of one PolicySet remembered per request shape (most traffic repeats a few).

    `key(...)` is everything a decision can depend on: the HTTP method, the path, the JMAP method
    names and capabilities, the identity's presence, roles, tenant, auth method and scopes, the
    client address only when some rule has `cidrs`, and, when some rule has `time` windows, which
    of those windows contain `now` (`window_states`). Long paths and requests with many method
    calls are not cached (key returns None), and at most `size` entries are kept (the oldest go
    first). A reloaded policy is a new PolicySet, hence a new cache. Pure but for a memo of the
    window states of the last second."""

    __slots__ = ("policy_set", "enabled", "by_ip", "windows", "size", "_items", "_second", "_states")

    MAX_PATH = 512
    MAX_CALLS = 32

    def __init__(self, policy_set: PolicySet, size: int = 4096) -> None:
        self.policy_set = policy_set
        self.enabled = size > 0
        self.by_ip = any(r.cidrs is not None for r in policy_set.rules)
        # every time window of every rule, in rule order: a decision reads the clock through these only
        self.windows: tuple[TimeWindow, ...] = tuple(w for r in policy_set.rules if r.time for w in r.time)
        self.size = size
        self._items: dict[tuple, Any] = {}
        self._second: int | None = None
        self._states: tuple[bool, ...] = ()

    def window_states(self, now: datetime) -> tuple[bool, ...]:
        """Which of `windows` contain `now`. A window's answer reads the local weekday and minute
        only, and time zone offsets are whole seconds, so it cannot change within one whole UTC
        second: the answer of the last second asked is reused."""
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        second = (now - _EPOCH) // _SECOND  # exact: no float rounding at a second's edge
        if second != self._second:
            self._states = tuple(w.contains(now) for w in self.windows)
            self._second = second
        return self._states

    def key(self, method: str, path: str, jmap_methods: tuple[str, ...] | None,
            using: tuple[str, ...] | None, identity: Identity | None, source_ip: str,
            now: datetime | None = None) -> tuple | None:
        """The cache key for a request, or None when its decision must not be cached (`now` is
        needed when the set has time windows)."""
        if not self.enabled or len(path) > self.MAX_PATH or (
                jmap_methods is not None and len(jmap_methods) > self.MAX_CALLS) or (
                using is not None and len(using) > self.MAX_CALLS):
            return None
        if self.windows:
            if now is None:
                return None
            when: tuple[bool, ...] | None = self.window_states(now)
        else:
            when = None
        who = None if identity is None else (identity.roles, identity.tenant, identity.method,
                                             identity.scopes)
        return (method, path, jmap_methods, using, who, source_ip if self.by_ip else None, when)

    def get(self, key: tuple) -> Any:
        return self._items.get(key)

    def put(self, key: tuple, value: Any) -> None:
        items = self._items
        if len(items) >= self.size:
            del items[next(iter(items))]
        items[key] = value

    def __len__(self) -> int:
        return len(self._items)


@functools.lru_cache(maxsize=4096)  # client addresses repeat; parsing one is ~20 Python calls
def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_ENCODED_SEP = re.compile(r"%(?:2[fFeE]|5[cC])")


def _canonical(path: str) -> bool:
    """No `.`/`..` or empty segments and no encoded `/`, `.` or `\\` that could turn into them
    upstream: such a path could match a pattern here and mean another path there."""
    if "\\" in path or _ENCODED_SEP.search(path):
        return False
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        if seg in (".", ".."):
            return False
        if seg == "" and i != len(segments) - 1:
            return False
    return path.startswith("/") or path == "*"


# ------------------------------------------------------------------------------------- loading

class _Map(dict):
    """A YAML mapping that remembers its line and the line of each key (1-based)."""
    line: int = 0
    key_lines: dict


class _Seq(list):
    """A YAML sequence that remembers the line of each item."""
    line: int = 0
    item_lines: list


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    m = _Map()
    m.line = node.start_mark.line + 1
    m.key_lines = {}
    for knode, vnode in node.value:
        key = loader.construct_object(knode, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a string",
                                                    knode.start_mark)
        if key in m:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                    knode.start_mark)
        m[key] = loader.construct_object(vnode, deep=True)
        m.key_lines[key] = knode.start_mark.line + 1
    return m


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    s = _Seq(loader.construct_object(n, deep=True) for n in node.value)
    s.line = node.start_mark.line + 1
    s.item_lines = [n.start_mark.line + 1 for n in node.value]
    return s


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


class _Ctx:
    """Error reporting for one file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, reason: str, line: int | None) -> ConfigError:
        where = f"{self.source}, line {line}" if line else self.source
        return ConfigError(key, reason, source=where)


def parse_policy(text: str, source: str, *, default_timezone: str = "UTC") -> PolicyFile:
    """Validate one policy file. Raises ConfigError naming `source` and the line."""
    ctx = _Ctx(source)
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ctx.error("policy", f"invalid YAML: {e.problem or e}",
                        mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise ctx.error("policy", f"invalid YAML: {e}", None) from None
    if doc is None:
        raise ctx.error("policy", "the file is empty", None)
    if not isinstance(doc, _Map):
        raise ctx.error("policy", "the top level must be a mapping with `name` and `rules`", 1)
    _unknown(ctx, doc, _FILE_KEYS, "")
    stem = source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    name = doc.get("name", stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ctx.error("name", "must be 1-64 letters, digits, '.', '_' or '-' (it is a metric label)",
                        doc.key_lines.get("name", doc.line))
    if "version" in doc and doc["version"] != 1:
        raise ctx.error("version", f"unsupported version {doc['version']!r} (known: 1)",
                        doc.key_lines["version"])
    if "rules" not in doc:
        raise ctx.error("rules", "missing (a list of rules)", doc.line)
    rules_node = doc["rules"]
    if not isinstance(rules_node, _Seq):
        raise ctx.error("rules", "must be a list of rules", doc.key_lines["rules"])
    tz = _zone(ctx, default_timezone, "timezone", None)
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, node in enumerate(rules_node):
        line = rules_node.item_lines[i]
        if not isinstance(node, _Map):
            raise ctx.error(f"rules[{i}]", "a rule must be a mapping", line)
        rule = _parse_rule(ctx, node, f"rules[{i}]", name, tz)
        if rule.id in seen:
            raise ctx.error(f"rules[{i}].id", f"duplicate rule id {rule.id!r} (first at line "
                            f"{seen[rule.id]})", node.key_lines["id"])
        seen[rule.id] = node.line
        rules.append(rule)
    return PolicyFile(name, source, tuple(rules))


def build_set(files: Iterable[PolicyFile]) -> PolicySet:
    """Merge files in order. Rule ids and file names must be unique across the set."""
    files = tuple(files)
    ids: dict[str, Rule] = {}
    names: dict[str, str] = {}
    for f in files:
        if f.name in names:
            raise ConfigError("name", f"policy name {f.name!r} is also used by {names[f.name]}",
                              source=f.source)
        names[f.name] = f.source
        for r in f.rules:
            if r.id in ids:
                raise ConfigError("id", f"duplicate rule id {r.id!r} (also in {ids[r.id].source})",
                                  source=r.source)
            ids[r.id] = r
    return PolicySet(files, tuple(r for f in files for r in f.rules))


def _unknown(ctx: _Ctx, node: _Map, known: frozenset[str], prefix: str) -> None:
    for k in node:
        if k not in known:
            raise ctx.error(f"{prefix}{k}", f"unknown key (known: {', '.join(sorted(known))})",
                            node.key_lines[k])


def _parse_rule(ctx: _Ctx, node: _Map, key: str, policy: str, tz: ZoneInfo | timezone) -> Rule:
    _unknown(ctx, node, _RULE_KEYS, f"{key}.")
    kl = node.key_lines

    def line(k: str) -> int:
        return kl.get(k, node.line)

    if "id" not in node:
        raise ctx.error(f"{key}.id", "missing: every rule needs an id", node.line)
    rid = node["id"]
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise ctx.error(f"{key}.id", "must be 1-128 letters, digits, '.', '_', ':' or '-'", line("id"))
    key = f"{key}({rid})"
    effect = node.get("effect")
    if effect not in ("allow", "deny"):
        raise ctx.error(f"{key}.effect", f"must be allow or deny, got {effect!r}", line("effect"))
    reason = node.get("reason", "")
    if not isinstance(reason, str):
        raise ctx.error(f"{key}.reason", "must be a string", line("reason"))
    if effect == "deny" and not reason.strip():
        raise ctx.error(f"{key}.reason", "a deny rule needs a reason (it is shown to the client)",
                        line("reason"))
    if "description" in node and not isinstance(node["description"], str):
        raise ctx.error(f"{key}.description", "must be a string", line("description"))
    identity = node.get("identity", "authenticated" if effect == "allow" else "any")
    if identity not in ("authenticated", "anonymous", "any"):
        raise ctx.error(f"{key}.identity", f"must be authenticated, anonymous or any, got {identity!r}",
                        line("identity"))

    def strings(k: str) -> tuple[list[str], list[int]] | None:
        if k not in node:
            return None
        v = node[k]
        if isinstance(v, str):
            v = _Seq([v])
            v.item_lines = [line(k)]
        if not isinstance(v, _Seq):
            raise ctx.error(f"{key}.{k}", "must be a list of strings", line(k))
        if not v:
            raise ctx.error(f"{key}.{k}", "must not be empty (leave the key out to match anything)",
                            line(k))
        for j, item in enumerate(v):
            if not isinstance(item, str) or not item.strip():
                raise ctx.error(f"{key}.{k}[{j}]", f"must be a non-empty string, got {item!r}",
                                v.item_lines[j])
        return [s.strip() for s in v], list(v.item_lines)

    http_methods = None
    if (got := strings("http_methods")) is not None:
        vals, lines = got
        for j, m in enumerate(vals):
            if m != "*" and not _HTTP_METHOD_RE.match(m):
                raise ctx.error(f"{key}.http_methods[{j}]", f"not an HTTP method: {m!r} (use upper case)",
                                lines[j])
        http_methods = None if "*" in vals else frozenset(vals)

    def path_globs(k: str) -> tuple[Glob, ...] | None:
        if (got := strings(k)) is None:
            return None
        vals, lines = got
        for j, p in enumerate(vals):
            if not p.startswith("/"):
                raise ctx.error(f"{key}.{k}[{j}]", f"a path pattern starts with '/', got {p!r}", lines[j])
        return tuple(Glob(p, path=True) for p in vals)

    def name_globs(k: str) -> tuple[Glob, ...] | None:
        if (got := strings(k)) is None:
            return None
        return tuple(Glob(p, path=False) for p in got[0])

    def string_set(k: str) -> frozenset[str] | None:
        got = strings(k)
        return None if got is None else frozenset(got[0])

    auth = string_set("auth")
    if auth is not None and not auth <= AUTH_METHODS:
        bad = ", ".join(sorted(auth - AUTH_METHODS))
        raise ctx.error(f"{key}.auth", f"unknown auth method {bad} (known: api_key, jwt)", line("auth"))

    cidrs = None
    if (got := strings("cidrs")) is not None:
        nets = []
        for j, c in enumerate(got[0]):
            try:
                nets.append(ipaddress.ip_network(c, strict=True))
            except ValueError as e:
                raise ctx.error(f"{key}.cidrs[{j}]", f"bad CIDR {c!r}: {e}", got[1][j]) from None
        cidrs = tuple(nets)

    windows = None
    if "time" in node:
        raw = node["time"]
        if isinstance(raw, _Map):
            raw_list, lines = [raw], [raw.line]
        elif isinstance(raw, _Seq) and raw:
            raw_list, lines = list(raw), list(raw.item_lines)
        else:
            raise ctx.error(f"{key}.time", "must be a time window {days, hours} or a list of them",
                            line("time"))
        windows = tuple(_parse_window(ctx, w, f"{key}.time[{j}]", lines[j], tz)
                        for j, w in enumerate(raw_list))

    rule = Rule(
        id=rid, effect=effect, reason=reason.strip(), policy=policy,
        source=f"{ctx.source}, line {node.line}", identity=identity,
        http_methods=http_methods, paths=path_globs("paths"),
        except_paths=path_globs("except_paths") or (),
        jmap_methods=name_globs("jmap_methods"), using=name_globs("using"),
        roles=string_set("roles"), tenants=string_set("tenants"), cidrs=cidrs, time=windows,
        auth=auth, scopes=string_set("scopes"))
    if identity == "anonymous":
        for k in ("roles", "tenants", "auth", "scopes"):
            if k in node:
                raise ctx.error(f"{key}.{k}", "can never match: the rule is for anonymous clients",
                                line(k))
    return rule


def _zone(ctx: _Ctx, name: Any, key: str, line: int | None) -> ZoneInfo | timezone:
    if not isinstance(name, str) or not name:
        raise ctx.error(key, f"expected a timezone name such as Europe/Paris, got {name!r}", line)
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ctx.error(key, f"unknown timezone {name!r}", line) from None


def _parse_window(ctx: _Ctx, node: Any, key: str, line: int, tz: ZoneInfo | timezone) -> TimeWindow:
    if not isinstance(node, _Map):
        raise ctx.error(key, "a time window is a mapping with `days` and `hours`", line)
    _unknown(ctx, node, _WINDOW_KEYS, f"{key}.")
    kl = node.key_lines
    hours = node.get("hours", "00:00-24:00")
    m = _HOURS_RE.match(hours) if isinstance(hours, str) else None
    if m is None:
        raise ctx.error(f"{key}.hours", f"expected HH:MM-HH:MM, got {hours!r} (quote it)",
                        kl.get("hours", node.line))
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
        raise ctx.error(f"{key}.hours", f"time out of range in {hours!r}", kl.get("hours", node.line))
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end % 1440 and not (start == 0 and end == 1440):
        raise ctx.error(f"{key}.hours", f"empty window {hours!r} (use 00:00-24:00 for all day)",
                        kl.get("hours", node.line))
    days = _parse_days(ctx, node.get("days", "mon-sun"), f"{key}.days", kl.get("days", node.line))
    if "timezone" in node:
        tz = _zone(ctx, node["timezone"], f"{key}.timezone", kl["timezone"])
    return TimeWindow(days, start, end, tz)


def _parse_days(ctx: _Ctx, value: Any, key: str, line: int) -> frozenset[int]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ctx.error(key, "expected day names such as [mon, tue] or a range such as mon-fri", line)
    out: set[int] = set()
    for item in items:
        text = item.strip().lower() if isinstance(item, str) else None
        if text is None:
            raise ctx.error(key, f"not a day: {item!r}", line)
        first, sep, last = text.partition("-")
        if first not in _DAY_ALIASES or (sep and last not in _DAY_ALIASES):
            raise ctx.error(key, f"not a day or day range: {item!r} (use mon..sun)", line)
        a = _DAY_ALIASES[first]
        b = _DAY_ALIASES[last] if sep else a
        out.update((a + k) % 7 for k in range((b - a) % 7 + 1))
    return frozenset(out)
