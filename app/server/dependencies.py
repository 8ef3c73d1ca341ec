"""The server's services, and the FastAPI dependencies that hand them to routes.

:func:`app.server.app.create_app`'s lifespan builds one :class:`Services` and puts it on
``app.state.services``; FastAPI routes receive its parts through the ``Annotated`` aliases below,
and the tile route (:class:`app.server.tiles.TileRoute`) reads the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from app.batch.jobs import JobManager
from app.cache.content import ContentHasher
from app.cache.tiles import TileService
from app.coordination import Coordination
from app.core.planner import TilePlanner
from app.core.privacy import Privacy
from app.core.slides import SlideRegistry
from app.server.audit import AuditLog
from app.server.auth import principal_of
from app.server.credentials import Principal, UrlSigner
from app.settings import Settings

if TYPE_CHECKING:
    from app.server.metrics import Metrics
    from app.server.readiness import Readiness


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a request may use, built once per process at start-up.

    Attributes:
        settings: the validated settings.
        registry: the slide catalogue and open slides (with the ``Privacy`` filter).
        planner: the tile planner (format policy, passthrough, cache keys).
        tiles: tiles from the caches or rendered.
        jobs: pregeneration jobs.
        audit: the audit log, or None when ``Audit.Enabled`` is false.
        content: whole-file SHA-256 of slides, or None unless ``Integrity.ContentSha256``.
        signer: signs URLs (``Auth:SignedUrls``), or None without a key.
        store: the coordination store shared with the other processes and replicas.
        metrics: Prometheus metrics, or None unless ``Metrics.Enabled``.
        readiness: what ``/readyz`` answers.
    """

    settings: Settings
    registry: SlideRegistry
    planner: TilePlanner
    tiles: TileService
    jobs: JobManager
    audit: AuditLog | None
    content: ContentHasher | None = None
    signer: UrlSigner | None = None
    store: Coordination | None = None
    metrics: Metrics | None = None
    readiness: Readiness | None = None

    @property
    def privacy(self) -> Privacy:
        """What clients may see of a slide (``Privacy`` settings)."""
        return self.registry.privacy


def services(request: Request) -> Services:
    """The app's :class:`Services` (``app.state`` is untyped: the lifespan put them there)."""
    built: Services = request.app.state.services
    return built


def _settings(request: Request) -> Settings:
    return services(request).settings


def _registry(request: Request) -> SlideRegistry:
    return services(request).registry


def _planner(request: Request) -> TilePlanner:
    return services(request).planner


def _tiles(request: Request) -> TileService:
    return services(request).tiles


def _jobs(request: Request) -> JobManager:
    return services(request).jobs


def _privacy(request: Request) -> Privacy:
    return services(request).registry.privacy


def _content(request: Request) -> ContentHasher | None:
    return services(request).content


def _signer(request: Request) -> UrlSigner | None:
    return services(request).signer


def path_base(request: Request) -> str:
    """The path the app is served under (``root_path``: ``PathBase`` or a known proxy's
    ``X-Forwarded-Prefix``, see app.server.proxy); empty at the root. Every URL the app gives
    out starts with it."""
    base: str = request.scope.get("root_path", "")
    return base


AppSettings = Annotated[Settings, Depends(_settings)]
Registry = Annotated[SlideRegistry, Depends(_registry)]
Planner = Annotated[TilePlanner, Depends(_planner)]
Tiles = Annotated[TileService, Depends(_tiles)]
Jobs = Annotated[JobManager, Depends(_jobs)]
PrivacyFilter = Annotated[Privacy, Depends(_privacy)]
Content = Annotated[ContentHasher | None, Depends(_content)]
Signer = Annotated[UrlSigner | None, Depends(_signer)]
Base = Annotated[str, Depends(path_base)]
Caller = Annotated[Principal, Depends(principal_of)]
