"""The start-up proof that every encoding the policy calls lossless is bit-exact.

``X-Tile-Lossless: true`` is a promise that the tile decodes to exactly the pixels
``DeepZoomGenerator.get_tile`` returned. PNG (DEFLATE of filtered bytes) and lossless WebP (VP8L:
spatial prediction, colour-cache and LZ77 codes, all invertible integer transforms) are lossless
by construction; this module checks that the encoders as installed keep that promise, by encoding
a set of test images with each lossless :class:`~app.core.formats.Encoding` and decoding them again
with Pillow. :func:`check_round_trips` runs at start-up (``create_app``'s lifespan and
``tileserver serve`` before uvicorn starts) and in the tests; a failure stops the server with a
message naming the encoding and the image.

The images: a real H&E tile (wsidicom-data's ``test_tile.png``, 240x240), the same cut to odd
border-tile shapes, uniform noise (no predictor helps; every byte value in every channel),
flat white glass, and 1x1 px (DZI level 0).
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.errors import ConfigError
from app.core.formats import Encoding


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """The outcome of one encode + decode.

    Attributes:
        encoding: the encoder configuration (``Encoding.key`` names it).
        image: the test image's name.
        shape: ``(height, width, 3)`` of the test image, pixels.
        max_error: the largest absolute difference of any sample, 0..255 (0: bit-exact).
        differing: the fraction of samples that differ, 0..1.
    """

    encoding: Encoding
    image: str
    shape: tuple[int, int, int]
    max_error: int
    differing: float

    @property
    def exact(self) -> bool:
        """True when the decoded pixels equal the original ones, and so does the shape."""
        return self.max_error == 0


def he_tile_path() -> Path:
    """The file of wsidicom-data's real H&E tile, ``wsidicom_data/data/test_tile.png`` (240x240
    RGB PNG).

    Found without importing the package (``importlib.resources.files`` would): its
    ``__init__`` imports all of wsidicom and pydicom, a heavy import that every server worker
    and CLI command would pay at start-up for one PNG file.

    Raises:
        ModuleNotFoundError: wsidicom-data is not installed.
    """
    spec = importlib.util.find_spec("wsidicom_data")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("wsidicom-data is not installed", name="wsidicom_data")
    return Path(spec.origin).parent / "data" / "test_tile.png"


@lru_cache(maxsize=1)
def sample_images() -> tuple[tuple[str, np.ndarray], ...]:
    """``(name, (H, W, 3) uint8 RGB)`` test images; read once per process."""
    with Image.open(he_tile_path()) as im:
        tile = np.asarray(im.convert("RGB"))
    rng = np.random.default_rng(4)
    return (
        ("H&E tile 240x240 (wsidicom-data test_tile.png)", tile),
        ("H&E border tile 239x97", np.ascontiguousarray(tile[:97, :239])),
        ("uniform noise 255x257", rng.integers(0, 256, (255, 257, 3), dtype=np.uint8)),
        ("white glass 254x254", np.full((254, 254, 3), 255, np.uint8)),
        ("1x1 px", tile[:1, :1].copy()),
    )


def round_trip(encoding: Encoding, name: str, pixels: np.ndarray) -> RoundTrip:
    """Encode ``pixels`` with ``encoding`` and decode with Pillow; measure the difference.

    Blocking (encoder + decoder): call it from a worker thread on a server.
    """
    data = encoding.encode(pixels)
    with Image.open(io.BytesIO(data)) as im:
        decoded = np.asarray(im.convert("RGB"))
    if decoded.shape != pixels.shape:
        return RoundTrip(encoding, name, pixels.shape, 255, 1.0)
    diff = np.abs(decoded.astype(np.int16) - pixels.astype(np.int16))
    return RoundTrip(encoding, name, pixels.shape, int(diff.max()), float(np.mean(diff > 0)))


def round_trips(encodings: Iterable[Encoding]) -> list[RoundTrip]:
    """Every encoding on every :func:`sample_images` image. Blocking."""
    return [round_trip(e, name, pixels) for e in encodings for name, pixels in sample_images()]


def check_round_trips(encodings: Iterable[Encoding]) -> list[RoundTrip]:
    """Prove that each encoding claimed lossless is bit-exact on every test image.

    Args:
        encodings: e.g. :meth:`app.core.formats.FormatPolicy.lossless_encodings`.

    Returns:
        The round trips, all exact.

    Raises:
        ConfigError: an encoding changed a pixel; the message names it, the image and the error.
    """
    results = round_trips(encodings)
    bad = [r for r in results if not r.exact]
    if bad:
        first = bad[0]
        raise ConfigError(
            f"lossless self-check failed: {first.encoding.key} is not bit-exact on "
            f"{first.image} (max error {first.max_error}, {first.differing:.1%} of samples "
            f"differ); {len(bad)} of {len(results)} round trips failed. Tiles of this encoding "
            "would be served as X-Tile-Lossless: true; refusing to start")
    return results
