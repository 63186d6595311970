"""Who may reach the service: API keys (read and admin) and the Host header, checked before any route runs.

Keys file (`--api-key-file` or $NOTELLM_API_KEYS_FILE): one key a line, `read <key>` or `admin <key>`; blank
lines and `#` comments are ignored; a key is at least 16 characters without spaces. With keys, every route
but `/healthz`, `/readyz` and the page `/` (static HTML, no data: it asks for a key and sends it itself) needs
`Authorization: Bearer <key>` (401 without one or with an unknown one, with
`WWW-Authenticate: Bearer`), and a write (PUT/DELETE/PATCH, POST /index/rebuild) needs an admin key (403 for
a read key). Keys are compared as SHA-256 digests with `hmac.compare_digest` against every stored key, so
the time taken says nothing about how much of a key was right.

Allowed hosts: a request whose Host header (port aside) is not in the list is refused with 421 (a page on
another site reaching the port through DNS rebinding sends its own host name). `*` allows any host.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.responses import JSONResponse

from notellm_jax.errors import ConfigError
from notellm_jax.serve.openai_api import openai_error

KEYS_ENV = "NOTELLM_API_KEYS_FILE"
ROLES = ("read", "admin")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
MIN_KEY_CHARS = 16
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("notellm_jax.serve")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def read_keys(path: str | Path) -> tuple[tuple[bytes, str], ...]:
    """(SHA-256 digest of the key, role) for every line of a keys file; ConfigError naming the line else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"API keys file {path} does not exist")
    keys: dict[bytes, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in ROLES:
            raise ConfigError(f"{path}:{number}: expected `read <key>` or `admin <key>`")
        if len(words[1]) < MIN_KEY_CHARS:
            raise ConfigError(f"{path}:{number}: a key needs at least {MIN_KEY_CHARS} characters")
        if _digest(words[1].encode()) in keys:
            raise ConfigError(f"{path}:{number}: this key is listed twice")
        keys[_digest(words[1].encode())] = words[0]
    if not keys:
        raise ConfigError(f"API keys file {path} holds no key: lines `read <key>` or `admin <key>`")
    return tuple(keys.items())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_hosts(bound: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys([bound.strip("[]").lower(), *LOOPBACK_NAMES]))


def host_name(header: str) -> str:
    """The host of a Host header, port and IPv6 brackets removed, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclasses.dataclass(frozen=True)
class Access:
    """`keys`: (digest, role) pairs, none = no key needed. `allowed_hosts`: None = any Host header."""
    keys: tuple[tuple[bytes, str], ...] = ()
    allowed_hosts: frozenset[str] | None = None

    @classmethod
    def from_options(cls, key_file: str | None, hosts: Iterable[str] | None, bound: str) -> "Access":
        key_file = key_file or os.environ.get(KEYS_ENV) or None
        hosts = [h.strip().strip("[]").lower() for h in (hosts or default_hosts(bound)) if h.strip()]
        return cls(read_keys(key_file) if key_file else (), None if "*" in hosts else frozenset(hosts))

    def role(self, token: bytes) -> str | None:
        """The role of `token`, compared with every stored key in constant time."""
        digest, role = _digest(token), None
        for key, key_role in self.keys:
            if hmac.compare_digest(key, digest):
                role = key_role
        return role

    def refusal(self, method: str, path: str, headers: dict[bytes, bytes]) -> JSONResponse | None:
        """The answer refusing this request, or None when it may go on."""
        if self.allowed_hosts is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                return refuse(path, 421, f"Host {host!r} is not served here (allowed: "
                                         f"{', '.join(sorted(self.allowed_hosts))}; see --allowed-hosts)")
        if not self.keys or path in OPEN_PATHS:
            return None
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return refuse(path, 401, "an API key is needed: send `Authorization: Bearer <key>`")
        role = self.role(token.strip())
        if role is None:
            return refuse(path, 401, "unknown API key")
        if role != "admin" and is_write(method, path):
            return refuse(path, 403, f"{method} {path} changes the index: it needs an admin key, not a read key")
        return None


def refuse(path: str, status: int, message: str) -> JSONResponse:
    """`{"detail": message}` (with OpenAI's error object on /v1 routes); 401 carries the Bearer challenge."""
    body: dict = {"detail": message}
    if path.startswith("/v1/"):
        body["error"] = openai_error(status, message)
    return JSONResponse(body, status, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def is_write(method: str, path: str) -> bool:
    return method in ("PUT", "DELETE", "PATCH") or (method == "POST" and path == "/index/rebuild")


class Guard:
    """ASGI middleware applying an `Access` to every HTTP request before routing."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.access.refusal(scope["method"], scope["path"], dict(scope["headers"]))
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def warn_if_exposed(host: str, access: Access) -> bool:
    """Log a warning (and return True) when binding a non-loopback address without API keys."""
    if is_loopback(host) or access.keys:
        return False
    log.warning("serving on %s, beyond this machine, without API keys: anyone who reaches the port can "
                "read, upsert, delete and rebuild; give --api-key-file (or $%s)", host, KEYS_ENV)
    return True
