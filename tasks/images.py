"""Reading images safely: header probe (API side) and full decode (worker side).

Pillow is told which formats to try, the pixel count is checked from the header before
any pixel is decoded (Pillow's own bomb check only raises above 2x its limit), EXIF
orientation is applied, the first frame of an animation is used, and grey, palette,
alpha, CMYK and 16-bit images all come out as 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings

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
    return im


def probe(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; raises 415/413/422 errors."""
    im = _open(data, max_pixels)
    return im.format or "?", im.size[0], im.size[1]


def decode_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """H x W x 3 uint8 RGB, EXIF orientation applied, first frame only."""
    im = _open(data, max_pixels)
    try:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im) or im
        return to_rgb(im)
    except (ImageTooLarge, UnsupportedMediaType):
        raise
    except Exception as e:
        raise UndecodableImage(f"the image could not be decoded (truncated or corrupt?): {e}") from None


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
