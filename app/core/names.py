"""The rule for slide names: what may appear in a URL segment and as a cache folder name.

A slide name becomes one URL path segment (``/storage/{name}.dzi``) and one folder of the tile
cache (``{TileCachePath}/{name}/...``), so it must never be able to name another folder. A name
is valid when it:

- is 1 to :data:`MAX_NAME_BYTES` bytes long in UTF-8 (one file-name component on every common
  file system),
- contains no ``/`` and no ``\\`` (no path separators on any platform),
- does not start with ``.`` (so never ``.``, ``..``, ``...``, nor a hidden file such as the
  cache's own marker),
- contains no control, format, surrogate, private-use or unassigned character (Unicode
  categories ``C*``: no NUL, newline, bidi override, ...),
- does not end with a space (file names that Windows and many tools mangle).

Everything else is allowed: spaces inside, non-ASCII letters (``Präparat 12``), punctuation.
``Images`` entries with an invalid ``Name`` are a configuration error; files of
``SlideDirectory`` whose stem is invalid are skipped with a warning.
"""

from __future__ import annotations

import unicodedata

MAX_NAME_BYTES = 200


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid slide name (see the module docstring), or None if it is."""
    if not name:
        return "it is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name.startswith("."):
        return "it starts with '.'"
    if name.endswith(" "):
        return "it ends with a space"
    for char in name:
        if unicodedata.category(char).startswith("C"):
            return f"it contains the control or format character U+{ord(char):04X}"
    return None


def is_valid_name(name: str) -> bool:
    """True when ``name`` is a valid slide name."""
    return name_problem(name) is None
