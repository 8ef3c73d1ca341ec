"""IIIF Image API 3.0 request parsing, the tile address of aligned requests, and info.json."""

from __future__ import annotations

import pytest

from app.core.errors import BadTileRequest, FeatureNotImplemented
from app.core.iiif import (
    Limits,
    image_info,
    parse_image_request,
    parse_region,
    parse_rotation,
    parse_size,
    scale_factors,
)
from app.core.planner import request_level, tile_address

LIMITS = Limits(4000, 3000, 6_000_000)


@pytest.mark.parametrize(("text", "expected"), [
    ("full", (0, 0, 1000, 600)),
    ("square", (200, 0, 600, 600)),
    ("10,20,30,40", (10, 20, 30, 40)),
    ("900,500,500,500", (900, 500, 100, 100)),  # cropped at the image's edges
    ("pct:10,10,50,50", (100, 60, 500, 300)),
    ("pct:0.5,0,99.5,100", (5, 0, 995, 600)),
])
def test_regions(text, expected):
    assert parse_region(text, 1000, 600) == expected


@pytest.mark.parametrize("text", [
    "", "full ", "1,2,3", "1,2,3,4,5", "-1,0,10,10", "0,0,0,10", "0,0,10,0", "1000,0,5,5",
    "0,600,5,5", "pct:1,2,3", "pct:1e1,0,5,5", "pct:,0,5,5", "x,0,5,5", "１,0,5,5",
    "0,0,1234567890,5", "pct:100,0,5,5",
])
def test_bad_regions_are_400(text):
    with pytest.raises(BadTileRequest):
        parse_region(text, 1000, 600)


@pytest.mark.parametrize(("text", "expected"), [
    ("max", (1000, 600)),
    ("500,", (500, 300)),
    (",300", (500, 300)),
    ("pct:25", (250, 150)),
    ("400,400", (400, 400)),  # distorted, as asked
    ("!500,500", (500, 300)),
    ("!500,200", (333, 200)),
    ("^2000,", (2000, 1200)),
    ("^pct:150", (1500, 900)),
    ("^!3000,3000", (3000, 1800)),
    ("^max", (3162, 1897)),  # scaled up to maxArea (and within maxWidth/maxHeight)
])
def test_sizes(text, expected):
    assert parse_size(text, 1000, 600, LIMITS) == expected


def test_max_fits_the_limits_without_upscaling():
    assert parse_size("max", 100_000, 50_000, LIMITS) == (3464, 1732)
    assert parse_size("max", 10, 5, LIMITS) == (10, 5)


@pytest.mark.parametrize("text", [
    "full", "1001,", ",601", "pct:101", "1001,600", "!2000,3000", "0,", ",0", "pct:0", ",",
    "!5,", "abc", "^", "^5001,", "^4000,3000", "1.5,",
])
def test_bad_sizes_are_400(text):
    with pytest.raises(BadTileRequest):
        parse_size(text, 1000, 600, LIMITS)


def test_rotation():
    assert parse_rotation("0") == (False, 0)
    assert parse_rotation("!90") == (True, 90)
    assert parse_rotation("270.0") == (False, 270)
    assert parse_rotation("360") == (False, 0)
    for bad in ("", "!", "-90", "361", "9O", "!!0", "1e2"):
        with pytest.raises(BadTileRequest):
            parse_rotation(bad)
    with pytest.raises(FeatureNotImplemented):
        parse_rotation("45")


def test_quality_and_format():
    request = parse_image_request("full", "max", "0", "gray.png", 100, 80, LIMITS)
    assert (request.quality, request.extension, request.format.value) == ("gray", "png", "png")
    assert not request.plain
    for bad in ("default", "default.", ".jpg", "grey.jpg", "default.gif", "default.jpeg",
                "default.JPG"):
        with pytest.raises(BadTileRequest):
            parse_image_request("full", "max", "0", bad, 100, 80, LIMITS)


def test_scale_factors_stop_where_the_image_fits_one_tile():
    assert scale_factors(1000, 1000, 254, 11) == [1, 2, 4]
    assert scale_factors(3000, 2200, 254, 13) == [1, 2, 4, 8, 16]
    assert scale_factors(200, 100, 254, 9) == [1]


def test_request_level():
    assert request_level(13, 1.0) == 12
    assert request_level(13, 0.5) == 12
    assert request_level(13, 1.99) == 12
    assert request_level(13, 2.0) == 11
    assert request_level(13, 5.0) == 10
    assert request_level(3, 1000.0) == 0


class _Pyramid:
    """The geometry ``tile_address`` reads: a 3000x2200 image, 254 px tiles, no overlap."""

    tile_size = 254
    level_dimensions = [(-(-3000 // 2 ** k), -(-2200 // 2 ** k)) for k in range(12, -1, -1)]
    level_count = 13


def _address(region: str, size: str):
    request = parse_image_request(region, size, "0", "default.jpg", 3000, 2200,
                                  Limits(10_000, 10_000, 10**8))
    return tile_address(_Pyramid(), request)


def test_tile_address_of_the_requests_openseadragon_makes():
    assert _address("0,0,254,254", "254,254") == (12, 0, 0)
    assert _address("2794,2032,206,168", "206,168") == (12, 11, 8)  # the bottom-right edge
    assert _address("508,0,508,508", "254,254") == (11, 1, 0)
    assert _address("2032,2032,968,168", "242,42") == (10, 2, 2)  # ceil(3000/4) = 750
    assert _address("full", "188,138") == (8, 0, 0)  # one tile: ceil(3000/16)
    assert _address("full", "max") is None  # 3000 px: not one tile
    assert _address("0,0,254,254", "127,127") is None  # scaled, not a declared tile
    assert _address("1,0,254,254", "254,254") is None
    assert _address("0,0,200,254", "200,254") is None


def test_info_json():
    info = image_info("http://h/iiif/3/a", 3000, 2200, 254, 13, Limits(2000, 2000, 10**7),
                      ["jpg", "png"])
    assert info["type"] == "ImageService3" and info["profile"] == "level2"
    assert info["tiles"] == [{"width": 254, "height": 254, "scaleFactors": [1, 2, 4, 8, 16]}]
    # sizes within the limits only, smallest first, each the DZI level's size
    assert info["sizes"] == [{"width": 188, "height": 138}, {"width": 375, "height": 275},
                             {"width": 750, "height": 550}, {"width": 1500, "height": 1100}]
    assert info["preferredFormats"] == ["jpg", "png"] and info["extraFormats"] == ["webp"]
    assert (info["maxWidth"], info["maxHeight"], info["maxArea"]) == (2000, 2000, 10**7)
