"""Authentication once per request, and the one authorization rule.

:class:`AuthLayer` is a pure ASGI middleware: for every HTTP request it reads the credentials
(``Authorization: Bearer``, ``X-Api-Key``, a signed URL's query) with the verifiers of
:mod:`app.server.credentials` and puts the resulting :class:`Principal` in the scope under
:data:`PRINCIPAL_KEY`. (CORS preflights, which carry no credentials, are answered before it by
:class:`app.server.middleware.Cors`.)

:func:`authorize` is the one decision of what a principal may do. The tile route
(:class:`app.server.tiles.TileRoute`) calls it for every tile family; every FastAPI route declares
exactly one :func:`require` dependency (:class:`GuardedRoute` refuses a route without one, and
audits the routes that change state or sign URLs).

Permissions (:class:`Permission`):

=========  ================================================================================
public     anyone: liveness, static assets, the OpenAPI document and its pages
list       a viewer or admin: listings, filtered to the slides the grants cover
view       a viewer or admin whose grants cover the slide: tiles, DZIs, documents, pages
token      ``view`` with credentials that are not themselves a signed URL: sign a URL
admin      the admin role: cache statistics, jobs
change     ``admin``, not from a page of another site: deletes, job start and cancel
=========  ================================================================================

Outcomes: missing or invalid credentials -> 401 with ``WWW-Authenticate``
(:class:`NotAuthenticated`); valid credentials without the role, or a change of state whose
``Origin``/``Sec-Fetch-Site`` is another site -> 403 (:class:`AccessDenied`); a slide the
grants do not cover -> ``SlideNotFound.named(slide)``, the very error of a slide that does
not exist, raised at the same point of the request (before the slide is looked up), so the
two cannot be told apart.

``Auth:Mode none`` (the default): everyone is a viewer of every slide; the admin role goes to
*local* requests only: a loopback client, a loopback ``Host`` (``localhost``, ``127.0.0.1``,
``[::1]``: a DNS-rebound page names another host) and no forwarding header at all (a proxy on
the same machine would otherwise make every remote client local). Tests count as local by
giving Starlette's TestClient a loopback client and base URL (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import (
    AccessDenied,
    AuditUnavailable,
    NotAuthenticated,
    SlideNotFound,
    TileServerError,
)
from app.server.credentials import (
    ADMIN,
    ANONYMOUS,
    PRINCIPAL_KEY,
    VIEWER,
    ApiKeys,
    CredentialError,
    JwtVerifier,
    Principal,
    UrlSigner,
)
from app.server.errors import status_for
from app.server.proxy import FORWARDED_KEY, host_name
from app.settings import Settings

log = logging.getLogger(__name__)


REALM = 'Bearer realm="tileserver"'
LOCAL = Principal("anonymous", "none", frozenset({VIEWER, ADMIN}), None, local=True)
"""The principal of a local request under ``Auth:Mode none``."""
REMOTE = Principal("anonymous", "none", frozenset({VIEWER}), None)
"""The principal of any other request under ``Auth:Mode none``."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class Permission(StrEnum):
    """What a route needs (the table of the module docstring)."""

    PUBLIC = "public"
    LIST = "list"
    VIEW = "view"
    TOKEN = "token"
    ADMIN = "admin"
    CHANGE = "change"


SLIDE_PERMISSIONS = frozenset({Permission.VIEW, Permission.TOKEN})


