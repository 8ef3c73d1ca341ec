"""ICC colour modes: embed the slide's profile, convert to sRGB, or ignore it.

The modes are openslide-python's ``deepzoom_server.py`` ``DEEPZOOM_COLOR_MODE`` values, with
``embed`` as this server's default because it leaves every pixel as the slide stores it:

* ``embed``: pixels untouched; the slide's ICC profile is embedded in every tile, so browsers
  (which colour-manage tagged images) show the scanner's colours.
* ``default``: convert to sRGB with the rendering intent the profile's header names, embed
  :data:`app.core.icc.SRGB_PROFILE`.
* ``absolute-colorimetric``, ``perceptual``, ``relative-colorimetric``, ``saturation``:
  convert to sRGB with that intent, embed :data:`app.core.icc.SRGB_PROFILE`.
* ``ignore``: pixels untouched, no profile.

A slide without a profile is served untouched and untagged in every mode. Conversions are
LittleCMS transforms (Pillow's ``ImageCms``), built once per open slide (and per associated
image, which carries its own profile), never per tile.

:func:`reference_pixels` and :func:`expected_profile` give what a tile must decode to and carry
under a mode, from ``DeepZoomGenerator.get_tile`` and ``ImageCms.profileToProfile``: the
reference that tests and ``tileserver verify`` compare served tiles with.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from openslide import AbstractSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image, ImageCms

from app.core.icc import SRGB_PROFILE


class ColorMode(StrEnum):
    """``DeepZoom.ColorMode``: what to do with a slide's ICC profile (see module docstring)."""

    EMBED = "embed"
    DEFAULT = "default"
    ABSOLUTE_COLORIMETRIC = "absolute-colorimetric"
    PERCEPTUAL = "perceptual"
    RELATIVE_COLORIMETRIC = "relative-colorimetric"
    SATURATION = "saturation"
    IGNORE = "ignore"

    @classmethod
    def parse(cls, name: str) -> ColorMode:
        """Parse a mode name case-insensitively (``_`` may stand for ``-``).

        Raises:
            ValueError: not one of the seven modes.
        """
        value = name.strip().lower().replace("_", "-")
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown colour mode {name!r}; expected one of "
                             + ", ".join(m.value for m in cls)) from None


INTENT_NAMES: dict[ImageCms.Intent, str] = {
    ImageCms.Intent.PERCEPTUAL: "perceptual",
    ImageCms.Intent.RELATIVE_COLORIMETRIC: "relative-colorimetric",
    ImageCms.Intent.SATURATION: "saturation",
    ImageCms.Intent.ABSOLUTE_COLORIMETRIC: "absolute-colorimetric",
}
"""LittleCMS rendering intents by their ICC names (ICC.1 section 6.1.11)."""

_MODE_INTENTS = {ColorMode(name): intent for intent, name in INTENT_NAMES.items()}

NO_TRANSFORM = "none"
"""``X-Tile-Color-Transform`` of tiles whose pixels are the slide's."""

_SRGB = ImageCms.ImageCmsProfile(io.BytesIO(SRGB_PROFILE))


def conversion_intent(mode: ColorMode | str,
                      profile: ImageCms.ImageCmsProfile | None) -> ImageCms.Intent | None:
    """The rendering intent a mode converts to sRGB with; None when pixels stay untouched.

    ``default`` takes the intent from the profile's header, as openslide-python's server does.
    """
    mode = ColorMode(mode)
    if profile is None or mode in (ColorMode.EMBED, ColorMode.IGNORE):
        return None
    if mode is ColorMode.DEFAULT:
        return ImageCms.Intent(ImageCms.getDefaultIntent(profile))
    return _MODE_INTENTS[mode]


