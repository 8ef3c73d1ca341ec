"""Domain exceptions: what goes wrong, with a stable ``code``, and no HTTP.

Every layer raises these; only the server layer knows HTTP: :mod:`app.server.errors` maps each
class to a status code in one table and renders the JSON ``{"error", "detail", "slide"}`` body.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


class TileServerError(Exception):
    """Base of every error the server reports to a client; ``code`` is a stable identifier."""

    code = "internal_error"

    def __init__(self, detail: str, *, slide: str | None = None, **extra: str):
        super().__init__(detail)
        self.detail = detail
        self.slide = slide
        self.extra = extra  # more fields of the JSON body, e.g. ``job`` of a 409


class ConfigError(TileServerError):
    """The configuration is invalid; the message names the key and the value."""

    code = "invalid_configuration"


class BadTileRequest(TileServerError):
    """A malformed request: non-integer level/col/row, unknown extension, bad ``?format=``."""

    code = "bad_request"


class FeatureNotImplemented(TileServerError):
    """A well-formed request for a feature this server does not implement (IIIF: a rotation
    that is not a multiple of 90 degrees)."""

    code = "not_implemented"


class SlideNotFound(TileServerError):
    """No slide of that name is configured (path-like names are never looked up on disk).

    Also what a caller gets for a slide its grants do not cover (:mod:`app.server.auth`), so
    that a denied slide and a missing one read the same: build both with :meth:`named`.
    """

    code = "slide_not_found"

    @classmethod
    def named(cls, name: str) -> SlideNotFound:
        """The error of a slide name that is not configured (or not granted)."""
        return cls(f"no slide named {name!r}", slide=None)


class TileNotFound(TileServerError):
    """The level or the col/row address lies outside the slide's DZI pyramid."""

    code = "tile_not_found"


class AssociatedImageNotFound(TileServerError):
    """The slide has no associated image of that name."""

    code = "associated_image_not_found"


class SlideGone(SlideNotFound):
    """A configured slide whose file no longer exists (answered as unknown: 404)."""


class SlideOpenError(TileServerError):
    """OpenSlide could not open the slide; ``detail`` carries OpenSlide's message."""

    code = "slide_unopenable"


class SlideReadError(TileServerError):
    """OpenSlide opened the slide but failed to read pixels; ``detail`` is OpenSlide's message."""

    code = "slide_unreadable"


class BadJobRequest(TileServerError):
    """A malformed pregeneration request, e.g. ``?levels=`` that is not ``A-B`` or a list."""

    code = "bad_request"


class JobNotFound(TileServerError):
    """No pregeneration job of that id is in the coordination store."""

    code = "job_not_found"


class JobConflict(TileServerError):
    """A job already runs (or waits) for that slide; ``extra["job"]`` is its id."""

    code = "job_conflict"


class JobFinished(TileServerError):
    """The job has already finished, so it cannot be cancelled."""

    code = "job_finished"


class DiskCacheDisabled(TileServerError):
    """Pregeneration fills the disk cache, and ``EnableDiskCache`` is false."""

    code = "disk_cache_disabled"


class CacheWriteError(TileServerError):
    """Pregeneration could not write a tile (read-only or full disk); ``detail`` says why."""

    code = "cache_not_writable"


class Overloaded(TileServerError):
    """The render queue is full (``Server.MaxQueuedRenders``): try again after
    ``retry_after`` seconds. Tiles in a cache are still served."""

    code = "overloaded"

    def __init__(self, detail: str, *, slide: str | None = None, retry_after: int = 1):
        super().__init__(detail, slide=slide)
        self.retry_after = retry_after


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[^/\s'\"]+/)+(?=[^/\s'\"]*)")


def describe_error(exc: BaseException, path: str | os.PathLike[str] | None = None,
                   label: str | None = None) -> str:
    """A foreign exception's message as a client may see it: no absolute server path.

    OpenSlide, Pillow and the OS name files by their full path (``cannot identify image file
    '/srv/slides/x.svs'``); the folders are dropped and the file name kept, or replaced by
    ``label``. The server's log keeps the full message.

    Args:
        exc: the exception (its type name stands in for an empty message).
        path: the slide file the exception is about, when known.
        label: what stands for that file (default its name; ``Privacy.SlideNames: hash``
            gives words without it, :meth:`app.core.privacy.Privacy.file_label`).
    """
    text = str(exc) or type(exc).__name__
    if path is not None:
        full = os.path.abspath(path)
        variants = {full, os.fspath(path), os.path.realpath(full)}
        for variant in sorted(variants, key=len, reverse=True):
            text = text.replace(variant, Path(variant).name if label is None else label)
        if label is not None:
            for name in {Path(variant).name for variant in variants}:
                text = text.replace(name, label)
    return _ABSOLUTE_PATH.sub("", text)


class NotAuthenticated(TileServerError):
    """Credentials are missing or invalid (expired, wrong issuer or key, tampered signature).

    ``challenge`` is the ``WWW-Authenticate`` value of the response (RFC 6750's form).
    """

    code = "unauthorized"

    def __init__(self, detail: str, *, challenge: str):
        super().__init__(detail)
        self.challenge = challenge


class AccessDenied(TileServerError):
    """Valid credentials that do not grant what the request needs (a role, a same-origin
    page for a change of state)."""

    code = "forbidden"


class HostNotAllowed(TileServerError):
    """The ``Host`` header names a host ``AllowedHosts`` does not list."""

    code = "bad_host"


class AuditUnavailable(TileServerError):
    """The audit log cannot take the request's line and ``Audit:FailClosed`` is on."""

    code = "audit_unavailable"


class SignedUrlsDisabled(TileServerError):
    """A signed URL was asked for and ``Auth:SignedUrls`` has no key."""

    code = "signed_urls_disabled"
