"""Getting init images in (fetch from a URL or data: URI, decode, normalise) and results out as
base64 (PNG encoding: ``png_encoding``). No torch here: the HTTP layer uses it."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
from PIL import Image, ImageOps, features

from fluxserve.fetching import FetchError, FetchPolicy, decode_data_uri, decode_raw_base64, fetch_bytes, is_raw_base64

MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding pixels
MAX_SIDE = 16_384  # and extreme aspects: 1x40M pixels is still a bomb for resizing
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF") + (("AVIF",) if features.check("avif") else ())
_FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "AVIF": "AVIF"}
_ALLOWED_NAMES = [_FORMAT_NAMES[name] for name in ALLOWED_FORMATS]
_USE = ", ".join(_ALLOWED_NAMES[:-1]) + " or " + _ALLOWED_NAMES[-1]
_WHITE = (255, 255, 255)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Leading bytes of the formats worth naming in an error: the allowed ones (a file that starts
# like one but does not open is truncated or corrupt) and the refused ones people send.
_MAGIC = (
    (_PNG_SIGNATURE, "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"), (b"8BPS", "PSD"),
    (b"%PDF-", "PDF"), (b"%!PS", "PostScript"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"), (b"qoif", "QOI"), (b"v/1\x01", "OpenEXR"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")


class ImageInputError(ValueError):
    """An init image that could not be fetched or decoded; the message is safe to show."""


async def fetch_image_bytes(url: str, *, client: httpx.AsyncClient, policy: FetchPolicy) -> bytes:
    """Bytes of an image as clients send one: an http(s) URL (checked against SSRF, pinned,
    size-capped: ``fetching``), a base64 ``data:`` URI, or a bare base64 string."""
    inline = url[:5].lower() == "data:" or is_raw_base64(url)
    try:
        if url[:5].lower() == "data:":
            return decode_data_uri(url, policy.max_bytes)
        if inline:
            return decode_raw_base64(url, policy.max_bytes)
        return await fetch_bytes(url, policy=policy, client=client, allow_data=False)
    except FetchError as exc:
        prefix = "" if inline else "Unable to fetch image from provided URL: "
        raise ImageInputError(f"{prefix}{exc}") from None


def is_inline_image(text: str) -> bool:
    """An image sent in the request itself (a data: URI or bare base64), not a URL to fetch."""
    return text[:5].lower() == "data:" or is_raw_base64(text)


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE,
                 keep_alpha: bool = False) -> Image.Image:
    """Decode untrusted bytes into an RGB image: the format is sniffed from the bytes (PNG, JPEG,
    WebP, GIF, AVIF where Pillow has it), the size checked from the header before any pixel is
    decoded, the first frame of an animation taken, EXIF orientation applied, alpha flattened
    onto white (with ``keep_alpha``, an image with transparency is RGBA instead). Anything else
    raises ``ImageInputError`` with a message safe to show."""
    if not data:
        raise ImageInputError("Unable to decode the init image: the file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:  # reads the header only
            _check_size(probe.size, max_pixels, max_side)
            if probe.format == "PNG":
                _check_png_chunks(data)
            return _to_rgb(ImageOps.exif_transpose(probe), keep_alpha)  # decodes the first frame only
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning if raised as error
        raise ImageInputError(f"Init image too large: more than {max_pixels} pixels") from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error...
        raise ImageInputError(_refusal(data)) from None


def _check_size(size: tuple[int, int], max_pixels: int, max_side: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageInputError(f"Unable to decode the init image: it declares a size of {width}x{height}")
    if width * height > max_pixels or max(width, height) > max_side:
        raise ImageInputError(
            f"Init image too large: {width}x{height} pixels; the limit is {max_pixels} pixels"
            f" and {max_side} on a side"
        )


def _check_png_chunks(data: bytes) -> None:
    """Pillow checks neither the IDAT checksums nor a file cut after its image data: walk the
    chunks (length, type, data, CRC) up to IEND, as libpng does."""
    view, pos = memoryview(data), len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        if zlib.crc32(view[pos + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            raise ImageInputError("Unable to decode the init image: corrupt PNG file (bad chunk checksum)")
        if data[pos + 4:pos + 8] == b"IEND":
            return
        pos = end + 4
    raise ImageInputError("Unable to decode the init image: truncated PNG file")


def _refusal(data: bytes) -> str:
    """The message for bytes Pillow could not open or decode, named from their leading bytes."""
    name = _sniff(data)
    if name is None:
        return "Unable to decode the init image: not a valid image file"
    if name in _ALLOWED_NAMES:
        return f"Unable to decode the init image: truncated or corrupt {name} file"
    return f"Unsupported image format {name}; use {_USE}"


def _sniff(data: bytes) -> str | None:
    head = data[:64]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":  # ISO media: AVIF or HEIF (iPhone photos) by their brands
        brands = head[8:32]
        return "AVIF" if b"avif" in brands or b"avis" in brands else "HEIF" if brands[:4] in _HEIF_BRANDS else None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    text = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!doctype svg")) and b"<svg" in text):
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if text.startswith(b"<?xml"):
        return "XML"
    return None


def _to_rgb(image: Image.Image, keep_alpha: bool = False) -> Image.Image:
    """Any mode to RGB: high bit depth grey scaled to 8 bits, transparency flattened onto white
    (or kept: RGBA), palette, 1-bit, grey and CMYK converted."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _grey_to_l(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        if keep_alpha:
            return rgba
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def _grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit or 32-bit grey to 8 bits, scaled from its nominal range -- a plain ``convert("L")``
    clips everything over 255 to white. 16-bit: 0..65535; 32-bit integer or float: the first of
    0..1 (float only), 0..255, 0..65535 that holds its values, else its own extrema."""
    low: float
    high: float
    if image.mode.startswith("I;16"):
        image, (low, high) = image.convert("I"), (0, 65535)
    else:
        extrema = image.getextrema()
        assert not isinstance(extrema[0], tuple)  # I and F have one band: (min, max), not a pair per band
        low, high = extrema
        tops = ((1.0,) if image.mode == "F" else ()) + (255, 65535)
        if low >= 0 and high <= tops[-1]:
            low, high = 0, next(top for top in tops if high <= top)
    scale = 255 / (high - low) if high > low else 0.0
    grey = image.point(lambda v: v * scale - low * scale).convert("L")
    grey.info.pop("transparency", None)  # a 16-bit key colour means nothing at 8 bits (rare)
    return grey


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
