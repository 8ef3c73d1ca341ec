"""The SHA-256 of a tile's bytes, and what is made of it: ETag and RFC 9530 digest fields; and
the SHA-256 of a whole file."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TileDigest:
    """What one SHA-256 of a tile's bytes gives; computed once per tile (when it is rendered,
    read from disk or from the slide) and kept beside the bytes in the memory cache.

    Attributes:
        sha256: 64 hex digits (the audit log's ``sha256``; ``sha256sum`` prints the same).
        etag: strong ETag, quoted: the first 32 of those hex digits.
        content_digest: the RFC 9530 field value ``sha-256=:<base64 of the 32 bytes>:``.
    """

    sha256: str
    etag: str
    content_digest: str


def digest_of(data: bytes) -> TileDigest:
    """SHA-256 of tile bytes as hex, ETag and RFC 9530 ``Content-Digest`` value."""
    return digest_from_sha256(hashlib.sha256(data).digest())


def digest_from_sha256(digest: bytes) -> TileDigest:
    """The :class:`TileDigest` of bytes whose SHA-256 (32 bytes) is ``digest``."""
    hexdigest = digest.hex()
    return TileDigest(hexdigest, '"' + hexdigest[:32] + '"',
                      "sha-256=:" + base64.b64encode(digest).decode("ascii") + ":")


EMPTY_DIGEST = digest_of(b"")
"""The digest of empty content: RFC 9530's ``Content-Digest`` of a HEAD response (its Appendix
B.2), whose message has no content."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a whole file, read in :data:`CHUNK`-byte pieces. Blocking.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
