"""The URLs the server gives out in documents and pages (DZI, viewer pages)."""

from __future__ import annotations

from app.core.slides import SINGLE_SLIDE_NAME


def dzi_url(name: str, associated: str | None = None) -> str:
    """The DZI URL of a slide (``/image.dzi`` for the single slide, else under ``/storage``),
    or of one of its associated images."""
    if associated is not None:
        base = "/image" if name == SINGLE_SLIDE_NAME else f"/storage/{name}"
        return f"{base}/associated/{associated}.dzi"
    return "/image.dzi" if name == SINGLE_SLIDE_NAME else f"/storage/{name}.dzi"


def viewer_url(name: str, associated: str | None = None) -> str:
    """The viewer page of a slide, or of one of its associated images."""
    if associated is not None:
        return f"/slide/{name}/associated/{associated}.html"
    return f"/slide/{name}.html"
