"""The format policy as a pure function, and the encoders' lossless claims."""

import numpy as np
import pytest
from PIL import Image

from app.core.errors import BadTileRequest
from app.core.formats import Encoding, FormatPolicy, TileFormat, accepts_webp
from app.core.lossless import he_tile_path
from app.settings import TileFormatSettings
from tests.conftest import decode

CHROME_ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


def policy(**kw) -> FormatPolicy:
    return FormatPolicy(TileFormatSettings.model_validate(kw))


@pytest.mark.parametrize("level_count", [5, 18])
@pytest.mark.parametrize("lossless_count", [-1, 0, 1, 3])
def test_level_table(level_count, lossless_count):
    p = policy(LosslessLevelCount=lossless_count)
    table = [p.level_encoding(level, level_count) for level in range(level_count)]
    expected_lossless = {
        -1: level_count, 0: 0, 1: 1, 3: 3,
    }[lossless_count]
    formats = [e.format for e in table]
    assert formats == ([TileFormat.JPEG] * (level_count - expected_lossless)
                       + [TileFormat.PNG] * expected_lossless)
    assert [e.lossless for e in table] == [f is TileFormat.PNG for f in formats]
    assert all(e.quality == 90 for e in table if e.format is TileFormat.JPEG)


def test_declared_extension_follows_policy():
    p = policy()
    top, below = 17, 16
    assert p.decide(top, 18, "jpeg").encoding.format is TileFormat.PNG
    assert p.decide(top, 18, "jpg").encoding.format is TileFormat.PNG  # jpg means jpeg
    assert p.decide(top, 18, None).encoding.format is TileFormat.PNG
    assert p.decide(below, 18, "jpeg").encoding.format is TileFormat.JPEG


@pytest.mark.parametrize(("ext", "query", "level", "expected", "lossless"), [
    ("png", None, 3, TileFormat.PNG, True),
    ("webp", None, 3, TileFormat.WEBP, False),      # lossy level: lossy webp
    ("webp", None, 17, TileFormat.WEBP, True),      # lossless level: lossless webp
    ("jpeg", "png", 3, TileFormat.PNG, True),       # ?format= wins
    ("png", "jpeg", 17, TileFormat.JPEG, False),    # ?format= wins, even downgrading
    ("jpeg", "jpg", 3, TileFormat.JPEG, False),
])
def test_override(ext, query, level, expected, lossless):
    decision = policy().decide(level, 18, ext, query)
    assert decision.encoding.format is expected
    assert decision.encoding.lossless is lossless
    assert decision.vary_accept is False


def test_override_disabled_serves_policy():
    p = policy(AllowFormatOverride=False)
    assert p.decide(3, 18, "png", "webp").encoding.format is TileFormat.JPEG
    assert p.decide(17, 18, "jpeg", "jpeg").encoding.format is TileFormat.PNG
    with pytest.raises(BadTileRequest):
        p.decide(3, 18, "gif")  # still a bad extension


@pytest.mark.parametrize(("ext", "query"), [("gif", None), ("jpeg", "bmp"), ("jpeg", "")])
def test_bad_requests(ext, query):
    with pytest.raises(BadTileRequest):
        policy().decide(3, 18, ext, query)


def test_webp_policy_depends_on_accept():
    p = policy(LosslessFormat="webp", LosslessLevelCount=2)
    yes = p.decide(17, 18, "jpeg", accept=CHROME_ACCEPT)
    assert (yes.encoding.format, yes.encoding.lossless, yes.vary_accept) == (
        TileFormat.WEBP, True, True)
    no = p.decide(17, 18, "jpeg", accept="*/*")
    assert (no.encoding.format, no.encoding.lossless, no.vary_accept) == (
        TileFormat.PNG, True, True)
    explicit = p.decide(17, 18, "webp", accept="*/*")  # asked for webp by URL: no fallback
    assert (explicit.encoding.format, explicit.vary_accept) == (TileFormat.WEBP, False)
    assert p.decide(3, 18, "jpeg", accept="*/*").vary_accept is False  # jpeg level


