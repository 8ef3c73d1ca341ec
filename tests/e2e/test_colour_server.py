"""Colour modes, associated images and the PHI switch over real HTTP (uvicorn)."""

import io

import numpy as np
import openslide
from openslide import ImageSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from app.core.colour import expected_profile, reference_pixels, stored_profile
from tests.conftest import decode, start_server, stop_server


def profile_of(data: bytes) -> bytes | None:
    with Image.open(io.BytesIO(data)) as im:
        return im.info.get("icc_profile")


def test_default_server_embeds_profiles_and_serves_associated_images(live_server, fixtures,
                                                                     generated_svs):
    boxes = openslide.open_slide(fixtures / "boxes.tiff")
    for ext in ("jpeg", "png", "webp"):
        r = live_server.get(f"/storage/boxes_files/8/0_0.{ext}")
        assert r.status_code == 200
        assert r.headers["x-tile-color-transform"] == "none"
        assert profile_of(r.content) == stored_profile(boxes)
    head = live_server.get("/storage/generated/associated/macro_files/11/0_0.jpeg")
    assert head.status_code == 200 and head.headers["x-tile-lossless"] == "true"
    slide = openslide.open_slide(generated_svs)
    dz = DeepZoomGenerator(ImageSlide(slide.associated_images["macro"]), 254, 1, True)
    assert np.array_equal(decode(head.content), np.asarray(dz.get_tile(11, (0, 0))))


def test_converting_server_with_privacy(tmp_path, fixtures, generated_svs):
    settings = {
        "TileCachePath": str(tmp_path / "cache"),
        "Images": [{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")},
                   {"Name": "generated", "Path": str(generated_svs)}],
        "DeepZoom": {"ColorMode": "relative-colorimetric"},
        "Privacy": {"HideAssociatedImages": True, "HideProperties": ["aperio.*"]},
    }
    server = start_server(tmp_path, settings, "--workers", "2")
    try:
        boxes = openslide.open_slide(fixtures / "boxes.tiff")
        for _ in range(2):  # miss, then hit (either worker)
            r = server.get("/storage/boxes_files/9/1_0.png")
            assert r.headers["x-tile-color-transform"] == "srgb-relative-colorimetric"
            assert r.headers["x-tile-lossless"] == "false"
            assert profile_of(r.content) == expected_profile(boxes, "relative-colorimetric")
            expected = reference_pixels(boxes, 9, 1, 0, tile_size=254, overlap=1,
                                        limit_bounds=True, color_mode="relative-colorimetric")
            assert np.array_equal(decode(r.content), expected)
        assert server.get("/storage/generated/associated/label.dzi").status_code == 404
        doc = server.get("/api/slides/generated").json()
        assert doc["associated"] == [] and doc["color"]["mode"] == "relative-colorimetric"
        assert not any(k.startswith("aperio.") for k in doc["properties"])
        assert "tiff.ImageDescription" not in doc["properties"]  # repeats aperio.* values
    finally:
        stop_server(server)
