"""FastAPI dependencies: the services on ``app.state``, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.settings import Settings
from app.slides import SlideRegistry
from app.tiles import TileService


def _service(request: Request) -> TileService:
    return request.app.state.tiles


def _registry(request: Request) -> SlideRegistry:
    return request.app.state.registry


def _settings(request: Request) -> Settings:
    return request.app.state.settings


Tiles = Annotated[TileService, Depends(_service)]
Registry = Annotated[SlideRegistry, Depends(_registry)]
AppSettings = Annotated[Settings, Depends(_settings)]