def test_default_webp_is_lossy_and_falls_back_to_png():
    p = policy(Default="webp", LosslessLevelCount=0)
    d = p.decide(3, 18, "webp", accept=CHROME_ACCEPT)
    assert (d.encoding.format, d.encoding.lossless, d.encoding.quality) == (
        TileFormat.WEBP, False, 90)
    assert p.decide(3, 18, "webp", accept="image/png").encoding.format is TileFormat.PNG


@pytest.mark.parametrize(("header", "expected"), [
    (CHROME_ACCEPT, True), ("image/webp;q=0", False), ("image/webp;q=0.5", True),
    ("*/*", False), ("image/*", False), (None, False), ("IMAGE/WEBP", True),
])
def test_accepts_webp(header, expected):
    assert accepts_webp(header) is expected


def test_format_parse_and_facts():
    assert TileFormat.parse("JPG") is TileFormat.JPEG
    assert TileFormat.WEBP.media_type == "image/webp"
    with pytest.raises(ValueError, match="unknown tile format"):
        TileFormat.parse("tiff")


def test_encoding_key_names_every_option():
    keys = {Encoding(TileFormat.JPEG, False, quality=90).key,
            Encoding(TileFormat.JPEG, False, quality=80).key,
            Encoding(TileFormat.PNG, True, compress_level=1).key,
            Encoding(TileFormat.PNG, True, compress_level=6).key,
            Encoding(TileFormat.WEBP, True).key,
            Encoding(TileFormat.WEBP, False, quality=90).key}
    assert len(keys) == 6


@pytest.fixture(scope="module")
def he_tile():
    with Image.open(he_tile_path()) as im:
        return im.convert("RGB").resize((256, 254))


@pytest.mark.parametrize("encoding", [
    Encoding(TileFormat.PNG, True, compress_level=0),
    Encoding(TileFormat.PNG, True, compress_level=1),
    Encoding(TileFormat.PNG, True, compress_level=9),
    Encoding(TileFormat.WEBP, True),
], ids=lambda e: e.key)
def test_lossless_encodings_are_bit_exact(encoding, he_tile):
    data = encoding.encode(he_tile)
    assert np.array_equal(decode(data), np.asarray(he_tile))


@pytest.mark.parametrize("encoding", [Encoding(TileFormat.JPEG, False, quality=90),
                                      Encoding(TileFormat.WEBP, False, quality=90)],
                         ids=lambda e: e.key)
def test_lossy_encodings_are_close_but_not_exact(encoding, he_tile):
    pixels = decode(encoding.encode(he_tile)).astype(int)
    error = np.abs(pixels - np.asarray(he_tile, dtype=int))
    assert error.max() > 0
    assert error.mean() < 6


@pytest.mark.parametrize("level", [0, 1, 6, 12])
@pytest.mark.parametrize("shape", [(254, 256), (1, 1), (3, 200), (257, 1)])
def test_png_writer_round_trips_exactly(level, shape):
    from app.core import png
    rng = np.random.default_rng(level)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    data = png.encode_rgb(pixels, level)
    with Image.open(__import__("io").BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(im), pixels)


def test_png_writer_rejects_other_shapes():
    from app.core import png
    with pytest.raises(ValueError, match="expected"):
        png.encode_rgb(np.zeros((4, 4, 4), np.uint8))


@pytest.mark.parametrize("quality", [50, 90, 100])
def test_jpeg_bytes_equal_pillow_save(he_tile, quality):
    """The JPEG encoder writes what openslide-python's deepzoom_server writes (Pillow save)."""
    buf = __import__("io").BytesIO()
    he_tile.save(buf, "JPEG", quality=quality)
    assert Encoding(TileFormat.JPEG, False, quality=quality).encode(he_tile) == buf.getvalue()


# ----------------------------------------------------------------- EnforceLossless and AVIF

LOSSY_OVERRIDES = [("jpeg", "jpeg"), ("png", "jpeg"), ("jpeg", "avif"), ("jpeg", "webp"),
                   ("avif", None), ("jpg", "jpg")]


