"""The service's front gate without a model: the keys file, Host header parsing, which requests are writes,
the refusals (401 with a Bearer challenge, 403, 421) and the warning for a non-loopback bind without keys."""
from __future__ import annotations

import argparse
import json
import logging

import pytest

from notellm_jax.errors import ConfigError
from notellm_jax.serve import access as access_mod
from notellm_jax.serve.access import KEYS_ENV, Access, host_name, is_write, read_keys, warn_if_exposed
from notellm_jax.serve.cli import add_arguments

READ, ADMIN = "r" * 8 + "-read-key-0001", "a" * 8 + "-admin-key-0001"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# service keys\nread {READ}\n\nadmin {ADMIN}  # ops\n")
    return path


def headers(host="127.0.0.1:8080", key=None):
    out = {b"host": host.encode()}
    if key is not None:
        out[b"authorization"] = f"Bearer {key}".encode()
    return out


def test_keys_file_roles_and_refusals(key_file, tmp_path):
    assert sorted(role for _, role in read_keys(key_file)) == ["admin", "read"]
    for text, message in [("write " + READ, "expected `read <key>`"), ("read short", "at least 16"),
                          (f"read {READ}\nadmin {READ}", "listed twice"), ("# nothing\n", "holds no key")]:
        (tmp_path / "bad").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_keys(tmp_path / "bad")
    with pytest.raises(ConfigError, match="does not exist"):
        read_keys(tmp_path / "missing")


@pytest.mark.parametrize("header, host", [("LocalHost:8080", "localhost"), ("[::1]:8080", "::1"), ("[::1]", "::1"),
                                          ("example.org", "example.org"), ("10.0.0.2:80", "10.0.0.2")])
def test_host_name(header, host):
    assert host_name(header) == host


def test_writes_are_puts_deletes_and_the_rebuild():
    assert is_write("PUT", "/notes/a/b") and is_write("DELETE", "/notes/x") and is_write("POST", "/index/rebuild")
    assert not any(is_write(m, p) for m, p in [("POST", "/embed"), ("POST", "/similar"), ("GET", "/notes/x"),
                                               ("POST", "/v1/embeddings"), ("POST", "/generate")])


def test_refusals(key_file, monkeypatch):
    gate = Access.from_options(str(key_file), None, "127.0.0.1")
    assert gate.allowed_hosts == {"127.0.0.1", "localhost", "::1"}
    assert gate.refusal("GET", "/healthz", headers()) is None
    for given, status in [(None, 401), ("not-a-key-at-all-0000", 401), (READ, 403), (ADMIN, None)]:
        answer = gate.refusal("DELETE", "/notes/x", headers(key=given))
        assert (answer and answer.status_code) == status
        if status == 401:
            assert answer.headers["www-authenticate"] == "Bearer" and json.loads(answer.body)["detail"]
    assert gate.refusal("POST", "/embed", headers(key=READ)) is None
    refused = gate.refusal("PUT", "/notes/x", headers("attacker.example", ADMIN))
    assert refused.status_code == 421 and "attacker.example" in json.loads(refused.body)["detail"]
    calls = []
    real = access_mod.hmac.compare_digest
    monkeypatch.setattr(access_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    gate.refusal("GET", "/notes/x", headers(key=READ))
    assert len(calls) == 2  # every stored key compared, in constant time, even after a match
    assert Access.from_options(None, ["*"], "0.0.0.0").allowed_hosts is None


def test_cli_options_and_the_environment_variable(key_file, monkeypatch, caplog):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--index", "i", "--allowed-hosts", "api.example,localhost", "--docs"])
    assert args.allowed_hosts == ["api.example", "localhost"] and args.docs and args.api_key_file is None
    assert not parser.parse_args(["--index", "i"]).docs
    monkeypatch.setenv(KEYS_ENV, str(key_file))
    gate = Access.from_options(args.api_key_file, args.allowed_hosts, "0.0.0.0")
    assert len(gate.keys) == 2 and gate.allowed_hosts == {"api.example", "localhost"}
    with caplog.at_level(logging.WARNING, logger="notellm_jax.serve"):
        assert not warn_if_exposed("0.0.0.0", gate) and not warn_if_exposed("127.0.0.1", Access())
        assert not warn_if_exposed("::1", Access()) and warn_if_exposed("0.0.0.0", Access())
    assert "without API keys" in caplog.text
