"""Lossless PNG encoding made for speed, on every core: encoding sits on every request's path,
so it counts against the service's overhead over the bare pipeline.

The picture is cut into horizontal strips, and each strip is filtered (PNG's Sub filter, by
numpy) and deflated (zlib level 1, run-length strategy) on a thread of its own: zlib releases the
GIL. The strips' deflate streams end on full flushes (byte-aligned, no shared history), so put
one after another they are one valid zlib stream; each becomes one IDAT chunk, the first behind
the zlib header and the last followed by the Adler-32 of all the filtered bytes, combined from
the strips' own checksums. Any PNG decoder reads the result (tests decode it with Pillow and
with our own strict reader).

Measured (``python -m bench.png``, 1024x1024 RGB, 2 cores): 9-12 ms against 111-232 ms for
Pillow's defaults (zlib level 6, adaptive filters) and 15-20 ms for libpng with the same
settings on one core; files the same size as Pillow's on noise and smooth pictures, up to 1.8x
larger on detailed ones. The time falls with more cores (one strip per core).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6}  # 8 bits per sample
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, "fastest" level; (0x7801 % 31 == 0)
_ADLER_MOD = 65521
_STRIP_BYTES = 256 * 1024  # below this much raw data per strip, threads cost more than they save
_WORKERS = min(16, os.cpu_count() or 1)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="png-strip")
        return _pool


def _adler32_combine(first: int, second: int, second_length: int) -> int:
    """Adler-32 of A+B from those of A and B (zlib's adler32_combine; Python's zlib lacks it)."""
    rem = second_length % _ADLER_MOD
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % _ADLER_MOD
    b = (b1 + b2 + rem * a1 - rem) % _ADLER_MOD
    return (b << 16) | a


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _strip(rows: np.ndarray, channels: int, last: bool) -> tuple[bytes, int, int]:
    """Sub-filter and deflate some rows; returns (deflate bytes, adler32 of the filtered bytes, their length)."""
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 1  # filter type Sub: each byte minus the byte one pixel to its left
    filtered[:, 1:channels + 1] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, channels + 1:])
    raw = filtered.tobytes()
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15, 8, zlib.Z_RLE)
    data = compressor.compress(raw) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)
    return data, zlib.adler32(raw), len(raw)


def encode_png(image: Image.Image) -> bytes:
    """``image`` as an 8-bit PNG (L, LA, RGB or RGBA; other modes are converted to RGB or RGBA)."""
    if image.mode not in _COLOR_TYPES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = pixels.reshape(height, width * channels)
    strips = max(1, min(height, _WORKERS, rows.nbytes // _STRIP_BYTES))
    bounds = np.linspace(0, height, strips + 1).astype(int)
    pieces = [(rows[bounds[i]:bounds[i + 1]], channels, i == strips - 1) for i in range(strips)]
    parts = list(_threads().map(lambda piece: _strip(*piece), pieces)) if strips > 1 else [_strip(*pieces[0])]
    adler = 1
    for _, checksum, length in parts:
        adler = _adler32_combine(adler, checksum, length)
    streams = [data for data, _, _ in parts]
    streams[0] = _ZLIB_HEADER + streams[0]
    streams[-1] = streams[-1] + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[image.mode], 0, 0, 0)
    return b"".join([_SIGNATURE, _chunk(b"IHDR", header), *(_chunk(b"IDAT", s) for s in streams), _chunk(b"IEND", b"")])
