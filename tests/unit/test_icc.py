"""ICC profiles built in code, profile embedding in every format, colour modes, privacy."""

import io

import numpy as np
import pytest
from openslide import ImageSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image, ImageCms

from app.core import icc, png
from app.core.colour import ColorMode, ColorTransform, conversion_intent
from app.core.errors import ConfigError
from app.core.formats import Encoding, TileFormat
from app.core.privacy import Privacy
from app.core.pyramid import single_tile_level
from app.settings import PrivacySettings, settings_from
from tests.conftest import decode

LCMS_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
WIDE = icc.rgb_matrix_profile("wide test", ((0.68, 0.32), (0.21, 0.71), (0.15, 0.06)),
                              icc.D65_XY, 1.8)


def every_colour() -> Image.Image:
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8)
    return Image.fromarray(rgb.reshape(4096, 4096, 3))


def test_srgb_profile_is_small_deterministic_v2():
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc.SRGB_PROFILE))
    assert profile.profile.version == pytest.approx(2.1)
    assert profile.profile.xcolor_space.strip() == "RGB"
    assert len(icc.SRGB_PROFILE) < 1024
    rebuilt = icc.rgb_matrix_profile("sRGB IEC61966-2.1 (compact v2)", icc.SRGB_PRIMARIES,
                                     icc.D65_XY,
                                     icc.srgb_to_linear(np.linspace(0, 1, 64)))
    assert rebuilt == icc.SRGB_PROFILE


@pytest.mark.parametrize("intent", [ImageCms.Intent.PERCEPTUAL,
                                    ImageCms.Intent.ABSOLUTE_COLORIMETRIC])
def test_srgb_profile_equals_littlecms_srgb_on_every_8_bit_colour(intent):
    ours = ImageCms.ImageCmsProfile(io.BytesIO(icc.SRGB_PROFILE))
    image = every_colour()
    expected = np.asarray(image)
    for source, target in ((LCMS_SRGB, ours), (ours, LCMS_SRGB)):
        transform = ImageCms.buildTransform(source, target, "RGB", "RGB", intent)
        assert np.array_equal(np.asarray(ImageCms.applyTransform(image, transform)), expected)


def test_a_coarse_tone_curve_would_be_caught():
    coarse = icc.rgb_matrix_profile("x", icc.SRGB_PRIMARIES, icc.D65_XY,
                                    icc.srgb_to_linear(np.linspace(0, 1, 8)))
    transform = ImageCms.buildTransform(LCMS_SRGB, ImageCms.ImageCmsProfile(io.BytesIO(coarse)),
                                        "RGB", "RGB")
    image = every_colour()
    assert not np.array_equal(np.asarray(ImageCms.applyTransform(image, transform)),
                              np.asarray(image))


@pytest.fixture
def tile():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (200, 255, 3), np.uint8)


@pytest.mark.parametrize("encoding", [
    Encoding(TileFormat.JPEG, False, quality=90),
    Encoding(TileFormat.PNG, True, compress_level=1),
    Encoding(TileFormat.WEBP, True),
    Encoding(TileFormat.WEBP, False, quality=90),
], ids=lambda e: e.key)
@pytest.mark.parametrize("profile", [icc.SRGB_PROFILE, WIDE, bytes(70000)],
                         ids=["srgb", "wide", "70kB"])
def test_embedding_keeps_the_image_data_and_carries_the_profile(encoding, profile, tile):
    plain = encoding.encode(tile)
    tagged = encoding.encode(tile, profile)
    with Image.open(io.BytesIO(tagged)) as im:
        assert im.info["icc_profile"] == profile
    with Image.open(io.BytesIO(plain)) as im:
        assert "icc_profile" not in im.info
    assert np.array_equal(decode(tagged), decode(plain))
    # no re-encode: the tagged file is the plain one plus the profile's segments or chunk
    if encoding.format is TileFormat.JPEG:
        assert tagged.replace(icc.jpeg_app2_segments(profile), b"", 1) == plain
    elif encoding.format is TileFormat.PNG:
        assert tagged.replace(icc.png_iccp_chunk(profile), b"", 1) == plain


def test_png_writer_puts_iccp_before_idat(tile):
    data = png.encode_rgb(tile, 1, WIDE)
    assert data.index(b"iCCP") < data.index(b"IDAT")


