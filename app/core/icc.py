"""Small ICC profiles built in code, and the bytes that embed a profile in a tile file.

Why build profiles here: converting colour modes (see :mod:`app.core.colour`) embed an sRGB
profile in every tile, so it must be small (it is sent with every tile) and deterministic (it is
part of the tile's bytes, ETag and cache). LittleCMS's built-in sRGB
(``ImageCms.createProfile("sRGB")``) is an ICC v4 profile stamped with the time it was created, so
its bytes change from process to process, and browsers that ignore v4 profiles exist.
:func:`rgb_matrix_profile` writes a minimal ICC v2 matrix/TRC display profile (ICC.1:2001-04,
section 6.3.1.2: ``desc``, ``cprt``, ``wtpt``, ``rXYZ``/``gXYZ``/``bXYZ``,
``rTRC``/``gTRC``/``bTRC``; the three curves share one table) with a fixed date;
:data:`SRGB_PROFILE` is sRGB from the numbers of IEC 61966-2-1 (primaries, D65 white, transfer
function), its colorants adapted to the D50 connection space with the Bradford transform, as ICC.1
Annex E asks. A test converts every 8-bit grey and a colour grid from LittleCMS's own sRGB to
this profile and finds no difference.

Embedding never re-encodes: :func:`jpeg_app2_segments` are APP2 ``ICC_PROFILE`` segments to
insert after the JFIF APP0 segment (ICC.1 Annex B.4), :func:`png_iccp_chunk` is a PNG ``iCCP``
chunk (PNG specification 11.3.3.3) to insert before ``IDAT``; both are computed once per profile.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import numpy.typing as npt

D50_XYZ = (0.9642, 1.0, 0.8249)
"""The ICC profile connection space white, as ICC.1 encodes it (s15Fixed16 0xF6D6, 1, 0xD32D)."""

SRGB_PRIMARIES = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06))
"""sRGB red, green, blue chromaticities (x, y), IEC 61966-2-1."""

D65_XY = (0.3127, 0.3290)
"""D65 white chromaticity (x, y), IEC 61966-2-1."""

_BRADFORD: npt.NDArray[np.float64] = np.array([[0.8951, 0.2664, -0.1614],
                                               [-0.7502, 1.7135, 0.0367],
                                               [0.0389, -0.0685, 1.0296]])
_DATE = (2026, 1, 1, 0, 0, 0)  # fixed, so the bytes never change
_SRGB_TRC_POINTS = 64  # the smallest table with margin that converts every 8-bit colour exactly


def srgb_to_linear(v: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The sRGB transfer function (IEC 61966-2-1): encoded 0..1 -> linear light 0..1."""
    v = np.asarray(v, np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _xy_to_xyz(x: float, y: float) -> npt.NDArray[np.float64]:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def d50_colorants(primaries: tuple[tuple[float, float], ...],
                  white: tuple[float, float]) -> npt.NDArray[np.float64]:
    """The ``rXYZ``, ``gXYZ``, ``bXYZ`` columns of an RGB space, Bradford-adapted to D50.

    Args:
        primaries: ``((xr, yr), (xg, yg), (xb, yb))`` chromaticities.
        white: the space's white chromaticity ``(x, y)``.

    Returns:
        A 3x3 matrix whose columns are the red, green and blue colorants in PCS XYZ.
    """
    m = np.column_stack([_xy_to_xyz(*p) for p in primaries])
    m = m * np.linalg.solve(m, _xy_to_xyz(*white))  # scale so that RGB (1, 1, 1) is the white
    src = _BRADFORD @ _xy_to_xyz(*white)
    dst = _BRADFORD @ np.array(D50_XYZ)
    adapt = np.linalg.inv(_BRADFORD) @ np.diag(dst / src) @ _BRADFORD
    return adapt @ m


def _s15f16(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz_tag(xyz: Iterable[float]) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15f16(v) for v in xyz)


def _desc_tag(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return (b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text
            + b"\0" * 8  # Unicode language code and count (none)
            + b"\0" * 3  # ScriptCode code and count (none)
            + b"\0" * 67)


def _text_tag(text: str) -> bytes:
    return b"text\0\0\0\0" + text.encode("ascii") + b"\0"


def _curve_tag(trc: float | npt.NDArray[np.float64]) -> bytes:
    if isinstance(trc, float | int):
        return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(trc * 256))
    table = np.round(np.clip(trc, 0, 1) * 65535).astype(">u2")
    return b"curv\0\0\0\0" + struct.pack(">I", len(table)) + table.tobytes()


def rgb_matrix_profile(description: str, primaries: tuple[tuple[float, float], ...],
                       white: tuple[float, float], trc: float | npt.NDArray[np.float64],
                       copyright: str = "No copyright, use freely") -> bytes:
    """An ICC v2 RGB display profile (matrix + one tone curve for all three channels).

    Args:
        description: the ``desc`` text (ASCII).
        primaries: red, green, blue chromaticities ``(x, y)``.
        white: the white chromaticity ``(x, y)``; colorants are adapted from it to D50.
        trc: a gamma (e.g. 2.2), or the curve sampled at evenly spaced encoded values 0..1
            (linear light 0..1; ICC ``curveType``, interpolated linearly by readers).
        copyright: the ``cprt`` text (ASCII).

    Returns:
        The profile bytes; identical for identical arguments (fixed date, no profile ID).
    """
    colorants = d50_colorants(primaries, white)
    curve = _curve_tag(trc)
    tags = [(b"desc", _desc_tag(description)), (b"cprt", _text_tag(copyright)),
            (b"wtpt", _xyz_tag(D50_XYZ)), (b"rXYZ", _xyz_tag(colorants[:, 0])),
            (b"gXYZ", _xyz_tag(colorants[:, 1])), (b"bXYZ", _xyz_tag(colorants[:, 2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, data, placed = [], b"", {}
    for sig, body in tags:
        if body not in placed:  # shared data: the three TRC tags point at one curve
            placed[body] = offset + len(data)
            data += body + b"\0" * (-len(body) % 4)
        table.append(struct.pack(">4sII", sig, placed[body], len(body)))
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + struct.pack(">6H", *_DATE) + b"acsp" + b"\0" * 24
              + struct.pack(">I", 0)  # rendering intent: perceptual
              + b"".join(_s15f16(v) for v in D50_XYZ) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(table) + data


SRGB_PROFILE = rgb_matrix_profile(
    "sRGB IEC61966-2.1 (compact v2)", SRGB_PRIMARIES, D65_XY,
    srgb_to_linear(np.linspace(0.0, 1.0, _SRGB_TRC_POINTS)))
"""The sRGB profile embedded by converting colour modes (ICC v2, 620 bytes)."""


@lru_cache(maxsize=64)
def jpeg_app2_segments(profile: bytes) -> bytes:
    """APP2 ``ICC_PROFILE`` marker segments carrying ``profile`` (ICC.1 Annex B.4).

    A profile larger than one segment (65,519 bytes of data) is split into numbered chunks.
    """
    chunk = 65519
    parts = [profile[i:i + chunk] for i in range(0, len(profile), chunk)] or [b""]
    out = []
    for number, part in enumerate(parts, 1):
        body = b"ICC_PROFILE\0" + bytes([number, len(parts)]) + part
        out.append(b"\xff\xe2" + struct.pack(">H", len(body) + 2) + body)
    return b"".join(out)


def jpeg_with_profile(jpeg: bytes, profile: bytes) -> bytes:
    """``jpeg`` with ``profile`` embedded: APP2 segments after SOI and any JFIF APP0 segment.

    Raises:
        ValueError: ``jpeg`` does not start with SOI.
    """
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    at = 2
    if jpeg[2:4] == b"\xff\xe0":  # JFIF requires APP0 to follow SOI directly
        at = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:at] + jpeg_app2_segments(profile) + jpeg[at:]


@lru_cache(maxsize=64)
def png_iccp_chunk(profile: bytes, name: bytes = b"ICC profile") -> bytes:
    """A PNG ``iCCP`` chunk: profile name, NUL, method 0, zlib-compressed profile."""
    data = name + b"\0\0" + zlib.compress(profile, 9)
    return (struct.pack(">I", len(data)) + b"iCCP" + data
            + struct.pack(">I", zlib.crc32(b"iCCP" + data) & 0xFFFFFFFF))
