"""Hosts, proxies and the path base: the one ASGI layer in front of the app.

:class:`ProxyLayer` runs first for every request (``tileserver serve`` runs uvicorn with
``proxy_headers=False``, so no other code believes a forwarding header):

1. ``AllowedHosts`` (ASP.NET's host filtering): ``*`` serves every ``Host``; otherwise a
   ``;``-separated list of names, ``*.example.org`` matching its subdomains; ports are ignored.
   Another host gets 400 JSON (a DNS-rebound page names the attacker's host).
2. ``ForwardedHeaders`` (ASP.NET's forwarded headers middleware): only when the peer is in
   ``KnownProxies``/``KnownNetworks``, ``X-Forwarded-For`` is read right to left, taking up to
   ``ForwardLimit`` entries while each hop is itself a known proxy; the client becomes the last
   entry taken (so a client's own forged ``X-Forwarded-For``, which nginx's
   ``$proxy_add_x_forwarded_for`` puts to the left of the address it saw, is not believed).
   ``X-Forwarded-Proto`` sets the scheme and ``X-Forwarded-Prefix`` the path base, from such a
   peer only. The scope then carries :data:`FORWARDED_KEY`.
3. ``PathBase``: a request under it is served with ``root_path`` = the base, as
   ``X-Forwarded-Prefix`` does for a proxy that strips its prefix (``path`` is then the prefix
   plus the path received, as the ASGI spec and Starlette's router expect). Every URL the app
   gives out (pages, scripts, API documents, ``Location``, OpenAPI ``servers``) starts with
   ``root_path``.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from app.server.errors import error_json
from app.settings import Settings

FORWARDED_KEY = "tileserver.forwarded"
"""ASGI scope key set when a forwarding header of a known proxy was believed."""
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$")


def host_name(host: str) -> str:
    """The name of a ``Host`` header value: port and IPv6 brackets removed, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def clean_prefix(value: str) -> str | None:
    """A path prefix from a header (``/wsi``, trailing ``/`` dropped), or None when it is not
    a plain absolute path (no ``..``, no query, no control characters)."""
    value = value.strip().rstrip("/")
    if not value or not _PREFIX.match(value) or "/.." in value or "/./" in value + "/":
        return None
    return value


class ProxyLayer:
    """The ASGI middleware of the module docstring.

    Args:
        app: the application.
        settings: ``AllowedHosts``, ``ForwardedHeaders``, ``PathBase``.
    """

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        hosts = [h.strip().lower() for h in settings.AllowedHosts.split(";") if h.strip()]
        self.any_host = not hosts or "*" in hosts
        self.hosts = frozenset(h for h in hosts if not h.startswith("*."))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
        forwarded = settings.ForwardedHeaders
        self.proxies = frozenset(ipaddress.ip_address(p) for p in forwarded.KnownProxies)
        self.networks = tuple(ipaddress.ip_network(n, strict=False)
                              for n in forwarded.KnownNetworks)
        self.limit = forwarded.ForwardLimit
        self.path_base = settings.PathBase

    @staticmethod
    def needed(settings: Settings) -> bool:
        """Whether the layer has anything to do: a host list, a proxy, a path base."""
        hosts = [h.strip() for h in settings.AllowedHosts.split(";") if h.strip()]
        forwarded = settings.ForwardedHeaders
        return bool((hosts and "*" not in hosts) or forwarded.KnownProxies
                    or forwarded.KnownNetworks or settings.PathBase)

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (one layer per app, a few peers)
    def trusted(self, address: str) -> bool:
        """Whether an address is a known proxy or lies in a known network."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip in self.proxies or any(ip in net for net in self.networks)

    def host_allowed(self, host: bytes | None) -> bool:
        """Whether ``AllowedHosts`` lets a ``Host`` value through."""
        if self.any_host:
            return True
        if host is None:
            return False
        name = host_name(host.decode("latin-1"))
        return name in self.hosts or (bool(name) and name.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: check the host, apply forwarding headers and the path base."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = None
        forwarded_for: list[bytes] = []
        proto = prefix = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
            elif name == b"x-forwarded-proto":
                proto = value
            elif name == b"x-forwarded-prefix":
                prefix = value
        if not self.host_allowed(host):
            status, body = error_json(400, "bad_host", "this server does not serve that host "
                                      "(AllowedHosts)")
            await send({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        client = scope.get("client")
        if ((forwarded_for or proto or prefix) and client is not None
                and self.trusted(client[0])):
            scope = dict(scope)
            scope[FORWARDED_KEY] = True
            address = self._client(forwarded_for, client[0])
            if address != client[0]:
                scope["client"] = (address, 0)
            if proto is not None:
                scheme = proto.decode("latin-1").rpartition(",")[2].strip().lower()
                if scheme in ("http", "https"):
                    scope["scheme"] = scheme
            base = clean_prefix(prefix.decode("latin-1")) if prefix is not None else None
            if base is not None:
                raw = scope.get("raw_path") or scope["path"].encode("latin-1")
                scope["root_path"] = base
                scope["path"] = base + scope["path"]
                scope["raw_path"] = base.encode("latin-1") + raw
                await self.app(scope, receive, send)
                return
        if self.path_base:
            path = scope["path"]
            base = self.path_base
            if path == base or path.startswith(base + "/"):
                scope = {**scope, "root_path": base}
        await self.app(scope, receive, send)

    def _client(self, values: list[bytes], peer: str) -> str:
        """The client address after ``X-Forwarded-For`` (see the module docstring)."""
        entries = [e.strip() for v in values for e in v.decode("latin-1").split(",")]
        current = peer
        for _ in range(self.limit):
            if not entries or not self.trusted(current):
                break
            entry = entries.pop()
            try:
                ipaddress.ip_address(entry)
            except ValueError:
                break
            current = entry
        return current
