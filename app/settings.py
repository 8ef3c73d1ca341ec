"""Settings: one section model per appsettings.json key, loaded the ASP.NET way.

Sources, later wins (the order of ASP.NET Core's default host builder):

1. defaults (the field defaults below),
2. ``appsettings.json`` in the working directory,
3. ``config/appsettings.{Environment}.json`` (``TILESERVER_ENVIRONMENT``, default Production),
4. ``--config FILE``,
5. environment variables, ``__`` nesting: ``Image__Path``, ``TileFormat__LosslessLevelCount``,
   list items by index: ``Images__0__Name``,
6. command-line overrides ``Key:Sub=value`` (``Images:1:Path=/slides/b.svs``).

Keys are matched case-insensitively, as ASP.NET configuration does. Lists are merged by index
across sources (``Images__1__Path`` replaces the path of item 1 and keeps its name), because each
source is flattened to index-keyed dicts before pydantic-settings deep-merges them.

Files written for the original OpenSlideSharp SingleSlideServer (``Image: {Path, TileCachePath,
EnableDiskCache, TileFormat}``) and MultiSlideServer (top-level ``TileCachePath``,
``EnableDiskCache``, ``TileFormat``, ``Images``) load unchanged.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.core import colour
from app.core.errors import ConfigError
from app.core.formats import AVIF_LOSSLESS_MEASUREMENT, TileFormat
from app.core.names import name_problem

ENVIRONMENT_VARIABLE = "TILESERVER_ENVIRONMENT"


class Section(BaseModel):
    """Base of every settings section: keys match case-insensitively, unknown keys are ignored.

    ASP.NET configuration is case-insensitive and appsettings.json files often carry keys for
    other parts of a host (``Logging``, ``AllowedHosts``); both are accepted here.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _match_keys(cls, data: Any) -> Any:
        return _canonical_keys(cls, data)


def _canonical_keys(model: type[BaseModel], data: Any) -> Any:
    """Rename ``data``'s keys to ``model``'s field names, case-insensitively; turn index dicts
    (``{"0": ..., "1": ...}``, as environment variables give) into lists."""
    if not isinstance(data, Mapping):
        return data
    names = {name.lower(): name for name in model.model_fields}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = names.get(str(key).lower(), key)
        info = model.model_fields.get(name)
        if info is not None and _is_list_field(info):
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


class ServerSettings(Section):
    """``Server``: HTTP headers, concurrency and memory bounds of the serving process."""

    CacheControl: str = "public, max-age=86400"
    AccessControlAllowOrigin: str = "*"
    RenderThreads: int = Field(0, ge=0, le=256, description="0: two per CPU core.")
    MaxOpenSlides: int = Field(16, ge=1, le=4096)
    OpenSlideCacheBytes: int = Field(256 * 1024 * 1024, ge=0,
                                     description="Decoded slide tiles kept, per process.")
    NativeReader: bool = Field(True,
                               description="Decode TIFF JPEG tiles natively (app.core.native).")
    MemoryCacheBytes: int = Field(64 * 1024 * 1024, ge=0)
    RevalidateSeconds: float = Field(2.0, ge=0, description="How often a slide file is re-stat'ed.")


