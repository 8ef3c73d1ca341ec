"""``tileserver verify`` in-process: passes on real slides, fails on a corrupted cache."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from app.cache.disk import seal, unseal
from app.cli import main
from app.tools.verify import VerifyError, parse_levels, sample_addresses

OPENABLE = ["boxes.tiff", "small.svs", "boxes_0.dcm", "boxes.png", "boxes-no-icc.png"]


def images_args(slides: dict) -> list[str]:
    out = []
    for i, (name, path) in enumerate(slides.items()):
        out += [f"Images:{i}:Name={name}", f"Images:{i}:Path={path}"]
    return out


def run_cli(args: list[str], tmp_path, capsys) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    code = main(["verify", *args, "--json", str(report)])
    out = capsys.readouterr().out
    return code, json.loads(report.read_text()), out


@pytest.fixture
def slides(fixtures, generated_svs) -> dict:
    out = {name.replace(".", "-"): fixtures / name for name in OPENABLE}
    out["generated"] = generated_svs
    return out


def test_verify_passes_on_every_openable_slide(slides, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no appsettings.json here: only the overrides count
    code, report, out = run_cli(
        [*images_args(slides), f"TileCachePath={tmp_path / 'cache'}", "--sample", "6"],
        tmp_path, capsys)
    assert code == 0, out
    assert report["passed"] is True and "PASSED" in out
    assert report["server"] == {"url": "in-process", "version": "0.1.0"}
    assert report["reference"]["function"] == "openslide.deepzoom.DeepZoomGenerator.get_tile"
    assert [s["name"] for s in report["slides"]] == list(slides)
    for slide in report["slides"]:
        assert slide["passed"] and not slide["problems"]
        assert slide["settings"]["tile_size"] == 254 and slide["settings"]["overlap"] == 1
        levels = slide["levels"]
        assert [lv["level"] for lv in levels] == list(range(len(levels)))
        top = levels[-1]
        assert top["lossless"] and top["format"] == "png"
        assert top["exact"] == top["tiles_checked"] == min(6, top["tiles"]) > 0
        assert all(lv["tiles_checked"] == min(6, lv["tiles"]) for lv in levels)
        lossy = [lv for lv in levels if not lv["lossless"] and lv["psnr_min"] is not None]
        assert lossy and all(lv["psnr_min"] > 10 and lv["max_error"] > 0 for lv in lossy)
    generated = report["slides"][-1]
    assert generated["identity_check"] == "openslide.quickhash-1"
    assert generated["quickhash"] == generated["server_quickhash"] is not None
    png = report["slides"][OPENABLE.index("boxes.png")]
    assert png["quickhash"] is None and png["identity_check"].startswith("file size")


def test_verify_every_level_as_png_and_every_tile(generated_svs, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, report, out = run_cli(
        [f"Image:Path={generated_svs}", f"TileCachePath={tmp_path / 'c'}", "--format", "png",
         "--levels", "8-10", "--sample", "0"], tmp_path, capsys)
    assert code == 0, out
    levels = report["slides"][0]["levels"]
    assert [lv["level"] for lv in levels] == [8, 9, 10]
    for lv in levels:  # every tile, and every one bit-exact since PNG was asked for
        assert lv["tiles_checked"] == lv["tiles"] == lv["exact"]


def test_verify_fails_on_a_corrupted_disk_cache(quick_svs, tmp_path, capsys, monkeypatch):
    """A cached PNG overwritten with other valid pixels, and sealed again as the cache seals
    its files (what a tool that knows the format could do), is served by the server, whose
    seal check cannot see it; verify catches it and names it."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    args = ["Images:0:Name=g", f"Images:0:Path={quick_svs}", f"TileCachePath={cache}",
            "--levels", "11-top", "--sample", "0"]
    code, report, out = run_cli(args, tmp_path, capsys)
    assert code == 0, out
    top = report["slides"][0]["levels"][-1]["level"]
    victim = next((cache / "g").rglob(f"{top}/1_2.png"))
    other = next((cache / "g").rglob(f"{top}/2_1.png"))
    victim_size = Image.open(io.BytesIO(unseal(victim.read_bytes())[0])).size
    with Image.open(io.BytesIO(unseal(other.read_bytes())[0])) as im:  # another tile's pixels,
        pixels = np.asarray(im.convert("RGB"))[: victim_size[1], : victim_size[0]]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    victim.write_bytes(seal(buf.getvalue()))  # ... cut to the victim's size: a plausible tile

    code, report, out = run_cli(args, tmp_path, capsys)  # a new app: memory cache empty
    assert code == 1
    assert report["passed"] is False
    failures = [f for lv in report["slides"][0]["levels"] for f in lv["failures"]]
    assert [(f["level"], f["col"], f["row"]) for f in failures] == [(top, 1, 2)]
    assert failures[0]["url"] == f"/storage/g_files/{top}/1_2.jpeg"
    assert "lossless tile differs from DeepZoomGenerator.get_tile" in failures[0]["problem"]
    assert failures[0]["max_error"] > 0
    assert f"/storage/g_files/{top}/1_2.jpeg: lossless tile differs" in out.replace("\n", "")
    assert "FAILED" in out