@dataclass(frozen=True, eq=False)
class ColorTransform:
    """What one colour mode does to the tiles of one image (a slide or an associated image).

    Build with :meth:`for_slide`, once per open slide; :meth:`apply` is thread-safe.

    Attributes:
        mode: the configured mode.
        source_profile: the image's own ICC profile bytes, or None.
        embed_profile: the profile bytes written into every tile, or None.
        intent: the rendering intent of the conversion to sRGB, or None (pixels untouched).
    """

    mode: ColorMode
    source_profile: bytes | None
    embed_profile: bytes | None
    intent: ImageCms.Intent | None
    _transform: ImageCms.ImageCmsTransform | None = None

    @classmethod
    def for_slide(cls, slide: AbstractSlide, mode: ColorMode | str) -> ColorTransform:
        """The transform of ``slide`` (OpenSlide or ImageSlide) under ``mode``. Blocking.

        Raises:
            OSError (``ImageCms.PyCMSError``): LittleCMS cannot read the slide's profile.
        """
        mode = ColorMode(mode)
        profile = slide.color_profile
        if profile is None:
            return cls(mode, None, None, None)
        source = stored_profile(slide)
        intent = conversion_intent(mode, profile)
        if intent is None:
            embedded = source if mode is ColorMode.EMBED else None
            return cls(mode, source, embedded, None)
        transform = ImageCms.buildTransform(profile, _SRGB, "RGB", "RGB", intent)
        return cls(mode, source, SRGB_PROFILE, intent, transform)

    @property
    def converts(self) -> bool:
        """True when pixels are converted (they then differ from the slide's)."""
        return self._transform is not None

    @property
    def name(self) -> str:
        """The ``X-Tile-Color-Transform`` value: ``none`` or ``srgb-<intent>``."""
        return NO_TRANSFORM if self.intent is None else f"srgb-{INTENT_NAMES[self.intent]}"

    @property
    def key(self) -> str:
        """A short text naming everything that changes tile bytes (enters the cache variant)."""
        digest = (hashlib.sha256(self.embed_profile).hexdigest()[:12]
                  if self.embed_profile else "-")
        return f"{self.mode.value}:{self.name}:{digest}"

    def apply(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """The tile's pixels under this mode (the input itself when nothing converts).

        Args:
            image: an RGB tile, PIL or ``(H, W, 3)`` uint8 array.

        Returns:
            The converted RGB PIL image, or ``image`` unchanged.
        """
        if self._transform is None:
            return image
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return self._transform.apply(image)

    def describe(self) -> dict[str, Any]:
        """The ``color`` block of ``/api/slides/{name}``."""
        profile = None
        if self.source_profile is not None:
            parsed = ImageCms.ImageCmsProfile(io.BytesIO(self.source_profile)).profile
            profile = {
                "description": (parsed.profile_description or "").strip(),
                "bytes": len(self.source_profile),
                "version": parsed.version,
                "rendering_intent": INTENT_NAMES.get(
                    ImageCms.Intent(parsed.rendering_intent), str(parsed.rendering_intent)),
                "sha256": hashlib.sha256(self.source_profile).hexdigest(),
            }
        return {
            "mode": self.mode.value,
            "icc_profile": profile,
            "transform": self.name,
            "embedded_profile": ("slide" if self.mode is ColorMode.EMBED and profile
                                 else "srgb" if self.converts else None),
            "pixels_untouched": not self.converts,
        }


def stored_profile(slide: AbstractSlide) -> bytes | None:
    """The slide's ICC profile bytes exactly as the file stores them, or None. Blocking.

    ``slide.color_profile.tobytes()`` would not do: it is LittleCMS's re-serialisation, which
    can differ (a DICOM fixture's v2.1 profile comes back marked v2.2). openslide-python
    attaches the stored bytes to every region it reads, so one pixel is read for them.

    Raises:
        openslide.OpenSlideError: the slide cannot be read.
    """
    if slide.color_profile is None:
        return None
    stored: bytes = slide.read_region((0, 0), 0, (1, 1)).info["icc_profile"]
    return stored


def expected_profile(slide: AbstractSlide, mode: ColorMode | str) -> bytes | None:
    """The ICC profile bytes a tile of ``slide`` must carry under ``mode`` (None: untagged)."""
    mode = ColorMode(mode)
    if slide.color_profile is None or mode is ColorMode.IGNORE:
        return None
    return stored_profile(slide) if mode is ColorMode.EMBED else SRGB_PROFILE


def reference_pixels(slide: AbstractSlide, level: int, col: int, row: int, *,
                     color_mode: ColorMode | str, tile_size: int | None = None,
                     overlap: int | None = None, limit_bounds: bool | None = None,
                     generator: DeepZoomGenerator | None = None) -> np.ndarray:
    """The pixels a served tile must decode to: ``get_tile``'s, converted as the mode says.

    Independent of the serving pipeline: openslide-python's ``DeepZoomGenerator.get_tile``
    (no native reader, no cache), then ``ImageCms.profileToProfile`` from the slide's profile
    to :data:`app.core.icc.SRGB_PROFILE` for converting modes.

    Args:
        slide: the slide (an ``OpenSlide``), or ``ImageSlide(slide.associated_images[name])``
            for an associated image.
        level, col, row: DZI level (0 = 1x1 px) and tile address.
        color_mode: ``DeepZoom.ColorMode``.
        tile_size, overlap, limit_bounds: the DZI geometry (``DeepZoom`` settings); needed
            only without ``generator``.
        generator: a ``DeepZoomGenerator`` of ``slide`` with the geometry, to reuse across
            calls (one is built from the three above when omitted).

    Returns:
        ``(height, width, 3)`` uint8 RGB.

    Raises:
        ValueError: the address is outside the pyramid (``get_tile``'s error).
        openslide.OpenSlideError: the slide cannot be read.
    """
    dz = generator
    if dz is None:
        if tile_size is None or overlap is None or limit_bounds is None:
            raise TypeError("reference_pixels needs a generator or tile_size, overlap and "
                            "limit_bounds")
        dz = DeepZoomGenerator(slide, tile_size, overlap, limit_bounds)
    tile = dz.get_tile(level, (col, row))
    profile = slide.color_profile
    intent = conversion_intent(color_mode, profile)
    if profile is not None and intent is not None:  # no intent without a profile
        converted = ImageCms.profileToProfile(tile, profile, _SRGB, renderingIntent=intent,
                                              outputMode="RGB")
        assert converted is not None  # None only with inPlace=True
        tile = converted
    return np.asarray(tile.convert("RGB"))
