"""A fast PNG writer for RGB tiles: the "Up" filter and libdeflate.

Pillow's PNG encoder (zlib, adaptive filters) took about 3 ms for a 256x256 H&E tile at
``compress_level=1`` on this project's benchmark machine; this writer takes about 1 ms for the same
size of file, because libdeflate (through imagecodecs) compresses several times faster than zlib
at equal levels and one fixed filter costs one vectorised subtraction. "Up" (filter type 2,
PNG specification section 9.2) suits scanned tissue: rows resemble the row above.

The output is a plain, valid PNG (signature, IHDR, one IDAT, IEND; 8-bit truecolour, no
interlace) that every decoder reads back to exactly the input pixels.
"""

from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np

from app.core.icc import png_iccp_chunk

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_UP = 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_rgb(pixels: np.ndarray, level: int = 1, icc_profile: bytes | None = None) -> bytes:
    """Encode an RGB image losslessly as PNG.

    Args:
        pixels: ``(height, width, 3)`` uint8 array.
        level: libdeflate compression level, 0 (stored) to 12 (smallest); 1 is fastest.
        icc_profile: an ICC profile to embed as an ``iCCP`` chunk before ``IDAT`` (the chunk
            is built once per profile, :func:`app.core.icc.png_iccp_chunk`), or None.

    Returns:
        The PNG file bytes.

    Raises:
        ValueError: ``pixels`` is not an ``(H, W, 3)`` uint8 array.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    height, width, _ = pixels.shape
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines
    idat = imagecodecs.deflate_encode(filtered.tobytes(), level=level)
    assert isinstance(idat, bytes)  # a bytearray only when given one as ``out``
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    iccp = png_iccp_chunk(icc_profile) if icc_profile else b""
    return (SIGNATURE + _chunk(b"IHDR", header) + iccp + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))
