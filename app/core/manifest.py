"""IIIF Presentation API 3.0 manifests of slides, built with ``iiif-prezi3``. Pure (no I/O).

A slide's manifest (``/iiif/3/{name}/manifest.json``) has one canvas for the slide and one for
each associated image that ``Privacy`` lets clients see; each canvas is painted by an image
whose IIIF Image API service (:mod:`app.core.iiif`) serves its pixels. The slide's canvas
carries its physical scale as a Physical Dimensions service (``physicalScale`` millimetres per
canvas pixel, from ``openslide.mpp-x``), and the manifest's metadata (vendor, dimensions, mpp,
objective power) comes only from the properties ``Privacy`` shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import openslide

from app.core.iiif import base_path

PHYSDIM_PROFILE = "http://iiif.io/api/annex/services/physdim"
PHYSDIM_CONTEXT = "http://iiif.io/api/annex/services/physdim/1/context.json"


@dataclass(frozen=True, slots=True)
class CanvasImage:
    """One image a manifest shows: the associated image's name (None: the slide) and its
    full-resolution size in pixels (the IIIF image's, so the DZI region's)."""

    associated: str | None
    width: int
    height: int


def slide_manifest(base_url: str, name: str, dimensions: tuple[int, int],
                   props: dict[str, str], images: list[CanvasImage],
                   image_format: str) -> dict[str, Any]:
    """The manifest of a slide as a JSON-LD dict.

    Args:
        base_url: the server's absolute base URL, ending in ``/``.
        name: the slide name (its IIIF identifier).
        dimensions: the slide's level-0 size in pixels.
        props: the slide's properties clients may see
            (:meth:`app.core.privacy.Privacy.slide_properties`).
        images: the slide first, then the visible associated images.
        image_format: the IIIF format name of the painting images (``jpg``, ``png``, ...).

    Blocking (it imports ``iiif-prezi3`` on first use and builds its models): call it from a
    worker thread on a server.
    """
    # imported here, not at module level: iiif-prezi3 builds its many pydantic models when
    # imported, a heavy import every server worker would otherwise pay at start-up
    from iiif_prezi3 import Manifest

    manifest_id = _uri(base_url, f"{base_path(name)}/manifest.json")
    manifest = Manifest(id=manifest_id, label={"none": [name]})
    for label, value in _metadata(dimensions, props):
        manifest.add_metadata(label={"en": [label]}, value={"none": [value]})
    mpp = _mpp(props)
    for image in images:
        service = _uri(base_url, base_path(name, image.associated))
        canvas_id = f"{manifest_id[:-len('manifest.json')]}canvas/{image.associated or 'slide'}"
        canvas = manifest.make_canvas(id=canvas_id, label={"none": [image.associated or name]},
                                      width=image.width, height=image.height)
        page = canvas.add_image(
            image_url=f"{service}/full/max/0/default.{image_format}",
            anno_page_id=f"{canvas_id}/page", anno_id=f"{canvas_id}/image",
            format=_MEDIA[image_format], width=image.width, height=image.height)
        page.items[0].body.make_service(id=service, type="ImageService3", profile="level2")
        if image.associated is None and mpp is not None:
            canvas.make_service(id=f"{canvas_id}/physdim", type="PhysicalDimensions",
                                profile=PHYSDIM_PROFILE, physicalScale=mpp / 1000,
                                physicalUnits="mm")
    document: dict[str, Any] = json.loads(manifest.jsonld())
    return document


_MEDIA = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def _uri(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + quote(path)


def _mpp(props: dict[str, str]) -> float | None:
    try:
        return float(props[openslide.PROPERTY_NAME_MPP_X])
    except (KeyError, ValueError):
        return None


def _metadata(dimensions: tuple[int, int], props: dict[str, str]) -> list[tuple[str, str]]:
    """Label/value pairs of the slide's facts, from visible properties only."""
    width, height = dimensions
    out = [("Dimensions", f"{width} x {height} px")]
    vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
    if vendor:
        out.insert(0, ("Vendor", vendor))
    mpp_y = props.get(openslide.PROPERTY_NAME_MPP_Y)
    if _mpp(props) is not None and mpp_y:
        out.append(("Microns per pixel", f"{props[openslide.PROPERTY_NAME_MPP_X]} x {mpp_y}"))
    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if power:
        out.append(("Objective power", f"{power}x"))
    return out
