"""Settings: one section model per appsettings.json key, loaded the ASP.NET way.

Sources, later wins (the order of ASP.NET Core's default host builder):

1. defaults (the field defaults below),
2. ``appsettings.json`` in the working directory,
3. ``config/appsettings.{Environment}.json`` (``TILESERVER_ENVIRONMENT``, default Production),
4. ``--config FILE``,
5. environment variables whose first ``__`` segment is a section (or a top-level key):
   ``Image__Path``, ``TileFormat__LosslessLevelCount``, list items by index: ``Images__0__Name``,
6. command-line items ``Section:Key=value`` (``Images:1:Path=/slides/b.svs``).

:func:`load_settings` reads each source into a plain nested dict (lists as index-keyed dicts),
deep-merges them in that order, matching keys case-insensitively as ASP.NET configuration does,
and validates the result once into a frozen :class:`Settings`; derive variants with
``model_copy``. Lists merge by index: ``Images__1__Path`` replaces the path of item 1 and keeps
its name.

Keys are strict: a key that is not a setting, from any source, is a :class:`ConfigError` that
names it, says where it came from and suggests the nearest setting
(``TileFormat:EnforceLosless`` -> ``TileFormat:EnforceLossless``). The sections ASP.NET files
carry for the host (:data:`HOST_SECTIONS`) are accepted and not validated.

Files written for the original OpenSlideSharp SingleSlideServer (``Image: {Path, TileCachePath,
EnableDiskCache, TileFormat}``) and MultiSlideServer (top-level ``TileCachePath``,
``EnableDiskCache``, ``TileFormat``, ``Images``) load unchanged.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, to_jsonable_python

from app.core import colour
from app.core.errors import ConfigError
from app.core.formats import AVIF_LOSSLESS_MEASUREMENT, TileFormat
from app.core.names import name_problem

ENVIRONMENT_VARIABLE = "TILESERVER_ENVIRONMENT"

SETTINGS_ENV = "TILESERVER_SETTINGS_JSON"
"""The variable in which ``tileserver serve`` hands its validated settings (JSON) to the
uvicorn workers (:func:`settings_from`; ``app.server.app.create_app_from_env``)."""

HOST_SECTIONS = ("Kestrel", "ConnectionStrings")
"""Top-level sections of ASP.NET appsettings files that configure the host, not the tile server:
accepted from every source, their content not validated. A section the server comes to honour
becomes a field of :class:`Settings` and leaves this tuple."""

_HOST_KEYS = frozenset(name.lower() for name in HOST_SECTIONS)
_SINGLE_SLIDE_KEYS = ("TileCachePath", "EnableDiskCache", "TileFormat")


class Section(BaseModel):
    """Base of every settings section: frozen, keys matched case-insensitively, and a key that
    is not a field an ``unknown_key`` error naming the nearest field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _match_keys(cls, data: Any) -> Any:
        return _canonical_keys(cls, data)


def _canonical_keys(model: type[BaseModel], data: Any,
                    ignored: frozenset[str] = frozenset()) -> Any:
    """Rename ``data``'s keys to ``model``'s field names, case-insensitively; turn index dicts
    (``{"0": ..., "1": ...}``, as environment variables give) into lists; drop ``ignored``
    (lower-case) keys.

    Raises:
        PydanticCustomError: ``unknown_key``, context ``key`` (as written) and ``suggestion``
            (the nearest field name, or "").
    """
    if not isinstance(data, Mapping):
        return data
    names = {name.lower(): name for name in model.model_fields}
    out: dict[str, Any] = {}
    for key, value in data.items():
        lower = str(key).lower()
        if lower in ignored:
            continue
        name = names.get(lower)
        if name is None:
            close = difflib.get_close_matches(lower, list(names), n=1)
            raise PydanticCustomError("unknown_key", "{key} is not a setting",
                                      {"key": str(key),
                                       "suggestion": names[close[0]] if close else ""})
        if _is_list_field(model.model_fields[name]):
            value = _indexed_to_list(value)
        out[name] = value
    return out


def _is_list_field(info: FieldInfo) -> bool:
    return getattr(info.annotation, "__origin__", None) is list


def _indexed_to_list(value: Any) -> Any:
    """``{"1": b, "0": a}`` -> ``[a, b]``; anything else is returned unchanged."""
    if isinstance(value, Mapping) and all(str(k).isdigit() for k in value):
        return [value[k] for k in sorted(value, key=lambda k: int(k))]
    return value


