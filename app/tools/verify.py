"""``tileserver verify``: prove that served tiles are the slide's pixels.

For each slide, verify asks the server for its format policy (``/api/slides/{name}/policy``) and
its DZI, opens the same slide file itself with openslide-python, and for a sample of tiles of
each DZI level (or all of them) fetches the tile as a viewer would, decodes it, and compares it
with the pixels the reference gives for the same address:

- a tile the server calls lossless (``X-Tile-Lossless: true``) or that lies on a level the
  policy calls lossless must be bit for bit equal (shape and every sample);
- a lossy tile is measured: PSNR (dB, 8-bit peak 255) and the largest sample error;
- every tile's ``Content-Digest`` must be the SHA-256 of the bytes received, its
  ``Content-Type`` the format the bytes decode as, and the DZI must equal
  ``DeepZoomGenerator.get_dzi``.

Before any tile, the slide file here must be the server's (same ``openslide.quickhash-1``, or
file size where the format has none, and the same DZI pyramid size; the pyramid size only when
the server's ``Privacy`` settings withhold its fingerprints); otherwise verify cannot run
(:class:`VerifyError`). Slide names come from the server, so ``Privacy.SlideNames: hash`` needs
the same setting here (names are derived from the files, the same on both sides).

Tiles come over HTTP from a running server (``--url``) or from the app built in this process
(the same ASGI app uvicorn runs, through httpx's ASGI transport). Either way the slide files come
from this machine's configuration (appsettings.json, ``--config``, environment, overrides), as for
``tileserver serve``.

The reference is ONE function, :func:`expected_tile`: openslide-python's
``DeepZoomGenerator.get_tile`` with the server's tile size, overlap and limit_bounds, converted
to sRGB where the server's ``DeepZoom.ColorMode`` converts
(:func:`app.core.colour.reference_pixels`), so that verify compares against the same transform.
Tiles the server sends as the slide's own JPEG bytes (``X-Tile-Source: original``) must be the
stored tile, read here with tifffile, and decode exactly to the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpx
import numpy as np
import openslide
import tifffile
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from app import __version__
from app.core.colour import ColorMode, expected_profile, reference_pixels
from app.core.digest import digest_of, file_sha256
from app.core.privacy import OPAQUE_IDENTITY_PREFIX
from app.core.slides import build_catalogue
from app.settings import Settings

CONCURRENCY = 8
"""Tiles fetched and compared at the same time."""

_DECODED_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                  "AVIF": "image/avif"}


class VerifyError(Exception):
    """Verify cannot run (unknown slide, server unreachable, bad ``--levels``, the slide file
    here is not the server's); exit status 2."""


ProgressCallback = Callable[[str, int, int], None]
"""``progress(slide name, tiles checked, tiles to check)`` of :func:`run_verify`."""


# ----------------------------------------------------------------------------- reference


def expected_tile(slide: openslide.AbstractSlide, generator: DeepZoomGenerator, level: int,
                  col: int, row: int, color_mode: ColorMode | str = ColorMode.EMBED
                  ) -> np.ndarray:
    """The pixels a tile must decode to: ``DeepZoomGenerator.get_tile``, as RGB, converted to
    sRGB where the server's colour mode converts (:func:`app.core.colour.reference_pixels`).

    The one reference of :mod:`app.tools.verify`. Blocking (OpenSlide read): call from a worker
    thread.

    Args:
        slide: the slide opened here (its ICC profile drives converting modes).
        generator: openslide-python's generator of ``slide`` with the server's tile_size,
            overlap and limit_bounds.
        level, col, row: DZI level (0 = 1x1 px) and tile address.
        color_mode: the server's ``DeepZoom.ColorMode`` (its policy document names it).

    Returns:
        ``(height, width, 3)`` uint8.
    """
    return reference_pixels(slide, level, col, row, color_mode=color_mode, generator=generator)


class ReferenceSlide:
    """The slide file opened here, independently of the server, with the server's geometry.

    Args:
        path: the slide file.
        tile_size, overlap, limit_bounds: the DZI geometry (from the server's policy document).

    Raises:
        VerifyError: OpenSlide cannot open the file.
    """

    def __init__(self, path: Path, tile_size: int, overlap: int, limit_bounds: bool,
                 color_mode: ColorMode | str = ColorMode.EMBED):
        try:
            self.slide = openslide.open_slide(path)
        except (openslide.OpenSlideError, OSError) as exc:
            raise VerifyError(f"cannot open {path} here: {exc}") from None
        self.path = path
        self.color_mode = color_mode
        self.generator = DeepZoomGenerator(self.slide, tile_size, overlap, limit_bounds)
        self.quickhash = self.slide.properties.get(openslide.PROPERTY_NAME_QUICKHASH1)
        self.profile = expected_profile(self.slide, color_mode)
        self._pages: dict[tuple[int, int], _StoredPage] | None = None

    def expected(self, level: int, col: int, row: int) -> np.ndarray:
        """:func:`expected_tile` of this slide (blocking)."""
        return expected_tile(self.slide, self.generator, level, col, row, self.color_mode)

    def stored_tile(self, level: int, col: int, row: int) -> bytes | None:
        """The slide file's stored JPEG tile that DZI tile (level, col, row) must be when the
        server says ``X-Tile-Source: original``, read here with tifffile (offsets and byte
        counts of the TIFF page whose size is the slide level's); None if the DZI tile is not
        exactly one stored tile. Blocking; the TIFF's pages are parsed once per slide."""
        l0, slide_level, l_size = self.generator.get_tile_coordinates(level, (col, row))
        downsample = self.slide.level_downsamples[slide_level]
        x, y = l0[0] / downsample, l0[1] / downsample
        dims = self.slide.level_dimensions[slide_level]
        page = self._jpeg_pages().get(dims)
        if (page is None or not x.is_integer() or not y.is_integer()
                or tuple(l_size) != page.tile_size
                or x % page.tile_size[0] or y % page.tile_size[1]):
            return None
        index = (int(y) // page.tile_size[1]) * page.cols + int(x) // page.tile_size[0]
        with open(self.path, "rb") as f:
            f.seek(page.offsets[index])
            return f.read(page.counts[index])

    def _jpeg_pages(self) -> dict[tuple[int, int], _StoredPage]:
        """``{(width, height): layout}`` of the file's tiled JPEG pages (parsed once)."""
        if self._pages is None:  # threads may race here: each builds, one dict wins whole
            pages = {}
            try:
                with tifffile.TiffFile(self.path) as tif:
                    for p in tif.pages:
                        if isinstance(p, tifffile.TiffPage) and p.is_tiled and p.compression == 7:
                            pages[(p.imagewidth, p.imagelength)] = _StoredPage(
                                (p.tilewidth, p.tilelength), -(-p.imagewidth // p.tilewidth),
                                tuple(p.dataoffsets), tuple(p.databytecounts))
            except (OSError, tifffile.TiffFileError, ValueError):
                pass  # not a TIFF: no stored JPEG tiles, every "original" claim fails
            self._pages = pages
        return self._pages


@dataclass(frozen=True)
class _StoredPage:
    """Where one TIFF page's JPEG tiles are: tile size, tiles per row, offsets, byte counts."""

    tile_size: tuple[int, int]
    cols: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]


# ----------------------------------------------------------------------------- results


@dataclass
class TileResult:
    """One verified tile.

    Attributes:
        url: the path requested.
        level, col, row: the DZI address.
        status: HTTP status.
        format: ``X-Tile-Format`` (None if absent).
        lossless: True when the tile had to be bit-exact (claimed lossless, or on a lossless
            level).
        exact: pixels and shape equal the reference.
        max_error: largest absolute sample difference 0..255 (None if not comparable).
        differing_pixels: pixels with any channel different.
        psnr: dB over all samples; ``inf`` when exact; None if not comparable.
        problem: why this tile fails verification, or None.
    """

    url: str
    level: int
    col: int
    row: int
    status: int
    format: str | None = None
    lossless: bool = False
    exact: bool = False
    max_error: int | None = None
    differing_pixels: int | None = None
    psnr: float | None = None
    source: str | None = None
    problem: str | None = None


@dataclass
class LevelReport:
    """The verified tiles of one DZI level and their summary."""

    level: int
    width: int
    height: int
    cols: int
    rows: int
    format: str
    lossless: bool
    slide_level: int
    tiles: list[TileResult] = field(default_factory=list)

    @property
    def failures(self) -> list[TileResult]:
        """Tiles with a problem."""
        return [t for t in self.tiles if t.problem]

    def summary(self) -> dict[str, Any]:
        """The JSON record of the level (failures listed in full)."""
        psnrs = [t.psnr for t in self.tiles if t.psnr is not None and not t.exact]
        errors = [t.max_error for t in self.tiles if t.max_error is not None]
        return {
            "level": self.level, "width": self.width, "height": self.height,
            "cols": self.cols, "rows": self.rows, "tiles": self.cols * self.rows,
            "format": self.format, "lossless": self.lossless, "slide_level": self.slide_level,
            "tiles_checked": len(self.tiles),
            "exact": sum(t.exact for t in self.tiles),
            "original": sum(t.source == "original" for t in self.tiles),
            "failed": len(self.failures),
            "psnr_min": round(min(psnrs), 2) if psnrs else None,
            "psnr_mean": round(sum(psnrs) / len(psnrs), 2) if psnrs else None,
            "max_error": max(errors) if errors else None,
            "failures": [asdict(t) for t in self.failures],
        }


@dataclass
class SlideReport:
    """Verification of one slide."""

    name: str
    file: str | None = None
    quickhash: str | None = None
    server_quickhash: str | None = None
    identity_check: str | None = None
    sha256: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    levels: list[LevelReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No slide-level problem and no failing tile."""
        return not self.problems and not any(lv.failures for lv in self.levels)

    def to_json(self) -> dict[str, Any]:
        """The slide's JSON record."""
        return {
            "name": self.name, "file": self.file, "quickhash": self.quickhash,
            "server_quickhash": self.server_quickhash, "identity_check": self.identity_check,
            "sha256": self.sha256,
            "passed": self.passed, "problems": self.problems, "settings": self.settings,
            "levels": [lv.summary() for lv in self.levels],
        }


# ----------------------------------------------------------------------------- checking


def parse_levels(text: str | None) -> tuple[int, int | None] | None:
    """``--levels``: ``A-B`` (inclusive), ``A`` alone, ``A-`` or ``A-top`` (to the top level).

    Returns:
        ``(first, last or None for the top)``, or None for every level.

    Raises:
        VerifyError: not of that shape.
    """
    if text is None:
        return None
    first, sep, last = text.strip().partition("-")
    try:
        a = int(first)
        b = (None if last in ("", "top") else int(last)) if sep else a
    except ValueError:
        raise VerifyError(f"--levels {text!r}: expected A-B, A, A- or A-top "
                          "(DZI levels, 0 = 1x1 px)") from None
    if a < 0 or (b is not None and b < a):
        raise VerifyError(f"--levels {text!r}: expected 0 <= A <= B")
    return a, b


def sample_addresses(cols: int, rows: int, sample: int, seed: str) -> list[tuple[int, int]]:
    """``sample`` tile addresses of a ``cols`` x ``rows`` level, or all of them.

    The four corners and the centre (border tiles have their own shapes) and then a seeded
    random choice, so that a report can be reproduced. ``sample`` 0 means every tile.
    """
    total = cols * rows
    if sample <= 0 or total <= sample:
        return [(c, r) for r in range(rows) for c in range(cols)]
    picks = {(0, 0), (cols - 1, 0), (0, rows - 1), (cols - 1, rows - 1), (cols // 2, rows // 2)}
    picks = set(list(sorted(picks))[:sample])
    rng = random.Random(seed)
    while len(picks) < sample:
        index = rng.randrange(total)
        picks.add((index % cols, index // cols))
    return sorted(picks, key=lambda a: (a[1], a[0]))


def psnr(mse: float) -> float:
    """PSNR in dB of 8-bit samples (peak 255) for a mean squared error (``inf`` for 0)."""
    if mse == 0:
        return math.inf
    return 10 * math.log10(255 ** 2 / mse)


def compare(result: TileResult, body: bytes, headers: httpx.Headers, expected: np.ndarray,
            level_lossless: bool, min_psnr: float, stored: bytes | None = None,
            profile: bytes | None = None) -> None:
    """Decode ``body`` and fill ``result``: headers, exactness, error, PSNR, problem.

    A tile the server calls ``X-Tile-Source: original`` must be ``stored`` (the slide's own
    JPEG tile, read here): its entropy-coded scan byte for byte, and its pixels exactly the
    reference's, since OpenSlide decodes that same stream. The ICC profile embedded in the tile
    must be ``profile`` (:func:`app.core.colour.expected_profile`: the slide's own bytes in
    ``embed`` mode, the sRGB profile in converting modes, none otherwise). Blocking (decode +
    arrays).
    """
    problems = []
    result.source = headers.get("x-tile-source")
    if result.source == "original":
        if stored is None:
            problems.append("X-Tile-Source: original, but this DZI tile is not one stored tile")
        elif not body.endswith(stored[2:]):
            problems.append("X-Tile-Source: original, but the bytes are not the stored tile's")
    digest = headers.get("content-digest")
    if digest != digest_of(body).content_digest:
        problems.append(f"Content-Digest {digest!r} is not the SHA-256 of the bytes received")
    claimed = headers.get("x-tile-lossless")
    result.lossless = claimed == "true" or level_lossless
    if level_lossless and claimed != "true":
        problems.append(f"X-Tile-Lossless: {claimed} on a level the policy calls lossless")
    try:
        with Image.open(io.BytesIO(body)) as im:
            kind = im.format
            embedded = im.info.get("icc_profile") or None
            pixels = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - any undecodable body is a finding, not a crash
        result.problem = f"cannot decode the {len(body)} bytes: {exc}"
        return
    if embedded != profile:
        problems.append(f"embedded ICC profile ({len(embedded or b'')} bytes) is not the "
                        f"expected one ({len(profile or b'')} bytes)")
    media = headers.get("content-type", "")
    if _DECODED_TYPES.get(kind or "") != media:
        problems.append(f"Content-Type {media} but the bytes are {kind}")
    if pixels.shape != expected.shape:
        problems.append(f"shape {pixels.shape[1]}x{pixels.shape[0]} px, expected "
                        f"{expected.shape[1]}x{expected.shape[0]}")
    else:
        diff = np.abs(pixels.astype(np.int16) - expected.astype(np.int16))
        result.max_error = int(diff.max()) if diff.size else 0
        result.differing_pixels = int(np.count_nonzero(diff.max(axis=2)))
        result.exact = result.max_error == 0
        result.psnr = psnr(float(np.mean(diff.astype(np.float64) ** 2)))
        if (result.lossless or result.source == "original") and not result.exact:
            kind = "lossless" if result.lossless else "original"
            problems.append(f"{kind} tile differs from DeepZoomGenerator.get_tile: "
                            f"{result.differing_pixels} pixel(s), max error {result.max_error}")
        elif not result.lossless and result.psnr < min_psnr:
            problems.append(f"PSNR {result.psnr:.1f} dB below --min-psnr {min_psnr}")
    result.problem = "; ".join(problems) or None


class Verifier:
    """Verifies slides through one HTTP client (a server's URL, or the in-process app).

    Args:
        client: an httpx client whose base URL is the server.
        settings: this machine's settings: where the slide files are.
        levels: ``parse_levels`` result; sample: tiles per level (0: all); min_psnr: dB below
            which a lossy tile fails (0: never).
        query_format: ``?format=`` to add to every tile URL (None: the policy's format).
        progress: called after each tile (see :data:`ProgressCallback`).
    """

    def __init__(self, client: httpx.AsyncClient, settings: Settings,
                 levels: tuple[int, int | None] | None = None, sample: int = 16,
                 min_psnr: float = 0.0, query_format: str | None = None,
                 progress: ProgressCallback | None = None):
        self.client = client
        self.catalogue = build_catalogue(settings)
        self.levels = levels
        self.sample = sample
        self.min_psnr = min_psnr
        self.query_format = query_format
        self.progress = progress
        self._limit = anyio.Semaphore(CONCURRENCY)

    async def get_json(self, path: str) -> Any:
        """GET a JSON document of the server.

        Raises:
            VerifyError: the server did not answer 200 with JSON.
        """
        try:
            response = await self.client.get(path)
        except httpx.HTTPError as exc:
            raise VerifyError(f"{self.client.base_url}{path}: {exc}") from None
        if response.status_code != 200:
            raise VerifyError(f"{path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    async def slide_names(self) -> list[str]:
        """Every slide the server lists."""
        return [item["name"] for item in await self.get_json("/api/images")]

    async def verify(self, name: str) -> SlideReport:
        """Verify one slide; every finding lands in the report (never raises for the slide).

        Raises:
            VerifyError: the slide is unknown here (no file to compare with), or the file here
                is not the server's slide (checked before any tile).
        """
        entry = self.catalogue.get(name)
        if entry is None:
            raise VerifyError(f"slide {name!r} is not in this machine's configuration: verify "
                              "needs its file (configure it as for tileserver serve)")
        report = SlideReport(name, str(entry.path))
        policy_response = await self.client.get(f"/api/slides/{name}/policy")
        if policy_response.status_code != 200:
            report.problems.append(f"/api/slides/{name}/policy: HTTP "
                                   f"{policy_response.status_code} {policy_response.text[:300]}")
            return report
        policy = policy_response.json()
        report.settings = {k: policy[k] for k in (
            "tile_size", "overlap", "limit_bounds", "declared_format", "lossless_format",
            "lossless_level_count", "enforce_lossless", "allow_format_override")}
        report.settings["query_format"] = self.query_format
        report.server_quickhash = policy["quickhash"]
        report.settings["color_mode"] = policy["color"]["mode"]
        report.settings["geometry"] = policy["geometry"]
        reference = await anyio.to_thread.run_sync(
            ReferenceSlide, entry.path, policy["tile_size"], policy["overlap"],
            policy["limit_bounds"], policy["color"]["mode"])
        report.quickhash = reference.quickhash
        await anyio.to_thread.run_sync(self._check_identity, name, report, reference, policy)
        base = await self._check_dzi(report, reference, name, policy["declared_format"])
        if base is None:
            return report
        wanted = self._wanted_levels(policy["level_count"])
        for lv in policy["levels"]:
            if lv["level"] not in wanted:
                continue
            fmt, lossless = self._requested(policy, lv)
            level = LevelReport(lv["level"], lv["width"], lv["height"], lv["cols"], lv["rows"],
                                fmt, lossless, lv["slide_level"])
            seed = f"{policy['quickhash'] or name}-{lv['level']}"
            for col, row in sample_addresses(lv["cols"], lv["rows"], self.sample, seed):
                result = TileResult(f"{base}/{lv['level']}/{col}_{row}."
                                    f"{policy['declared_format']}", lv["level"], col, row, 0)
                if self.query_format:
                    result.url += f"?format={self.query_format}"
                level.tiles.append(result)
            report.levels.append(level)
        tiles = [(t, lv.lossless) for lv in report.levels for t in lv.tiles]
        checked = 0

        async def check(result: TileResult, lossless: bool) -> None:
            nonlocal checked
            await self._check_tile(reference, result, lossless)
            checked += 1
            if self.progress is not None:
                self.progress(name, checked, len(tiles))

        if self.progress is not None:
            self.progress(name, 0, len(tiles))
        async with anyio.create_task_group() as tg:
            for result, lossless in tiles:
                tg.start_soon(check, result, lossless)
        return report

    def _check_identity(self, name: str, report: SlideReport, reference: ReferenceSlide,
                        policy: dict[str, Any]) -> None:
        """The file here must be the server's slide: same SHA-256 when the server hashed its
        file whole (``Integrity.ContentSha256``), else same quickhash (or, for formats without
        one, same file size); and same DZI pyramid size. Blocking (hashing). When the server's
        ``Privacy`` settings withhold its fingerprints (no quickhash, an ``opaque:`` identity),
        only the pyramid size is compared, and the report says so.

        Raises:
            VerifyError: they differ (one line naming both sides).
        """
        differences = []
        withheld = policy["identity"].startswith(OPAQUE_IDENTITY_PREFIX)
        if policy.get("sha256"):  # the server hashed its file whole: the strongest check
            report.sha256 = file_sha256(reference.path)
            report.identity_check = "SHA-256 of the whole file"
            if report.sha256 != policy["sha256"]:
                differences.append(f"SHA-256 {report.sha256} here, {policy['sha256']} on the "
                                   "server")
        elif policy["quickhash"] or (reference.quickhash and not withheld):
            report.identity_check = "openslide.quickhash-1"
            if policy["quickhash"] != reference.quickhash:
                differences.append(f"quickhash {reference.quickhash} here, "
                                   f"{policy['quickhash']} on the server")
        elif withheld:
            report.identity_check = ("none: the server's Privacy settings withhold its file "
                                     "fingerprints (DZI pyramid size only)")
        else:
            fields = dict(part.split("=", 1) for part in policy["identity"].split(";")
                          if "=" in part)
            report.identity_check = "file size (no quickhash for this format)"
            size = str(reference.path.stat().st_size)
            if fields.get("size") != size:
                differences.append(f"{size} bytes here, {fields.get('size')} on the server")
        top = max(policy["levels"], key=lambda lv: lv["level"], default=None)
        here = reference.generator.level_dimensions[-1]
        there = (top["width"], top["height"]) if top else None
        if tuple(here) != there or reference.generator.level_count != policy["level_count"]:
            differences.append(f"{here[0]}x{here[1]} px in {reference.generator.level_count} DZI "
                               f"levels here, {there[0] if there else 0}x"
                               f"{there[1] if there else 0} px in {policy['level_count']} on "
                               "the server")
        if differences:
            raise VerifyError(f"slide {name!r}: {reference.path} here is not the slide the "
                              f"server serves ({'; '.join(differences)})")

    async def _check_dzi(self, report: SlideReport, reference: ReferenceSlide, name: str,
                         declared: str) -> str | None:
        """Compare the DZI with ``get_dzi``; return the tile base path (``.../{name}_files``)."""
        info = await self.client.get(f"/api/slides/{name}")
        if info.status_code != 200:
            report.problems.append(f"/api/slides/{name}: HTTP {info.status_code}")
            return None
        dzi_url: str = info.json()["dzi_url"]
        dzi = await self.client.get(dzi_url)
        if dzi.status_code != 200:
            report.problems.append(f"{dzi_url}: HTTP {dzi.status_code} {dzi.text[:300]}")
            return None
        if dzi.text != reference.generator.get_dzi(declared):
            report.problems.append(f"{dzi_url} differs from DeepZoomGenerator.get_dzi: "
                                   "the server's geometry is not the reference's")
        return dzi_url.removesuffix(".dzi") + "_files"

    def _requested(self, policy: dict[str, Any], lv: dict[str, Any]) -> tuple[str, bool]:
        """The format a level's tiles come in and whether they must be bit-exact, given
        ``--format``: an override the server honours (``AllowFormatOverride``, and not a lossy
        format on a level ``EnforceLossless`` keeps lossless) makes PNG exact, WebP exact on
        lossless levels, JPEG and AVIF lossy; a converting colour mode is never exact."""
        fmt = (self.query_format or "").lower().replace("jpg", "jpeg")
        if not fmt or not policy["allow_format_override"] or fmt == lv["format"]:
            return lv["format"], lv["lossless"]
        if policy["enforce_lossless"] and lv["lossless"] and fmt in ("jpeg", "avif"):
            return lv["format"], True
        untouched = lv["color_transform"] == "none"
        return fmt, untouched and (fmt == "png" or (fmt == "webp" and lv["lossless"]))

    def _wanted_levels(self, level_count: int) -> range:
        if self.levels is None:
            return range(level_count)
        first, last = self.levels
        last = level_count - 1 if last is None else min(last, level_count - 1)
        return range(first, last + 1)

    async def _check_tile(self, reference: ReferenceSlide, result: TileResult,
                          level_lossless: bool) -> None:
        async with self._limit:
            try:
                response = await self.client.get(result.url)
            except httpx.HTTPError as exc:
                result.problem = f"request failed: {exc}"
                return
            result.status = response.status_code
            result.format = response.headers.get("x-tile-format")
            if response.status_code != 200:
                result.problem = f"HTTP {response.status_code}: {response.text[:300]}"
                return
            expected = await anyio.to_thread.run_sync(
                reference.expected, result.level, result.col, result.row)
            stored = None
            if response.headers.get("x-tile-source") == "original":
                stored = await anyio.to_thread.run_sync(
                    reference.stored_tile, result.level, result.col, result.row)
            await anyio.to_thread.run_sync(compare, result, response.content, response.headers,
                                           expected, level_lossless, self.min_psnr, stored,
                                           reference.profile)


@contextlib.asynccontextmanager
async def http_client(url: str | None, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the server at ``url``, or of the app built here from ``settings``
    (its lifespan run: start-up checks, slide registry, audit log)."""
    if url:
        async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=120) as client:
            yield client
        return
    from app.server.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process",
                                     timeout=120) as client:
            yield client


async def run_verify(settings: Settings, names: list[str], url: str | None = None,
                     levels: str | None = None, sample: int = 16, min_psnr: float = 0.0,
                     query_format: str | None = None,
                     progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Verify slides and return the JSON report (``passed`` says whether all passed).

    Args:
        settings: this machine's settings (slide files; and the app's, in-process).
        names: slide names; empty for every slide the server lists.
        url: the server's base URL; None verifies the app built in this process.
        levels: ``--levels`` text; sample: tiles per level (0: all); min_psnr: dB.
        query_format: ``?format=`` for every tile (None: the policy's choice).
        progress: called after each tile (see :data:`ProgressCallback`).

    Raises:
        VerifyError: cannot run (bad options, unknown slide, server unreachable, a slide file
            here that is not the server's).
    """
    level_range = parse_levels(levels)
    if sample < 0:
        raise VerifyError("--sample must be 0 (every tile) or more")
    started = time.time()
    t0 = time.perf_counter()
    async with http_client(url, settings) as client:
        verifier = Verifier(client, settings, level_range, sample, min_psnr, query_format,
                            progress)
        version = (await verifier.get_json("/api/version"))["version"]
        names = names or await verifier.slide_names()
        reports = [await verifier.verify(name) for name in names]
    return {
        "tool": "tileserver verify",
        "verifier_version": __version__,
        "server": {"url": url or "in-process", "version": version},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.perf_counter() - t0, 2),
        "reference": {"function": "openslide.deepzoom.DeepZoomGenerator.get_tile",
                      "openslide_python": openslide.__version__,
                      "openslide": openslide.__library_version__},
        "options": {"levels": levels, "sample": sample, "min_psnr": min_psnr,
                    "format": query_format},
        "passed": all(r.passed for r in reports),
        "slides": [r.to_json() for r in reports],
    }


def print_summary(report: dict[str, Any], file: TextIO | None = None) -> None:
    """The human summary of a report (rich tables; offending tiles named)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=140)
    server = report["server"]
    console.print(f"[bold]tileserver verify[/] {server['url']} (server {server['version']}) "
                  f"against {report['reference']['function']} "
                  f"(openslide {report['reference']['openslide']})")
    for slide in report["slides"]:
        s = slide["settings"]
        verdict = "[green]PASS[/]" if slide["passed"] else "[bold red]FAIL[/]"
        title = (f"{verdict} {slide['name']}  ({slide['file']}, quickhash "
                 f"{slide['quickhash'] or '-'})")
        if s:
            title += (f"\ntile_size {s['tile_size']}, overlap {s['overlap']}, limit_bounds "
                      f"{s['limit_bounds']}, DZI {s['declared_format']}")
        table = Table(title=title, title_justify="left")
        for column in ("level", "size px", "tiles", "format", "checked", "result"):
            table.add_column(column, justify="left" if column in ("format", "result")
                             else "right")
        for lv in slide["levels"]:
            if lv["failed"]:
                result = f"[bold red]{lv['failed']} failed[/]"
            elif lv["lossless"]:
                result = f"[green]bit-exact {lv['exact']}/{lv['tiles_checked']}[/]"
            elif lv["psnr_min"] is None:
                result = f"exact {lv['exact']}/{lv['tiles_checked']}"
            else:
                result = (f"PSNR min {lv['psnr_min']:.1f} / mean {lv['psnr_mean']:.1f} dB, "
                          f"max error {lv['max_error']}")
            fmt = f"{lv['format']} ({'lossless' if lv['lossless'] else 'lossy'})"
            table.add_row(str(lv["level"]), f"{lv['width']}x{lv['height']}", str(lv["tiles"]),
                          fmt, str(lv["tiles_checked"]), result)
        console.print(table)
        for problem in slide["problems"]:
            console.print(f"[bold red]  {slide['name']}: {problem}[/]")
        for lv in slide["levels"]:
            for tile in lv["failures"]:
                console.print(f"[bold red]  {tile['url']}: {tile['problem']}[/]")
    checked = sum(lv["tiles_checked"] for s in report["slides"] for lv in s["levels"])
    failed = sum(lv["failed"] for s in report["slides"] for lv in s["levels"])
    verdict = "[green]PASSED[/]" if report["passed"] else "[bold red]FAILED[/]"
    console.print(f"{verdict}: {len(report['slides'])} slide(s), {checked} tile(s) checked, "
                  f"{failed} failed, in {report['duration_s']} s")


def write_json(report: dict[str, Any], path: str) -> None:
    """Write the report as JSON (``-`` for stdout); non-finite PSNRs become null."""
    text = json.dumps(_finite(report), indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
