"""The PHI switch: which properties, associated images and file names a slide shows to clients.

``Privacy.HideProperties`` holds glob patterns (``fnmatch``: ``*``, ``?``, ``[...]``) matched
case-insensitively against whole property names, so ``*.filename`` also hides
``aperio.Filename``: where personal data is concerned, matching too much is the safe side.
A withheld value must not come back through another property either: Aperio's whole
ImageDescription, ``Filename = ...|User = ...`` included, is repeated in ``tiff.ImageDescription``
and ``openslide.comment``. So:

1. a property whose value contains the value of a withheld one, of at least
   :data:`MIN_VALUE_LENGTH` characters, is withheld whole;
2. in every other property, the ``Key = Value`` items of an Aperio description
   (``header|Key = Value|Key = Value``, the structure OpenSlide reads ``aperio.Key`` from) are
   dropped when ``aperio.Key`` is withheld: ``User = JD`` goes however short ``JD`` is.

``Privacy.SlideNames: hash`` withholds file names: the file's name and stem join the withheld
values (``aperio.Filename`` often repeats them) and :meth:`Privacy.file_label` stands for the
file in error details (names themselves: :func:`app.core.slides.opaque_slide_name`).
``Privacy.HideAssociatedImages`` withholds every associated image (label and macro photograph
the slide label; a thumbnail can show it too) and the ``openslide.associated.*`` properties
that would reveal them.

Values derived from the file rather than read from its properties (docs/regulatory.md,
"Privacy", says where each appears): the whole-file ``sha256`` is a fingerprint like
``openslide.quickhash-1`` and is shown only when that property is
(:attr:`Privacy.shows_fingerprints`); the slide identity
(``quickhash-1:...;size=...;mtime_ns=...``, whose modification time is often the scan's) is
replaced by an opaque digest whenever any property is withheld (:meth:`Privacy.identity`).

Everything a client can see goes through :class:`Privacy`: the associated-image routes answer
404 exactly as for a name the slide does not have, and the listings and JSON leave withheld
items out.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import openslide

from app.settings import PrivacySettings

if TYPE_CHECKING:
    from app.core.slides import OpenSlide

ASSOCIATED_PREFIX = "openslide.associated."
APERIO_PREFIX = "aperio."
MIN_VALUE_LENGTH = 3
"""Shorter withheld values (``0``, ``20``) are too common to withhold every property holding
them; a name pattern withholds those, and the Aperio ``Key = Value`` rule drops their items."""
OPAQUE_IDENTITY_PREFIX = "opaque:"


class Privacy:
    """Filters what clients see of a slide, per ``Privacy`` settings.

    Args:
        settings: the ``Privacy`` section.
    """

    def __init__(self, settings: PrivacySettings):
        self.hide_associated = settings.HideAssociatedImages
        self.hide_file_names = settings.SlideNames == "hash"
        self.hides_properties = bool(settings.HideProperties)
        patterns = [fnmatch.translate(p.lower()) for p in settings.HideProperties]
        if self.hide_associated:
            patterns.append(re.escape(ASSOCIATED_PREFIX) + ".*")
        self._hidden = re.compile("|".join(patterns)) if patterns else None

    def name_visible(self, name: str) -> bool:
        """True unless a pattern withholds the property ``name``."""
        return self._hidden is None or self._hidden.fullmatch(name.lower()) is None

    def properties(self, properties: Mapping[str, str],
                   file: Path | None = None) -> dict[str, str]:
        """The visible properties, in name order, redacted (see the module docstring).

        Args:
            properties: OpenSlide's properties of the slide.
            file: the slide's file; with ``SlideNames: hash`` its name and stem are withheld
                values too.
        """
        secrets = {v.strip() for k, v in properties.items() if not self.name_visible(k)}
        if self.hide_file_names and file is not None:
            secrets.update((file.name, file.stem))
        secrets = {s for s in secrets if len(s) >= MIN_VALUE_LENGTH}
        if self._hidden is None and not secrets:
            return {k: properties[k] for k in sorted(properties)}
        return {name: self._redact_items(properties[name]) for name in sorted(properties)
                if self.name_visible(name)
                and not any(secret in properties[name] for secret in secrets)}

    def _redact_items(self, value: str) -> str:
        """``value`` without the Aperio ``Key = Value`` items whose ``aperio.Key`` is withheld,
        split as OpenSlide splits a description: on ``|``, the first part a header, each item
        on its first ``=``, the key stripped."""
        if "|" not in value or self._hidden is None:
            return value
        header, *items = value.split("|")
        kept = [item for item in items if "=" not in item
                or self.name_visible(APERIO_PREFIX + item.partition("=")[0].strip())]
        return value if len(kept) == len(items) else "|".join([header, *kept])

    def slide_properties(self, handle: OpenSlide) -> dict[str, str]:
        """The visible properties of an open slide (:meth:`properties` with its file)."""
        return self.properties(handle.slide.properties, handle.entry.path)

    def quickhash(self, handle: OpenSlide) -> str | None:
        """``openslide.quickhash-1`` of an open slide if the slide has it and it is visible."""
        return self.slide_properties(handle).get(openslide.PROPERTY_NAME_QUICKHASH1)

    def associated_names(self, names: Iterable[str]) -> list[str]:
        """The associated images clients may see, sorted (none when they are hidden)."""
        return [] if self.hide_associated else sorted(names)

    @property
    def shows_fingerprints(self) -> bool:
        """Whether clients see fingerprints of slide files (the whole-file SHA-256): only
        when they see ``openslide.quickhash-1``, the fingerprint OpenSlide computes."""
        return self.name_visible(openslide.PROPERTY_NAME_QUICKHASH1)

    def identity(self, identity: str) -> str:
        """The slide identity (:func:`app.core.slides.slide_identity`) as clients see it: as
        it is when no property is withheld, else ``opaque:`` and the first 32 hex digits of
        its SHA-256, which changes exactly when the identity does."""
        if not self.hides_properties:
            return identity
        digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
        return OPAQUE_IDENTITY_PREFIX + digest

    def file_label(self, name: str, file: Path) -> str:
        """How error details name slide ``name``'s file: its file name, or with
        ``SlideNames: hash`` the words "the file of slide <name>"."""
        return f"the file of slide {name}" if self.hide_file_names else file.name

    # Last in the class: the name shadows the builtin ``property`` for what follows it.
    def property(self, properties: Mapping[str, str], name: str) -> str | None:
        """One property's value if it exists and is visible, else None."""
        return self.properties(properties).get(name)