class DeepZoomSettings(Section):
    """``DeepZoom``: the DZI geometry, as openslide-python's ``DeepZoomGenerator`` takes it."""

    TileSize: int = Field(254, ge=1, le=4096,
                          description="Tile edge in DZI pixels, overlap excluded.")
    Overlap: int = Field(1, ge=0, le=64, description="Pixels added to each interior tile edge.")
    LimitBounds: bool = Field(True, description="Render only the slide's non-empty bounds.")
    Geometry: Literal["configured", "aligned"] = Field(
        "configured",
        description="configured: TileSize, Overlap, LimitBounds as set. aligned: per slide, the "
                    "DZI grid follows the slide's stored tiles (TileSize = stored tile size, "
                    "Overlap 0, LimitBounds only where the bounds origin is on the tile grid), "
                    "so stored JPEG tiles can be served as they are (TileFormat.Passthrough).")

    ColorMode: colour.ColorMode = Field(
        colour.ColorMode.EMBED, description="ICC handling (app.core.colour): embed, default, "
        "absolute-colorimetric, perceptual, relative-colorimetric, saturation, ignore.")

    @field_validator("ColorMode", mode="before")
    @classmethod
    def _parse_color_mode(cls, value: Any) -> Any:
        return colour.ColorMode.parse(value) if isinstance(value, str) else value

    @field_validator("Geometry", mode="before")
    @classmethod
    def _geometry_lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class TileFormatSettings(Section):
    """``TileFormat``: the per-level format policy and encoder options (see app.core.formats)."""

    Default: TileFormat = TileFormat.JPEG
    LosslessFormat: TileFormat = TileFormat.PNG
    LosslessLevelCount: int = Field(1, ge=-1, description="0 none, N the N highest levels, -1 all.")
    JpegQuality: int = Field(90, ge=1, le=100)
    WebpQuality: int = Field(90, ge=1, le=100)
    PngCompressLevel: int = Field(1, ge=0, le=12,
                                  description="libdeflate level: 0 stored, 1 fastest, 12 smallest.")
    AllowFormatOverride: bool = True
    Passthrough: bool = Field(
        True, description="Serve a stored JPEG tile's own bytes where a JPEG DZI tile is "
                          "exactly one stored tile (needs DeepZoom.Geometry aligned).")
    AvifQuality: int = Field(70, ge=1, le=100, description="libavif quality of AVIF tiles.")
    EnforceLossless: bool = Field(False, description="No override downgrades a lossless level.")
    OverrideCacheBytes: int = Field(
        0, ge=0, description="Per slide, the most bytes of disk-cache tiles in encodings other "
        "than each level's policy encoding (?format= overrides); the least recently used "
        "beyond are evicted. 0: no quota of its own (TileCacheMaxBytes still applies).")

    @field_validator("Default", "LosslessFormat", mode="before")
    @classmethod
    def _parse_format(cls, value: Any) -> Any:
        return TileFormat.parse(value) if isinstance(value, str) else value

    @field_validator("LosslessFormat")
    @classmethod
    def _avif_is_not_lossless(cls, value: TileFormat) -> TileFormat:
        if value is TileFormat.AVIF:
            raise ValueError(
                f"AVIF is not bit-exact: {AVIF_LOSSLESS_MEASUREMENT}; it is served as a lossy "
                "format only (TileFormat:Default or ?format=avif); use png or webp")
        return value

    @model_validator(mode="after")
    def _lossless_format_is_lossless(self) -> TileFormatSettings:
        if not self.LosslessFormat.can_be_lossless:
            raise ValueError(
                f"LosslessFormat {self.LosslessFormat.value!r} cannot encode losslessly; "
                "use png or webp"
            )
        return self


class ImageSettings(Section):
    """``Image``: single-slide mode, in the shape SingleSlideServer's appsettings.json has.

    ``TileCachePath``, ``EnableDiskCache`` and ``TileFormat`` here are the SingleSlideServer
    places for those keys; they apply when the top-level key of the same name is not set.
    """

    Path: str | None = None
    TileCachePath: str | None = None
    EnableDiskCache: bool | None = None
    TileFormat: TileFormatSettings | None = None