@pytest.mark.parametrize("level_count", [5, 18])
@pytest.mark.parametrize("lossless_count", [-1, 0, 1, 3])
@pytest.mark.parametrize(("ext", "query"), LOSSY_OVERRIDES)
def test_enforce_lossless_table(level_count, lossless_count, ext, query):
    """Over every level: a lossless level is never served lossy, and refusals are named."""
    lenient = policy(LosslessLevelCount=lossless_count)
    strict = policy(LosslessLevelCount=lossless_count, EnforceLossless=True)
    for level in range(level_count):
        asked = lenient.decide(level, level_count, ext, query, CHROME_ACCEPT)
        got = strict.decide(level, level_count, ext, query, CHROME_ACCEPT)
        lossless_level = strict.is_lossless_level(level, level_count)
        if lossless_level and not asked.encoding.lossless:
            assert got.override_refused is True
            assert got.encoding == strict.level_encoding(level, level_count)
            assert got.encoding.lossless
        else:
            assert got == asked and got.override_refused is False
        assert lossless_level <= got.encoding.lossless


def test_enforce_lossless_keeps_lossless_overrides_and_fallbacks():
    p = policy(EnforceLossless=True, LosslessFormat="webp")
    webp = p.decide(17, 18, "webp", accept="*/*")  # asked for lossless WebP: served as asked
    assert (webp.encoding.format, webp.encoding.lossless, webp.override_refused) == (
        TileFormat.WEBP, True, False)
    refused = p.decide(17, 18, "jpeg", "jpeg", accept="*/*")  # policy WebP, Accept lacks it
    assert (refused.encoding.format, refused.encoding.lossless, refused.override_refused,
            refused.vary_accept) == (TileFormat.PNG, True, True, True)
    assert p.decide(3, 18, "jpeg", "jpeg").override_refused is False  # lossy level: as asked


def test_avif_is_lossy_only():
    assert not TileFormat.AVIF.can_be_lossless
    assert TileFormat.parse("AVIF") is TileFormat.AVIF
    assert TileFormat.AVIF.media_type == "image/avif"
    p = policy(AvifQuality=55)
    for level in (3, 17):  # even on the lossless level, ?format=avif is lossy AVIF
        d = p.decide(level, 18, "jpeg", "avif")
        assert (d.encoding.format, d.encoding.lossless, d.encoding.quality) == (
            TileFormat.AVIF, False, 55)
    assert TileFormat.AVIF not in {e.format for e in p.lossless_encodings()}


def test_avif_default_falls_back_to_jpeg_without_accept():
    p = policy(Default="avif")
    assert p.decide(3, 18, "avif", accept=CHROME_ACCEPT).encoding.format is TileFormat.AVIF
    old = p.decide(3, 18, "avif", accept="image/webp,*/*")
    assert (old.encoding.format, old.vary_accept) == (TileFormat.JPEG, True)
    assert p.decide(17, 18, "avif", accept="*/*").encoding.format is TileFormat.PNG


def test_avif_as_lossless_format_is_a_configuration_error():
    from app.core.errors import ConfigError
    from app.settings import settings_from

    with pytest.raises(ConfigError) as info:
        settings_from({"TileFormat": {"LosslessFormat": "avif"}})
    message = info.value.detail
    assert "TileFormat:LosslessFormat = 'avif'" in message
    assert "not bit-exact" in message and "max error 67" in message and "lossy" in message


def test_avif_tiles_are_close(he_tile):
    encoding = Encoding(TileFormat.AVIF, False, quality=70)
    data = encoding.encode(he_tile)
    assert data[4:12] == b"ftypavif"
    pixels = decode(data).astype(int)
    assert pixels.shape == np.asarray(he_tile).shape
    error = np.abs(pixels - np.asarray(he_tile, dtype=int))
    assert error.max() > 0 and error.mean() < 6


def test_lossless_encodings_follow_the_settings():
    keys = lambda p: [e.key for e in p.lossless_encodings()]  # noqa: E731
    assert keys(policy()) == ["png-lossless-z1", "webp-lossless"]  # ?format=webp may ask
    assert keys(policy(AllowFormatOverride=False)) == ["png-lossless-z1"]
    assert keys(policy(AllowFormatOverride=False, LosslessFormat="webp")) == [
        "png-lossless-z1", "webp-lossless"]