def test_color_modes_parse_and_bad_mode_names_the_key():
    assert ColorMode.parse("Relative_Colorimetric") is ColorMode.RELATIVE_COLORIMETRIC
    assert settings_from({"DeepZoom": {"ColorMode": "SATURATION"}}).DeepZoom.ColorMode \
        is ColorMode.SATURATION
    with pytest.raises(ConfigError, match="DeepZoom:ColorMode = 'vivid'.*embed, default"):
        settings_from({"DeepZoom": {"ColorMode": "vivid"}})


def image_slide(profile: bytes | None) -> ImageSlide:
    im = Image.new("RGB", (40, 30), (200, 40, 90))
    if profile:
        im.info["icc_profile"] = profile
    return ImageSlide(im)


@pytest.mark.parametrize("mode", list(ColorMode))
def test_transform_per_mode(mode):
    untagged = ColorTransform.for_slide(image_slide(None), mode)
    assert (untagged.name, untagged.embed_profile, untagged.converts) == ("none", None, False)
    tagged = ColorTransform.for_slide(image_slide(WIDE), mode)
    converts = mode not in (ColorMode.EMBED, ColorMode.IGNORE)
    assert tagged.converts is converts
    assert tagged.embed_profile == (WIDE if mode is ColorMode.EMBED
                                    else icc.SRGB_PROFILE if converts else None)
    intent = "perceptual" if mode is ColorMode.DEFAULT else mode.value  # WIDE's header intent
    assert tagged.name == (f"srgb-{intent}" if converts else "none")
    keys = {ColorTransform.for_slide(image_slide(WIDE), m).key for m in ColorMode}
    assert len(keys) == len(ColorMode)  # every mode is its own cache variant


def test_default_mode_takes_the_profiles_rendering_intent():
    saturation = bytearray(WIDE)
    saturation[64:68] = (2).to_bytes(4, "big")
    profile = ImageCms.ImageCmsProfile(io.BytesIO(bytes(saturation)))
    assert conversion_intent("default", profile) is ImageCms.Intent.SATURATION
    assert conversion_intent("perceptual", profile) is ImageCms.Intent.PERCEPTUAL
    assert conversion_intent("embed", profile) is None


def test_conversion_changes_pixels_of_a_wide_gamut_image():
    color = ColorTransform.for_slide(image_slide(WIDE), "relative-colorimetric")
    before = np.full((4, 4, 3), (200, 40, 90), np.uint8)
    after = np.asarray(color.apply(before))
    assert np.abs(after.astype(int) - before).max() > 10


@pytest.mark.parametrize("size", [(400, 460), (1280, 431), (1024, 683), (16, 16), (255, 10)])
def test_single_tile_level_matches_deepzoom_generator(size):
    dz = DeepZoomGenerator(ImageSlide(Image.new("RGB", size)), 254, 1)
    level = single_tile_level(*size, 254)
    assert dz.level_tiles[level] == (1, 1)
    assert level == dz.level_count - 1 or dz.level_tiles[level + 1] != (1, 1)


def test_privacy_patterns_are_globs_matched_case_insensitively():
    privacy = Privacy(PrivacySettings(HideProperties=["aperio.User", "*.filename",
                                                      "tiff.Date?ime"]))
    props = {"aperio.User": "u", "aperio.Filename": "f", "tiff.DateTime": "d",
             "aperio.AppMag": "20", "openslide.associated.label.width": "400"}
    assert privacy.properties(props) == {"aperio.AppMag": "20",
                                         "openslide.associated.label.width": "400"}
    # a withheld value never comes back inside another property (Aperio's comment)
    props = {"aperio.Filename": "case-1234", "openslide.comment": "x|Filename = case-1234|y",
             "aperio.AppMag": "20", "aperio.User": "20"}
    assert privacy.properties(props) == {"aperio.AppMag": "20"}
    assert privacy.property(props, "aperio.AppMag") == "20"  # "20" is too short to chase
    assert privacy.associated_names(["macro", "label"]) == ["label", "macro"]
    hidden = Privacy(PrivacySettings(HideAssociatedImages=True))
    assert hidden.associated_names(["label"]) == []
    assert hidden.properties(props) == {k: v for k, v in props.items()
                                        if not k.startswith("openslide.associated.")}