class PrivacySettings(Section):
    """``Privacy``: what is withheld from every route, listing and cache path (PHI switch)."""

    HideAssociatedImages: bool = Field(
        False, description="Withhold every associated image (label, macro, thumbnail).")
    HideProperties: list[str] = Field(
        default_factory=list, description="Property-name glob patterns to withhold "
        "(case-insensitive), e.g. aperio.User, *.Filename, tiff.DateTime.")

    @field_validator("HideProperties", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        if isinstance(value, str):  # one pattern or a comma-separated list (environment)
            return [p.strip() for p in value.split(",") if p.strip()]
        return value


class AuditSettings(Section):
    """``Audit``: the JSON-lines audit log of tile requests (see app.server.audit)."""

    Enabled: bool = False
    Path: str = Field("./audit/tiles.jsonl", min_length=1,
                      description="The log file; rotated files get .1, .2, ... appended.")
    MaxBytes: int = Field(100 * 1024 * 1024, ge=0,
                          description="Rotate when the file reaches this size; 0 never rotates.")
    BackupCount: int = Field(10, ge=0, le=10000, description="Rotated files kept.")


class IntegritySettings(Section):
    """``Integrity``: checks beyond those that are always on (see docs/regulatory.md)."""

    ContentSha256: bool = Field(
        False, description="Hash every slide file whole (SHA-256), once per version of the "
        "file, in the background; /api/slides/{name} and tileserver verify report it.")


class PregenerationSettings(Section):
    """``Pregeneration``: background jobs and ``tileserver pregenerate``
    (see app.batch.pregenerate)."""

    Workers: int = Field(0, ge=0, le=256, description="Worker processes; 0: one per CPU core.")
    Nice: int = Field(10, ge=0, le=19,
                      description="Niceness added to worker processes, so that interactive "
                                  "requests keep their latency while a job runs.")
    WorkerCacheBytes: int = Field(64 * 1024 * 1024, ge=0,
                                  description="Decoded slide tiles kept per worker process.")
    Scheduler: str | None = Field(None, description="Dask scheduler address "
                                  "(tcp://host:8786): run jobs on that cluster instead.")


class Settings(BaseSettings):
    """The whole configuration; attribute names are the appsettings.json keys."""

    model_config = SettingsConfigDict(extra="ignore", validate_assignment=True)

    Image: ImageSettings = Field(default_factory=ImageSettings)
    Images: list[ImageEntry] = Field(default_factory=list)
    SlideDirectory: str | None = None
    SlideDirectoryFollowSymlinks: bool = Field(
        False, description="Serve symbolic links in SlideDirectory that point outside it "
        "(skipped with a warning otherwise).")
    TileCachePath: str = "./tile_cache"
    EnableDiskCache: bool = True
    DeepZoom: DeepZoomSettings = Field(default_factory=DeepZoomSettings)
    TileFormat: TileFormatSettings = Field(default_factory=TileFormatSettings)
    Server: ServerSettings = Field(default_factory=ServerSettings)
    Privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    Pregeneration: PregenerationSettings = Field(default_factory=PregenerationSettings)
    DemoDirectory: str = "./data"
    Audit: AuditSettings = Field(default_factory=AuditSettings)
    Integrity: IntegritySettings = Field(default_factory=IntegritySettings)

    @model_validator(mode="before")
    @classmethod
    def _match_keys(cls, data: Any) -> Any:
        return _canonical_keys(cls, data)

    @model_validator(mode="after")
    def _apply_single_slide_shape(self) -> Settings:
        """Lift SingleSlideServer's ``Image.TileCachePath`` etc. where the top level is unset."""
        for key in ("TileCachePath", "EnableDiskCache", "TileFormat"):
            value = getattr(self.Image, key)
            if value is not None and key not in self.model_fields_set:
                object.__setattr__(self, key, value)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """ASP.NET order (first wins): init, command line, environment, JSON files."""
        ctx = _LOAD_CONTEXT.get() or _LoadContext()
        json_sources = [JsonFileSource(settings_cls, path) for path in reversed(ctx.json_files)]
        return (
            init_settings,
            KeyPathSource(settings_cls, _parse_overrides(ctx.overrides), "command line"),
            KeyPathSource(settings_cls, _parse_environ(settings_cls, ctx.environ), "environment"),
            *json_sources,
        )

    def configured_slide_paths(self) -> list[tuple[str, str]]:
        """``(key, path)`` of every slide file named by the settings, for start-up checks."""
        out = [(f"Images:{i}:Path", entry.Path) for i, entry in enumerate(self.Images)]
        if self.Image.Path:
            out.insert(0, ("Image:Path", self.Image.Path))
        return out


@dataclass
class _LoadContext:
    json_files: list[Path] = field(default_factory=lambda: [Path("appsettings.json")])
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    overrides: list[str] = field(default_factory=list)


_LOAD_CONTEXT: contextvars.ContextVar[_LoadContext | None] = contextvars.ContextVar(
    "tileserver_settings_context", default=None
)


class JsonFileSource(PydanticBaseSettingsSource):
    """An appsettings JSON file; lists become index dicts so later sources merge by index."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path):
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: values come whole from ``__call__``."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """The file's settings with lower-cased keys and index-keyed lists ({} if absent)."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: the top level must be a JSON object")
        return _lists_to_indexed(_lower_tree(data))


class KeyPathSource(PydanticBaseSettingsSource):
    """Flat ``[(key path, value)]`` pairs (environment or command line) as a nested dict."""

    def __init__(self, settings_cls: type[BaseSettings], pairs: Iterable[tuple[list[str], str]],
                 origin: str):
        super().__init__(settings_cls)
        self.pairs = list(pairs)
        self.origin = origin

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """Unused: values come whole from ``__call__``."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        """The pairs as a nested dict."""
        tree: dict[str, Any] = {}
        for path, value in self.pairs:
            node = tree
            for part in path[:-1]:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
            node[path[-1]] = value
        return tree


def _lower_tree(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k).lower(): _lower_tree(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_lower_tree(v) for v in data]
    return data


def _lists_to_indexed(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _lists_to_indexed(v) for k, v in data.items()}
    if isinstance(data, list):
        return {str(i): _lists_to_indexed(v) for i, v in enumerate(data)}
    return data


def _parse_environ(settings_cls: type[BaseSettings], environ: Mapping[str, str]):
    """Environment variables whose first ``__`` segment is a top-level key."""
    top = {name.lower() for name in settings_cls.model_fields}
    for name, value in environ.items():
        path = [part.lower() for part in name.split("__")]
        if path[0] in top and all(path):
            yield path, value


def _parse_overrides(overrides: Iterable[str]):
    for item in overrides:
        key, sep, value = item.partition("=")
        path = [part.lower() for part in key.strip().lstrip("-").split(":")]
        if not sep or not all(path):
            raise ConfigError(f"command-line setting {item!r}: expected Section:Key=value")
        yield path, value


def load_settings(
    *,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    base_dir: str | Path = ".",
    check_files: bool = True,
) -> Settings:
    """Load settings from every source, in ASP.NET order, and validate them.

    Args:
        config_file: the ``--config FILE`` JSON, applied after the environment overlay file.
        overrides: command-line ``Section:Key=value`` items.
        environ: environment variables (default ``os.environ``); also gives
            ``TILESERVER_ENVIRONMENT``.
        base_dir: folder holding ``appsettings.json`` and ``config/``.
        check_files: check that every configured slide file and ``SlideDirectory`` exists.

    Returns:
        The validated settings.

    Raises:
        ConfigError: one message naming the offending key and value (unknown format, quality out
            of 1..100, missing slide file, malformed JSON or override).
    """
    environ = os.environ if environ is None else environ
    base = Path(base_dir)
    environment = environ.get(ENVIRONMENT_VARIABLE, "Production")
    json_files = [base / "appsettings.json", base / "config" / f"appsettings.{environment}.json"]
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ConfigError(f"--config {config_file}: file not found")
        json_files.append(Path(config_file))
    token = _LOAD_CONTEXT.set(_LoadContext(json_files, environ, list(overrides)))
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _LOAD_CONTEXT.reset(token)
    if check_files:
        _check_files(settings)
    return settings


def settings_from(data: Mapping[str, Any] | str) -> Settings:
    """Settings from one dict or JSON text alone: no files, no environment, no command line.

    For tests and for uvicorn workers, which receive the CLI's already-resolved settings.

    Raises:
        ConfigError: the data is invalid.
    """
    token = _LOAD_CONTEXT.set(_LoadContext(json_files=[], environ={}, overrides=[]))
    try:
        if isinstance(data, str):
            return Settings.model_validate_json(data)
        return Settings.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _LOAD_CONTEXT.reset(token)


def _describe(exc: ValidationError) -> str:
    """One line per problem: ``Key:Sub = 'value': why``."""
    lines = []
    for err in exc.errors():
        key = ":".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) else f" = {value!r}"
        lines.append(f"{key}{shown}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)


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