def test_verify_fails_on_an_unreadable_slide(fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, report, out = run_cli(
        ["Images:0:Name=bad", f"Images:0:Path={fixtures / 'unreadable.svs'}",
         f"TileCachePath={tmp_path / 'c'}"], tmp_path, capsys)
    assert code == 1
    failures = report["slides"][0]["levels"][0]["failures"]
    assert failures[0]["status"] == 500 and "Bogus marker length" in failures[0]["problem"]


def test_verify_under_privacy_hash_names_and_withheld_fingerprints(fixtures, tmp_path, capsys,
                                                                   monkeypatch):
    """Verify finds the slides by their hash names (derived from the files, the same here as on
    the server) and, with the fingerprints withheld, compares the pyramid and the tiles."""
    import shutil

    from app.core.slides import opaque_slide_name

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "slides"
    folder.mkdir()
    slide = shutil.copy(fixtures / "small.svs", folder / "Smith.svs")
    code, report, out = run_cli(
        [f"SlideDirectory={folder}", "Privacy:SlideNames=hash",
         "Privacy:HideProperties=openslide.quickhash-1", "Integrity:ContentSha256=true",
         f"TileCachePath={tmp_path / 'c'}", "--sample", "2"], tmp_path, capsys)
    assert code == 0, out
    [checked] = report["slides"]
    assert checked["name"] == opaque_slide_name(slide) and checked["passed"]
    assert checked["server_quickhash"] is None and checked["sha256"] is None
    assert checked["identity_check"].startswith("none: the server's Privacy settings")


def test_verify_usage_errors(fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["Images:0:Name=boxes", f"Images:0:Path={fixtures / 'boxes.tiff'}",
            f"TileCachePath={tmp_path / 'c'}"]
    assert main(["verify", *base, "nosuch"]) == 2
    assert "'nosuch' is not in this machine's configuration" in capsys.readouterr().err
    assert main(["verify", *base, "--levels", "5-2"]) == 2
    assert "--levels '5-2'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("3", (3, 3)), ("2-5", (2, 5)), ("4-", (4, None)), ("4-top", (4, None)),
])
def test_parse_levels(text, expected):
    assert parse_levels(text) == expected


@pytest.mark.parametrize("text", ["a", "-1", "3-1", "1-2-3", "top"])
def test_parse_levels_rejects(text):
    with pytest.raises(VerifyError):
        parse_levels(text)


def test_sample_addresses():
    assert sample_addresses(3, 2, 0, "s") == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    picks = sample_addresses(100, 80, 16, "seed")
    assert len(picks) == len(set(picks)) == 16
    assert {(0, 0), (99, 0), (0, 79), (99, 79), (50, 40)} <= set(picks)
    assert picks == sample_addresses(100, 80, 16, "seed")  # reproducible
    assert picks != sample_addresses(100, 80, 16, "other")


def test_verify_original_tiles_and_a_converting_colour_mode(tmp_path, capsys, monkeypatch):
    """Aligned geometry: verify checks that original tiles are the stored tiles and decode to
    exactly get_tile; a converting colour mode is compared with the same LittleCMS transform."""
    from app.core.icc import D65_XY, rgb_matrix_profile
    from app.tools.demo import write_aperio_svs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "slides").mkdir()
    bare = write_aperio_svs(tmp_path / "slides" / "bare.svs", 1500, 1100, photometric="rgb",
                            app14=False, seed=8)
    code, report, out = run_cli(
        [f"Image:Path={bare}", f"TileCachePath={tmp_path / 'c1'}", "DeepZoom:Geometry=aligned",
         "--format", "jpeg", "--levels", "10-top", "--sample", "0"], tmp_path, capsys)
    assert code == 0, out
    slide = report["slides"][0]
    assert slide["settings"]["geometry"] == "aligned" and slide["settings"]["tile_size"] == 240
    top = slide["levels"][-1]
    assert top["original"] == top["exact"] == (1500 // 240) * (1100 // 240)
    assert top["tiles_checked"] == top["tiles"] > top["original"]  # edge tiles rendered

    wide = rgb_matrix_profile("wide (verify test)", ((0.68, 0.32), (0.21, 0.71), (0.15, 0.06)),
                              D65_XY, 1.8)
    icc = write_aperio_svs(tmp_path / "slides" / "icc.svs", 1500, 1100, seed=8,
                           icc_profile=wide)
    code, report, out = run_cli(
        [f"Image:Path={icc}", f"TileCachePath={tmp_path / 'c2'}",
         "DeepZoom:ColorMode=perceptual", "--levels", "10-top", "--sample", "4"],
        tmp_path, capsys)
    assert code == 0, out
    slide = report["slides"][0]
    assert slide["settings"]["color_mode"] == "perceptual"
    top = slide["levels"][-1]
    assert top["format"] == "png" and not top["lossless"]  # converted: not the slide's pixels
    assert top["exact"] == top["tiles_checked"] == 4  # ... but exactly the transform's


def test_compare_flags_an_original_tile_that_is_not_the_stored_one():
    import httpx

    from app.cache.tiles import digest_of
    from app.tools.verify import TileResult, compare

    pixels = np.full((8, 8, 3), 200, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=100)
    body = buf.getvalue()
    headers = httpx.Headers({"content-digest": digest_of(body).content_digest,
                             "content-type": "image/jpeg", "x-tile-lossless": "false",
                             "x-tile-source": "original"})
    expected = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    result = TileResult("/t", 0, 0, 0, 200)
    compare(result, body, headers, expected, False, 0.0, stored=body)
    assert result.problem is None and result.exact
    result = TileResult("/t", 0, 0, 0, 200)
    compare(result, body, headers, expected, False, 0.0, stored=b"\xff\xd8other\xff\xd9")
    assert "not the stored tile" in result.problem