class ImageEntry(Section):
    """One item of ``Images`` (multi-slide mode): the URL name and the slide file."""

    Name: str = Field(min_length=1, max_length=200)
    Path: str

    @field_validator("Name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        problem = name_problem(value)
        if problem is not None:
            raise ValueError(f"{value!r} is not a valid slide name: {problem}")
        return value


MAX_RENDER_THREADS = 256
"""The most ``Server.RenderThreads`` a process may have (its default included)."""


class ServerSettings(Section):
    """``Server``: HTTP headers, concurrency, connection and memory bounds of the serving
    process (the connection bounds apply to ``tileserver serve``, see app.server.guard)."""

    CacheControl: str = "public, max-age=86400"
    AccessControlAllowOrigin: str = Field(
        "*", description="CORS: Access-Control-Allow-Origin of every response (tiles, DZIs, "
        "JSON API, errors) and of preflight answers; * or one origin; empty: no CORS headers.")
    RenderThreads: int = Field(
        0, ge=0, le=MAX_RENDER_THREADS, description="Render threads per process. 0: two per "
        "CPU core, shared by the --workers processes (default_render_threads).")
    RenderNice: int = Field(
        10, ge=0, le=19, description="Niceness added to the render threads (Linux), so that "
        "the event loop, which answers cache hits and refusals, gets a core first.")
    MaxOpenSlides: int = Field(16, ge=1, le=4096)
    OpenSlideCacheBytes: int = Field(256 * 1024 * 1024, ge=0,
                                     description="Decoded slide tiles kept, per process.")
    NativeReader: bool = Field(True,
                               description="Decode TIFF JPEG tiles natively (app.core.native).")
    MemoryCacheBytes: int = Field(64 * 1024 * 1024, ge=0)
    RevalidateSeconds: float = Field(2.0, ge=0, description="How often a slide file is re-stat'ed.")
    MaxQueuedRenders: int = Field(
        0, ge=0, le=100_000, description="Tile loads (disk read or render) a process queues at "
        "most; beyond, a tile that is in no cache answers 503 with Retry-After at once. "
        "0: 8 per CPU core.")
    MaxRequestHeadBytes: int = Field(
        16384, ge=1024, le=1 << 20, description="Request line and headers larger than this "
        "get 431 before more of them is read.")
    HeaderTimeoutSeconds: float = Field(
        60.0, gt=0, description="A connection that has not sent a whole request head this "
        "long after it opened or began the head is closed (nginx client_header_timeout).")
    KeepAliveTimeoutSeconds: int = Field(
        75, ge=1, description="An idle keep-alive connection is closed after this "
        "(nginx keepalive_timeout).")
    MaxConnections: int = Field(
        4096, ge=1, description="Open connections per process; at the cap a new connection "
        "replaces the oldest one that has not sent a whole request head, else it gets 503.")


class PrivacySettings(Section):
    """``Privacy``: what is withheld from every route, listing and cache path (PHI switch)."""

    HideAssociatedImages: bool = Field(
        False, description="Withhold every associated image (label, macro, thumbnail).")
    HideProperties: list[str] = Field(
        default_factory=list, description="Property-name glob patterns to withhold "
        "(case-insensitive), e.g. aperio.User, *.Filename, tiff.DateTime.")

    SlideNames: Literal["file", "hash"] = Field(
        "file", description="How SlideDirectory files are named in URLs: file (the file's stem) "
        "or hash (24 hex digits derived from openslide.quickhash-1, else from the file's "
        "SHA-256; no file name reaches a client). Image and Images keep their names.")

    @field_validator("SlideNames", mode="before")
    @classmethod
    def _slide_names_lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("HideProperties", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        if isinstance(value, str):  # one pattern or a comma-separated list (environment)
            return [p.strip() for p in value.split(",") if p.strip()]
        return value


class AuditSettings(Section):
    """``Audit``: the JSON-lines audit log of tile requests and admin actions, a SHA-256 hash
    chain (see app.server.audit)."""

    Enabled: bool = False
    Path: str = Field("./audit/tiles.jsonl", min_length=1,
                      description="The log file; rotated files get .1, .2, ... appended.")
    MaxBytes: int = Field(100 * 1024 * 1024, ge=0,
                          description="Rotate when the file reaches this size; 0 never rotates.")
    BackupCount: int = Field(10, ge=0, le=10000, description="Rotated files kept.")
    RetentionDays: float = Field(
        0, ge=0, description="A rotated file younger than this is never deleted, even beyond "
        "BackupCount (0: BackupCount alone decides).")
    FailClosed: bool | None = Field(
        None, description="Answer 503 instead of serving a tile whose line cannot be queued "
        "(queue full, log not writable); null: true when Auth:Mode is not none.")
    QueueLines: int = Field(65536, ge=16, description="Lines queued in memory at most, per "
                            "process; beyond it lines are refused (fail closed) or dropped "
                            "and counted.")
    MaxFieldChars: int = Field(256, ge=16, le=65536, description="Request-supplied fields "
                               "(path, Accept, subject, ...) are cut to this length; the line "
                               "names the fields cut.")


class ApiKeyEntry(Section):
    """One item of ``Auth:AdminApiKeys``: an admin key, by its SHA-256 or where to read it."""

    Id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                    description="Names the key in the audit log (apikey:<Id>).")
    Sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                               description="Hex SHA-256 of the key.")
    File: str | None = Field(None, description="A file holding the key (one line).")
    Environment: str | None = Field(None, description="An environment variable holding "
                                    "the key.")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyEntry:
        if sum(x is not None for x in (self.Sha256, self.File, self.Environment)) != 1:
            raise ValueError(f"API key {self.Id!r}: give exactly one of Sha256, File, "
                             "Environment (a key itself is never written in settings)")
        return self


