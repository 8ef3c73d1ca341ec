"""The PHI switch: which properties and associated images a slide shows to clients.

``Privacy.HideProperties`` holds glob patterns (``fnmatch``: ``*``, ``?``, ``[...]``) matched
case-insensitively against whole property names, so ``*.filename`` also hides
``aperio.Filename``: where personal data is concerned, matching too much is the safe side.
A withheld value must not come back through another property either: Aperio's whole
ImageDescription, ``Filename = ...|User = ...`` included, is repeated in ``tiff.ImageDescription``
and ``openslide.comment``. So every property whose value contains the value of a withheld one
(of at least :data:`MIN_VALUE_LENGTH` characters) is withheld too.
``Privacy.HideAssociatedImages`` withholds every associated image (label and macro photograph
the slide label; a thumbnail can show it too) and the ``openslide.associated.*`` properties
that would reveal them. Everything a client can see goes through :class:`Privacy`: the
associated-image routes answer 404 exactly as for a name the slide does not have, and the
listings and JSON leave withheld items out.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

from app.settings import PrivacySettings

ASSOCIATED_PREFIX = "openslide.associated."
MIN_VALUE_LENGTH = 3
"""Shorter withheld values (``0``, ``20``) are too common to withhold every property holding
them; a name pattern withholds those."""


class Privacy:
    """Filters what clients see of a slide, per ``Privacy`` settings.

    Args:
        settings: the ``Privacy`` section.
    """

    def __init__(self, settings: PrivacySettings):
        self.hide_associated = settings.HideAssociatedImages
        patterns = [fnmatch.translate(p.lower()) for p in settings.HideProperties]
        if self.hide_associated:
            patterns.append(re.escape(ASSOCIATED_PREFIX) + ".*")
        self._hidden = re.compile("|".join(patterns)) if patterns else None

    def name_visible(self, name: str) -> bool:
        """True unless a pattern withholds the property ``name``."""
        return self._hidden is None or self._hidden.fullmatch(name.lower()) is None

    def properties(self, properties: Mapping[str, str]) -> dict[str, str]:
        """The visible properties, in name order: none whose name a pattern matches, and none
        whose value contains a withheld value (see the module docstring)."""
        if self._hidden is None:
            return {k: properties[k] for k in sorted(properties)}
        shown = {k: v for k, v in properties.items() if self.name_visible(k)}
        secrets = {v.strip() for k, v in properties.items()
                   if k not in shown and len(v.strip()) >= MIN_VALUE_LENGTH}
        return {k: shown[k] for k in sorted(shown)
                if not any(secret in shown[k] for secret in secrets)}

    def property(self, properties: Mapping[str, str], name: str) -> str | None:
        """One property's value if it exists and is visible, else None."""
        return self.properties(properties).get(name)

    def associated_names(self, names: Iterable[str]) -> list[str]:
        """The associated images clients may see, sorted (none when they are hidden)."""
        return [] if self.hide_associated else sorted(names)
