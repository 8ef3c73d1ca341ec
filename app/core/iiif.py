"""IIIF Image API 3.0 (compliance level 2): identifiers, request parsing, and info.json. Pure.

Identifier scheme (docs/api.md, "IIIF"): a slide's IIIF base URI is ``/iiif/3/{name}`` (the
single slide: ``/iiif/3/image``); an associated image's is ``/iiif/3/{name}/associated/{assoc}``,
an image service whose prefix is ``iiif/3/{name}/associated`` and whose identifier is the
associated image's name. No identifier contains ``/``, so none needs ``%2F``, which proxies
treat differently.

Coordinates: the image of a slide is its DZI region (``DeepZoom.LimitBounds`` applies as for
the DZI), so IIIF pixel ``(x, y)`` is the full-resolution DZI pixel ``(x, y)``; scale factor
``2**k`` is DZI level ``level_count - 1 - k``.

:func:`parse_image_request` turns the four path segments of an image request into an
:class:`ImageRequest` with every number resolved against the image's size and the server's
limits, raising before any pixel is read:

- :class:`~app.core.errors.BadTileRequest` (400) for bad syntax, a region outside the image, a
  size of zero, upscaling without ``^``, or a size beyond ``maxWidth``/``maxHeight``/``maxArea``;
- :class:`~app.core.errors.FeatureNotImplemented` (501) for a rotation that is not a multiple
  of 90 degrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.core.errors import BadTileRequest, FeatureNotImplemented
from app.core.formats import TileFormat

PREFIX = "/iiif/3"
"""The URL path prefix of every IIIF Image API 3.0 resource of this server."""
CONTEXT = "http://iiif.io/api/image/3/context.json"
PROTOCOL = "http://iiif.io/api/image"

FORMATS: dict[str, TileFormat] = {"jpg": TileFormat.JPEG, "png": TileFormat.PNG,
                                  "webp": TileFormat.WEBP}
"""IIIF format names served, and the tile format each one is."""
IIIF_NAMES: dict[TileFormat, str] = {fmt: name for name, fmt in FORMATS.items()}
QUALITIES = ("default", "color", "gray", "bitonal")
EXTRA_FEATURES = ("mirroring", "regionByPct", "regionSquare", "sizeByConfinedWh",
                  "sizeByPct", "sizeUpscaling", "sizeByW", "sizeByH", "sizeByWh",
                  "rotationBy90s", "baseUriRedirect", "cors", "jsonldMediaType")
"""Features beyond level 2 (or named by it) that this server supports (info.json
``extraFeatures``); level 2 itself is the ``profile``."""

_MAX_DIGITS = 9


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's size limits of one image (info.json ``maxWidth``, ``maxHeight``,
    ``maxArea``), in output pixels."""

    max_width: int
    max_height: int
    max_area: int


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """One IIIF image request, resolved against an image of known size.

    Attributes:
        region: ``(x, y, w, h)`` in full-resolution image pixels, inside the image.
        size: ``(width, height)`` of the scaled region, before rotation.
        mirror: mirror horizontally before rotating.
        rotation: 0, 90, 180 or 270 degrees clockwise.
        quality: ``default``, ``color``, ``gray`` or ``bitonal``.
        extension: the IIIF format name asked for (``jpg``, ``png``, ``webp``).
    """

    region: tuple[int, int, int, int]
    size: tuple[int, int]
    mirror: bool
    rotation: int
    quality: str
    extension: str

    @property
    def format(self) -> TileFormat:
        """The tile format the URL asked for."""
        return FORMATS[self.extension]

    @property
    def plain(self) -> bool:
        """No rotation, no mirroring, the image's own colours: such a request can be a tile of
        the pyramid."""
        return self.rotation == 0 and not self.mirror and self.quality in ("default", "color")

    @property
    def downsample(self) -> float:
        """Full-resolution pixels per output pixel along the finer axis (below 1: upscaled)."""
        _, _, w, h = self.region
        return min(w / self.size[0], h / self.size[1])


