"""Reading WebDataset tars safely, without extracting anything.

Written here rather than taken from `webdataset` because importing `webdataset` imports
torch, which the API process must not load; the grouping rule is webdataset's own
(`base_plus_ext`: key = path up to the first dot of the file name). Workers processing
whole shards feed these members to webdataset's pipeline.

Members are streamed (`tarfile` in `r|*` mode, never extracted): only regular files
are accepted; names with `..` or absolute paths, links, devices, members over
MAX_SAMPLE_BYTES and members past MAX_SAMPLES_PER_SHARD are refused and reported.

Declared sizes are checked from each header before its data is read: a member's own
size, and the running total of the members read so far against `max_total` (the sync
endpoints pass MAX_BODY_BYTES). Sparse members (GNU `tar --sparse`: type `S`, or the pax
`GNU.sparse.*` forms) are refused before tarfile expands them: a 30 KiB tar can declare
gigabytes of holes that `extractfile().read()` would fill with zeros in memory. A pax or
GNU long-name header over MAX_META_BYTES is refused before tarfile reads it into memory.
Either ends the tar with its reason (the members before it stand).
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from tasks.errors import BadRequest, PayloadTooLarge, Unprocessable

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "heic", "heif", "img")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class Sample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)  # extension (lower case) → bytes
    errors: list[str] = field(default_factory=list)

    def image(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTS:
            if ext in self.files:
                return ext, self.files[ext]
        return None


MAX_META_BYTES = 1 << 20  # a pax or GNU long-name header's data (names are capped at 1024 characters anyway)
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


REFUSED = "refused: "  # our own header refusals, told apart from a corrupt tar in the final error


def _why_stopped(e: BaseException) -> str:
    msg = str(e)
    return msg.removeprefix(REFUSED) if msg.startswith(REFUSED) else f"the tar is truncated or corrupt: {e}"


def _sparse(name: str) -> str:
    return f"{REFUSED}member {name[:200]!r} is a sparse file (tar --sparse); sparse members are refused, re-create the tar without --sparse"


class _Header(tarfile.TarInfo):
    """A TarInfo that refuses, while tarfile parses the headers, what it would otherwise
    expand or hold in memory: sparse members (their maps are read and their holes filled
    before any caller sees the member) and oversized pax / GNU long-name data.

    `_proc_member` is the hook tarfile's own source names for subclasses ("can be overridden
    in a subclass"); `_proc_gnusparse_10` (pax sparse 1.0 reads its map from the member's
    data inside `_proc_pax`) is private: checked against CPython 3.11-3.13's tarfile.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in _META_TYPES and self.size > MAX_META_BYTES:
            raise tarfile.SubsequentHeaderError(f"{REFUSED}a header at byte {self.offset} declares {self.size} bytes of metadata (most accepted: {MAX_META_BYTES}); the rest was not read")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.SubsequentHeaderError(_sparse(self.name))
        ti = super()._proc_member(tarfile_)  # type: ignore[misc]
        if ti.sparse is not None:  # pax GNU.sparse 0.0 / 0.1: the map came in the pax header
            raise tarfile.SubsequentHeaderError(_sparse(ti.name))
        return ti

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict, tarfile_: tarfile.TarFile) -> None:  # noqa: A002 - tarfile's own signature
        raise tarfile.SubsequentHeaderError(_sparse(next.name))


def split_key(name: str) -> tuple[str | None, str | None]:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def _refusal(ti: tarfile.TarInfo, max_member: int) -> str | None:
    name = ti.name
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        return f"member {name!r} has an unsafe path"
    if ti.issym() or ti.islnk():
        return f"member {name!r} is a link"
    if ti.isdev() or ti.isfifo() or ti.ischr() or ti.isblk():
        return f"member {name!r} is a device or fifo"
    if not ti.isreg():
        return None if ti.isdir() else f"member {name!r} is not a regular file"
    if ti.issparse():  # _Header stops the tar first; kept for a TarInfo made elsewhere
        return _sparse(name).removeprefix(REFUSED)
    if ti.size > max_member:
        return f"member {name!r} is {ti.size} bytes, over MAX_SAMPLE_BYTES={max_member}"
    if len(name) > 1024:
        return "a member name is longer than 1024 characters"
    return None


