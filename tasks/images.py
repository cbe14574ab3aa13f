"""Reading images safely: header probe (API side) and full decode (worker side).

Pillow is told which formats to try, the pixel count is checked from the header before
any pixel is decoded (Pillow's own bomb check only raises above 2x its limit), EXIF
orientation is applied, the first frame of an animation is used, and grey, palette,
alpha, CMYK and 16-bit images all come out as 8-bit RGB.
"""

from __future__ import annotations

import bisect
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
try:  # HEIC/HEIF when pillow-heif is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
    FORMATS.append("HEIF")
except ImportError:  # pragma: no cover - optional
    pass

# We check sizes ourselves (below) before decoding; Pillow's check would only warn
# between 1x and 2x of its limit, so it is switched off in favour of ours.
Image.MAX_IMAGE_PIXELS = None

# Magic bytes of the formats above: a body that starts with one is a broken image (422), not a wrong type (415).
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"RIFF", "WEBP"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))

IMAGE_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "image/heic", "image/heif", "application/octet-stream"}


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise UndecodableImage("the body is empty; send the image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        sig = next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic) and (fmt != "WEBP" or data[8:12] == b"WEBP")), None)
        if sig:  # the right magic bytes, then nothing Pillow can read: truncated or corrupt, not a wrong type
            raise UndecodableImage(f"the body starts like a {sig} image but its header could not be read (truncated or corrupt?)") from None
        raise UnsupportedMediaType(f"not an image in a supported format ({', '.join(f.lower() for f in FORMATS)})") from None
    except ValueError as e:
        if "Decompressed data too large" in str(e):  # a zTXt/iCCP chunk that inflates past Pillow's MAX_TEXT_CHUNK
            raise ImageTooLarge(f"a metadata chunk of the image inflates past the limit: {e}") from None
        raise UndecodableImage(f"the image header could not be read: {e}") from None
    except Exception as e:  # a header that starts right and then breaks
        raise UndecodableImage(f"the image header could not be read: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise UndecodableImage(f"the image has an invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} (MAX_IMAGE_PIXELS)")
    if im.format == "JPEG":
        check_jpeg_cost(data, w, h)
    return im


# A progressive JPEG has about 10 scans (libjpeg's default script writes 10 for colour, 6 for
# grey). Every scan walks every block of the image, so a small file of thousands of scans
# (EOB runs cost no bytes) keeps libjpeg-turbo busy for minutes (LJT-01-003 in its
# "Two Issues with the JPEG Standard"). Neither Pillow nor simplejpeg caps scans, so the
# SOS markers are counted here before any decode, and the decode's cost (pixels x scans)
# is held to MAX_JPEG_SCAN_PIXELS: about 2 s of one core per 1e9 measured here.
MAX_JPEG_SCANS = 100


def check_jpeg_scans(data: bytes, limit: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS markers) of a JPEG, walking its segments as the decoder does; 422 past `limit`.

    Segment payloads (EXIF thumbnails included) are skipped by their length; junk bytes
    between segments and entropy-coded data are skipped by searching for the next marker
    (RSTn markers inside a scan carry no length and are stepped over). A structure that
    breaks stops the count (the decoder reports it).

    Every place a marker code can sit (an FF, then a byte neither 00 nor FF) is found by numpy,
    64 KiB at a time; the walk then jumps from candidate to candidate, exactly where
    libjpeg's next_marker() (the regex walk in tests/helpers/jpegscan.py) would land (the run of FF fill bytes before
    a code only has to start at or after the search position, and its last FF sits right
    before the code). The regex search crossed every stuffed FF00 of the entropy-coded data
    in Python's regex engine: 0.6 ms of a 68 KB photo, paid by the API and again by the worker.
    """
    a = np.frombuffer(data, np.uint8)
    n, i, scans = len(data), 2, 0
    chunk: list[Any] = [0, []]  # (first position, the marker codes from there on for _SCAN_CHUNK bytes)
    while True:
        k = _next_marker_code(a, i + 1, chunk)  # the first code whose FF run starts at or after i
        if k < 0:
            break
        m, i = data[k], k + 1
        if m == 0xD9:  # EOI
            break
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


# Marker codes are searched 64 KiB at a time, so a large body never costs more than a few
# chunk-sized temporary arrays and lists.
_SCAN_CHUNK = 1 << 16


def _next_marker_code(a: np.ndarray, k0: int, chunk: list[Any]) -> int:
    """The first position k >= k0 (k0 >= 1) where a[k-1] is FF and a[k] is a marker with a length
    or EOI, or -1. Markers without a length (TEM, RSTn, SOI: the walk would only step over them)
    are left out here, so a scan of many restart markers costs no Python step per marker."""
    n = len(a)
    while k0 < n:
        start, codes = chunk
        if start == 0 or not start <= k0 < start + _SCAN_CHUNK:
            start, end = k0, min(n, k0 + _SCAN_CHUNK)
            w = a[start - 1 : end]  # the byte pairs (p - 1, p) for p in [start, end)
            v = w[1:]
            hit = (w[:-1] == 0xFF) & (v != 0x00) & (v != 0xFF) & (v != 0x01) & ((v < 0xD0) | (v > 0xD8))
            codes = (np.flatnonzero(hit) + start).tolist()
            chunk[0], chunk[1] = start, codes
        j = bisect.bisect_left(codes, k0)
        if j < len(codes):
            return codes[j]
        k0 = start + _SCAN_CHUNK
    return -1


def _scan_pixels_budget() -> int:
    from tasks.settings import get_settings

    return get_settings().max_jpeg_scan_pixels


def check_jpeg_cost(data: bytes, w: int, h: int, budget: int | None = None) -> int:
    """pixels x scans of a JPEG's decode (its CPU cost); 422 past MAX_JPEG_SCANS, 413 past the budget."""
    scans = check_jpeg_scans(data)
    budget = _scan_pixels_budget() if budget is None else budget
    if w * h * max(1, scans) > budget:
        raise ImageTooLarge(
            f"decoding this {w}x{h} JPEG of {scans} scans would walk {w * h * scans} pixel-scans; the limit is {budget} (MAX_JPEG_SCAN_PIXELS). Re-encode it as a baseline JPEG or with fewer scans"
        )
    return scans


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image opened lazily (no pixel decoded yet) after every check `probe` makes: for a
    decoder that needs the image's own mode (alpha, grey) rather than `decode_rgb`'s RGB."""
    return _open(data, max_pixels)


def probe(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; raises 415/413/422 errors."""
    im = _open(data, max_pixels)
    return im.format or "?", im.size[0], im.size[1]


