"""Colour modes through the app: embedded profiles, converted pixels, headers, cache variants;
transparent regions composited onto the background, never black."""

import io

import numpy as np
import openslide
import pytest
import tifffile
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from app.core import icc
from app.core.colour import ColorMode, expected_profile, reference_pixels
from tests.conftest import decode

WIDE = icc.rgb_matrix_profile("wide-gamut scanner (test)",
                              ((0.68, 0.32), (0.21, 0.71), (0.15, 0.06)), icc.D65_XY, 1.8)
FORMATS = ["png", "webp", "jpeg"]  # lossless, lossless on the top level, lossy


@pytest.fixture(scope="module")
def wide_svs(tmp_path_factory):
    """A generated Aperio SVS whose level 0 carries a wide-gamut ICC profile (native path)."""
    from app.tools.demo import write_aperio_svs

    path = tmp_path_factory.mktemp("icc") / "wide.svs"
    return write_aperio_svs(path, 1500, 1100, seed=5, icc_profile=WIDE)


@pytest.fixture
def slides(fixtures, wide_svs):
    return {"boxes": fixtures / "boxes.tiff", "noicc": fixtures / "boxes-no-icc.png",
            "dicom": fixtures / "boxes_0.dcm", "wide": wide_svs}


def served(client, name, level, col, row, fmt):
    r = client.get(f"/storage/{name}_files/{level}/{col}_{row}.{fmt}")
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(r.content)) as im:
        profile = im.info.get("icc_profile")
    return r, decode(r.content), profile


def psnr(a, b):
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)


@pytest.mark.parametrize("mode", list(ColorMode))
def test_every_mode_on_every_format(client_for, slides, mode):
    client = client_for(Images=[{"Name": n, "Path": str(p)} for n, p in slides.items()],
                        DeepZoom={"ColorMode": mode.value})
    for name, path in slides.items():
        slide = openslide.open_slide(path)
        dz = DeepZoomGenerator(slide, 254, 1, True)
        has_profile = slide.color_profile is not None
        converts = has_profile and mode not in (ColorMode.EMBED, ColorMode.IGNORE)
        doc = client.get(f"/api/slides/{name}").json()
        assert doc["color"]["mode"] == mode.value
        assert doc["color"]["pixels_untouched"] is not converts
        top = dz.level_count - 1
        for level in (top, top - 2):
            cols, rows = dz.level_tiles[level]
            biggest_change = 0
            for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                expected = reference_pixels(slide, level, col, row, tile_size=254, overlap=1,
                                            limit_bounds=True, color_mode=mode, generator=dz)
                untouched = np.asarray(dz.get_tile(level, (col, row)).convert("RGB"))
                for fmt in FORMATS:
                    r, pixels, profile = served(client, name, level, col, row, fmt)
                    assert profile == expected_profile(slide, mode)
                    if mode is ColorMode.EMBED and has_profile:  # the file's own bytes
                        assert profile == slide.read_region((0, 0), 0, (1, 1)).info["icc_profile"]
                    transform = r.headers["x-tile-color-transform"]
                    assert (transform != "none") is converts
                    served_format = r.headers["x-tile-format"]  # .jpeg on the top level is PNG
                    exact = served_format == "png" or (served_format == "webp" and level == top)
                    assert r.headers["x-tile-lossless"] == str(exact and not converts).lower()
                    if exact:
                        assert np.array_equal(pixels, expected), (name, level, fmt)
                    else:
                        assert psnr(pixels, expected) > 22  # JPEG q90 of sharp boxes: ~25 dB
                    if converts and name == "wide":
                        # the conversion is real: far from the untouched pixels
                        change = np.abs(expected.astype(int) - untouched).max()
                        biggest_change = max(biggest_change, change)
                        assert change > 1  # glass too
                        assert psnr(pixels, expected) > psnr(pixels, untouched) + 3
                    elif not converts:
                        assert np.array_equal(expected, untouched)
            if converts and name == "wide":
                assert biggest_change > 20  # tissue: tens of levels
        level_doc = doc["levels"][top]
        assert level_doc["lossless"] is not converts
        assert level_doc["color_transform"] == (doc["color"]["transform"])


def test_header_names_the_intent(client_for, slides):
    client = client_for(Images=[{"Name": "wide", "Path": str(slides["wide"])}],
                        DeepZoom={"ColorMode": "default"})
    r = client.get("/storage/wide_files/10/0_0.jpeg")
    assert r.headers["x-tile-color-transform"] == "srgb-perceptual"  # the profile's intent
    assert "X-Tile-Color-Transform" in r.headers["access-control-expose-headers"]
    doc = client.get("/api/slides/wide").json()["color"]
    assert doc["icc_profile"]["description"] == "wide-gamut scanner (test)"
    assert doc["icc_profile"]["bytes"] == len(WIDE)
    assert doc["embedded_profile"] == "srgb" and doc["transform"] == "srgb-perceptual"