class JwtSettings(Section):
    """``Auth:Jwt``: OIDC bearer tokens (see app.server.credentials)."""

    JwksUrl: str | None = Field(None, description="The provider's JWKS URL (fetched, cached, "
                                "fetched again for an unknown kid).")
    JwksFile: str | None = Field(None, description="A JWKS file, instead of JwksUrl.")
    Issuer: str | None = Field(None, description="Required iss.")
    Audience: str | None = Field(None, description="Required aud.")
    Algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256"],
                                  description="Accepted asymmetric algorithms.")
    ClockSkewSeconds: int = Field(60, ge=0, le=3600, description="Leeway on exp and nbf.")
    RolesClaim: str = Field("roles", description="Claim (dotted path) listing the roles: "
                            "viewer, admin.")
    SlidesClaim: str = Field("slides", description="Claim (dotted path) listing slide name "
                             "patterns the subject may see.")
    SlideGrants: dict[str, list[str]] = Field(
        default_factory=dict, description="Slide name patterns per subject (sub) or role.")
    JwksRefreshSeconds: int = Field(300, ge=10, description="How long a fetched JWKS is used.")
    TokenCacheSize: int = Field(10000, ge=0, description="Verified tokens kept (until their "
                                "exp) so a token is checked once, not per tile.")

    @field_validator("SlideGrants", mode="before")
    @classmethod
    def _grant_lists(cls, value: Any) -> Any:
        if isinstance(value, Mapping):  # files and the environment give lists as index dicts
            return {k: _indexed_to_list(v) for k, v in value.items()}
        return value

    @field_validator("Algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA"}
        bad = [a for a in value if a not in allowed]
        if bad or not value:
            names = ", ".join(sorted(allowed))
            raise ValueError(f"{bad or value}: only asymmetric algorithms ({names}) are "
                             "accepted: none and HS* would let a public key sign tokens")
        return value


class SignedUrlSettings(Section):
    """``Auth:SignedUrls``: HMAC-SHA256 URLs that grant one slide until an expiry."""

    KeyFile: str | None = Field(None, description="A file holding the HMAC key (>= 32 bytes).")
    KeyEnvironment: str | None = Field(None, description="An environment variable holding "
                                       "the HMAC key, instead of KeyFile.")
    DefaultSeconds: int = Field(3600, ge=1, description="Lifetime of a signed URL.")
    MaxSeconds: int = Field(86400, ge=1, description="Longest lifetime a caller may ask for.")


AUTH_MODES = ("none", "apikey", "jwt")