def authorize(principal: Principal, permission: Permission, slide: str | None = None) -> None:
    """Allow, or raise what the caller gets (see the module docstring).

    Args:
        principal: the request's principal (:data:`PRINCIPAL_KEY`).
        permission: what the route needs.
        slide: the slide name of ``view`` and ``token``.

    Raises:
        NotAuthenticated: no or invalid credentials (401).
        AccessDenied: a role missing, a signed URL asking to sign, a cross-site change (403).
        SlideNotFound: the grants do not cover ``slide`` (404, as a missing slide).
    """
    if permission is Permission.PUBLIC:
        return
    if principal.problem is not None:
        raise NotAuthenticated(f"invalid credentials: {principal.problem}",
                               challenge=challenge(principal.problem))
    if not principal.roles:
        if principal.method == "none":
            raise NotAuthenticated("credentials required: Authorization: Bearer <token or "
                                   "API key>, X-Api-Key, or a signed URL", challenge=REALM)
        raise AccessDenied("the credentials grant neither the viewer nor the admin role")
    if permission in (Permission.ADMIN, Permission.CHANGE):
        if ADMIN not in principal.roles:
            if principal.method == "none":
                raise AccessDenied("with Auth:Mode none, admin routes answer only local "
                                   "requests (a loopback client and Host, no proxy)")
            raise AccessDenied("this route needs the admin role")
        if permission is Permission.CHANGE and principal.cross_site:
            raise AccessDenied("a change of state sent by a page of another site is refused")
        return
    if permission is Permission.TOKEN and principal.method == "signed-url":
        raise AccessDenied("a signed URL cannot sign URLs")
    if slide is not None and permission in SLIDE_PERMISSIONS and not principal.may_view(slide):
        raise SlideNotFound.named(slide)


def challenge(problem: str) -> str:
    """The ``WWW-Authenticate`` value of refused credentials (RFC 6750 section 3)."""
    text = "".join(c if c.isprintable() and c not in '"\\' else " " for c in problem)[:200]
    return f'{REALM}, error="invalid_token", error_description="{text}"'


def visible(principal: Principal, names: list[str]) -> list[str]:
    """The slide names of a listing the principal may see (:func:`authorize` per name)."""
    out = []
    for name in names:
        try:
            authorize(principal, Permission.VIEW, name)
        except SlideNotFound:
            continue
        out.append(name)
    return out


# ------------------------------------------------------------------------------ the layer


@functools.lru_cache(maxsize=1024)
def is_loopback(address: str) -> bool:
    """Whether an IP address (text) is a loopback address; False for anything else."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether an ``Origin`` value is the origin the request was sent to (default ports
    equal to none)."""
    try:
        parts = urlsplit(origin)
        theirs = (parts.scheme, parts.hostname, parts.port)
        ours = urlsplit(f"{scheme}://{host}")
        mine = (ours.scheme, ours.hostname, ours.port)
    except ValueError:
        return False
    default = {"http": 80, "https": 443}
    return (theirs[:2] == mine[:2]
            and (theirs[2] or default.get(theirs[0])) == (mine[2] or default.get(mine[0])))


class AuthLayer:
    """The ASGI middleware that authenticates every request (see the module docstring).

    Args:
        app: the application.
        settings: ``Auth:Mode``.
        api_keys, jwt, signer: the verifiers of the methods on (built by the app factory).
    """

    def __init__(self, app: ASGIApp, settings: Settings, api_keys: ApiKeys | None = None,
                 jwt: JwtVerifier | None = None, signer: UrlSigner | None = None):
        self.app = app
        self.modes = settings.Auth.modes
        self.api_keys = api_keys
        self.jwt = jwt
        self.signer = signer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry: put the principal in the scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = api_key = origin = fetch_site = host = None
        forwarded = scope.get(FORWARDED_KEY, False)
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
            elif name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                fetch_site = value
            elif name == b"host":
                host = value
            elif name in (b"x-forwarded-for", b"forwarded", b"x-real-ip"):
                forwarded = True
        method = scope["method"]
        if not self.modes:
            client = scope.get("client")
            local = (not forwarded and client is not None and is_loopback(client[0])
                     and host is not None and host_name(host.decode("latin-1")) in LOOPBACK_HOSTS)
            principal = LOCAL if local else REMOTE
        else:
            principal = await self.authenticate(authorization, api_key,
                                                scope["query_string"])
        if method not in SAFE_METHODS and (
                (fetch_site is not None and fetch_site not in (b"same-origin", b"none"))
                or (origin is not None and not same_origin(
                    origin.decode("latin-1"), scope.get("scheme", "http"),
                    (host or b"").decode("latin-1")))):
            principal = dataclasses.replace(principal, cross_site=True)
        scope[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)

    async def authenticate(self, authorization: bytes | None, api_key: bytes | None,
                           query: bytes) -> Principal:
        """The principal of a request's credentials under ``Auth:Mode`` other than none:
        :data:`ANONYMOUS` without credentials; a principal with ``problem`` set for refused
        ones."""
        method = "none"
        try:
            if api_key is not None and self.api_keys is not None:
                method = "apikey"
                return self.api_keys.identify(api_key.decode("latin-1"))
            if authorization is not None:
                scheme, _, token = authorization.decode("latin-1").partition(" ")
                token = token.strip()
                if scheme.lower() != "bearer" or not token:
                    raise CredentialError("expected Authorization: Bearer <token>")
                if self.jwt is not None and token.count(".") == 2:
                    method = "jwt"
                    return await self.jwt.verify(token)
                if self.api_keys is not None:
                    method = "apikey"
                    return self.api_keys.identify(token)
                raise CredentialError("not a token this server accepts")
            if self.signer is not None and query:
                method = "signed-url"
                signed = self.signer.verify(query.decode("latin-1"))
                if signed is not None:
                    return signed
        except CredentialError as exc:
            return Principal("anonymous", method, problem=str(exc))
        return ANONYMOUS


