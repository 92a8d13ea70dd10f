"""The parallel PNG encoder: lossless in every mode and size, valid for strict readers, and
really cut into strips (several IDAT chunks) when the picture is large."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fluxserve import png_encoding
from fluxserve.images import decode_image
from fluxserve.png_encoding import _adler32_combine, encode_png
from tests.conftest import make_test_image


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(body, zlib.crc32(kind)), kind
        chunks.append((kind, body))
        at += 12 + length
    return chunks


def _roundtrip(image: Image.Image) -> Image.Image:
    back = Image.open(io.BytesIO(encode_png(image)))
    back.load()
    return back


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16"])
def test_every_mode_comes_back_pixel_for_pixel(mode):
    picture = make_test_image(96, 64).convert(mode)
    back = _roundtrip(picture)
    expected = picture if mode in ("RGB", "RGBA", "L", "LA") else picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
    assert back.mode == expected.mode and back.size == (96, 64)
    assert np.array_equal(np.asarray(back), np.asarray(expected))


@pytest.mark.parametrize("size", [(1, 1), (1, 37), (37, 1), (7, 3), (255, 257), (1024, 1024), (3000, 700)])
def test_sizes_from_one_pixel_to_many_strips(size):
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[: size[1] // 2] //= 32  # some runs for the RLE strategy, some noise
    data = encode_png(Image.fromarray(pixels))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    kinds = [kind for kind, _ in _chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    idat = b"".join(body for kind, body in _chunks(data) if kind == b"IDAT")
    assert len(zlib.decompress(idat)) == size[1] * (3 * size[0] + 1)  # one valid zlib stream, Adler-32 checked


def test_a_large_picture_is_encoded_in_strips(monkeypatch):
    monkeypatch.setattr(png_encoding, "_WORKERS", 4)
    picture = make_test_image(1024, 1024)
    data = encode_png(picture)
    assert sum(kind == b"IDAT" for kind, _ in _chunks(data)) == 4
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(picture))
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(picture))  # our strict reader accepts it


def test_adler32_combine_matches_zlib():
    rng = np.random.default_rng(1)
    for length_a, length_b in [(0, 5), (5, 0), (1, 1), (70000, 123457), (65521, 65521)]:
        a, b = rng.bytes(length_a), rng.bytes(length_b)
        assert _adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