class AuthSettings(Section):
    """``Auth``: who may call (see app.server.auth and docs/deploy.md)."""

    Mode: str = Field("none", description="none (loopback clients are admins), or apikey, "
                      "jwt, or both: apikey,jwt.")
    AdminApiKeys: list[ApiKeyEntry] = Field(default_factory=list)
    Jwt: JwtSettings = Field(default_factory=JwtSettings)
    SignedUrls: SignedUrlSettings = Field(default_factory=SignedUrlSettings)

    @field_validator("Mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if not isinstance(value, str):
            return value
        modes = [m.strip().lower() for m in value.split(",") if m.strip()]
        bad = [m for m in modes if m not in AUTH_MODES]
        if bad or not modes or ("none" in modes and len(modes) > 1):
            raise ValueError(f"{value!r}: none, or apikey, jwt or apikey,jwt")
        return ",".join(sorted(set(modes)))

    @property
    def modes(self) -> frozenset[str]:
        """The methods on: empty for ``none``."""
        return frozenset(self.Mode.split(",")) - {"none"}

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        if "jwt" in self.modes:
            jwt = self.Jwt
            if (jwt.JwksUrl is None) == (jwt.JwksFile is None):
                raise ValueError("Auth:Mode jwt needs one of Auth:Jwt:JwksUrl, JwksFile")
            if not jwt.Issuer or not jwt.Audience:
                raise ValueError("Auth:Mode jwt needs Auth:Jwt:Issuer and Auth:Jwt:Audience")
        if "apikey" in self.modes and not self.AdminApiKeys:
            raise ValueError("Auth:Mode apikey needs at least one Auth:AdminApiKeys item")
        if self.SignedUrls.KeyFile and self.SignedUrls.KeyEnvironment:
            raise ValueError("Auth:SignedUrls: KeyFile or KeyEnvironment, not both")
        return self


class ForwardedHeadersSettings(Section):
    """``ForwardedHeaders``: whose X-Forwarded-For/-Proto/-Prefix are believed (see
    app.server.proxy). Unlike ASP.NET, loopback is not trusted unless listed."""

    KnownProxies: list[str] = Field(default_factory=list,
                                    description="Proxy addresses, e.g. 127.0.0.1.")
    KnownNetworks: list[str] = Field(default_factory=list,
                                     description="Proxy networks, e.g. 10.0.0.0/8.")
    ForwardLimit: int = Field(1, ge=1, le=16, description="X-Forwarded-For entries taken, "
                              "right to left, while each hop is a known proxy.")

    @field_validator("KnownProxies", "KnownNetworks", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
        return value

    @field_validator("KnownProxies")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_address(item)
        return value

    @field_validator("KnownNetworks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value


class IntegritySettings(Section):
    """``Integrity``: checks beyond those that are always on (see docs/regulatory.md)."""

    ContentSha256: bool = Field(
        False, description="Hash every slide file whole (SHA-256), once per version of the "
        "file, in the background; /api/slides/{name} and tileserver verify report it.")


class IiifSettings(Section):
    """``Iiif``: the IIIF Image API's size limits (info.json ``maxWidth``, ``maxHeight``,
    ``maxArea``; see app.core.iiif). A larger image request is a 400 before any pixel is read;
    ``max`` fits the limits."""

    MaxWidth: int = Field(8192, ge=1, le=1_000_000,
                          description="Widest IIIF image served, pixels.")
    MaxHeight: int = Field(8192, ge=1, le=1_000_000,
                           description="Tallest IIIF image served, pixels.")
    MaxArea: int = Field(4096 * 4096, ge=1, le=10**12,
                         description="Most pixels (width x height) of an IIIF image served.")


class PregenerationSettings(Section):
    """``Pregeneration``: background jobs and ``tileserver pregenerate``
    (see app.batch.pregenerate)."""

    Workers: int = Field(0, ge=0, le=256, description="Worker processes; 0: one per CPU core.")
    Nice: int = Field(15, ge=0, le=19,
                      description="Niceness added to worker processes, so that interactive "
                                  "requests (event loop, then render threads at "
                                  "Server.RenderNice) keep their latency while a job runs.")
    WorkerCacheBytes: int = Field(64 * 1024 * 1024, ge=0,
                                  description="Decoded slide tiles kept per worker process.")
    Scheduler: str | None = Field(None, description="Dask scheduler address "
                                  "(tcp://host:8786): run jobs on that cluster instead.")


class CoordinationSettings(Section):
    """``Coordination``: where the processes and replicas of a deployment share job state, the
    one-job-per-slide rule, cancellation and cache invalidation (see app.coordination)."""

    RedisUrl: str | None = Field(
        None, description="redis://host:6379/0: share through Redis (replicas on several "
        "machines). None: an SQLite database in TileCachePath (one machine).")
    KeyPrefix: str = Field("tileserver", min_length=1, max_length=100,
                           description="Prefix of every Redis key (several deployments on "
                                       "one Redis).")


class LoggingSettings(Section):
    """``Logging``: the format of the log lines (ASP.NET's ``LogLevel`` is accepted, unused:
    ``tileserver serve --log-level`` sets the level)."""

    Format: Literal["text", "json"] = Field(
        "text", description="text: LEVEL logger: message. json: one JSON object a line with "
        "time, level, logger, message, process and the request id.")
    LogLevel: dict[str, str] = Field(default_factory=dict,
                                     description="ASP.NET's log levels; accepted, not used.")

    @field_validator("Format", mode="before")
    @classmethod
    def _format_lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class MetricsSettings(Section):
    """``Metrics``: the Prometheus endpoint ``/metrics`` (see app.server.metrics)."""

    Enabled: bool = Field(True, description="Count requests, renders, cache and jobs and "
                          "serve them at /metrics (every worker process added up).")


class Settings(BaseModel):
    """The whole configuration, frozen; attribute names are the appsettings.json keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    Image: ImageSettings = Field(default_factory=ImageSettings)
    Images: list[ImageEntry] = Field(default_factory=list)
    SlideDirectory: str | None = None
    SlideDirectoryFollowSymlinks: bool = Field(
        False, description="Serve symbolic links in SlideDirectory that point outside it "
        "(skipped with a warning otherwise).")
    TileCachePath: str = "./tile_cache"
    EnableDiskCache: bool = True
    TileCacheMaxBytes: int | None = Field(
        None, ge=0, description="Most bytes the disk cache may hold (tiles and seals). None: "
        "10% of the size of the file system that holds TileCachePath; 0: no limit.")
    TileCacheHighWatermark: float = Field(
        0.95, gt=0, le=1, description="Eviction starts when the cache holds this share of "
        "TileCacheMaxBytes.")
    TileCacheLowWatermark: float = Field(
        0.85, gt=0, le=1, description="Eviction deletes the least recently used tiles until "
        "the cache holds this share of TileCacheMaxBytes.")
    DeepZoom: DeepZoomSettings = Field(default_factory=DeepZoomSettings)
    TileFormat: TileFormatSettings = Field(default_factory=TileFormatSettings)
    Server: ServerSettings = Field(default_factory=ServerSettings)
    Privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    Pregeneration: PregenerationSettings = Field(default_factory=PregenerationSettings)
    DemoDirectory: str = "./data"
    Audit: AuditSettings = Field(default_factory=AuditSettings)
    Integrity: IntegritySettings = Field(default_factory=IntegritySettings)
    Iiif: IiifSettings = Field(default_factory=IiifSettings)
    Coordination: CoordinationSettings = Field(default_factory=CoordinationSettings)
    Logging: LoggingSettings = Field(default_factory=LoggingSettings)
    Metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    Auth: AuthSettings = Field(default_factory=AuthSettings)
    AllowedHosts: str = Field("*", description="Host names served, ;-separated (ASP.NET's "
                              "format: *, example.org, *.example.org); others get 400.")
    ForwardedHeaders: ForwardedHeadersSettings = Field(
        default_factory=ForwardedHeadersSettings)
    PathBase: str = Field("", pattern=r"^(/[^/?#\s]+)*$", description="Serve the app under "
                          "this sub-path, e.g. /wsi (X-Forwarded-Prefix from a known proxy "
                          "does the same per request).")

    @property
    def audit_fail_closed(self) -> bool:
        """``Audit:FailClosed``, with null resolved: true when authentication is on."""
        closed = self.Audit.FailClosed
        return bool(self.Auth.modes) if closed is None else closed

    @model_validator(mode="after")
    def _watermarks(self) -> Settings:
        if self.TileCacheLowWatermark >= self.TileCacheHighWatermark:
            raise ValueError(f"TileCacheLowWatermark ({self.TileCacheLowWatermark}) must be "
                             f"below TileCacheHighWatermark ({self.TileCacheHighWatermark})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _match_keys(cls, data: Any) -> Any:
        """Canonical keys, host sections dropped, and SingleSlideServer's ``Image.TileCachePath``,
        ``Image.EnableDiskCache`` and ``Image.TileFormat`` lifted where the top level lacks them."""
        data = _canonical_keys(cls, data, _HOST_KEYS)
        image = data.get("Image") if isinstance(data, dict) else None
        if isinstance(image, Mapping):
            nested = {str(k).lower(): v for k, v in image.items()}
            for key in _SINGLE_SLIDE_KEYS:
                if nested.get(key.lower()) is not None and key not in data:
                    data[key] = nested[key.lower()]
        return data

    def configured_slide_paths(self) -> list[tuple[str, str]]:
        """``(key, path)`` of every slide file named by the settings, for start-up checks."""
        out = [(f"Images:{i}:Path", entry.Path) for i, entry in enumerate(self.Images)]
        if self.Image.Path:
            out.insert(0, ("Image:Path", self.Image.Path))
        return out


# ----------------------------------------------------------------------------- loading


class _Merged:
    """The deep merge of the sources: a nested dict, and where each key path came from.

    Keys match case-insensitively (the first spelling seen is kept); a dict merges into a dict
    key by key, anything else replaces what was there. ``origin`` maps each lower-cased key
    path (list indexes as digit strings) to the label of the last source that set it.
    """

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.origin: dict[tuple[str, ...], str] = {}

    def add(self, label: str, tree: Mapping[str, Any]) -> None:
        """Merge one source's tree over what is there."""
        self._merge(self.tree, tree, (), label)

    def _merge(self, into: dict[str, Any], tree: Mapping[str, Any], prefix: tuple[str, ...],
               label: str) -> None:
        for key, value in tree.items():
            path = (*prefix, str(key).lower())
            self.origin[path] = label
            existing = next((k for k in into if k.lower() == path[-1]), str(key))
            if isinstance(value, Mapping):
                if not isinstance(into.get(existing), dict):
                    into[existing] = {}
                self._merge(into[existing], value, path, label)
            else:
                into[existing] = value


def _read_json(path: Path) -> dict[str, Any] | None:
    """An appsettings JSON file with its lists as index dicts; None if there is no file.

    Raises:
        ConfigError: not JSON, or not an object at the top level.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    indexed: dict[str, Any] = _lists_to_indexed(data)
    return indexed


def _lists_to_indexed(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k): _lists_to_indexed(v) for k, v in data.items()}
    if isinstance(data, list):
        return {str(i): _lists_to_indexed(v) for i, v in enumerate(data)}
    return data


def _nested(path: list[str], value: str) -> dict[str, Any]:
    """``["a", "b"], v`` -> ``{"a": {"b": v}}`` (``path`` is not empty)."""
    *parents, last = path
    tree: dict[str, Any] = {last: value}
    for part in reversed(parents):
        tree = {part: tree}
    return tree


def _environment(environ: Mapping[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(label, tree)`` of each environment variable whose first ``__`` segment is a
    top-level key or a host section (case-insensitive); other variables are not settings."""
    known = {name.lower() for name in Settings.model_fields} | _HOST_KEYS
    for name, value in environ.items():
        path = name.split("__")
        if path[0].lower() in known and all(path):
            yield f"environment variable {name}", _nested(path, value)


def _command_line(items: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(label, tree)`` of each ``Section:Key=value`` item (``--Section:Key=value`` too).

    Raises:
        ConfigError: an item without ``=`` or with an empty key segment.
    """
    for item in items:
        key, sep, value = item.partition("=")
        path = key.strip().removeprefix("--").split(":")
        if not sep or not all(path):
            raise ConfigError(f"command-line setting {item!r}: expected Section:Key=value")
        yield "command line", _nested(path, value)


def load_settings(
    *,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    base_dir: str | Path = ".",
    check_files: bool = True,
) -> Settings:
    """Load settings from every source, in ASP.NET order, and validate them once.

    Args:
        config_file: the ``--config FILE`` JSON, applied after the environment overlay file.
        overrides: command-line ``Section:Key=value`` items.
        environ: environment variables (default ``os.environ``); also gives
            ``TILESERVER_ENVIRONMENT``.
        base_dir: folder holding ``appsettings.json`` and ``config/``.
        check_files: check that every configured slide file and ``SlideDirectory`` exists.

    Returns:
        The validated, frozen settings.

    Raises:
        ConfigError: one message naming the offending key and value (unknown key, with its
            source and the nearest setting; unknown format, quality out of 1..100, missing
            slide file, malformed JSON or command-line item).
    """
    environ = os.environ if environ is None else environ
    base = Path(base_dir)
    environment = environ.get(ENVIRONMENT_VARIABLE, "Production")
    files = [base / "appsettings.json", base / "config" / f"appsettings.{environment}.json"]
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ConfigError(f"--config {config_file}: file not found")
        files.append(Path(config_file))
    merged = _Merged()
    for path in files:
        tree = _read_json(path)
        if tree is not None:
            merged.add(str(path), tree)
    for label, tree in (*_environment(environ), *_command_line(overrides)):
        merged.add(label, tree)
    settings = _validate(merged.tree, merged.origin)
    if check_files:
        _check_files(settings)
    return settings


def settings_from(data: Mapping[str, Any] | str) -> Settings:
    """Settings from one dict or JSON text alone: no files, no environment, no command line.

    For tests and for uvicorn and pregeneration workers, which receive the CLI's resolved
    settings (``Settings.model_dump_json()``).

    Raises:
        ConfigError: the data is invalid (unknown keys included).
    """
    if isinstance(data, str):
        try:
            return Settings.model_validate_json(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
    return _validate(dict(data))


def _validate(data: dict[str, Any], origin: Mapping[tuple[str, ...], str] | None = None
              ) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def _describe(exc: ValidationError, origin: Mapping[tuple[str, ...], str] | None = None) -> str:
    """One clause per problem: ``Key:Sub = 'value': why``, or for a key that is not a setting
    ``Key:Sub (source) is not a setting; did you mean Key:Other?``."""
    clauses = []
    errors = exc.errors()
    seen = {(tuple(map(str, err["loc"])), err["type"], err["msg"]) for err in errors}
    for err in errors:
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        if (loc and loc[0] in _SINGLE_SLIDE_KEYS
                and (("Image", *loc), err["type"], err["msg"]) in seen):
            continue  # lifted from Image (SingleSlideServer's place): reported there
        if err["type"] == "unknown_key":
            ctx = err.get("ctx") or {}
            path = [*loc, ctx["key"]]
            where = (origin or {}).get(tuple(p.lower() for p in path))
            clause = ":".join(path) + (f" ({where})" if where else "") + " is not a setting"
            if ctx.get("suggestion"):
                clause += f"; did you mean {':'.join([*loc, ctx['suggestion']])}?"
            clauses.append(clause)
            continue
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) else f" = {value!r}"
        clauses.append(f"{':'.join(loc)}{shown}: {err['msg']}")
    return "invalid configuration: " + "; ".join(clauses)


def _check_files(settings: Settings) -> None:
    for key, path in settings.configured_slide_paths():
        if not Path(path).is_file():
            raise ConfigError(f"{key} = {path!r}: slide file not found")
    if settings.SlideDirectory and not Path(settings.SlideDirectory).is_dir():
        raise ConfigError(f"SlideDirectory = {settings.SlideDirectory!r}: folder not found")
    names = [entry.Name for entry in settings.Images]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Images: the name {duplicates[0]!r} is used twice")


# ----------------------------------------------------------------------------- reporting


def default_render_threads(workers: int = 1) -> int:
    """``Server.RenderThreads`` 0: the render threads of each of ``workers`` processes serving
    on this machine, two per CPU core in all, at least one each (2 cores, 2 workers: 2 each).

    Two per core: decoding and encoding release the GIL, and while one thread writes the cache
    another renders (more cold tiles per second than one per core). In all, not per process:
    each render thread of a process competes with its event loop for the GIL, and under a
    flood of cold tiles 4 per process on 2 cores and 2 workers held the loop's refusals and
    cache hits up for 38-84 ms at p99 against 10-23 ms with 2, for the same cold throughput
    (docs/benchmarks.md, "Render threads per machine").
    """
    return min(MAX_RENDER_THREADS, max(1, 2 * (os.cpu_count() or 1) // max(1, workers)))


def with_render_threads(settings: Settings, workers: int) -> Settings:
    """``settings`` with ``Server.RenderThreads`` 0 resolved for ``workers`` processes
    (:func:`default_render_threads`); unchanged when it is set."""
    if settings.Server.RenderThreads:
        return settings
    server = settings.Server.model_copy(
        update={"RenderThreads": default_render_threads(workers)})
    return settings.model_copy(update={"Server": server})


def changed_settings(settings: Settings) -> list[str]:
    """``Section:Key = value`` for every setting that differs from its default, in field order.

    A section that defaults to none (``Image:TileFormat``) is compared with its own defaults.
    List items are named by index (``Images:0:Path = /slides/a.svs``) except lists of plain
    values, which are shown whole as JSON (``Privacy:HideProperties = ["aperio.User"]``);
    strings are shown bare, other values as JSON (``true``, ``null``, ``90``).
    """
    lines: list[str] = []
    _diff(settings, Settings(), [], lines)
    return lines


_ABSENT = object()


def _diff(value: Any, default: Any, path: list[str], lines: list[str]) -> None:
    if isinstance(value, BaseModel):
        if not isinstance(default, type(value)):
            try:
                default = type(value)()
            except ValidationError:  # required fields (an Images item): no default
                default = None
        for name in type(value).model_fields:
            _diff(getattr(value, name), getattr(default, name, _ABSENT), [*path, name], lines)
    elif isinstance(value, list) and any(isinstance(item, BaseModel) for item in value):
        base = default if isinstance(default, list) else []
        for i, item in enumerate(value):
            _diff(item, base[i] if i < len(base) else _ABSENT, [*path, str(i)], lines)
    elif value != default and not (value is None and default is _ABSENT):
        plain = to_jsonable_python(value)
        shown = plain if isinstance(plain, str) else json.dumps(plain)
        lines.append(f"{':'.join(path)} = {shown}")
