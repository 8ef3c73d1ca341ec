"""Credentials and what they prove: admin API keys, OIDC bearer tokens, signed URLs.

Each verifier turns a credential into a :class:`Principal` (who, by which method, with which
roles and slide grants) or raises :class:`CredentialError`; :mod:`app.server.auth` calls them
once per request and decides what the principal may do.

- :class:`ApiKeys` (``Auth:AdminApiKeys``): keys are held as SHA-256 digests only, read from a
  digest in the settings, a file or an environment variable; a presented key is hashed and
  compared with :func:`hmac.compare_digest`. A key grants the ``admin`` role.
- :class:`JwtVerifier` (``Auth:Jwt``): PyJWT checks the signature against the provider's JWKS
  (``JwksUrl``, fetched with httpx and kept ``JwksRefreshSeconds``, fetched again, at most every
  :data:`UNKNOWN_KID_REFETCH_SECONDS`, for a ``kid`` it does not hold: key rotation), the
  algorithm (asymmetric ones from ``Algorithms`` only, so neither ``alg: none`` nor HS256 signed
  with the public key passes), ``exp``/``nbf`` with ``ClockSkewSeconds``, ``iss`` and ``aud``.
  Verified tokens are kept until their ``exp`` (``TokenCacheSize``), so a viewer's token is
  checked once, not once per tile; the cache is emptied when the key set changes.
- :class:`UrlSigner` (``Auth:SignedUrls``): ``?grant=PATTERN&exp=UNIX&sub=SUBJECT&sig=MAC``,
  where ``MAC`` is the unpadded base64url HMAC-SHA256 of the canonical string
  ``tileserver-signed-url/v1\\n{grant}\\n{exp}\\n{sub}``; the order of the query does not
  matter, a repeated parameter does (refused).

Roles are ``viewer`` (listings, viewer pages, slides its grants cover) and ``admin`` (every
slide, caches, jobs). Slide grants are :func:`fnmatch.fnmatchcase` patterns on slide names.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import glob
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
import httpx
import jwt

from app.core.errors import ConfigError
from app.settings import ApiKeyEntry, JwtSettings, SignedUrlSettings

log = logging.getLogger(__name__)

VIEWER = "viewer"
ADMIN = "admin"
ROLES = frozenset({VIEWER, ADMIN})

PRINCIPAL_KEY = "tileserver.principal"
"""ASGI scope key of the request's :class:`Principal` (set by :class:`app.server.auth.AuthLayer`,
read by the routes and the audit log)."""
UNKNOWN_KID_REFETCH_SECONDS = 5.0
"""A token whose ``kid`` is not in the cached key set makes the verifier fetch the JWKS again,
at most this often (rotation is seen at once; random kids cannot flood the provider)."""
SIGNED_PARAMS = ("grant", "exp", "sub", "sig")
"""The query parameters of a signed URL."""
ASYMMETRIC = ("RSA", "EC", "OKP")
"""JWK key types used; a symmetric (``oct``) key in a JWKS is ignored."""
MIN_SECRET_BYTES = 32
MIN_API_KEY_CHARS = 16


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from, as authentication established it.

    Attributes:
        subject: ``sub`` of a token (also of a signed URL), ``apikey:<Id>``, or ``anonymous``.
        method: how: ``jwt``, ``apikey``, ``signed-url``, or ``none`` (no credentials).
        roles: a subset of :data:`ROLES`.
        slides: slide name patterns granted, or None for every slide.
        expires: UNIX time the credential expires, or None.
        problem: why presented credentials were refused (then no roles), else None.
        local: ``Auth:Mode none`` and a loopback client (see app.server.auth).
        cross_site: the request is a change of state sent by a page of another site.
    """

    subject: str
    method: str
    roles: frozenset[str] = frozenset()
    slides: tuple[str, ...] | None = ()
    expires: float | None = None
    problem: str | None = None
    local: bool = False
    cross_site: bool = False
    _seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def may_view(self, slide: str) -> bool:
        """Whether the grants cover the slide name (roles aside); remembered per name."""
        if self.slides is None:
            return True
        seen = self._seen.get(slide)
        if seen is None:
            seen = any(fnmatch.fnmatchcase(slide, p) for p in self.slides)
            if len(self._seen) < 4096:
                self._seen[slide] = seen
        return seen


ANONYMOUS = Principal("anonymous", "none")


class CredentialError(Exception):
    """Presented credentials are not valid; ``str()`` says why (no secret in it)."""


def exact_grant(name: str) -> str:
    """The grant pattern that matches exactly one slide name (glob characters escaped)."""
    return glob.escape(name)


