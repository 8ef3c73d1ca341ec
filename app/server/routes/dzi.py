"""DZI descriptors: ``/image.dzi``, ``/storage/{name}.dzi`` and those of associated images.

Their tiles are answered by the one tile route, :class:`app.server.tiles.TileRoute`.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.core.pyramid import ImageSource
from app.core.slides import SINGLE_SLIDE_NAME
from app.server.auth import GuardedRoute, Permission, require
from app.server.dependencies import Planner, Registry

router = APIRouter(tags=["deepzoom"], route_class=GuardedRoute)
VIEW = require(Permission.VIEW)
VIEW_SINGLE = require(Permission.VIEW, SINGLE_SLIDE_NAME)


def _dzi(source: ImageSource, planner: Planner) -> Response:
    return Response(source.pyramid.dzi(planner.declared.value), media_type="application/xml")


@router.get("/image.dzi", summary="DZI of the single slide", dependencies=[VIEW_SINGLE])
async def single_dzi(registry: Registry, planner: Planner) -> Response:
    """The DZI XML of the ``Image.Path`` slide (``DeepZoomGenerator.get_dzi``)."""
    return _dzi((await registry.get(SINGLE_SLIDE_NAME)).source, planner)


@router.get("/storage/{name}.dzi", summary="DZI of a slide", dependencies=[VIEW])
async def multi_dzi(name: str, registry: Registry, planner: Planner) -> Response:
    """The DZI XML of slide ``name`` (``DeepZoomGenerator.get_dzi``)."""
    return _dzi((await registry.get(name)).source, planner)


@router.get("/storage/{name}/associated/{associated}.dzi",
            summary="DZI of an associated image of a slide", dependencies=[VIEW])
async def multi_associated_dzi(name: str, associated: str, registry: Registry,
                               planner: Planner) -> Response:
    """The DZI XML of associated image ``associated`` (label, macro, ...) of slide ``name``."""
    handle = await registry.get(name)
    return _dzi(await registry.associated(handle, associated), planner)


@router.get("/image/associated/{associated}.dzi",
            summary="DZI of an associated image of the single slide", dependencies=[VIEW_SINGLE])
async def single_associated_dzi(associated: str, registry: Registry,
                                planner: Planner) -> Response:
    """The DZI XML of an associated image of the ``Image.Path`` slide."""
    handle = await registry.get(SINGLE_SLIDE_NAME)
    return _dzi(await registry.associated(handle, associated), planner)
