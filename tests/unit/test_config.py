"""Configuration: precedence and the one-line error messages."""
from __future__ import annotations

import pytest

from proxy.config import load_config
from proxy.errors import ConfigError


def test_defaults():
    c = load_config(None, env={})
    assert c.listen == "127.0.0.1:8080" and c.admin_listen == "127.0.0.1:9901"
    assert c.stalwart.url == "https://stalwart.skygenesisenterprise.com"
    assert c.stalwart.routing_mode == "official" and c.stalwart.max_connections == 100
    assert c.stalwart.tls_min_version == "1.3" and c.chain is None


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("listen: 127.0.0.1:1111\nadmin_listen: 127.0.0.1:2222\n"
                 "stalwart: {max_connections: 7, connect_timeout: 9, url: 'https://file.example'}\n")
    env = {"SGE_LISTEN": "127.0.0.1:3333", "STALWART_MAX_CONNECTIONS": "8"}
    c = load_config(f, env=env, overrides={"listen": "127.0.0.1:4444"})
    assert c.listen == "127.0.0.1:4444"          # flag
    assert c.stalwart.max_connections == 8        # env over file
    assert c.stalwart.connect_timeout == 9.0      # file over default
    assert c.admin_listen == "127.0.0.1:2222"     # file
    assert c.stalwart.url == "https://file.example"
    assert c.source == str(f) and c.base_dir == tmp_path


@pytest.mark.parametrize("env,expected", [
    ({"SGE_CHAIN": ""}, ()),
    ({"SGE_CHAIN": "auth, policy"}, ("auth", "policy")),
    ({}, None),
])
def test_sge_chain(env, expected):
    assert load_config(None, env=env).chain == expected


@pytest.mark.parametrize("env,key,reason", [
    ({"STALWART_MAX_CONNECTIONS": "lots"}, "stalwart.max_connections", "expected an integer"),
    ({"STALWART_MAX_CONNECTIONS": "0"}, "stalwart.max_connections", "at least 1"),
    ({"STALWART_URL": "http://plain.example"}, "stalwart.url", "plain http upstream refused"),
    ({"STALWART_URL": "ftp://x"}, "stalwart.url", "scheme must be https"),
    ({"STALWART_URL": "https://u:p@x"}, "stalwart.url", "credentials"),
    ({"STALWART_ROUTING_MODE": "random"}, "stalwart.routing_mode", "must be one of"),
    ({"STALWART_CONNECT_TIMEOUT": "soon"}, "stalwart.connect_timeout", "expected a duration"),
    ({"STALWART_JMAP_PATH": "jmap"}, "stalwart.jmap_path", "must start with /"),
    ({"SGE_LISTEN": "nowhere"}, "listen", "HOST:PORT"),
    ({"SGE_ADMIN_LISTEN": "127.0.0.1:99999"}, "admin_listen", "out of range"),
    ({"STALWART_CLIENT_CERT": "/x.crt"}, "stalwart.client_cert", "go together"),
])
def test_bad_environment_names_key_and_reason(env, key, reason):
    with pytest.raises(ConfigError) as ei:
        load_config(None, env=env)
    msg = str(ei.value)
    assert key in msg and reason in msg and "\n" not in msg
    if key != "stalwart.client_cert":
        assert f"environment variable {next(iter(env))}" in msg


@pytest.mark.parametrize("text,key,reason", [
    ("stalwart: {max_conections: 5}\n", "stalwart.max_conections", "unknown key"),
    ("bogus: 1\n", "bogus", "unknown key"),
    ("limits: {max_header_bytes: huge}\n", "limits.max_header_bytes", "expected a size"),
    ("stalwart: [1, 2]\n", "stalwart", "expected a mapping"),
    ("listen: [\n", "--config", "invalid YAML"),
    ("- a\n- b\n", "--config", "top level must be a mapping"),
    ("trusted_proxies: [10.0.0.0/8, lb.example]\n", "trusted_proxies[1]", "not an address or CIDR"),
    ("mail: {imap: {listen: nowhere}}\n", "mail.imap.listen", "expected HOST:PORT"),
    ("mail: {submission: {upstream_port: 0}}\n", "mail.submission.upstream_port", "must be a port number"),
    ("mail: {imap: {upstream_tls: starttls}}\n", "mail.imap.upstream_tls", "starttls"),
    ("listen: 8080\n", "listen", "expected HOST:PORT"),
    ("mail: {imap: {tls: implicit, proxy_protocol_from: [10.0.0.0/8]}}\n", "mail.imap.proxy_protocol_from",
     "needs tls: starttls"),
    ("mail: {sieve: {proxy_protocol_from: [lb]}}\n", "mail.sieve.proxy_protocol_from[0]", "not an address"),
])
def test_bad_file_names_key_file_and_reason(tmp_path, text, key, reason):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={})
    msg = str(ei.value)
    assert key in msg and reason in msg and "bad.yaml" in msg


def test_units():
    c = load_config(None, env={}, overrides={"limits.max_header_bytes": "32KiB",
                                             "stalwart.request_timeout": "1500ms"})
    assert c.limits.max_header_bytes == 32768 and c.stalwart.response_timeout == 1.5


def test_relative_paths_from_env_are_relative_to_cwd_and_from_file_to_the_file(tmp_path, monkeypatch):
    d = tmp_path / "conf"
    d.mkdir()
    f = d / "c.yaml"
    f.write_text("stalwart: {ca_cert: in-file/ca.crt}\n")
    monkeypatch.chdir(tmp_path)
    c = load_config(f, env={"STALWART_CLIENT_CERT": "env/c.crt", "STALWART_CLIENT_KEY": "env/c.key"})
    assert c.resolve(c.stalwart.client_cert) == tmp_path / "env" / "c.crt"
    assert c.resolve(c.stalwart.ca_cert) == d / "in-file" / "ca.crt"
