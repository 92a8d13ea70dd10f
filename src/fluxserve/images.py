"""Getting init images in (fetch from a URL or data: URI, decode, normalise) and results out
(PNG encoding, base64). No torch here: the HTTP layer uses it."""

from __future__ import annotations

import base64
import binascii
import io
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageOps

MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding pixels
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class ImageInputError(ValueError):
    """An init image that could not be fetched or decoded; the message is safe to show."""


async def fetch_image_bytes(
    url: str, *, client: httpx.AsyncClient, max_bytes: int, timeout: float
) -> bytes:
    """Bytes of an http(s) URL or a base64 data: URI, stopping at ``max_bytes``."""
    if url.startswith("data:"):
        return _decode_data_uri(url, max_bytes)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageInputError("Unable to fetch image from provided URL: only http, https and data: URLs are accepted")
    try:
        async with client.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise ImageInputError(
                    f"Unable to fetch image from provided URL: it answered HTTP {response.status_code}"
                )
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ImageInputError(f"Unable to fetch image from provided URL: larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ImageInputError(f"Unable to fetch image from provided URL: {type(exc).__name__}") from None


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise ImageInputError("data: URIs must be base64 encoded images")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageInputError(f"init image larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("data: URI is not valid base64") from None


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode into an RGB image: EXIF orientation applied, alpha flattened onto white."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            if probe.format not in ALLOWED_FORMATS:
                raise ImageInputError(f"Unsupported image format {probe.format}; use PNG, JPEG, WebP or GIF")
            if probe.width * probe.height > max_pixels:
                raise ImageInputError(f"Image of {probe.width}x{probe.height} exceeds {max_pixels} pixels")
            probe.seek(0)
            image = ImageOps.exif_transpose(probe)
            image.load()
    except ImageInputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ImageInputError("Unable to decode the init image: not a valid image file") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
