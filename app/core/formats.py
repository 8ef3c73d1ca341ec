"""Tile formats, their encoders, and the per-level format policy.

:class:`TileFormat` owns each format's facts (extension, media type, whether it can be
lossless). :class:`Encoding` is one concrete encoder configuration; its ``key`` enters the cache
variant. :class:`FormatPolicy` is a pure function from (DZI level, level count, request) to the
encoding to serve, following the rules of docs/api.md's "The format policy".

AVIF is served as a lossy format only. Pillow's AVIF encoder has no lossless mode: it always
converts RGB to YCbCr (no identity matrix coefficients), ignores ``lossless=True`` (the tile is then
written at the default quality 75 with 4:2:0 chroma: a max error of 67 on wsidicom-data's 240 px
H&E ``test_tile.png``), and even at quality 100 with 4:4:4 chroma that tile comes back with a max
error of 2 in 59% of its samples. Measured with Pillow 13.0.0 (libavif); see
:data:`AVIF_LOSSLESS_MEASUREMENT`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
from PIL import Image

from app.core import png
from app.core.errors import BadTileRequest
from app.core.icc import jpeg_with_profile

if TYPE_CHECKING:
    from app.settings import TileFormatSettings


class TileFormat(StrEnum):
    """An image format a tile can be served in; the value is the canonical URL extension."""

    JPEG = "jpeg"
    PNG = "png"
    WEBP = "webp"
    AVIF = "avif"

    @classmethod
    def parse(cls, name: str) -> TileFormat:
        """Parse a format name or extension, case-insensitively; ``jpg`` means jpeg.

        Raises:
            ValueError: the name is not jpeg, jpg, png or webp.
        """
        value = name.strip().lower()
        if value == "jpg":
            value = "jpeg"
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown tile format {name!r}; expected jpeg, jpg, png, webp or avif") from None

    @property
    def media_type(self) -> str:
        """The ``Content-Type`` of tiles in this format."""
        return _MEDIA_TYPES[self]

    @property
    def can_be_lossless(self) -> bool:
        """True for formats with a bit-exact mode (PNG always, WebP in its lossless mode).

        JPEG and AVIF are lossy only (AVIF: see :data:`AVIF_LOSSLESS_MEASUREMENT`).
        """
        return self in (TileFormat.PNG, TileFormat.WEBP)


_MEDIA_TYPES = {TileFormat.JPEG: "image/jpeg", TileFormat.PNG: "image/png",
                TileFormat.WEBP: "image/webp", TileFormat.AVIF: "image/avif"}

AVIF_LOSSLESS_MEASUREMENT = (
    "Pillow's AVIF encoder has no lossless mode: it converts RGB to YCbCr and ignores "
    "lossless=True (max error 67 on wsidicom-data's 240 px H&E test tile; 2 even at quality 100 "
    "with 4:4:4 chroma)"
)
"""Why AVIF cannot be ``TileFormat:LosslessFormat``: measured with Pillow 13.0.0 on
``wsidicom_data/data/test_tile.png`` (``tests/unit/test_lossless.py`` measures it again)."""

AVIF_SPEED = 10
"""libavif encoder speed 0..10 used for AVIF tiles: 10 encodes a 256 px H&E tile in ~5.5 ms
(speed 6, Pillow's default: ~68 ms) for files ~5% larger at the same PSNR."""


@dataclass(frozen=True, slots=True)
class Encoding:
    """One encoder configuration: format, lossless or not, and its options.

    ``quality`` is 1..100 for lossy JPEG, WebP and AVIF; ``compress_level`` is libdeflate's 0..12
    for PNG.
    """

    format: TileFormat
    lossless: bool
    quality: int | None = None
    compress_level: int | None = None

    @property
    def key(self) -> str:
        """A short text naming every option that changes the bytes (enters the cache variant)."""
        mode = "lossless" if self.lossless else f"q{self.quality}"
        extra = f"-z{self.compress_level}" if self.compress_level is not None else ""
        return f"{self.format.value}-{mode}{extra}"

    def encode(self, image: Image.Image | np.ndarray, icc_profile: bytes | None = None) -> bytes:
        """Encode an RGB image (PIL, or an ``(H, W, 3)`` uint8 array); returns the complete
        file bytes. Blocking: run it in a thread.

        ``icc_profile`` (see :mod:`app.core.colour`) is embedded without touching the encoded
        image data: JPEG APP2 segments spliced in after SOI/APP0, a PNG ``iCCP`` chunk, WebP's
        ``ICCP`` chunk (Pillow's ``icc_profile``). Without it the bytes are as before.

        JPEG is libjpeg-turbo through imagecodecs with Pillow's defaults (4:2:0 chroma
        subsampling, standard Huffman tables): the same bytes as ``PIL.Image.save(quality=q)``,
        as openslide-python's deepzoom_server writes, in about 70% of the time (a test holds
        the two byte-equal). PNG uses :mod:`app.core.png` (libdeflate at ``compress_level``).
        WebP lossless keeps RGB exact (``exact=True``); ``method=0`` is its fastest effort,
        bit-exact like every other. AVIF is libavif through Pillow at :data:`AVIF_SPEED`, 4:2:0,
        one thread per tile (tiles are encoded in parallel already).
        """
        pixels = image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB"))
        if self.format is TileFormat.PNG:
            return png.encode_rgb(pixels, self.compress_level or 0, icc_profile)
        if self.format is TileFormat.JPEG:
            data = imagecodecs.jpeg8_encode(pixels, level=self.quality)
            assert isinstance(data, bytes)  # a bytearray only when given one as ``out``
            return jpeg_with_profile(data, icc_profile) if icc_profile else data
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        buf = io.BytesIO()
        extra = {"icc_profile": icc_profile} if icc_profile else {}
        if self.format is TileFormat.AVIF:
            image.save(buf, "AVIF", quality=self.quality, speed=AVIF_SPEED, max_threads=1,
                       **extra)
        elif self.lossless:
            image.save(buf, "WEBP", lossless=True, quality=0, method=0, exact=True, **extra)
        else:
            image.save(buf, "WEBP", quality=self.quality, method=4, **extra)
        return buf.getvalue()


@dataclass(frozen=True, slots=True)
class FormatDecision:
    """What to serve for one tile request.

    ``vary_accept`` is true when the ``Accept`` header took part in the choice, so the response
    must carry ``Vary: Accept``. ``override_refused`` is true when the request asked for a lossy
    format on a lossless level and ``TileFormat.EnforceLossless`` served the lossless format
    instead (the response says ``X-Tile-Override: refused``).
    """

    encoding: Encoding
    vary_accept: bool = False
    override_refused: bool = False


class FormatPolicy:
    """The per-level format policy; pure: no I/O, no pixels.

    DZI levels count from 0 (1x1 px) to ``level_count - 1`` (full resolution). The
    ``LosslessLevelCount`` highest levels are lossless (``-1``: all, ``0``: none), as in
    OpenSlideSharp's ``TileFormatOptions.GetFormatForLevel``.
    """

    def __init__(self, settings: TileFormatSettings):
        self.settings = settings
        self.declared = settings.Default
        self._jpeg = Encoding(TileFormat.JPEG, False, quality=settings.JpegQuality)
        self._png = Encoding(TileFormat.PNG, True, compress_level=settings.PngCompressLevel)
        self._webp_lossy = Encoding(TileFormat.WEBP, False, quality=settings.WebpQuality)
        self._webp_lossless = Encoding(TileFormat.WEBP, True)
        self._avif = Encoding(TileFormat.AVIF, False, quality=settings.AvifQuality)

    def lossless_encodings(self) -> list[Encoding]:
        """Every encoding this policy may serve as lossless (``X-Tile-Lossless: true``).

        PNG always (lossless levels, ``?format=png``, the WebP fallback); lossless WebP when it
        is the ``LosslessFormat`` or when overrides may ask for it. Each one must pass the
        start-up round-trip (:func:`app.core.lossless.check_round_trips`).
        """
        out = [self._png]
        if (self.settings.LosslessFormat is TileFormat.WEBP
                or self.settings.AllowFormatOverride):
            out.append(self._webp_lossless)
        return out

    def encoding_keys(self) -> frozenset[str]:
        """The :attr:`Encoding.key` of every encoding this policy can serve (cache variants of
        other encodings are stale)."""
        return frozenset(e.key for e in (self._jpeg, self._png, self._webp_lossy,
                                         self._webp_lossless, self._avif))

    def is_lossless_level(self, level: int, level_count: int) -> bool:
        """True if the policy serves DZI ``level`` (of ``level_count``) in ``LosslessFormat``."""
        n = self.settings.LosslessLevelCount
        return n == -1 or (n > 0 and level >= level_count - n)

    def encoding_for(self, fmt: TileFormat, level: int, level_count: int) -> Encoding:
        """The encoding of ``fmt`` at a level: WebP is lossless on lossless levels only."""
        if fmt is TileFormat.JPEG:
            return self._jpeg
        if fmt is TileFormat.PNG:
            return self._png
        if fmt is TileFormat.AVIF:
            return self._avif
        if self.is_lossless_level(level, level_count):
            return self._webp_lossless
        return self._webp_lossy

    def level_encoding(self, level: int, level_count: int) -> Encoding:
        """The encoding the policy alone gives a level (no request override)."""
        lossless = self.is_lossless_level(level, level_count)
        fmt = self.settings.LosslessFormat if lossless else self.settings.Default
        return self.encoding_for(fmt, level, level_count)

    def decide(self, level: int, level_count: int, extension: str | None = None,
               query_format: str | None = None, accept: str | None = None) -> FormatDecision:
        """Choose the encoding for one request.

        Args:
            level: DZI level (0 = 1x1 px).
            level_count: number of DZI levels of the slide.
            extension: the URL's extension without the dot, or None.
            query_format: the ``?format=`` value, or None.
            accept: the request's ``Accept`` header, or None.

        An explicit override (``?format=``, or an extension other than the declared one) is
        served as asked, except that with ``EnforceLossless`` a lossy format asked for on a
        lossless level is refused: the level's lossless encoding is served instead. Where the
        policy (not the request) picks WebP or AVIF and ``Accept`` does not name it, PNG
        (lossless levels, and lossy WebP as before) or JPEG (lossy AVIF) is served.

        Returns:
            The encoding, whether ``Accept`` took part (``Vary: Accept``), and whether an
            override was refused.

        Raises:
            BadTileRequest: unknown extension or ``?format=`` value.
        """
        ext_format = _parse_requested(extension, "extension") if extension else None
        query = _parse_requested(query_format, "format") if query_format is not None else None
        requested = None
        if self.settings.AllowFormatOverride:
            if query is not None:
                requested = query
            elif ext_format is not None and ext_format is not self.declared:
                requested = ext_format
        refused = False
        if requested is not None:
            encoding = self.encoding_for(requested, level, level_count)
            if not (self.settings.EnforceLossless and not encoding.lossless
                    and self.is_lossless_level(level, level_count)):
                return FormatDecision(encoding)
            refused = True
        encoding = self.level_encoding(level, level_count)
        if encoding.format is TileFormat.WEBP:
            if not accepts_media(accept, "image/webp"):
                return FormatDecision(self._png, True, refused)
            return FormatDecision(encoding, True, refused)
        if encoding.format is TileFormat.AVIF:
            if not accepts_media(accept, "image/avif"):
                return FormatDecision(self._jpeg, True, refused)
            return FormatDecision(encoding, True, refused)
        return FormatDecision(encoding, False, refused)


def _parse_requested(value: str, what: str) -> TileFormat:
    try:
        return TileFormat.parse(value)
    except ValueError as exc:
        raise BadTileRequest(f"{what} {value!r}: {exc}") from None


def accepts_webp(accept: str | None) -> bool:
    """True if an ``Accept`` header names ``image/webp`` with a non-zero q.

    Only the explicit type counts: ``*/*`` and ``image/*`` were sent by browsers that could not
    decode WebP (Safari before 14), so image CDNs likewise ignore them.
    """
    return accepts_media(accept, "image/webp")


def accepts_media(accept: str | None, media_type: str) -> bool:
    """True if an ``Accept`` header names ``media_type`` explicitly with a non-zero q
    (wildcards do not count; see :func:`accepts_webp`)."""
    if not accept:
        return False
    for item in accept.lower().split(","):
        media, _, params = item.strip().partition(";")
        if media.strip() != media_type:
            continue
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False