def parse_image_request(region: str, size: str, rotation: str, quality_format: str,
                        width: int, height: int, limits: Limits) -> ImageRequest:
    """Resolve the segments ``{region}/{size}/{rotation}/{quality}.{format}`` of an image
    request against a ``width`` x ``height`` image (IIIF Image API 3.0, sections 4.1-4.5).

    Raises:
        BadTileRequest: bad syntax or values (see the module docstring).
        FeatureNotImplemented: a rotation that is not a multiple of 90 degrees.
    """
    quality, dot, extension = quality_format.rpartition(".")
    if not dot or not quality:
        raise BadTileRequest(f"{quality_format!r}: expected {{quality}}.{{format}}, "
                             "e.g. default.jpg")
    if quality not in QUALITIES:
        raise BadTileRequest(f"quality {quality!r}: expected one of {', '.join(QUALITIES)}")
    if extension not in FORMATS:
        raise BadTileRequest(f"format {extension!r}: this server serves "
                             f"{', '.join(FORMATS)}")
    box = parse_region(region, width, height)
    out = parse_size(size, box[2], box[3], limits)
    mirror, degrees = parse_rotation(rotation)
    return ImageRequest(box, out, mirror, degrees, quality, extension)


def parse_region(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` of a region segment (``full``, ``square``, ``x,y,w,h``,
    ``pct:x,y,w,h``), cropped to the image.

    Raises:
        BadTileRequest: bad syntax, zero width or height, or a region outside the image.
    """
    if text == "full":
        return 0, 0, width, height
    if text == "square":
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side
    if text.startswith("pct:"):
        values = [_decimal("region", v) for v in _four("region", text[4:])]
        x, y, w, h = (round(values[0] * width / 100), round(values[1] * height / 100),
                      round(values[2] * width / 100), round(values[3] * height / 100))
    else:
        x, y, w, h = (_integer("region", v) for v in _four("region", text))
    if w <= 0 or h <= 0:
        raise BadTileRequest(f"region {text!r} has no pixels")
    if x >= width or y >= height:
        raise BadTileRequest(f"region {text!r} lies outside the {width}x{height} image")
    return x, y, min(w, width - x), min(h, height - y)


def parse_size(text: str, region_width: int, region_height: int,
               limits: Limits) -> tuple[int, int]:
    """``(width, height)`` of a size segment (``max``, ``w,``, ``,h``, ``pct:n``, ``w,h``,
    ``!w,h``, each with an optional ``^``) for a region of that size.

    Without ``^`` the result may not be larger than the region (400; ``!w,h`` included, as the
    official validator checks); ``max`` fits the region within the limits, ``^max`` scales it
    to the limits; any other size beyond the limits is a 400.

    Raises:
        BadTileRequest: bad syntax, a zero size, upscaling without ``^``, beyond the limits.
    """
    upscale = text.startswith("^")
    spec = text[1:] if upscale else text
    rw, rh = region_width, region_height
    if spec == "max":
        scale = _limit_scale(rw, rh, limits)
        if not upscale:
            scale = min(scale, 1.0)
        if scale == 1.0:
            return rw, rh
        return max(1, math.floor(rw * scale)), max(1, math.floor(rh * scale))
    if spec.startswith("pct:"):
        n = _decimal("size", spec[4:])
        w, h = round(rw * n / 100), round(rh * n / 100)
    elif spec.startswith("!"):
        bw, bh = _pair(spec[1:], both=True)
        scale = min(bw / rw, bh / rh)
        w, h = (bw, min(bh, max(1, round(rh * scale)))) if bw / rw <= bh / rh else (
            min(bw, max(1, round(rw * scale))), bh)
    else:
        pw, ph = _pair(spec, both=False)
        if pw is None:
            w, h = max(1, round(rw * ph / rh)), ph
        elif ph is None:
            w, h = pw, max(1, round(rh * pw / rw))
        else:
            w, h = pw, ph
    if w <= 0 or h <= 0:
        raise BadTileRequest(f"size {text!r} has no pixels")
    if not upscale and (w > rw or h > rh):
        raise BadTileRequest(f"size {text!r} is larger than the {rw}x{rh} region; "
                             "upscaling needs ^")
    if w > limits.max_width or h > limits.max_height or w * h > limits.max_area:
        raise BadTileRequest(
            f"size {text!r} is {w}x{h} px, beyond this server's limits (maxWidth "
            f"{limits.max_width}, maxHeight {limits.max_height}, maxArea {limits.max_area})")
    return w, h


def parse_rotation(text: str) -> tuple[bool, int]:
    """``(mirror, degrees)`` of a rotation segment (``n`` or ``!n``, 0 <= n <= 360).

    Raises:
        BadTileRequest: bad syntax or beyond 360.
        FeatureNotImplemented: not a multiple of 90 degrees.
    """
    mirror = text.startswith("!")
    degrees = _decimal("rotation", text[1:] if mirror else text)
    if degrees > 360:
        raise BadTileRequest(f"rotation {text!r}: expected 0 to 360 degrees")
    if degrees % 90:
        raise FeatureNotImplemented(f"rotation {text!r}: only multiples of 90 degrees are "
                                    "supported")
    return mirror, int(degrees) % 360


def _limit_scale(w: int, h: int, limits: Limits) -> float:
    """The largest scale at which a ``w`` x ``h`` region fits the limits."""
    return min(limits.max_width / w, limits.max_height / h,
               math.sqrt(limits.max_area / (w * h)))


def _four(what: str, text: str) -> list[str]:
    parts = text.split(",")
    if len(parts) != 4:
        raise BadTileRequest(f"{what} {text!r}: expected four comma-separated numbers")
    return parts


def _pair(text: str, both: bool) -> tuple[Any, Any]:
    w, sep, h = text.partition(",")
    if not sep or (both and not (w and h)) or not (w or h):
        raise BadTileRequest(f"size {text!r}: expected w,h, w, or ,h")
    return (_integer("size", w) if w else None, _integer("size", h) if h else None)


def _integer(what: str, text: str) -> int:
    if text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS:
        return int(text)
    raise BadTileRequest(f"{what}: {text!r} is not a non-negative integer")


def _decimal(what: str, text: str) -> float:
    whole, dot, fraction = text.partition(".")
    if ((whole or fraction) and (not whole or (whole.isascii() and whole.isdigit()))
            and (not dot or (fraction.isascii() and fraction.isdigit()))
            and len(text) <= 2 * _MAX_DIGITS):
        return float(text)
    raise BadTileRequest(f"{what}: {text!r} is not a non-negative decimal number")


def scale_factors(width: int, height: int, tile_size: int, level_count: int) -> list[int]:
    """The ``scaleFactors`` of the declared tiles: 1, 2, 4, ... up to the first DZI level at
    which the whole image fits in one tile (consecutive powers of two)."""
    factors = [1]
    while (factors[-1] * tile_size < max(width, height)
           and len(factors) < level_count):
        factors.append(factors[-1] * 2)
    return factors


def image_info(base_uri: str, width: int, height: int, tile_size: int, level_count: int,
               limits: Limits, preferred: list[str]) -> dict[str, Any]:
    """The info.json document of an image service (IIIF Image API 3.0, section 5).

    ``sizes`` lists, smallest first, the whole image at each scale factor whose size fits the
    limits; each is ``ceil(size / factor)``, the DZI level's own size, so OpenSeadragon's level
    sizes and the server's pyramid agree.

    Args:
        base_uri: the absolute base URI (``id``).
        width, height: the full-resolution image size.
        tile_size: the declared tiles' edge (the DZI tile size).
        level_count: the DZI level count (bounds the scale factors).
        limits: ``maxWidth``/``maxHeight``/``maxArea``.
        preferred: ``preferredFormats`` in order (IIIF names).
    """
    factors = scale_factors(width, height, tile_size, level_count)
    sizes = []
    for factor in reversed(factors):
        w, h = -(-width // factor), -(-height // factor)
        if w <= limits.max_width and h <= limits.max_height and w * h <= limits.max_area:
            sizes.append({"width": w, "height": h})
    return {
        "@context": CONTEXT,
        "id": base_uri,
        "type": "ImageService3",
        "protocol": PROTOCOL,
        "profile": "level2",
        "width": width,
        "height": height,
        "maxWidth": limits.max_width,
        "maxHeight": limits.max_height,
        "maxArea": limits.max_area,
        "sizes": sizes,
        "tiles": [{"width": tile_size, "height": tile_size, "scaleFactors": factors}],
        "preferredFormats": preferred,
        "extraFormats": [name for name in FORMATS if name not in ("jpg", "png")],
        "extraQualities": ["color", "gray", "bitonal"],
        "extraFeatures": list(EXTRA_FEATURES),
    }


def base_path(name: str, associated: str | None = None) -> str:
    """The URL path of an image's IIIF base URI (unescaped; see the module docstring)."""
    if associated is None:
        return f"{PREFIX}/{name}"
    return f"{PREFIX}/{name}/associated/{associated}"
