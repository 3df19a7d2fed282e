"""Pure pieces of the SMTP submission listener: the replies it writes, the server replies it
reads."""
from __future__ import annotations

import asyncio

import pytest

from proxy.smtp import ehlo_reply, multiline, parse_reply_line, read_reply


@pytest.mark.parametrize("lines, want", [
    (["OK"], b"250 OK\r\n"),
    (["a", "b"], b"250-a\r\n250 b\r\n"),
    (["a", "b", "c"], b"250-a\r\n250-b\r\n250 c\r\n"),
])
def test_multiline(lines, want):
    assert multiline(250, lines) == want


@pytest.mark.parametrize("starttls, auth, want", [
    (True, False, ["mx", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS"]),
    (False, True, ["mx", "8BITMIME", "ENHANCEDSTATUSCODES", "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER"]),
    (True, True, ["mx", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS", "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER"]),
    (False, False, ["mx", "8BITMIME", "ENHANCEDSTATUSCODES"]),
])
def test_ehlo_reply(starttls, auth, want):
    lines = ehlo_reply("mx", starttls=starttls, auth=auth).decode().split("\r\n")
    assert lines[-1] == ""
    assert [x[4:] for x in lines[:-1]] == want
    assert [x[:4] for x in lines[:-1]] == ["250-"] * (len(want) - 1) + ["250 "]


@pytest.mark.parametrize("line, want", [
    (b"220 mx ESMTP\r\n", (220, False)),
    (b"250-mx\r\n", (250, True)),
    (b"250\r\n", (250, False)),
    (b"235 2.7.0 ok\n", (235, False)),
    (b"334 \r\n", (334, False)),
    (b"554 5.7.1 go away\r\n", (554, False)),
])
def test_parse_reply_line(line, want):
    assert parse_reply_line(line) == want


@pytest.mark.parametrize("line", [
    b"\r\n", b"25\r\n", b"2500 x\r\n", b"abc def\r\n", b"250_x\r\n", b"150 x\r\n", b"650 x\r\n",
    b"* OK imap\r\n", b"AUTH PLAIN c2VjcmV0\r\n",
])
def test_parse_reply_line_refuses_what_is_not_a_reply(line):
    with pytest.raises(ValueError) as e:
        parse_reply_line(line)
    assert b"c2VjcmV0" not in str(e.value).encode()  # the line is never quoted


def reader_of(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


@pytest.mark.parametrize("data, want", [
    (b"220 mx ESMTP\r\n", 220),
    (b"250-mx\r\n250-8BITMIME\r\n250 AUTH PLAIN\r\n", 250),
    (b"250-mx\r\n250 AUTH PLAIN\r\n235 next reply\r\n", 250),
])
async def test_read_reply(data, want):
    assert await read_reply(reader_of(data)) == want


async def test_read_reply_leaves_the_next_reply_unread():
    r = reader_of(b"250-mx\r\n250 OK\r\n235 2.7.0 in\r\n")
    assert await read_reply(r) == 250
    assert await read_reply(r) == 235


@pytest.mark.parametrize("data, error", [
    (b"250-mx\r\n251 x\r\n", ValueError),
    (b"250-mx\r\n", asyncio.IncompleteReadError),
    (b"", asyncio.IncompleteReadError),
    (b"hello\r\n", ValueError),
])
async def test_read_reply_errors(data, error):
    with pytest.raises(error):
        await read_reply(reader_of(data))
