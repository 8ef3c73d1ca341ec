"""Static export: a slide's whole DZI pyramid as plain files that nginx or an object store serves.

``tileserver export SLIDE OUTDIR`` writes::

    OUTDIR/{name}.dzi            the DZI XML the server serves (DeepZoomGenerator.get_dzi)
    OUTDIR/{name}_files/{level}/{col}_{row}.{ext}
    OUTDIR/{name}.json           the slide's quickhash and identity as the server shows them
                                 (``Privacy``), per DZI level: format, lossless, tiles
    OUTDIR/{name}.html           an OpenSeadragon viewer of the export
    OUTDIR/openseadragon/        OpenSeadragon's build (from ``npm ci``), used by the page

Tiles are rendered by the pregeneration workers (:mod:`app.batch.pregenerate`) with the server's
settings and format policy, so every file holds the bytes the server would serve for that address.
Each file's extension is its real format, so a static server's ``Content-Type`` is right: with the
default policy the lossless highest level is ``.png`` while the ``.dzi`` declares ``jpeg``. The
viewer page knows the extension of every level; a generic DZI client that builds URLs from the
``.dzi`` alone needs a single-format policy (``TileFormat:LosslessLevelCount=0`` for all JPEG,
or ``TileFormat:Default=png`` with ``LosslessLevelCount=-1`` for all PNG).
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from app.assets import openseadragon_dir, template
from app.batch.pregenerate import Pregenerator, Progress, target_for
from app.cache.disk import write_atomic
from app.core.planner import TilePlanner, level_policies
from app.core.slides import SlideRegistry
from app.settings import Settings

log = logging.getLogger(__name__)


class ExportLevel(TypedDict):
    """One DZI level of an export's ``{name}.json``: its format, and its tiles in columns and
    rows."""

    level: int
    format: str
    lossless: bool
    cols: int
    rows: int


class ExportDescription(TypedDict):
    """The ``{name}.json`` document of an export: file names, the level-0 size in pixels, the
    DZI geometry, the levels (DZI level 0, 1x1 px, first), and the slide's
    ``openslide.quickhash-1`` and identity (:func:`app.core.slides.slide_identity`) as the
    server shows them to clients (:mod:`app.core.privacy`: null, and ``opaque:...``, when
    ``Privacy`` withholds them)."""

    name: str
    dzi: str
    tiles: str
    width: int
    height: int
    tile_size: int
    overlap: int
    limit_bounds: bool
    quickhash: str | None
    identity: str
    levels: list[ExportLevel]


@dataclass(frozen=True)
class Export:
    """What an export wrote: the DZI, the viewer page and the tile counts."""

    dzi: Path
    page: Path
    progress: Progress


def export_slide(settings: Settings, registry: SlideRegistry, name: str, outdir: Path,
                 levels: Sequence[int] | None = None, overwrite: bool = False,
                 workers: int | None = None, scheduler: str | None = None,
                 cancel: threading.Event | None = None,
                 on_progress: Callable[[Progress], None] | None = None) -> Export:
    """Write the static DZI export of slide ``name`` into ``outdir``. Blocking.

    Resumable like pregeneration: whole tile files already in ``outdir`` are kept unless
    ``overwrite``.

    Raises:
        SlideNotFound, SlideOpenError, SlideReadError: the slide cannot be used.
        CacheWriteError: ``outdir`` cannot be written.
        Cancelled: ``cancel`` was set.
    """
    handle = registry.open_blocking(name)
    pyramid = handle.pyramid
    planner = TilePlanner(settings)
    files = outdir / f"{name}_files"
    target = target_for(handle.entry, pyramid.level_tiles, levels, files)
    outdir.mkdir(parents=True, exist_ok=True)
    dzi = outdir / f"{name}.dzi"
    write_atomic(dzi, pyramid.dzi(planner.declared.value).encode())
    with Pregenerator(settings, workers, scheduler) as pregenerator:
        progress = pregenerator.run([target], overwrite, cancel, on_progress)
    formats = [ExportLevel(level=lv.level, format=lv.format, lossless=lv.lossless,
                           cols=lv.cols, rows=lv.rows) for lv in level_policies(planner, handle)]
    width, height = pyramid.level_dimensions[-1]
    privacy = registry.privacy
    description: ExportDescription = {
        "name": name, "dzi": dzi.name, "tiles": files.name, "width": width, "height": height,
        "tile_size": handle.pyramid.tile_size, "overlap": handle.pyramid.overlap,
        "limit_bounds": handle.pyramid.limit_bounds,
        "quickhash": privacy.quickhash(handle), "identity": privacy.identity(handle.identity),
        "levels": formats,
    }
    write_atomic(outdir / f"{name}.json", (json.dumps(description, indent=1) + "\n").encode())
    page = outdir / f"{name}.html"
    write_atomic(page, export_page(description).encode())
    osd = openseadragon_dir()
    if osd is not None:
        shutil.copytree(osd, outdir / "openseadragon", dirs_exist_ok=True)
    else:
        log.warning("OpenSeadragon not found (run `npm ci`); %s needs openseadragon/ beside it",
                    page.name)
    return Export(dzi, page, progress)


def export_page(description: ExportDescription) -> str:
    """The viewer page of an export: OpenSeadragon with a tile source that knows the file
    extension of every level (``description`` is the ``{name}.json`` document)."""
    source = {
        "width": description["width"], "height": description["height"],
        "tileSize": description["tile_size"], "tileOverlap": description["overlap"],
        "tilesUrl": f"{description['tiles']}/",
        "formats": [item["format"] for item in description["levels"]],
    }
    return (template("export.html")
            .replace("{{TITLE}}", html.escape(str(description["name"])))
            .replace("{{SOURCE_JSON}}", json.dumps(source).replace("</", "<\\/")))
