"""proxy.ratelimit.FailureBans: failed authentications per address, then a ban."""
from __future__ import annotations

import pytest

from proxy.ratelimit import FailureBans


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("events, banned_at_end", [
    # (seconds after the start, address) per failure; 3 failures within 60 s ban for 100 s
    ([(0, "a"), (1, "a"), (2, "a")], {"a"}),
    ([(0, "a"), (1, "a")], set()),                                  # one short
    ([(0, "a"), (30, "a"), (61, "a")], set()),                      # the window expired: counting anew
    ([(0, "a"), (30, "a"), (61, "a"), (62, "a"), (63, "a")], {"a"}),
    ([(0, "a"), (1, "b"), (2, "a"), (3, "b")], set()),              # addresses count apart
    ([(0, "a"), (1, "a"), (2, "a"), (103, "b")], set()),            # a's ban (100 s) is over
    ([(0, "10.0.0.7"), (1, "10.0.0.7"), (2, "10.0.0.7")], set()),   # exempt (10.0.0.0/8)
    ([(0, "::1"), (1, "::1"), (2, "::1")], {"::1"}),
])
def test_bans(events, banned_at_end):
    clock = Clock()
    bans = FailureBans(3, 60, 100, exempt=["10.0.0.0/8"], clock=clock)
    start = clock.now
    for t, addr in events:
        clock.now = start + t
        bans.failed(addr)
    assert {a for a in ("a", "b", "10.0.0.7", "::1") if bans.banned(a) is not None} == banned_at_end
    assert len(bans) == len(banned_at_end)


def test_the_failure_that_bans_says_so_and_the_ban_counts_down():
    clock = Clock()
    bans = FailureBans(2, 60, 100, clock=clock)
    assert not bans.active
    assert bans.failed("a") is False
    assert bans.failed("a") is True
    assert bans.active and bans.banned("a") == 100
    clock.now += 40
    assert bans.banned("a") == 60
    clock.now += 61
    assert bans.banned("a") is None and len(bans) == 0


def test_memory_is_bounded():
    bans = FailureBans(1, 60, 100, size=10, clock=Clock())
    for i in range(1000):
        bans.failed(f"192.0.2.{i % 250}-{i}")
    assert len(bans._bans) == 10 and len(bans._counts) <= 10


@pytest.mark.parametrize("kw, key", [
    ({"failures": -1}, "failures"), ({"window": 0}, "window"), ({"ban": -5}, "window"),
    ({"exempt": ("10.0.0.0/8", "lb.internal")}, "exempt"),
])
def test_bad_ban_options(kw, key):
    from addons.auth import BanOptions
    from proxy.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        BanOptions(**kw)
    assert e.value.key == key
