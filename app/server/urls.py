"""The URLs the server gives out in documents and pages (DZI, viewer pages).

Each takes ``base``, the path the app is served under (``root_path``, see app.server.proxy),
so that every link works behind a proxy on a sub-path.
"""

from __future__ import annotations

from app.core.slides import SINGLE_SLIDE_NAME


def dzi_url(name: str, associated: str | None = None, base: str = "") -> str:
    """The DZI URL of a slide (``/image.dzi`` for the single slide, else under ``/storage``),
    or of one of its associated images."""
    if associated is not None:
        root = "/image" if name == SINGLE_SLIDE_NAME else f"/storage/{name}"
        return f"{base}{root}/associated/{associated}.dzi"
    return base + ("/image.dzi" if name == SINGLE_SLIDE_NAME else f"/storage/{name}.dzi")


def viewer_url(name: str, associated: str | None = None, base: str = "") -> str:
    """The viewer page of a slide, or of one of its associated images."""
    if associated is not None:
        return f"{base}/slide/{name}/associated/{associated}.html"
    return f"{base}/slide/{name}.html"