def principal_of(request: Request) -> Principal:
    """The request's principal (a KeyError, hence a 500, if :class:`AuthLayer` did not run:
    a request is never served unauthenticated by mistake)."""
    principal: Principal = request.scope[PRINCIPAL_KEY]
    return principal


# ------------------------------------------------------------------------------ FastAPI


class Requirement:
    """A route's permission, as a FastAPI dependency (build it with :func:`require`).

    Args:
        permission: what the route needs.
        slide: the slide of a ``view``/``token`` route without a ``{name}`` (the single slide).

    For ``view`` and ``token`` it also looks the slide up (``SlideNotFound``) right after the
    grant check, so that a missing slide and a denied one fail at the same point.
    """

    def __init__(self, permission: Permission, slide: str | None = None):
        self.permission = permission
        self.slide = slide

    @property
    def audited(self) -> bool:
        """Whether each call is an audit line (changes of state, signed URLs issued)."""
        return self.permission in (Permission.CHANGE, Permission.TOKEN)

    async def __call__(self, request: Request) -> Principal:
        """Authorize the request; return its principal."""
        principal = principal_of(request)
        slide = self.slide or request.path_params.get("name")
        authorize(principal, self.permission, slide)
        if slide is not None and self.permission in SLIDE_PERMISSIONS:
            request.app.state.services.registry.entry(slide)
        return principal

    def __repr__(self) -> str:
        return f"require({self.permission.value})"


def require(permission: Permission, slide: str | None = None) -> Any:
    """The ``dependencies=[...]`` item of a route that needs ``permission``."""
    return Depends(Requirement(permission, slide))


def _status_of(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, TileServerError):
        return status_for(exc), exc.code
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, "http_error"
    if isinstance(exc, RequestValidationError):
        return 422, "bad_request"
    return 500, "internal_error"


class GuardedRoute(APIRoute):
    """The route class of every FastAPI route of the app.

    Refuses, when the app is built, a route that does not declare exactly one
    :func:`require`; for audited requirements (:attr:`Requirement.audited`) writes one audit
    line per call with its outcome (the status, the error code, the ``Location`` of a job),
    and with ``Audit:FailClosed`` refuses the call with 503 before it acts when the line could
    not be queued.
    """

    def get_route_handler(self) -> Callable[[Request], Any]:
        """The handler, wrapped in the audit of audited routes."""
        found = [d.call for d in self.dependant.dependencies if isinstance(d.call, Requirement)]
        if len(found) != 1:
            raise TypeError(f"{sorted(self.methods or ())} {self.path}: every route declares "
                            f"exactly one require(...) dependency; found {len(found)}")
        self.requirement: Requirement = found[0]
        handler = super().get_route_handler()
        if not self.requirement.audited:
            return handler
        template = self.path

        async def audited(request: Request) -> Response:
            services = request.app.state.services
            audit = services.audit
            if audit is None:
                return await handler(request)
            if services.settings.audit_fail_closed and not audit.accepting:
                raise AuditUnavailable("the audit log cannot record this action now")
            try:
                response = await handler(request)
            except Exception as exc:
                status, code = _status_of(exc)
                audit.action(request.scope, template, status, code, None)
                raise
            audit.action(request.scope, template, response.status_code, None,
                         response.headers.get("location"))
            return response

        return audited
