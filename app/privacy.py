"""The PHI switch: which properties and associated images a slide shows to clients.

``Privacy.HideProperties`` holds glob patterns (``fnmatch``: ``*``, ``?``, ``[...]``) matched
case-insensitively against whole property names, so ``*.filename`` also hides
``aperio.Filename``: where personal data is concerned, matching too much is the safe side.
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

    def property_visible(self, name: str) -> bool:
        """True unless a pattern withholds the property ``name``."""
        return self._hidden is None or self._hidden.fullmatch(name.lower()) is None

    def properties(self, properties: Mapping[str, str]) -> dict[str, str]:
        """The visible properties, in name order."""
        return {k: properties[k] for k in sorted(properties) if self.property_visible(k)}

    def property(self, properties: Mapping[str, str], name: str) -> str | None:
        """One property's value if it exists and is visible, else None."""
        return properties.get(name) if self.property_visible(name) else None

    def associated_names(self, names: Iterable[str]) -> list[str]:
        """The associated images clients may see, sorted (none when they are hidden)."""
        return [] if self.hide_associated else sorted(names)
