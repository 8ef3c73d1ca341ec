"""The lossless self-check: what it accepts, what it refuses, and the AVIF measurement."""

import io

import numpy as np
import pytest
from PIL import Image

from app.core.errors import ConfigError
from app.core.formats import Encoding, FormatPolicy, TileFormat
from app.core.lossless import check_round_trips, he_tile_path, round_trips, sample_images
from app.settings import TileFormatSettings


def test_every_lossless_encoding_of_the_policy_is_bit_exact():
    settings = TileFormatSettings.model_validate(
        {"LosslessFormat": "webp", "PngCompressLevel": 12})
    results = check_round_trips(FormatPolicy(settings).lossless_encodings())
    assert {r.encoding.format for r in results} == {TileFormat.PNG, TileFormat.WEBP}
    assert len(results) == 2 * len(sample_images())
    assert all(r.max_error == 0 and r.differing == 0 for r in results)


def test_sample_images_cover_the_hard_cases():
    shapes = {name: pixels.shape for name, pixels in sample_images()}
    assert (1, 1, 3) in shapes.values()
    noise = dict(sample_images())["uniform noise 255x257"]
    assert len(np.unique(noise[..., 0])) == 256  # every byte value


@pytest.mark.parametrize("liar", [Encoding(TileFormat.JPEG, True, quality=100),
                                  Encoding(TileFormat.AVIF, True, quality=100),
                                  Encoding(TileFormat.WEBP, False, quality=100)],
                         ids=lambda e: e.key)
def test_an_encoding_that_is_not_bit_exact_is_refused(liar):
    with pytest.raises(ConfigError, match=f"{liar.key} is not bit-exact on .*max error"):
        check_round_trips([Encoding(TileFormat.PNG, True, compress_level=1), liar])


def test_avif_measurement_quoted_in_the_docs():
    """The numbers in AVIF_LOSSLESS_MEASUREMENT (and docs/regulatory.md): Pillow's AVIF
    ignores lossless=True (max error 67 on the H&E test tile) and stays lossy at q100 4:4:4."""
    with Image.open(he_tile_path()) as im:
        tile = im.convert("RGB")
    original = np.asarray(tile, dtype=int)

    def max_error(**options) -> int:
        buf = io.BytesIO()
        tile.save(buf, "AVIF", **options)
        with Image.open(io.BytesIO(buf.getvalue())) as back:
            return int(np.abs(np.asarray(back.convert("RGB"), dtype=int) - original).max())

    assert max_error(lossless=True) == 67
    assert max_error(quality=100, subsampling="4:4:4") == 2
    avif = round_trips([Encoding(TileFormat.AVIF, False, quality=100)])
    assert all(r.max_error > 0 for r in avif if "noise" in r.image or "H&E" in r.image)
