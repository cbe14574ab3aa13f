"""A WebDataset shard's bytes as `tarfile` reads them: gzip inflated here under caps, every byte counted.

The guard in front of `tasks.tars.iter_members` for whole shards (workers/shards.py): MAX_SHARD_BYTES
on the inflated output, a ratio cap against gzip bombs, bz2/xz refused up front.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import IO

# Past this much inflated output, a gzip stream inflating more than GZIP_RATIO_LIMIT:1 is
# a bomb: tars of images barely compress, tars of text/JSON reach ~10:1, zeros ~1000:1.
GZIP_RATIO_AFTER = 32 << 20
GZIP_RATIO_LIMIT = 100


class ShardTooLarge(Exception):
    """The shard inflates past MAX_SHARD_BYTES, or a gzip stream inflates like a bomb."""

    code = "payload_too_large"


class ShardUnsupported(ShardTooLarge):
    """A compression we do not inflate (bz2, xz)."""

    code = "unsupported_media_type"


class ShardSource:
    """The shard's bytes as `tarfile` reads them: gzip inflated here (capped), every byte counted.

    Inflating by hand rather than with tarfile's `r|*` so both caps apply while streaming:
    MAX_SHARD_BYTES on the output, and GZIP_RATIO_LIMIT once past GZIP_RATIO_AFTER.
    """

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw, self.limit = raw, limit
        self.read_in = 0  # bytes read from storage (what `size` is measured in)
        self.out = 0  # bytes handed to tarfile
        self._buf = b""
        head = self._raw(512)
        if head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
            raise ShardUnsupported("the shard is bz2/xz compressed; send .tar or .tar.gz")
        self._gz = zlib.decompressobj(16 + zlib.MAX_WBITS) if head[:2] == b"\x1f\x8b" else None
        self._pending = head  # raw bytes not yet inflated (or plain tar bytes not yet handed out)
        self._eof = False

    def _raw(self, n: int) -> bytes:
        b = self.raw.read(n)
        self.read_in += len(b)
        return b

    def _count(self, b: bytes) -> bytes:
        self.out += len(b)
        if self.out > self.limit:
            raise ShardTooLarge(f"the shard inflates past MAX_SHARD_BYTES={self.limit}; the rest was not read")
        if self._gz is not None and self.out > GZIP_RATIO_AFTER and self.out > GZIP_RATIO_LIMIT * max(1, self.read_in):
            raise ShardTooLarge(f"a gzip bomb: {self.read_in} bytes inflate to over {self.out} ({GZIP_RATIO_LIMIT}:1 is the most accepted); the rest was not read")
        return b

    def read(self, n: int = -1) -> bytes:
        n = 1 << 20 if n is None or n < 0 else n
        if self._gz is None:
            if self._pending:
                b, self._pending = self._pending[:n], self._pending[n:]
                return self._count(b)
            return self._count(self._raw(n))
        out = bytearray()
        while len(out) < n and not self._eof:
            if self._gz.unconsumed_tail:
                src = self._gz.unconsumed_tail
            elif self._pending:
                src, self._pending = self._pending, b""
            else:
                src = self._raw(1 << 16)
                if not src:
                    self._eof = True
                    break
            out += self._gz.decompress(src, n - len(out))
            if self._gz.eof:  # concatenated gzip members: go on with the next one
                rest = self._gz.unused_data
                self._gz = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._pending = rest + self._pending
                if not rest:
                    nxt = self._raw(1 << 16)
                    if not nxt:
                        self._eof = True
                    self._pending = nxt
        return self._count(bytes(out))


def content_length(f: IO[bytes]) -> int:
    """The size of an opened input, when the source tells it (S3 body, local file)."""
    n = getattr(f, "_content_length", None)
    if n is not None:
        return int(n)
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return 0
