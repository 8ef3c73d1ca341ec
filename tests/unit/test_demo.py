"""Tests of the synthetic Aperio SVS generator (app.tools.demo)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from app.tools import demo

W, H = 3000, 2000  # small, but still 2 levels and ~100 tiles
CENTRE = (W // 2 - 200, H // 2 - 150, 400, 300)  # always tissue (see app.tools.demo docstring)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small slide per photometric variant, shared by the module's tests."""
    directory = tmp_path_factory.mktemp("svs")
    return {
        ph: demo.write_aperio_svs(directory / f"{ph}.svs", W, H, photometric=ph, seed=3)
        for ph in ("ycbcr", "rgb")
    }


def _region(path: Path, box: tuple[int, int, int, int], level: int = 0) -> np.ndarray:
    """OpenSlide RGB pixels of a level-0 box, read at `level` (size scaled down)."""
    x, y, w, h = box
    with openslide.OpenSlide(path) as slide:
        ds = round(slide.level_downsamples[level])
        rgba = np.asarray(slide.read_region((x, y), level, (w // ds, h // ds)))
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3].astype(np.float64)


def _raw_tiles(page: tifffile.TiffPage) -> list[bytes]:
    fh = page.parent.filehandle
    tiles = []
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
        fh.seek(offset)
        tiles.append(fh.read(count))
    return tiles


def _segments(jpeg: bytes) -> list[int]:
    """Marker codes of a JPEG stream's header segments, up to and including SOS."""
    markers, pos = [], 2
    while True:
        assert jpeg[pos] == 0xFF
        markers.append(jpeg[pos + 1])
        if jpeg[pos + 1] == 0xDA:
            return markers
        pos += 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
def test_openslide_sees_an_aperio_slide(slides: dict[str, Path], photometric: str) -> None:
    with openslide.OpenSlide(slides[photometric]) as slide:
        props = slide.properties
        assert props["openslide.vendor"] == "aperio"
        assert slide.level_count == 2
        assert slide.level_dimensions == ((W, H), (W // 4, H // 4))
        assert slide.level_downsamples == pytest.approx((1.0, 4.0))
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.499)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.499)
        assert props["aperio.MPP"] == "0.4990"
        assert props["aperio.AppMag"] == "20"
        assert props["openslide.objective-power"] == "20"
        assert props["openslide.level[0].tile-width"] == "240"
        assert set(slide.associated_images) == {"thumbnail", "label", "macro"}
        assert slide.associated_images["thumbnail"].size == (1024, round(H * 1024 / W))
        assert slide.associated_images["label"].size == (400, 460)
        assert slide.associated_images["macro"].size == (1280, 431)


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
def test_ifd_layout_is_aperio_like(slides: dict[str, Path], photometric: str) -> None:
    with tifffile.TiffFile(slides[photometric]) as tif:
        pages = list(tif.pages)
        assert [p.is_tiled for p in pages] == [True, False, True, False, False]
        assert [p.compression for p in pages] == [7, 7, 7, 5, 7]
        assert [p.subfiletype for p in pages] == [0, 0, 0, 1, 9]
        assert [p.shape[:2] for p in pages] == [
            (H, W),
            (683, 1024),
            (H // 4, W // 4),
            (460, 400),
            (431, 1280),
        ]
        for page in pages:
            assert len([t for t in page.tags if t.code == 270]) == 1  # one description
            assert page.description.startswith("Aperio Image Library v12.0.15 \r\n")
        lines = [p.description.split("\r\n")[1] for p in pages]
        assert lines[0].startswith(f"{W}x{H} [0,0 {W}x{H}] (240x240) JPEG/RGB Q=90|AppMag = 20|")
        assert "|MPP = 0.4990|" in lines[0]
        assert lines[1].endswith("-> 1024x683 JPEG/RGB Q=90")
        assert lines[2].endswith(f"-> {W // 4}x{H // 4} JPEG/RGB Q=90")
        assert lines[3] == "label 400x460"
        assert lines[4] == "macro 1280x431"
        expected = 6 if photometric == "ycbcr" else 2
        for page in (pages[0], pages[1], pages[2], pages[4]):
            assert page.photometric == expected
        if photometric == "ycbcr":
            assert pages[0].tags["YCbCrSubSampling"].value == (2, 2)


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
def test_tiles_are_abbreviated_jpeg_with_shared_tables(
    slides: dict[str, Path], photometric: str
) -> None:
    with tifffile.TiffFile(slides[photometric]) as tif:
        tiled = [p for p in tif.pages if p.is_tiled]
        assert len(tiled) == 2
        for page in tiled:
            tables = page.jpegtables
            assert tables is not None
            assert tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9"
            # DQT and DHT segments only
            assert set(_segments(tables[:-2] + b"\xff\xda")[:-1]) == {0xDB, 0xC4}
            tiles = _raw_tiles(page)
            assert len(tiles) == len(page.dataoffsets) > 1
            for tile in tiles:
                assert tile[:2] == b"\xff\xd8" and tile[-2:] == b"\xff\xd9"
                assert b"\xff\xdb" not in tile and b"\xff\xc4" not in tile
                markers = _segments(tile)
                if photometric == "ycbcr":
                    assert markers == [0xC0, 0xDA]  # SOF0, SOS: like libtiff writes
                else:
                    assert markers == [0xEE, 0xC0, 0xDA]  # Adobe APP14 first
                    assert tile[4:17] == b"\x00\x0eAdobe\x00\x64\x00\x00\x00\x00"
                    assert tile[17] == 0  # transform 0: RGB, no colour conversion


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
def test_tables_plus_tile_is_a_decodable_jpeg(slides: dict[str, Path], photometric: str) -> None:
    """What a tile server does: splice JPEGTables and a raw tile into one JPEG."""
    with tifffile.TiffFile(slides[photometric]) as tif:
        page = tif.pages[0]
        across = -(-W // 240)
        tx, ty = 6, 4  # a tile in the slide centre (tissue)
        raw = _raw_tiles(page)[ty * across + tx]
        jpeg = page.jpegtables[:-2] + raw[2:]
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float64)
    expected = demo.render_region(W, H, (tx * 240, ty * 240, 240, 240), seed=3)
    assert decoded.shape == (240, 240, 3)
    assert np.abs(decoded - expected).mean() < 6
    assert decoded.mean() < 225  # tissue, not glass


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
def test_decoded_pixels_match_the_source(slides: dict[str, Path], photometric: str) -> None:
    x, y, w, h = CENTRE
    got = _region(slides[photometric], CENTRE)
    source = demo.render_region(W, H, CENTRE, seed=3).astype(np.float64)
    assert np.abs(got - source).mean() < 6
    # tissue in the centre: clearly darker than glass, and H&E-coloured
    assert got.mean() < 215
    assert got[..., 0].mean() > got[..., 1].mean()
    # level 1 is the 4x box-reduction of level 0
    got1 = _region(slides[photometric], CENTRE, level=1)
    reduced = Image.fromarray(source.astype(np.uint8)).reduce(4)
    assert np.abs(got1 - np.asarray(reduced)).mean() < 9  # more detail per px: more loss
    # a different seed gives a different slide (the comparison can fail)
    other = demo.render_region(W, H, CENTRE, seed=4).astype(np.float64)
    assert np.abs(got - other).mean() > 10


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
def test_corners_are_glass(slides: dict[str, Path], photometric: str) -> None:
    for box in [(0, 0, 120, 120), (W - 120, H - 120, 120, 120), (W - 120, 0, 120, 120)]:
        glass = _region(slides[photometric], box)
        assert np.abs(glass.reshape(-1, 3).mean(0) - [242, 242, 240]).max() < 3
        assert glass.std() < 3


def test_both_photometric_variants_show_the_same_colours(slides: dict[str, Path]) -> None:
    ycbcr = _region(slides["ycbcr"], CENTRE)
    rgb = _region(slides["rgb"], CENTRE)
    assert np.abs(ycbcr - rgb).mean() < 8
    assert np.abs(ycbcr.reshape(-1, 3).mean(0) - rgb.reshape(-1, 3).mean(0)).max() < 2
    for region in (ycbcr, rgb):  # pink/purple, not e.g. green or channel-swapped
        r, g, b = region.reshape(-1, 3).mean(0)
        assert r > g + 15 and b > g + 15
    with openslide.OpenSlide(slides["ycbcr"]) as a, openslide.OpenSlide(slides["rgb"]) as b:
        for name in ("thumbnail", "macro"):
            img_a = np.asarray(a.associated_images[name].convert("RGB"), np.float64)
            img_b = np.asarray(b.associated_images[name].convert("RGB"), np.float64)
            assert np.abs(img_a - img_b).mean() < 4


def test_level_sizes() -> None:
    assert demo._level_sizes(3000, 2000) == [(3000, 2000), (750, 500)]
    assert len(demo._level_sizes(20000, 15000)) == 3
    assert demo._level_sizes(24000, 18000) == [(24000, 18000), (6000, 4500), (1500, 1125)]
    assert demo._level_sizes(46000, 32914) == [
        (46000, 32914),
        (11500, 8228),
        (2875, 2057),
        (718, 514),
    ]
    assert demo._level_sizes(1000, 800) == [(1000, 800)]


def test_small_slide_with_other_options(tmp_path: Path) -> None:
    path = demo.write_aperio_svs(
        tmp_path / "s.svs", 1000, 700, tile_size=256, quality=70, mpp=0.25, app_mag=40
    )
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 1
        assert slide.dimensions == (1000, 700)
        assert slide.properties["openslide.level[0].tile-width"] == "256"
        assert float(slide.properties["openslide.mpp-x"]) == 0.25
        assert slide.properties["openslide.objective-power"] == "40"
        assert slide.associated_images["thumbnail"].size == (1000, 700)
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_bigtiff
        assert "Q=70" in tif.pages[0].description
    big = demo.write_aperio_svs(tmp_path / "b.svs", 500, 400, bigtiff=True)
    with tifffile.TiffFile(big) as tif:
        assert tif.is_bigtiff
    with openslide.OpenSlide(big) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"


def test_output_is_deterministic_and_atomic(tmp_path: Path) -> None:
    a = demo.write_aperio_svs(tmp_path / "a.svs", 800, 600, seed=7)
    b = demo.write_aperio_svs(tmp_path / "b.svs", 800, 600, seed=7)
    c = demo.write_aperio_svs(tmp_path / "c.svs", 800, 600, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svs", "b.svs", "c.svs"]


def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(demo, "_label_image", boom)
    with pytest.raises(RuntimeError, match="boom"):
        demo.write_aperio_svs(tmp_path / "x.svs", 600, 500)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 0}, "size"),
        ({"tile_size": 250}, "tile_size"),
        ({"quality": 0}, "quality"),
        ({"photometric": "lab"}, "photometric"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"width": 500, "height": 400, **kwargs}
    with pytest.raises(ValueError, match=message):
        demo.write_aperio_svs(tmp_path / "x.svs", **args)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_ensure_demo_slide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "DEMO_SIZE", (1200, 900))
    directory = tmp_path / "data" / "slides"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(demo.ensure_demo_slide(directory)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [directory / "demo.svs"] * 2
    assert [p.name for p in directory.iterdir()] == ["demo.svs"]  # no temp files left
    with openslide.OpenSlide(results[0]) as slide:
        assert slide.dimensions == (1200, 900)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not regenerate an existing slide")

    monkeypatch.setattr(demo, "write_aperio_svs", fail)
    assert demo.ensure_demo_slide(directory) == directory / "demo.svs"