def decode_rgb(data: bytes, max_pixels: int, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB, EXIF orientation applied, first frame only.

    `min_size` (h, w): the caller will shrink the image to at least this size anyway, so a
    JPEG may be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg-turbo's scaled
    decode) as long as the result stays at least that large. Without it the full size.
    """
    return decode_fitted(data, max_pixels, (lambda h, w: min_size) if min_size else None)[0]


def decode_fitted(data: bytes, max_pixels: int, fit: Callable[[int, int], tuple[int, int]] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB as `decode_rgb` gives it, (h, w) of the whole image after EXIF orientation) from ONE
    header read. `fit(h, w)` names the size the caller shrinks the image to, so a JPEG may be
    decoded smaller in the DCT domain. (Reading the size first with `original_size` costs a
    second open, and for a PNG its EXIF lookup decodes the whole image: measured 3.5 ms of a
    9 ms prepare for a 451x300 PNG.) EXIF is read before decoding only for a JPEG, whose EXIF
    is in its header; any other format is oriented after its decode."""
    return decode_opened(_open(data, max_pixels), data, fit)


def decode_opened(im: Image.Image, data: bytes, fit: Callable[[int, int], tuple[int, int]] | None = None, order: str = "RGB") -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_fitted` of an image `open_image` has already opened (and checked) from `data`:
    a caller that looks at the header itself first opens it once, not twice (the open runs
    the JPEG scan check). `order="BGR"`: a JPEG comes out of libjpeg-turbo as BGR straight
    away (the same values, in OpenCV's order, without a reversing copy); other formats are
    decoded as RGB and reversed."""
    try:
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            w, h = im.size
            if _orientation(im) in (5, 6, 7, 8):
                h, w = w, h
            return _decode_jpeg(im, data, fit(h, w) if fit else None, order), (h, w)
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im) or im
        rgb = to_rgb(im)
        if order == "BGR":
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        return rgb, (rgb.shape[0], rgb.shape[1])
    except (ImageTooLarge, UnsupportedMediaType):
        raise
    except Exception as e:
        raise UndecodableImage(f"the image could not be decoded (truncated or corrupt?): {e}") from None


def original_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(h, w) after EXIF orientation, from the header alone."""
    im = _open(data, max_pixels)
    w, h = im.size
    return (w, h) if _orientation(im) in (5, 6, 7, 8) else (h, w)


def _orientation(im: Image.Image) -> int:
    try:
        o = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: as Pillow's exif_transpose, ignore it
        return 1
    return o if 1 <= o <= 8 else 1


# EXIF orientation → the numpy view that undoes it (Pillow's exif_transpose, as views; checked against it in tests)
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _decode_jpeg(im: Image.Image, data: bytes, min_size: tuple[int, int] | None, order: str = "RGB") -> np.ndarray:
    """JPEG through simplejpeg (libjpeg-turbo straight into a numpy array): 2048x2048 in ~13 ms
    where Pillow's decode plus its array copy took ~23 ms, and DCT-domain downscaling when
    the model wants fewer pixels. Pillow has already read the header and checked the size."""
    import simplejpeg

    o = _orientation(im)
    kw: dict[str, int] = {}
    if min_size:
        mh, mw = min_size if o < 5 else (min_size[1], min_size[0])
        kw = {"min_height": max(1, int(mh)), "min_width": max(1, int(mw))}
    try:
        a = simplejpeg.decode_jpeg(data, colorspace=order, strict=True, **kw)
    except ValueError as e:
        raise UndecodableImage(f"the image could not be decoded (truncated or corrupt?): {e}") from None
    return np.ascontiguousarray(_ORIENT[o](a)) if o != 1 else a


def to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float32)
        hi = float(a.max()) or 1.0
        g = np.clip(a * (255.0 / (65535.0 if hi > 255 else 255.0)), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        g = ((a - lo) * (255.0 / ((hi - lo) or 1.0))).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr, 1 ...
    return np.asarray(im)
