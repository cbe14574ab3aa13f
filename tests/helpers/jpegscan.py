"""The regex walk of a JPEG's markers that `tasks.images.check_jpeg_scans` vectorised: its tests' reference."""

from __future__ import annotations

import re

from tasks.errors import UndecodableImage
from tasks.images import MAX_JPEG_SCANS

# A marker as libjpeg's next_marker() finds one: any bytes that are not FF are skipped (it
# only warns "extraneous bytes before marker"), then any run of FF fill bytes, then a code
# byte that is not 00 (FF00 is a stuffed byte in entropy-coded data). Pillow's header
# parser skips junk the same way, so a counter that stopped at the first non-FF byte
# between segments could be bypassed with one byte.
_NEXT_MARKER = re.compile(rb"\xff+([^\x00\xff])")


def check_jpeg_scans_regex(data: bytes, limit: int = MAX_JPEG_SCANS) -> int:
    """The plain regex walk `tasks.images.check_jpeg_scans` replaced: the reference its tests compare with."""
    i, n, scans = 2, len(data), 0
    while i < n:
        hit = _NEXT_MARKER.search(data, i)
        if hit is None:
            break
        m, i = hit.group(1)[0], hit.end()
        if m == 0xD9:  # EOI
            break
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # TEM, RSTn, SOI: no length
            continue
        if i + 2 > n:
            break
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2:
            break
        i += length
        if m == 0xDA:
            scans += 1
            if scans > limit:
                raise UndecodableImage(f"the JPEG has more than {limit} scans (a progressive JPEG has about 10); refused before decoding, as so many scans can take minutes to decode")
    return scans
