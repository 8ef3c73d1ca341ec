"""The official IIIF Image API validator (``iiif-validator``) against a running server, offline.

The validator's test image (tests/fixtures/iiif/, 1000x1000, 10x10 coloured squares whose
colours it samples) is written as a tiled pyramidal TIFF with deflate (lossless) that OpenSlide
opens as generic-tiff, and served under the identifier the validator expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import tifffile
from iiif_validator.validator import ImageAPI, ValidationInfo
from iiif_validator.validator import TestSuite as ValidatorSuite
from PIL import Image

from tests.conftest import ROOT, start_server, stop_server

IDENTIFIER = "67352ccc-d1b0-11e1-89ae-279075081939"
TEST_IMAGE = ROOT / "tests" / "fixtures" / "iiif" / f"{IDENTIFIER}.png"


def write_pyramidal_tiff(source: Path, path: Path) -> Path:
    """The PNG as a tiled pyramidal TIFF: full size and half size, 256 px deflate tiles."""
    with Image.open(source) as image:
        full = image.convert("RGB")
    half = full.resize((full.width // 2, full.height // 2), Image.Resampling.LANCZOS)
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.asarray(full), tile=(256, 256), compression="zlib", photometric="rgb")
        tif.write(np.asarray(half), tile=(256, 256), compression="zlib", photometric="rgb",
                  subfiletype=1)
    return path


def validate(host: str, identifier: str, version: str = "3.0", level: int = 2) -> dict:
    """Run every validator test up to ``level`` as ``iiif-validate.py`` does; returns
    ``{test: None or the failure}``."""
    results = {}
    tests = ValidatorSuite(ValidationInfo()).list_tests(version)
    for name, test in sorted(tests.items()):
        if test["level"] > level:
            continue
        result = ImageAPI(identifier, host, "iiif/3", "http", "", version, debug=False)
        try:
            ValidatorSuite(ValidationInfo()).run_test(name, result)
        except Exception as exc:  # the validator reports some failures by raising
            results[name] = f"{type(exc).__name__}: {exc}"
            continue
        error = result.exception
        results[name] = (None if error is None else
                         f"{error.type}: got {error.got}, expected {error.expected}; "
                         f"{error.message} ({result.urls[-1:]})")
    return results


def test_the_official_validator_passes_level_2(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    tiff = write_pyramidal_tiff(TEST_IMAGE, slides / f"{IDENTIFIER}.tiff")
    with openslide.OpenSlide(tiff) as slide:  # generic-tiff, pixels exactly the PNG's
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_dimensions == ((1000, 1000), (500, 500))
        read = np.asarray(slide.read_region((0, 0), 0, (1000, 1000)).convert("RGB"))
        assert np.array_equal(read, np.asarray(Image.open(TEST_IMAGE).convert("RGB")))
    server = start_server(tmp_path, {"SlideDirectory": str(slides),
                                     "TileCachePath": str(tmp_path / "cache")})
    try:
        results = validate(server.base_url.removeprefix("http://"), IDENTIFIER)
    finally:
        stop_server(server)
    assert len(results) == 33  # every test of version 3.0 up to level 2
    failures = {name: error for name, error in results.items() if error is not None}
    assert failures == {}