def iter_samples(f: IO[bytes], *, max_member: int, max_members: int, max_total: int | None = None) -> Iterator[Sample]:
    """Samples in tar order, each with its files; refused members land in `errors`.

    A truncated or corrupt tar ends the stream with a final sample keyed `__tar__`
    carrying the error, so callers record it and keep what came before. Members whose
    declared sizes add up past `max_total` raise 413 before the one that passes it is read.
    """
    current: Sample | None = None
    count = total = 0
    try:
        with tarfile.open(fileobj=f, mode="r|*", tarinfo=_Header) as tf:
            for ti in tf:
                count += 1
                if count > max_members:
                    if current:
                        yield current
                        current = None
                    yield Sample("__tar__", errors=[f"more than MAX_SAMPLES_PER_SHARD={max_members} members; the rest were not read"])
                    return
                why = _refusal(ti, max_member)
                if ti.isdir() and why is None:
                    continue
                key, ext = split_key(ti.name)
                if why is None and key is None:
                    why = f"member {ti.name!r} has no extension"
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key or ti.name)
                if why:
                    current.errors.append(why)
                    continue
                total += ti.size
                if max_total is not None and total > max_total:
                    raise PayloadTooLarge(f"the tar's members declare more than {max_total} bytes in all (MAX_BODY_BYTES); nothing past that was read")
                fobj = tf.extractfile(ti)
                data = fobj.read() if fobj else b""
                if len(data) != ti.size:
                    current.errors.append(f"member {ti.name!r} is truncated")
                    continue
                current.files[(ext or "").lower()] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if current:
            yield current
            current = None
        yield Sample("__tar__", errors=[_why_stopped(e)])
        return
    if current:
        yield current


def read_small_tar(f: IO[bytes], *, max_member: int, max_members: int, max_total: int | None = None) -> list[Sample]:
    samples = list(iter_samples(f, max_member=max_member, max_members=max_members, max_total=max_total))
    if not samples:
        raise BadRequest("the tar holds no samples")
    if len(samples) == 1 and samples[0].key == "__tar__":  # not one member could be read: the body is not a tar
        raise Unprocessable(f"the body is not a readable tar ({samples[0].errors[0]})")
    return samples


def iter_members(f: IO[bytes], *, max_member: int, max_members: int, max_total: int | None = None) -> Iterator[dict[str, object]]:
    """Members in tar order as webdataset's `tar_file_iterator` yields them (`{"fname", "data"}`),
    for its `group_by_keys`; nothing is extracted.

    A refused member (unsafe path, link, device, over MAX_SAMPLE_BYTES, truncated) comes
    with `data=None` and its reason in `"refused"`, so it is grouped with its sample and
    reported there. A tar cut short, corrupt, or past `max_members` ends the stream
    with `{"fname": None, "refused": reason}`; so do a sparse member, an oversized pax header
    and members declaring more than `max_total` bytes in all (checked before reading the one past it).
    """
    count = total = 0
    tap = _Tap(f)
    try:
        with tarfile.open(fileobj=tap, mode="r|", tarinfo=_Header) as tf:  # type: ignore[call-overload]
            for ti in tf:
                if ti.isdir() and _refusal(ti, max_member) is None:
                    continue
                count += 1
                if count > max_members:
                    yield {"fname": None, "data": None, "refused": f"more than MAX_SAMPLES_PER_SHARD={max_members} members; the rest were not read"}
                    return
                why = _refusal(ti, max_member)
                if why is None and split_key(ti.name)[0] is None:
                    why = f"member {ti.name!r} has no extension"
                if why:
                    yield {"fname": ti.name, "data": None, "refused": why}
                    continue
                total += ti.size
                if max_total is not None and total > max_total:
                    yield {"fname": None, "data": None, "refused": f"the members declare more than {max_total} bytes in all (MAX_SHARD_BYTES); the rest were not read"}
                    return
                fobj = tf.extractfile(ti)
                data = fobj.read() if fobj else b""
                if len(data) != ti.size:
                    yield {"fname": ti.name, "data": None, "refused": f"member {ti.name!r} is truncated"}
                    continue
                yield {"fname": ti.name, "data": data}
                tf.members = []  # stream mode keeps every TarInfo otherwise (webdataset does the same)
            if not tap.zero_block_at(tf.offset):
                # tarfile ends quietly on a missing or partial header after the first member
                yield {"fname": None, "data": None, "refused": "the tar is truncated: it ends without its end-of-archive block"}
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        yield {"fname": None, "data": None, "refused": _why_stopped(e)}


class _Tap:
    """A reader that remembers the tail of what passed through, to check how a tar ended."""

    KEEP = 64 << 10  # > tarfile's record size (10 KiB): the end block is in the last record read

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.n, self.tail = f, 0, b""

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.n += len(b)
        self.tail = (self.tail + b)[-self.KEEP :]
        return b

    def zero_block_at(self, offset: int) -> bool:
        start = offset - (self.n - len(self.tail))
        if start < 0:
            return True  # out of sight: tarfile saw it, trust the clean end
        block = self.tail[start : start + 512]
        if len(block) < 512:  # tarfile reads whole records; a short one: peek at the rest
            more = self.read(512 - len(block))
            block += more
        return len(block) == 512 and not any(block)