def test_the_colour_mode_is_part_of_the_cache_variant(client_for, slides, tmp_path):
    cache = str(tmp_path / "shared-cache")
    images = [{"Name": "wide", "Path": str(slides["wide"])}]
    url = "/storage/wide_files/11/1_1.png"
    first = {}
    for mode in ("embed", "perceptual", "saturation", "ignore"):
        client = client_for(Images=images, TileCachePath=cache, DeepZoom={"ColorMode": mode})
        r = client.get(url)
        assert r.headers["x-tile-cache"] == "miss"  # never another mode's cached bytes
        first[mode] = r.content
        assert client.get(url).headers["x-tile-cache"] == "hit"
    assert first["embed"] != first["ignore"] != first["perceptual"]
    assert np.array_equal(decode(first["embed"]), decode(first["ignore"]))
    # a matrix/TRC profile has no per-intent tables: LittleCMS converts the same either way
    assert first["perceptual"] == first["saturation"]


def test_untagged_slide_bytes_do_not_change_with_the_mode(client_for, fixtures, tmp_path):
    images = [{"Name": "noicc", "Path": str(fixtures / "boxes-no-icc.png")}]
    bodies = set()
    for mode in ColorMode:
        client = client_for(Images=images, TileCachePath=str(tmp_path / mode.value),
                            DeepZoom={"ColorMode": mode.value})
        r = client.get("/storage/noicc_files/9/0_0.png")
        assert r.headers["x-tile-lossless"] == "true"
        assert r.headers["x-tile-color-transform"] == "none"
        bodies.add(r.content)
    assert len(bodies) == 1


# ------------------------------------------------------------------ transparent regions


@pytest.fixture(scope="module")
def sparse_tiff(tmp_path_factory):
    """A generic tiled TIFF (JPEG tiles) whose last level-0 tile is missing (byte count 0):
    OpenSlide reads that area as transparent."""
    rng = np.random.default_rng(7)
    image = rng.integers(90, 170, (768, 1024, 3)).astype(np.uint8)
    path = tmp_path_factory.mktemp("sparse") / "sparse.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), compression="jpeg", photometric="rgb")
        tif.write(image[::2, ::2].copy(), tile=(256, 256), compression="jpeg",
                  photometric="rgb", subfiletype=1)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        counts = list(tag.value)
        counts[-1] = 0
        tag.overwrite(counts)
    return path


@pytest.fixture(scope="module")
def rgba_png(tmp_path_factory):
    """An RGBA PNG (an ImageSlide): opaque, half-transparent and transparent bands."""
    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., :3] = (30, 90, 160)
    rgba[:, :150, 3] = 255
    rgba[:, 150:250, 3] = 128
    path = tmp_path_factory.mktemp("rgba") / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


@pytest.mark.parametrize("limit_bounds", [True, False])
def test_transparent_areas_are_white_not_black(client_for, sparse_tiff, rgba_png,
                                               limit_bounds):
    client = client_for(Images=[{"Name": "sparse", "Path": str(sparse_tiff)},
                                {"Name": "alpha", "Path": str(rgba_png)}],
                        DeepZoom={"LimitBounds": limit_bounds},
                        TileFormat={"LosslessLevelCount": -1})
    sparse = openslide.open_slide(sparse_tiff)
    assert sparse.properties.get("openslide.background-color") is None  # white applies
    dz = DeepZoomGenerator(sparse, 254, 1, limit_bounds)
    top = dz.level_count - 1
    cols, rows = dz.level_tiles[top]
    pixels = decode(client.get(f"/storage/sparse_files/{top}/{cols - 1}_{rows - 1}.png").content)
    assert np.array_equal(pixels, np.asarray(dz.get_tile(top, (cols - 1, rows - 1))))
    assert (pixels[-50:, -50:] == 255).all()  # inside the missing tile
    inside = decode(client.get(f"/storage/sparse_files/{top}/0_0.png").content)
    assert inside.max() < 200  # the stored tiles are served as stored

    alpha = openslide.open_slide(rgba_png)
    dz = DeepZoomGenerator(alpha, 254, 1, limit_bounds)
    top = dz.level_count - 1
    row = decode(client.get(f"/storage/alpha_files/{top}/0_0.png").content)[10]
    right = decode(client.get(f"/storage/alpha_files/{top}/1_0.png").content)[10]
    assert tuple(row[10]) == (30, 90, 160)  # opaque
    assert tuple(right[-10]) == (255, 255, 255)  # transparent: white
    blend = row[200]  # half transparent: halfway to white
    assert all(abs(int(v) - (c + 255) / 2) <= 1 for v, c in zip(blend, (30, 90, 160),
                                                                 strict=True))
    assert np.array_equal(right, np.asarray(dz.get_tile(top, (1, 0)))[10])
