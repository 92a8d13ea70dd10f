"""decode_image on untrusted bytes: allowed formats decode to RGB (first frame, upright, alpha on
white, any bit depth), everything else is an ImageInputError with a message safe to show --
decompression bombs refused from the header, before any pixel is decoded. All inputs are made
here, in code."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib

import pytest
from PIL import Image, ImageFile, ImageStat, features

from fluxserve.images import MAX_PIXELS, ImageInputError, _to_rgb, decode_image

AVIF = features.check("avif")
needs_avif = pytest.mark.skipif(not AVIF, reason="Pillow built without AVIF")
USE = "use PNG, JPEG, WebP, GIF or AVIF" if AVIF else "use PNG, JPEG, WebP or GIF"
CORRUPT = "Unable to decode the init image: "
TOO_LARGE = "Init image too large: "

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------- making inputs

def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def picture(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Textured RGB (noise compresses badly, so cut points land inside the image data)."""
    return Image.merge("RGB", [Image.effect_noise((width, height), 60 + seed + i) for i in range(3)])


def halves(left, right, size=(40, 20), mode="RGB") -> Image.Image:
    image = Image.new(mode, size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, *, depth: int = 8, colour: int = 2, rows: bytes | None = None) -> bytes:
    """PNG signature + IHDR (correct CRC) + one IDAT (``rows``, or a tiny one) + IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_16bit_rgb() -> bytes:
    """4x4, 16 bits per channel, every sample 0x8080 (Pillow cannot write these)."""
    row = b"\x00" + b"\x80\x80" * 3 * 4
    return handmade_png(4, 4, depth=16, colour=2, rows=row * 4)


def png_16bit_grey_gradient() -> bytes:
    """256x256 left-to-right 0..65535 ramp: mean mid-grey, mostly over 255."""
    ramp = Image.linear_gradient("L").rotate(90).convert("I").point(lambda v: v * 257)
    return save(ramp.convert("I;16"), "PNG")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 declares another size."""
    data = bytearray(save(picture(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_frame_larger_than_screen() -> bytes:
    """Logical screen 1x1 but a first frame declared 8000x8000 (64M pixels)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 8000, 8000, 0) + b"\x02\x02\x4c\x01\x00"
    return screen + frame + b"\x3b"


def jpeg_oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(halves(RED, BLUE), "JPEG", exif=exif, quality=95)


def animated(fmt: str, **options) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, GREEN, BLUE)]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)


def palette_with_transparency() -> bytes:
    image = halves(0, 1, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    return save(image, "PNG", transparency=0)


def mpo() -> bytes:
    """What many phone cameras write: a JPEG with a second picture after it (Pillow: MPO)."""
    return save(Image.new("RGB", (32, 32), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (32, 32), BLUE)])


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def with_idat_crc_flipped(data: bytes) -> bytes:
    out = bytearray(data)
    at = out.index(b"IDAT")
    (length,) = struct.unpack_from(">I", out, at - 4)
    out[at + 4 + length] ^= 0xFF
    return bytes(out)


def with_idat_data_garbled(data: bytes) -> bytes:
    """IDAT contents damaged but its CRC recomputed: only the zlib stream is wrong."""
    at = data.index(b"IDAT")
    (length,) = struct.unpack_from(">I", data, at - 4)
    body = bytearray(data[at + 4: at + 4 + length])
    body[10:40] = bytes(30)
    return data[: at - 4] + chunk(b"IDAT", bytes(body)) + data[at + 8 + length:]


PNG = save(picture(), "PNG")
JPEG = save(picture(), "JPEG", quality=90)
WEBP = save(picture(), "WEBP", quality=90)
GIF = save(picture().convert("P"), "GIF")


# ---------------------------------------------------------------- decoded

def cases(table: list) -> list:
    """Plain tuples become params with their first item as id; pytest.param entries stay."""
    return [pytest.param(*row, id=row[0]) if type(row) is tuple else row for row in table]


def near(pixel, colour, tolerance=40):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


# (id, bytes factory, expected size, check of the decoded RGB image)
DECODED = [
    ("png", lambda: PNG, (96, 64), None),
    ("jpeg", lambda: JPEG, (96, 64), None),
    ("webp", lambda: WEBP, (96, 64), None),
    ("gif", lambda: GIF, (96, 64), None),
    pytest.param("avif", lambda: save(halves(RED, BLUE, (64, 32)), "AVIF", quality=90), (64, 32),
                 lambda im: near(im.getpixel((2, 2)), RED) and near(im.getpixel((60, 2)), BLUE),
                 marks=needs_avif, id="avif"),
    ("animated gif: first frame", lambda: animated("GIF"), (32, 32), lambda im: near(im.getpixel((5, 5)), RED, 0)),
    ("animated webp: first frame", lambda: animated("WEBP", lossless=True), (32, 32),
     lambda im: near(im.getpixel((5, 5)), RED, 0)),
    ("apng: first frame", lambda: animated("PNG"), (32, 32), lambda im: near(im.getpixel((5, 5)), RED, 0)),
    pytest.param("animated avif: first frame", lambda: animated("AVIF", quality=90), (32, 32),
                 lambda im: near(im.getpixel((5, 5)), RED), marks=needs_avif, id="animated avif: first frame"),
    ("mpo (phone jpeg): first picture", mpo, (32, 32), lambda im: near(im.getpixel((5, 5)), RED)),
    ("cmyk jpeg", lambda: save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95), (32, 32),
     lambda im: near(im.getpixel((5, 5)), RED, 60)),
    ("palette png with transparency", palette_with_transparency, (40, 20),
     lambda im: im.getpixel((2, 2)) == WHITE and im.getpixel((38, 2)) == RED),
    ("palette png", lambda: save(halves(RED, BLUE).convert("P"), "PNG"), (40, 20),
     lambda im: im.getpixel((2, 2)) == RED and im.getpixel((38, 2)) == BLUE),
    ("grey + alpha (LA) png", lambda: save(halves((0, 0), (0, 255), mode="LA"), "PNG"), (40, 20),
     lambda im: im.getpixel((2, 2)) == WHITE and im.getpixel((38, 2)) == (0, 0, 0)),
    ("rgba webp", lambda: save(halves((255, 0, 0, 0), (0, 0, 255, 255), mode="RGBA"), "WEBP", lossless=True), (40, 20),
     lambda im: im.getpixel((2, 2)) == WHITE and im.getpixel((38, 2)) == BLUE),
    ("rgba png half transparent", lambda: save(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG"), (8, 8),
     lambda im: near(im.getpixel((2, 2)), (127, 127, 127), 2)),
    ("16-bit grey png gradient: mid-grey, not white", png_16bit_grey_gradient, (256, 256),
     lambda im: 120 < ImageStat.Stat(im).mean[0] < 135 and im.getextrema()[0] == (0, 255)),
    ("16-bit rgb png", png_16bit_rgb, (4, 4), lambda im: near(im.getpixel((1, 1)), (128, 128, 128), 1)),
    ("1-bit png", lambda: save(halves(0, 1, mode="1"), "PNG"), (40, 20),
     lambda im: im.getpixel((2, 2)) == (0, 0, 0) and im.getpixel((38, 2)) == WHITE),
    ("grey jpeg", lambda: save(picture().convert("L"), "JPEG"), (96, 64), None),
    ("exif orientation 6: width and height swapped", lambda: jpeg_oriented(6), (20, 40),
     lambda im: near(im.getpixel((10, 5)), RED) and near(im.getpixel((10, 35)), BLUE)),
    ("exif orientation 1: as stored", lambda: jpeg_oriented(1), (40, 20), lambda im: near(im.getpixel((5, 10)), RED)),
    ("trailing bytes after IEND", lambda: PNG + b"junk" * 10, (96, 64), None),
]


@pytest.mark.parametrize("case,make,size,check", cases(DECODED))
def test_decodes_to_rgb(case, make, size, check):
    image = decode_image(make())
    assert image.mode == "RGB"
    assert image.size == size
    assert check is None or check(image)


# ---------------------------------------------------------------- refused

HTML = b"<!DOCTYPE html><html><body><img src=x></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
XML_SVG = b'<?xml version="1.0" encoding="UTF-8"?>\n' + SVG

# (id, bytes factory, exact message or message prefix ending with "...")
REFUSED = [
    # not an allowed format, whatever the file name or Content-Type said
    ("tiff", lambda: save(picture(), "TIFF"), f"Unsupported image format TIFF; {USE}"),
    ("bmp", lambda: save(picture(), "BMP"), f"Unsupported image format BMP; {USE}"),
    ("ico", lambda: save(picture(32, 32), "ICO"), f"Unsupported image format ICO; {USE}"),
    ("psd", lambda: b"8BPS\x00\x01" + bytes(40), f"Unsupported image format PSD; {USE}"),
    ("pdf", lambda: save(picture(), "PDF"), f"Unsupported image format PDF; {USE}"),
    ("svg", lambda: SVG, f"Unsupported image format SVG; {USE}"),
    ("svg with xml declaration", lambda: XML_SVG, f"Unsupported image format SVG; {USE}"),
    ("html", lambda: HTML, f"Unsupported image format HTML; {USE}"),
    ("heic", lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), f"Unsupported image format HEIF; {USE}"),
    pytest.param("avif without Pillow support", lambda: b"\x00\x00\x00\x1cftypavif" + bytes(64),
                 f"Unsupported image format AVIF; {USE}", marks=pytest.mark.skipif(AVIF, reason="AVIF supported"),
                 id="avif without Pillow support"),
    ("empty", lambda: b"", "Unable to decode the init image: the file is empty"),
    ("text", lambda: b"this is text, not a picture", "Unable to decode the init image: not a valid image file"),
    ("json", lambda: b'{"error": "not found"}', "Unable to decode the init image: not a valid image file"),
    ("random bytes", lambda: random.Random(7).randbytes(5000), "Unable to decode the init image: not a valid image file"),
    # decompression bombs and extreme sizes, from the header
    ("png declaring 100000x100000", lambda: handmade_png(100_000, 100_000), TOO_LARGE + "..."),
    ("png declaring 8000x8000 (over max_pixels, under Pillow's limit)", lambda: handmade_png(8000, 8000),
     f"{TOO_LARGE}8000x8000 pixels; the limit is {MAX_PIXELS} pixels and 16384 on a side"),
    ("png declaring 1x20000000 (side cap)", lambda: handmade_png(1, 20_000_000),
     f"{TOO_LARGE}1x20000000 pixels; the limit is {MAX_PIXELS} pixels and 16384 on a side"),
    ("png declaring 20000x1 (side cap)", lambda: handmade_png(20_000, 1), TOO_LARGE + "20000x1 pixels..."),
    ("jpeg declaring 65000x65000", lambda: jpeg_with_size(65_000, 65_000), TOO_LARGE + "..."),
    ("jpeg declaring 30000x100 (side cap)", lambda: jpeg_with_size(30_000, 100), TOO_LARGE + "30000x100 pixels..."),
    ("gif frame larger than its screen", gif_frame_larger_than_screen, TOO_LARGE + "8000x8000 pixels..."),
    # truncated and corrupt
    *[(f"png cut at {f:.1%}", lambda f=f: cut(PNG, f), "Unable to decode the init image: truncated ...")
      for f in (0.002, 0.03, 0.25, 0.5, 0.9)],
    ("png cut before IEND", lambda: PNG[:-12], "Unable to decode the init image: truncated PNG file"),
    ("png cut inside IEND", lambda: PNG[:-3], "Unable to decode the init image: truncated PNG file"),
    ("png bad IDAT crc", lambda: with_idat_crc_flipped(PNG), "Unable to decode the init image: corrupt PNG file (bad chunk checksum)"),
    ("png garbled IDAT (crc fixed)", lambda: with_idat_data_garbled(PNG), "Unable to decode the init image: truncated or corrupt PNG file"),
    ("png header then garbage", lambda: PNG[:33] + random.Random(1).randbytes(3000), "Unable to decode the init image: truncated or corrupt PNG file"),
    ("png signature only", lambda: PNG[:8], "Unable to decode the init image: truncated or corrupt PNG file"),
    ("png declaring 0x10", lambda: handmade_png(0, 10), CORRUPT + "..."),
    *[(f"jpeg cut at {f:.1%}", lambda f=f: cut(JPEG, f), "Unable to decode the init image: truncated or corrupt JPEG file")
      for f in (0.001, 0.01, 0.25, 0.5, 0.9)],
    ("jpeg header then garbage", lambda: JPEG[:400] + bytes(range(256)) * 10, "Unable to decode the init image: truncated or corrupt JPEG file"),
    *[(f"webp cut at {f:.0%}", lambda f=f: cut(WEBP, f), "Unable to decode the init image: truncated or corrupt WebP file")
      for f in (0.01, 0.5, 0.9)],
    *[(f"gif cut at {f:.0%}", lambda f=f: cut(GIF, f), "Unable to decode the init image: truncated or corrupt GIF file")
      for f in (0.01, 0.5)],
]


@pytest.mark.parametrize("case,make,message", cases(REFUSED))
def test_refused_with_a_clear_message(case, make, message):
    started = time.perf_counter()
    with pytest.raises(ImageInputError) as caught:
        decode_image(make())
    assert type(caught.value) is ImageInputError
    text = str(caught.value)
    if message.endswith("..."):
        assert text.startswith(message[:-3]), text
    else:
        assert text == message
    assert time.perf_counter() - started < 1.0  # from the header: nothing big decoded
    assert "<_io.BytesIO" not in text


def test_bomb_refused_quickly_before_decoding():
    data = handmade_png(100_000, 100_000)
    started = time.perf_counter()
    with pytest.raises(ImageInputError, match="^Init image too large"):
        decode_image(data)
    assert time.perf_counter() - started < 1.0


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_is_still_a_refusal():
    """10000x10000 is over Pillow's warning threshold (89M): with warnings as errors, Pillow raises
    in open; it must still come out as an ImageInputError."""
    with pytest.raises(ImageInputError, match="^Init image too large"):
        decode_image(handmade_png(10_000, 10_000))


def test_max_pixels_and_max_side_are_parameters():
    data = save(picture(100, 50), "PNG")
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(ImageInputError, match="^Init image too large: 100x50 pixels"):
        decode_image(data, max_pixels=4999)
    with pytest.raises(ImageInputError, match="^Init image too large: 100x50 pixels"):
        decode_image(data, max_side=99)


def test_global_pillow_state_untouched():
    for data in (cut(PNG, 0.5), cut(JPEG, 0.5), handmade_png(100_000, 100_000)):
        with pytest.raises(ImageInputError):
            decode_image(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


# ---------------------------------------------------------------- high bit depth grey


def grey(mode: str, values: list) -> Image.Image:
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    return image


@pytest.mark.parametrize("mode,values,expected", [
    pytest.param("I;16", [0, 32768, 65535], [0, 128, 255], id="I;16 0..65535"),
    pytest.param("I;16", [0, 257, 514], [0, 1, 2], id="I;16 dark stays dark"),
    pytest.param("I;16B", [0, 32768, 65535], [0, 128, 255], id="I;16B"),
    pytest.param("I", [0, 32768, 65535], [0, 128, 255], id="I holding 16-bit values"),
    pytest.param("I", [0, 128, 255], [0, 128, 255], id="I holding 8-bit values"),
    pytest.param("I", [-1000, 0, 1000], [0, 128, 255], id="I outside 0..65535: own extrema"),
    pytest.param("F", [0.0, 0.5, 1.0], [0, 128, 255], id="F 0..1"),
    pytest.param("F", [0.0, 100.0, 255.0], [0, 100, 255], id="F 0..255"),
])
def test_high_bit_depth_grey_scaled_not_clipped(mode, values, expected):
    image = _to_rgb(grey(mode, values))
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0))[0] for x in range(len(values))] == pytest.approx(expected, abs=1)

