"""Synthetic Aperio-style SVS slides for tests and the demo.

The files mimic what an Aperio scanner writes, so that OpenSlide opens them with
its ``aperio`` driver and the raw tiles look like real ones:

* IFD 0: level 0, tiled (240x240 by default), JPEG (Compression=7). Every tile is
  an *abbreviated* JPEG stream (SOI, SOF, SOS + scan, EOI; no DQT/DHT, no JFIF
  APP0) and the shared quantisation and Huffman tables live once in the
  JPEGTables tag (347) as SOI + DQT + DHT + EOI. ``photometric='ycbcr'`` (default)
  gives YCbCr 4:2:0 tiles and PhotometricInterpretation 6; ``'rgb'`` gives
  JPEG of untransformed RGB components, with an Adobe APP14 segment (transform
  0) right after SOI of every tile, and PhotometricInterpretation 2.
* IFD 1: thumbnail, stripped JPEG, about 1024 px wide.
* IFD 2...: further pyramid levels, each 4x smaller than the previous one, tiled
  like level 0, until the larger side is at most 2048 px.
* then ``label`` (stripped, LZW, NewSubfileType 1) and ``macro`` (stripped,
  JPEG, NewSubfileType 9); their descriptions name them on the second line.

The pixels are H&E-looking tissue on near-white glass: a few large irregular
tissue blobs (everything within min(300 px, 15% of the shorter side) of the
slide centre is tissue; a margin of 6% of the width/height along every border is
always glass), textured with a
real 240x240 H&E tile from ``wsidicom-data``: randomly flipped/rotated copies
quilted with cross-faded seams into a periodic atlas, sampled through a smooth
random warp so that it does not look like a grid. Everything is deterministic
given ``seed``; :func:`render_region` returns the exact level-0 pixels that get
JPEG-encoded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import numpy.typing as npt
import tifffile
from PIL import Image, ImageDraw, ImageFont

from app.core.lossless import he_tile_path

log = logging.getLogger(__name__)

DEMO_SIZE = (24000, 18000)
"""Level-0 size (width, height) of the slide written by :func:`ensure_demo_slide`."""

_GLASS = np.array([242.0, 242.0, 240.0], np.float32)  # empty glass, RGB
_WASH = (14.0, 40.0, 20.0)  # faint eosin absorbance added everywhere in tissue
_GRID = 16  # spacing in level-0 px of the coarse grid the smooth fields live on
_OVERSCAN = 2048  # render() may reach this many px past the right/bottom edge
_BLOCK = 240  # size of the H&E source tile
_FEATHER = 24  # half-width of the cross-fade band around texture block seams
_PERIOD = 16 * _BLOCK  # the H&E texture atlas repeats every _PERIOD px
_MAX_LEVEL_SIDE = 2048  # stop adding pyramid levels once the larger side is <= this
_THUMB_WIDTH = 1024
_SOFTWARE = "Aperio Image Library v12.0.15 "
_WORKERS = 2

FloatArray = npt.NDArray[np.floating[Any]]
"""A float32 or float64 array (the pixel model's fields)."""


# ----------------------------------------------------------------------------- pixels


def _he_texture() -> np.ndarray:
    """Return the H&E texture atlas, (_PERIOD, _PERIOD) uint32, periodic.

    A 16x16 torus of 240 px blocks, each the real H&E tile under a random flip /
    rot90, cross-faded over a 48 px band around every seam (each block is
    mirror-extended past its edge, so there are no hard edges). Bytes of each
    uint32: R, G, B, sensor noise 0..4. Fixed (independent of the slide seed).
    """
    with Image.open(he_tile_path()) as src:
        image = src.convert("RGB")
    tile = np.asarray(image.resize((_BLOCK, _BLOCK)) if image.size != (_BLOCK,) * 2 else image)
    rng = np.random.default_rng(12345)
    variants = [np.rot90(tile[:, ::-1] if k & 4 else tile, k & 3) for k in range(8)]

    def index(img: np.ndarray) -> int:
        return next(i for i, v in enumerate(variants) if np.array_equal(v, img))

    # a neighbour that equals or mirrors a block across the seam looks artificial
    clash_x = [{i, index(v[:, ::-1])} for i, v in enumerate(variants)]
    clash_y = [{i, index(v[::-1])} for i, v in enumerate(variants)]
    n = _PERIOD // _BLOCK
    choice = np.zeros((n, n), int)
    for by in range(n):
        for bx in range(n):
            bad = clash_x[choice[by, bx - 1]] if bx else set()
            bad |= clash_y[choice[by - 1, bx]] if by else set()
            if bx == n - 1:
                bad |= clash_x[choice[by, 0]]
            if by == n - 1:
                bad |= clash_y[choice[0, bx]]
            ok = [k for k in range(8) if k not in bad] or list(range(8))
            choice[by, bx] = ok[int(rng.integers(len(ok)))]

    f = _FEATHER
    ramp = _smoothstep((np.arange(2 * f, dtype=np.float32) + 0.5) / (2 * f))
    win = np.concatenate([ramp, np.ones(_BLOCK - 2 * f, np.float32), ramp[::-1]])
    weight = (win[:, None] * win[None, :])[..., None]
    # each variant mirror-extended by f px and weighted: neighbours sum to 1
    weighted = [np.pad(v, ((f, f), (f, f), (0, 0)), mode="symmetric") * weight for v in variants]
    acc = np.zeros((_PERIOD + 2 * f, _PERIOD + 2 * f, 3), np.float32)
    for by in range(n):
        for bx in range(n):
            y, x = by * _BLOCK, bx * _BLOCK
            acc[y : y + _BLOCK + 2 * f, x : x + _BLOCK + 2 * f] += weighted[choice[by, bx]]
    # fold the overhang onto the opposite side (the atlas is a torus)
    acc[_PERIOD : _PERIOD + f] += acc[:f]
    acc[f : 2 * f] += acc[_PERIOD + f :]
    acc[:, _PERIOD : _PERIOD + f] += acc[:, :f]
    acc[:, f : 2 * f] += acc[:, _PERIOD + f :]
    acc = acc[f : _PERIOD + f, f : _PERIOD + f]
    noise = rng.integers(0, 5, acc.shape[:2], np.uint8)
    rgb = np.add(acc, 0.5, out=acc).astype(np.uint8)  # a convex mix: no clipping needed
    rgba = np.dstack([rgb, noise])
    return np.ascontiguousarray(rgba).view(np.uint32)[..., 0]


def _noise_field(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[float, float]
) -> FloatArray:
    """Smooth random field of `shape` (rows, cols) with ~`cells` (y, x) features.

    Zero mean, unit standard deviation, float32.
    """
    cy, cx = max(1, round(cells[0])), max(1, round(cells[1]))
    coarse = rng.standard_normal((cy + 3, cx + 3)).astype(np.float32)
    img = Image.fromarray(coarse, "F").resize(
        (shape[1], shape[0]), Image.Resampling.BICUBIC, box=(1, 1, cx + 1, cy + 1)
    )
    field = np.asarray(img, np.float32)
    normalised: FloatArray = (field - field.mean()) / (field.std() + 1e-6)
    return normalised


def _smoothstep(x: FloatArray) -> FloatArray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class _Synth:
    """Level-0 pixel model of one synthetic slide (deterministic from the seed)."""

    _texture: np.ndarray | None = None
    _texture_lock = threading.Lock()

    def __init__(self, width: int, height: int, seed: int) -> None:
        self.width, self.height = width, height
        with _Synth._texture_lock:
            if _Synth._texture is None:
                _Synth._texture = _he_texture()
        self.texture = _Synth._texture
        rng = np.random.default_rng(seed)
        # coarse grid: node j sits at level-0 pixel centre (j + 0.5) * _GRID
        # (covering _OVERSCAN px past the right and bottom edges for padded tiles)
        gh = -(-(height + _OVERSCAN) // _GRID) + 2
        gw = -(-(width + _OVERSCAN) // _GRID) + 2
        v = (np.arange(gh, dtype=np.float32)[:, None] + 0.5) * _GRID / height
        u = (np.arange(gw, dtype=np.float32)[None, :] + 0.5) * _GRID / width

        # tissue: a few elliptical blobs (the first one on the centre), roughened
        # by low-frequency noise, kept away from the borders
        aspect = width / height
        blobs = np.zeros((gh, gw), np.float32)
        for i in range(int(rng.integers(3, 6))):
            if i == 0:
                cu, cv, r = 0.5, 0.5, 0.22
            else:
                cu, cv, r = rng.uniform(0.22, 0.78), rng.uniform(0.25, 0.75), 0.10
                r *= rng.uniform(0.8, 1.6)
            theta = rng.uniform(0, np.pi)
            elong = rng.uniform(1.0, 1.8)
            du, dv = (u - cu) * aspect, v - cv
            a = du * np.cos(theta) + dv * np.sin(theta)
            b = -du * np.sin(theta) + dv * np.cos(theta)
            d2 = ((a / elong) ** 2 + (b * elong) ** 2) / r**2
            blobs = np.maximum(blobs, np.exp(-d2).astype(np.float32))
        rough = 0.6 * _noise_field(rng, (gh, gw), (5, 5 * aspect))
        rough += 0.4 * _noise_field(rng, (gh, gw), (14, 14 * aspect))
        # a round bump keeps the slide centre tissue (field > 0.5 within 0.75 sigma)
        sigma = min(400.0, 0.2 * min(width, height))
        d2 = ((u - 0.5) * width) ** 2 + ((v - 0.5) * height) ** 2
        field = np.maximum(blobs + 0.16 * rough, 0.9 * np.exp(-d2 / sigma**2))
        edge = np.minimum(np.minimum(u, 1 - u), np.minimum(v, 1 - v))
        field *= _smoothstep((edge - 0.06) / 0.08)  # glass within 6% of a border
        alpha = _smoothstep((field - 0.42) / 0.03)

        def noise(px: float) -> np.ndarray:  # features of ~px level-0 pixels
            return _noise_field(rng, (gh, gw), (height / px + 1, width / px + 1))

        # stain density (cellularity) with lobules and a few lumens (holes)
        dens = np.clip(0.72 + 0.12 * noise(2400) + 0.1 * noise(600), 0.3, 1.0)
        holes = _smoothstep((noise(900) + 0.5 * noise(300) - 1.9) / 0.3)
        holes *= 1.0 - np.exp(-d2 / (1.5 * sigma) ** 2)  # none near the centre
        k = alpha * dens * (1.0 - 0.9 * holes)
        # hue: > 0 more haematoxylin (purple), < 0 more eosin (pink)
        hue = np.clip(0.6 * noise(1500) + 0.4 * noise(6000), -1.0, 1.0)
        # k_c: fraction of the texture's absorbance applied to channel c
        self.fields = [
            Image.fromarray(np.ascontiguousarray(k * base * (1 + s * hue), np.float32), "F")
            for base, s in ((0.7, 0.25), (0.95, 0.0), (0.8, -0.05))
        ]
        # warp of the texture coordinates: ~90 px displacement, ~1.5 mm features
        for _ in range(2):
            disp = 70 * noise(3000) + 35 * noise(900) + 15 * noise(400)
            self.fields.append(Image.fromarray(disp.astype(np.float32), "F"))

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Return level-0 pixels of the box (x, y, w, h) as (h, w, 3) uint8 RGB.

        The box may extend up to 2048 px past the right and bottom edges (glass
        there; used for padding edge tiles), not past the top or left edge.
        """
        box = (x / _GRID, y / _GRID, (x + w) / _GRID, (y + h) / _GRID)
        kr, kg, kb, dx, dy = (
            np.asarray(f.resize((w, h), Image.Resampling.BILINEAR, box=box)) for f in self.fields
        )
        xs = np.arange(x, x + w, dtype=np.float32)[None, :]
        ys = np.arange(y, y + h, dtype=np.float32)[:, None]
        sx = np.remainder((xs + dx).astype(np.int32), _PERIOD)
        sy = np.remainder((ys + dy).astype(np.int32), _PERIOD)
        px = self.texture.ravel().take(sy * _PERIOD + sx).view(np.uint8).reshape(h, w, 4)
        out = np.empty((h, w, 3), np.uint8)
        noise = px[..., 3].astype(np.float32) - 2.0
        for c, kc in enumerate((kr, kg, kb)):
            absorb = 255.0 - px[..., c].astype(np.float32)
            val = _GLASS[c] + noise - kc * (absorb + _WASH[c]) * (_GLASS[c] / 255.0)
            np.clip(val, 0, 255, out=val)
            out[..., c] = val
        return out


def render_region(
    width: int, height: int, box: tuple[int, int, int, int], *, seed: int = 0
) -> np.ndarray:
    """Render level-0 pixels exactly as :func:`write_aperio_svs` encodes them.

    Args:
        width: Level-0 width of the synthetic slide in pixels.
        height: Level-0 height of the synthetic slide in pixels.
        box: ``(x, y, w, h)`` region in level-0 pixel coordinates.
        seed: The slide's random seed.

    Returns:
        ``(h, w, 3)`` uint8 RGB array (before JPEG compression).
    """
    x, y, w, h = box
    return _Synth(width, height, seed).render(x, y, w, h)


# ------------------------------------------------------------------------------ JPEG


_DQT, _DHT, _APP0, _APP14, _SOF0, _SOS = 0xDB, 0xC4, 0xE0, 0xEE, 0xC0, 0xDA


def _split_jpeg(jpeg: bytes) -> tuple[bytes, bytes]:
    """Split a baseline JPEG into (tables, abbreviated stream).

    ``tables`` is SOI + all DQT and DHT segments + EOI (the JPEGTables tag value);
    the stream is the rest without the JFIF APP0 segment (libtiff does not write
    one): SOI, [APP14], SOF, SOS + entropy-coded data, EOI.
    """
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream")
    tables, rest = [b"\xff\xd8"], [b"\xff\xd8"]
    pos = 2
    while True:
        if jpeg[pos] != 0xFF:
            raise ValueError(f"bad JPEG marker at {pos}")
        marker = jpeg[pos + 1]
        if marker == _SOS:
            rest.append(jpeg[pos:])
            break
        end = pos + 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        if marker in (_DQT, _DHT):
            tables.append(jpeg[pos:end])
        elif marker != _APP0:
            rest.append(jpeg[pos:end])
        pos = end
    tables.append(b"\xff\xd9")
    return b"".join(tables), b"".join(rest)


def _bare_rgb(stream: bytes) -> bytes:
    """An abbreviated RGB JPEG stream without its Adobe APP14 segment and with component IDs
    0, 1, 2 instead of libjpeg's 'R', 'G', 'B'.

    Such a stream carries no sign that its components are RGB: only the TIFF's
    PhotometricInterpretation says so, and a decoder that is not told guesses YCbCr (the
    IJG rule for 3 components without JFIF/Adobe markers and IDs other than R, G, B), which
    shows the tile pink. Some scanners write their RGB tiles so.
    """
    out = bytearray(b"\xff\xd8")
    pos = 2
    while True:
        marker = stream[pos + 1]
        end = pos + 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
        segment = bytearray(stream[pos:end])
        if marker == _SOF0:  # Ci at 10, 13, 16
            for i in range(3):
                segment[10 + 3 * i] = i
        elif marker == _SOS:  # Cs at 5, 7, 9
            for i in range(3):
                segment[5 + 2 * i] = i
            out += segment + stream[end:]
            return bytes(out)
        if marker != _APP14:
            out += segment
        pos = end


class _TileEncoder:
    """JPEG-encodes tiles with one fixed set of tables (standard Huffman)."""

    def __init__(self, quality: int, photometric: str, tile_size: int,
                 app14: bool = True) -> None:
        self.quality = quality
        self.bare = photometric == "rgb" and not app14
        if photometric == "ycbcr":
            self.kwargs: dict[str, Any] = {"outcolorspace": "YCBCR", "subsampling": (2, 2)}
        else:  # RGB components, no colour transform, Adobe APP14 transform=0
            self.kwargs = {"outcolorspace": "RGB", "subsampling": (1, 1)}
        blank = np.zeros((tile_size, tile_size, 3), np.uint8)
        self.tables = _split_jpeg(self.encode_full(blank))[0]

    def encode_full(self, rgb: np.ndarray) -> bytes:
        """Return a complete (interchange) JPEG of `rgb`."""
        data = imagecodecs.jpeg8_encode(
            np.ascontiguousarray(rgb),
            level=self.quality,
            colorspace="RGB",
            optimize=False,  # standard Huffman tables: identical for every tile
            **self.kwargs,
        )
        assert isinstance(data, bytes)  # a bytearray only when given one as ``out``
        return data

    def encode_tile(self, rgb: np.ndarray) -> bytes:
        """Return the abbreviated JPEG stream of one tile (tables checked)."""
        tables, stream = _split_jpeg(self.encode_full(rgb))
        if tables != self.tables:
            raise RuntimeError("JPEG tables differ between tiles")
        return _bare_rgb(stream) if self.bare else stream


# -------------------------------------------------------------------------- helpers


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int
) -> Iterator[Any]:
    """Like ``pool.map`` but with at most `ahead` jobs submitted ahead (memory)."""
    queue: deque[Future[Any]] = deque()
    try:
        for item in items:
            queue.append(pool.submit(fn, item))
            if len(queue) >= ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:  # consumer failed or stopped early: drop the queued work
        for future in queue:
            future.cancel()


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level: /4 (floored) until the larger side <= 2048."""
    sizes = [(width, height)]
    while max(sizes[-1]) > _MAX_LEVEL_SIDE and min(sizes[-1]) >= 4:
        sizes.append((sizes[-1][0] // 4, sizes[-1][1] // 4))
    return sizes


def _reduce4(rgb: np.ndarray) -> np.ndarray:
    """4x box-downsample (h, w, 3) uint8 to (h // 4, w // 4, 3)."""
    h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:h, :w])).reduce(4))


def _tiles_of(
    img: np.ndarray, ts: int, enc: _TileEncoder, pool: ThreadPoolExecutor
) -> Iterator[bytes]:
    """Encoded tiles of an in-memory image, row-major, edge tiles edge-padded."""
    h, w = img.shape[:2]
    ph, pw = -(-h // ts) * ts, -(-w // ts) * ts
    padded = np.pad(img, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")

    def row(ty: int) -> list[bytes]:
        band = padded[ty : ty + ts]
        return [enc.encode_tile(band[:, tx : tx + ts]) for tx in range(0, pw, ts)]

    for tiles in _ordered_map(pool, row, range(0, ph, ts), ahead=4):
        yield from tiles


def _level0_tiles(
    synth: _Synth, ts: int, enc: _TileEncoder, pool: ThreadPoolExecutor, reduced: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[bytes]:
    """Render and encode level 0 band by band; fill `reduced` (4x smaller) on the way;
    ``progress(bands done, bands + 1)`` after each band."""
    w, h = synth.width, synth.height
    pw = -(-w // ts) * ts
    chunk = ts * max(1, 2048 // ts)  # render ~2k px wide pieces (cache friendly)

    def band(ty: int) -> list[bytes]:
        tiles: list[bytes] = []
        rows = min(ts, h - ty)
        for cx in range(0, pw, chunk):
            cw = min(chunk, pw - cx)
            rgb = synth.render(cx, ty, cw, ts)
            tiles += [enc.encode_tile(rgb[:, x : x + ts]) for x in range(0, cw, ts)]
            valid = rgb[: rows // 4 * 4, : max(0, min(cw, w - cx)) // 4 * 4]
            if valid.size:
                small = _reduce4(valid)
                reduced[ty // 4 : ty // 4 + small.shape[0], cx // 4 : cx // 4 + small.shape[1]] = (
                    small
                )
        return tiles

    bands = range(0, h, ts)
    for done, tiles in enumerate(_ordered_map(pool, band, bands, ahead=_WORKERS + 1), 1):
        yield from tiles
        if progress is not None:
            progress(done, len(bands) + 1)


def _label_image(seed: int, app_mag: int) -> np.ndarray:
    """A slide-label photo: paper, a few text lines, a 2-D barcode-like matrix."""
    rng = np.random.default_rng(seed + 1)
    img = Image.new("RGB", (400, 460), (236, 234, 228))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=34)
    for i, text in enumerate(("DEMO SLIDE", f"S-{seed:05d}", f"H&E  {app_mag}x")):
        draw.text((24, 24 + 46 * i), text, fill=(30, 30, 40), font=font)
    cells, cell, x0, y0 = 18, 12, 92, 200
    bits = rng.random((cells, cells)) < 0.5
    bits[:, 0] = bits[-1, :] = True  # finder pattern, as on a DataMatrix
    bits[0, ::2] = bits[1::2, -1] = True
    for r, c in zip(*np.nonzero(bits), strict=True):
        x, y = x0 + c * cell, y0 + r * cell
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(20, 20, 20))
    return np.asarray(img)


def _macro_image(thumb: np.ndarray, label: np.ndarray) -> np.ndarray:
    """A macro-camera photo of the whole slide: label on the left, tissue on the right."""
    mw, mh = 1280, 431
    img = Image.new("RGB", (mw, mh), (214, 216, 214))
    lab = Image.fromarray(label).rotate(90, expand=True)
    lab = lab.resize((round(lab.width * mh / lab.height), mh), Image.Resampling.LANCZOS)
    img.paste(lab, (0, 0))
    area_w, area_h = mw - lab.width - 40, mh - 40
    t = Image.fromarray(thumb)
    scale = min(area_w / t.width, area_h / t.height)
    t = t.resize((max(1, round(t.width * scale)), max(1, round(t.height * scale))))
    # multiply the tissue onto the glass colour so the glass shows no frame
    region = (lab.width + 20 + (area_w - t.width) // 2, 20 + (area_h - t.height) // 2)
    glass = np.asarray(img.crop((*region, region[0] + t.width, region[1] + t.height)), np.float32)
    mixed = glass * np.asarray(t, np.float32) / _GLASS
    img.paste(Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8)), region)
    return np.asarray(img)


# ------------------------------------------------------------------------------ API


def write_aperio_svs(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    tile_size: int = 240,
    quality: int = 90,
    photometric: str = "ycbcr",
    app14: bool = True,
    mpp: float = 0.499,
    app_mag: int = 20,
    seed: int = 0,
    bigtiff: bool | None = None,
    icc_profile: bytes | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic, Aperio-style SVS slide.

    IFDs written, in order: level 0 (tiled JPEG, abbreviated tiles + JPEGTables),
    thumbnail (stripped JPEG, at most 1024 px wide), levels 1..n (each 4x smaller
    than the previous, ``floor`` sizes, tiled like level 0, until the larger side
    is <= 2048 px), label (stripped LZW, 400x460) and macro (stripped JPEG,
    1280x431). The file is written to ``path.with_suffix('.tmp-<pid>-<thread>')``
    and then atomically renamed onto `path`.

    Args:
        path: Destination file (conventionally ``*.svs``).
        width: Level-0 width in pixels.
        height: Level-0 height in pixels.
        tile_size: Tile width and height in pixels; a multiple of 16.
        quality: JPEG quality (1-100) of all JPEG-compressed images.
        photometric: ``'ycbcr'``: YCbCr JPEG with 2x2 chroma subsampling
            (PhotometricInterpretation 6, YCbCrSubSampling 2,2); ``'rgb'``: JPEG
            of RGB components without colour transform, marked with an Adobe
            APP14 segment (transform 0), PhotometricInterpretation 2.
        app14: With ``photometric='rgb'``: False writes the tiles bare, without the APP14
            segment and with component IDs 0, 1, 2, so that only the TIFF tag says they are
            RGB (decoders that guess show them pink; see :func:`_bare_rgb`).
        mpp: Microns per pixel at level 0 (``aperio.MPP``).
        app_mag: Objective magnification (``aperio.AppMag``).
        seed: Random seed; the same arguments give byte-identical files.
        bigtiff: Write BigTIFF; ``None`` chooses BigTIFF only when the
            uncompressed level 0 exceeds 4 GB.
        icc_profile: An ICC profile for level 0's InterColorProfile tag (34675),
            where Aperio scanners store theirs (OpenSlide reports it as the
            slide's ``color_profile``); None writes none.
        progress: called with ``(steps done, steps)`` while the file is written: one step
            per row of level-0 tiles (most of the time), and a last one for everything else.

    Returns:
        `path` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: On invalid sizes, tile size, quality or photometric.
    """
    return _write_slide(path, width, height, tile_size=tile_size, quality=quality,
                        photometric=photometric, app14=app14, mpp=mpp, app_mag=app_mag,
                        seed=seed, bigtiff=bigtiff, aperio=True, icc_profile=icc_profile,
                        progress=progress)


def write_generic_tiff(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    tile_size: int = 256,
    quality: int = 90,
    photometric: str = "ycbcr",
    app14: bool = True,
    seed: int = 0,
) -> Path:
    """Write a synthetic generic tiled TIFF pyramid (OpenSlide vendor ``generic-tiff``).

    The same pixels and JPEG tiles as :func:`write_aperio_svs` (abbreviated streams sharing
    JPEGTables), but no Aperio ImageDescription, no thumbnail, label or macro: only the
    tiled levels, level 0 then each 4x smaller, as libvips ``tiffsave --pyramid`` lays them.
    Arguments as for :func:`write_aperio_svs`.
    """
    return _write_slide(path, width, height, tile_size=tile_size, quality=quality,
                        photometric=photometric, app14=app14, mpp=0.25, app_mag=40,
                        seed=seed, bigtiff=None, aperio=False, icc_profile=None)


def _write_slide(
    path: str | os.PathLike[str], width: int, height: int, *, tile_size: int, quality: int,
    photometric: str, app14: bool, mpp: float, app_mag: int, seed: int,
    bigtiff: bool | None, aperio: bool, icc_profile: bytes | None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """:func:`write_aperio_svs` (``aperio``) or :func:`write_generic_tiff`."""
    path = Path(path)
    if width < 1 or height < 1:
        raise ValueError(f"invalid slide size {width}x{height}")
    if tile_size < 16 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if photometric not in ("ycbcr", "rgb"):
        raise ValueError(f"photometric must be 'ycbcr' or 'rgb', got {photometric!r}")
    if bigtiff is None:
        bigtiff = width * height * 3 > 2**32 - 2**25

    enc = _TileEncoder(quality, photometric, tile_size, app14)
    synth = _Synth(width, height, seed)
    sizes = _level_sizes(width, height)

    head = f"{_SOFTWARE}\r\n{width}x{height} [0,0 {width}x{height}] ({tile_size}x{tile_size})"
    jpeg_kind = f"JPEG/RGB Q={quality}"
    mpp_text = f"{mpp:.4f}" if round(mpp, 4) == mpp else repr(float(mpp))
    props = (
        f"|AppMag = {app_mag}|StripeWidth = 2040|ScanScope ID = SS0000"
        f"|Filename = demo-{seed}|Date = 01/02/24|Time = 10:00:00|Time Zone = GMT+00:00"
        f"|User = 00000000-0000-0000-0000-000000000000|MPP = {mpp_text}"
        f"|Left = 20.000000|Top = 20.000000|LineCameraSkew = 0.000000"
        f"|LineAreaXOffset = 0.000000|LineAreaYOffset = 0.000000"
        f"|Focus Offset = 0.000000|ImageID = {seed}|OriginalWidth = {width}"
        f"|OriginalHeight = {height}|Filtered = 5|ICC Profile = ScanScope v1"
    )
    common: dict[str, Any] = {"software": False, "metadata": None}
    if photometric == "ycbcr":
        jpeg_args: dict[str, Any] = {"photometric": "rgb", "subsampling": (2, 2)}
    else:
        jpeg_args = {
            "photometric": "rgb",
            "subsampling": (1, 1),
            "compressionargs": {"outcolorspace": "RGB"},
        }

    def tiled(data: Iterator[bytes], size: tuple[int, int], desc: str) -> dict[str, Any]:
        px_per_cm = 1e4 / mpp * size[0] / width
        return {
            "resolution": (px_per_cm, px_per_cm),
            "resolutionunit": "CENTIMETER",
            "data": data,
            "shape": (size[1], size[0], 3),
            "dtype": np.uint8,
            "tile": (tile_size, tile_size),
            "compression": "jpeg",
            "jpegtables": enc.tables,
            "description": desc if aperio else None,
            **jpeg_args,
            **common,
        }

    def stripped_jpeg(img: np.ndarray, desc: str) -> dict[str, Any]:
        args = {**jpeg_args, **common}
        args["compressionargs"] = {**args.get("compressionargs", {}), "level": quality}
        return {
            "data": img,
            "compression": "jpeg",
            "rowsperstrip": img.shape[0],
            "description": desc,
            **args,
        }

    tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with (
            ThreadPoolExecutor(_WORKERS) as pool,
            tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif,
        ):
            level1 = np.zeros((height // 4, width // 4, 3), np.uint8)
            tiles = _level0_tiles(synth, tile_size, enc, pool, level1, progress)
            level0 = tiled(tiles, sizes[0], f"{head} {jpeg_kind}{props}")
            if icc_profile is not None:
                level0["iccprofile"] = icc_profile
            tif.write(**level0)

            levels = [level1]
            for _ in sizes[2:]:
                levels.append(_reduce4(levels[-1]))
            tw = min(_THUMB_WIDTH, width)
            th = max(1, round(height * tw / width))
            src = next((lv for lv in reversed(levels) if lv.shape[1] >= tw), None)
            if src is None:  # level 1 is narrower than the thumbnail
                small = width * height <= 2**24
                src = synth.render(0, 0, width, height) if small else level1
            thumb_img = Image.fromarray(src).resize((tw, th), Image.Resampling.LANCZOS)
            thumb = np.asarray(thumb_img)
            if aperio:
                tif.write(**stripped_jpeg(thumb, f"{head} -> {tw}x{th} {jpeg_kind}"))

            for size, img in zip(sizes[1:], levels, strict=False):
                desc = f"{head} -> {size[0]}x{size[1]} {jpeg_kind}"
                # generic TIFF: marked reduced-resolution (TiffWriter.write keywords)
                reduced: dict[str, Any] = {} if aperio else {"subfiletype": 1}
                tif.write(**tiled(_tiles_of(img, tile_size, enc, pool), size, desc), **reduced)

            if aperio:  # associated images: label (LZW), macro (JPEG)
                label = _label_image(seed, app_mag)
                lh, lw = label.shape[:2]
                tif.write(
                    label,
                    photometric="rgb",
                    compression="lzw",
                    rowsperstrip=16,
                    subfiletype=1,
                    description=f"{_SOFTWARE}\r\nlabel {lw}x{lh}",
                    **common,
                )
                macro = _macro_image(thumb, label)
                mh, mw = macro.shape[:2]
                args = stripped_jpeg(macro, f"{_SOFTWARE}\r\nmacro {mw}x{mh}")
                tif.write(subfiletype=9, **args)
        os.replace(tmp, path)
        if progress is not None:
            steps = -(-height // tile_size) + 1
            progress(steps, steps)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def ensure_demo_slide(directory: str | os.PathLike[str],
                      progress: Callable[[int, int], None] | None = None) -> Path:
    """Return ``directory/demo.svs``, generating it first if it does not exist.

    The slide is :data:`DEMO_SIZE` (24000x18000 px at 0.499 um/px, 20x), seed 0,
    YCbCr JPEG Q=90, ~65 MB; generating it takes ~15-25 s on 2 cores. Concurrent callers (threads or
    processes) may each generate it; every writer atomically replaces the file
    with identical content, so readers never see a partial file.

    Generating it logs one line before and one after (logger ``app.tools.demo``).

    Args:
        directory: Directory for the slide; created if missing.
        progress: while generating, called as :func:`write_aperio_svs` calls it.

    Returns:
        Path of the demo slide.
    """
    directory = Path(directory)
    path = directory / "demo.svs"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        log.info("writing the demo slide %s (%dx%d px; once, about half a minute)", path,
                 *DEMO_SIZE)
        started = time.monotonic()
        write_aperio_svs(path, *DEMO_SIZE, seed=0, progress=progress)
        log.info("wrote the demo slide %s in %.0f s", path, time.monotonic() - started)
    return path