# ------------------------------------------------------------------------------ API keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The admin API keys, held as SHA-256 digests.

    Args:
        entries: ``Auth:AdminApiKeys``.
        environ: where ``Environment`` entries are read (default ``os.environ``).

    Raises:
        ConfigError: a key file or variable is missing, or holds fewer than
            :data:`MIN_API_KEY_CHARS` characters (the message names the entry, never the key).
    """

    def __init__(self, entries: Iterable[ApiKeyEntry], environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self._keys: list[tuple[str, bytes]] = []
        for entry in entries:
            if entry.Sha256 is not None:
                self._keys.append((entry.Id, bytes.fromhex(entry.Sha256)))
                continue
            where = f"Auth:AdminApiKeys {entry.Id!r}"
            if entry.File is not None:
                try:
                    key = Path(entry.File).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(f"{where}: cannot read its File ({exc.strerror})") from None
            else:
                key = environ.get(entry.Environment or "", "").strip()
            if len(key) < MIN_API_KEY_CHARS:
                raise ConfigError(f"{where}: the key is missing or shorter than "
                                  f"{MIN_API_KEY_CHARS} characters")
            self._keys.append((entry.Id, _digest(key)))

    def identify(self, key: str) -> Principal:
        """The admin principal of a presented key.

        Raises:
            CredentialError: no configured key matches.
        """
        digest = _digest(key)
        found = None
        for key_id, known in self._keys:  # every entry compared: no early exit to time
            if hmac.compare_digest(known, digest):
                found = key_id
        if found is None:
            raise CredentialError("unknown API key")
        return Principal(f"apikey:{found}", "apikey", frozenset({ADMIN}), None)


# ------------------------------------------------------------------------------ OIDC tokens


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted claim path (``realm_access.roles``), or None."""
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _strings(value: Any) -> list[str]:
    """A claim as a list of strings: a list, or one space-separated string (OAuth's form)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


class JwtVerifier:
    """OIDC bearer tokens checked with PyJWT against a JWKS (see the module docstring).

    Args:
        settings: ``Auth:Jwt``.
        clock: UNIX time now (tests freeze it).

    :meth:`verify` is a coroutine (the JWKS is fetched without blocking the event loop);
    concurrent fetches are one.
    """

    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._jwks_text: str | None = None
        self._fetched_at = float("-inf")
        self._fetch_lock = asyncio.Lock()
        self._cache: dict[str, Principal] = {}
        self._grants = settings.SlideGrants

    async def verify(self, token: str) -> Principal:
        """The principal of a token.

        Raises:
            CredentialError: malformed, wrong algorithm, unknown key, bad signature, expired,
                not yet valid, wrong issuer or audience, no ``sub``.
        """
        now = self.clock()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires is not None and cached.expires + self.settings.ClockSkewSeconds > now:
                return cached
            del self._cache[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise CredentialError(f"malformed token: {exc}") from None
        algorithm = header.get("alg")
        if algorithm not in self.settings.Algorithms:
            raise CredentialError(f"algorithm {str(algorithm)[:20]!r} is not accepted")
        key = await self._key(header.get("kid"), now)
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[algorithm], audience=self.settings.Audience,
                issuer=self.settings.Issuer, leeway=self.settings.ClockSkewSeconds,
                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise CredentialError(str(exc) or type(exc).__name__) from None
        principal = self._principal(claims)
        if self.settings.TokenCacheSize:
            if len(self._cache) >= self.settings.TokenCacheSize:
                self._cache.pop(next(iter(self._cache)))
            self._cache[token] = principal
        return principal

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = str(claims["sub"])
        named = _strings(claim(claims, self.settings.RolesClaim))
        roles = frozenset(named) & ROLES
        patterns = [*_strings(claim(claims, self.settings.SlidesClaim)),
                    *self._grants.get(subject, ())]
        for role in named:
            patterns += self._grants.get(role, ())
        slides = None if ADMIN in roles else tuple(dict.fromkeys(patterns))
        return Principal(subject, "jwt", roles, slides, float(claims["exp"]))

    async def _key(self, kid: Any, now: float) -> jwt.PyJWK:
        if now - self._fetched_at > self.settings.JwksRefreshSeconds:
            await self._load(self._fetched_at)
        key = self._find(kid)
        if key is None and self.clock() - self._fetched_at >= UNKNOWN_KID_REFETCH_SECONDS:
            await self._load(self._fetched_at)
            key = self._find(kid)
        if key is None:
            raise CredentialError("no key of the provider's key set signed this token")
        return key

    def _find(self, kid: Any) -> jwt.PyJWK | None:
        if kid is None:  # a token without kid: only a key set of one key names the key
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(str(kid))

    async def _load(self, seen: float) -> None:
        async with self._fetch_lock:
            if self._fetched_at != seen:  # another request fetched while this one waited
                return
            try:
                text = await self._fetch()
                keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(json.loads(text)).keys
                        if k.key_type in ASYMMETRIC and k.public_key_use in (None, "sig")}
            except (OSError, ValueError, httpx.HTTPError, jwt.PyJWTError) as exc:
                log.warning("JWKS %s: %s; keeping the %d key(s) held",
                            self.settings.JwksUrl or self.settings.JwksFile, exc,
                            len(self._keys))
                return
            finally:
                # stamped once the fetch is over: a request that comes while it runs waits
                # for it on the lock instead of looking for its key in the old set
                self._fetched_at = self.clock()
            if text != self._jwks_text:
                if self._jwks_text is not None:
                    log.info("JWKS changed: %d key(s); verified tokens forgotten", len(keys))
                self._keys, self._jwks_text = keys, text
                self._cache.clear()

    async def _fetch(self) -> str:
        if self.settings.JwksFile:
            return await anyio.to_thread.run_sync(Path(self.settings.JwksFile).read_text)
        async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
            response = await client.get(self.settings.JwksUrl or "")
            response.raise_for_status()
            return response.text


# ------------------------------------------------------------------------------ signed URLs


def read_secret(settings: SignedUrlSettings,
                environ: Mapping[str, str] | None = None) -> bytes | None:
    """The signed-URL HMAC key from ``KeyFile`` or ``KeyEnvironment``; None when neither is set.

    Raises:
        ConfigError: the file or variable is missing or shorter than :data:`MIN_SECRET_BYTES`.
    """
    environ = os.environ if environ is None else environ
    if settings.KeyFile:
        try:
            secret = Path(settings.KeyFile).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"Auth:SignedUrls:KeyFile: cannot read it ({exc.strerror})"
                              ) from None
    elif settings.KeyEnvironment:
        secret = environ.get(settings.KeyEnvironment, "").strip().encode("utf-8")
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"Auth:SignedUrls: the key is missing or shorter than "
                          f"{MIN_SECRET_BYTES} bytes")
    return secret


class UrlSigner:
    """Signs and verifies signed URLs (see the module docstring).

    Args:
        secret: the HMAC key (:func:`read_secret`).
        settings: ``Auth:SignedUrls`` (lifetimes).
        clock: UNIX time now (tests freeze it).
    """

    def __init__(self, secret: bytes, settings: SignedUrlSettings,
                 clock: Callable[[], float] = time.time):
        self._secret = secret
        self.settings = settings
        self.clock = clock
        self._verified: dict[str, Principal] = {}

    def _mac(self, grant: str, expires: str, subject: str) -> str:
        message = f"tileserver-signed-url/v1\n{grant}\n{expires}\n{subject}".encode()
        mac = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def sign(self, grant: str, subject: str, seconds: int | None = None) -> tuple[str, int]:
        """``(query string, expiry)`` of a URL that grants ``grant`` to ``subject``.

        ``seconds`` defaults to ``DefaultSeconds`` and is capped at ``MaxSeconds``.
        """
        seconds = min(seconds or self.settings.DefaultSeconds, self.settings.MaxSeconds)
        expires = int(self.clock()) + seconds
        values = {"grant": grant, "exp": str(expires), "sub": subject,
                  "sig": self._mac(grant, str(expires), subject)}
        return "&".join(f"{k}={quote(v, safe='')}" for k, v in values.items()), expires

    def verify(self, query: str) -> Principal | None:
        """The principal of a signed URL's query string, or None when it carries no ``sig``.

        Raises:
            CredentialError: a parameter missing or repeated, a bad expiry, expired, or a
                signature that does not match.
        """
        if "sig=" not in query:
            return None
        now = self.clock()
        cached = self._verified.get(query)
        if cached is not None and cached.expires is not None and now <= cached.expires:
            return cached
        params = parse_qs(query, keep_blank_values=True)
        if "sig" not in params:
            return None
        values = {}
        for name in SIGNED_PARAMS:
            got = params.get(name, [])
            if len(got) != 1:
                raise CredentialError(f"signed URL: {name} must appear once")
            values[name] = got[0]
        if not values["exp"].isdigit() or len(values["exp"]) > 12:
            raise CredentialError("signed URL: exp is not a UNIX time")
        expected = self._mac(values["grant"], values["exp"], values["sub"])
        if not hmac.compare_digest(expected.encode(), values["sig"].encode("utf-8", "replace")):
            raise CredentialError("signed URL: the signature does not match")
        expires = int(values["exp"])
        if now > expires:
            raise CredentialError("signed URL: expired")
        principal = Principal(values["sub"], "signed-url", frozenset({VIEWER}),
                              (values["grant"],), float(expires))
        if len(self._verified) >= 10000:
            self._verified.pop(next(iter(self._verified)))
        self._verified[query] = principal
        return principal
