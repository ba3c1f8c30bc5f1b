import io
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tirsynth import images, shards

LIMIT = 10_000_000


def save(image: Image.Image, path, fmt, **kwargs):
    image.save(path, format=fmt, **kwargs)
    return path


def gradient(mode="RGB", size=(48, 32)) -> Image.Image:
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    rgb = Image.fromarray(np.stack([x, y, 255 - x], axis=2))
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.mark.parametrize(
    "fmt,suffix",
    [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif"), ("WEBP", "webp")],
)
def test_every_format_stores_the_source_pixels(tmp_path, fmt, suffix):
    path = save(gradient(), tmp_path / f"a.{suffix}", fmt)
    stored = images.read_image(path, "rgb", max_pixels=LIMIT)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(shards.decode_rgb(stored.data), expected)
    assert (stored.width, stored.height) == (48, 32)
    # Web formats keep their bytes; the others become lossless PNG.
    assert (stored.conversion == "") == (fmt in ("JPEG", "PNG", "WEBP"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_colour_modes_read_back_as_rgb(tmp_path, mode):
    path = save(gradient(mode), tmp_path / "a.png", "PNG")
    stored = images.read_image(path, "rgb", max_pixels=LIMIT)
    assert np.array_equal(
        shards.decode_rgb(stored.data), np.asarray(Image.open(path).convert("RGB"))
    )


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = save(gradient("CMYK"), tmp_path / "cmyk.jpg", "JPEG")
    stored = images.read_image(path, "rgb", max_pixels=LIMIT)
    assert stored.ext == "png" and "CMYK->RGB" in stored.conversion
    assert np.array_equal(
        shards.decode_rgb(stored.data), np.asarray(Image.open(path).convert("RGB"))
    )


def test_16_bit_thermal_is_preserved(tmp_path):
    values = np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40  # up to 61400
    png = save(Image.fromarray(values), tmp_path / "t.png", "PNG")
    tif = save(Image.fromarray(values), tmp_path / "t.tif", "TIFF")
    for path in (png, tif):
        stored = images.read_image(path, "tir", max_pixels=LIMIT)
        decoded = shards.decode_tir(stored.data)
        assert decoded.dtype == np.uint16 and stored.bits == 16
        assert np.array_equal(decoded, values)


def test_three_channel_gray_thermal_reduces_exactly(tmp_path):
    gray = np.asarray(gradient("L"))
    path = save(Image.fromarray(gray).convert("RGB"), tmp_path / "t.png", "PNG")
    stored = images.read_image(path, "tir", max_pixels=LIMIT)
    assert stored.conversion == ""  # bytes kept; the reader takes one channel
    assert np.array_equal(shards.decode_tir(stored.data), gray)


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    path = save(gradient(), tmp_path / "phone.jpg", "JPEG", exif=exif.tobytes())
    stored = images.read_image(path, "rgb", max_pixels=LIMIT)
    assert (stored.width, stored.height) == (32, 48)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert np.array_equal(shards.decode_rgb(stored.data), expected)
    assert "exif-orientation-6" in stored.conversion


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
        (lambda p: p.write_text("hello, not a picture"), "not an image"),
        (lambda p: p.write_bytes(_encoded("JPEG")[:300]), "truncated or corrupt image"),
        (lambda p: p.write_bytes(_encoded("PNG")[:-40]), "truncated or corrupt image"),
    ],
    ids=["zero-byte", "non-image", "truncated-jpeg", "truncated-png"],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(images.ImageRejected, match=reason):
        images.read_image(path, "rgb", max_pixels=LIMIT)


def test_huge_image_hits_the_decompression_bomb_limit(tmp_path):
    path = save(gradient(size=(200, 100)), tmp_path / "big.png", "PNG")
    with pytest.raises(images.ImageRejected, match="image too large"):
        images.read_image(path, "rgb", max_pixels=5_000)
    # Pillow's own limit is left as it was.
    assert Image.MAX_IMAGE_PIXELS != 5_000


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(images.ImageRejected, match="unreadable file"):
        images.read_image(tmp_path / "nope.jpg", "rgb", max_pixels=LIMIT)


def test_full_verify_catches_corruption_that_keeps_the_end_marker(tmp_path):
    data = bytearray(_encoded("PNG", size=(64, 64)))
    data[200:260] = b"\x00" * 60  # damage compressed data, keep IEND
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    with pytest.raises(images.ImageRejected):
        images.read_image(path, "rgb", verify="full", max_pixels=LIMIT)


def _variant(name: str) -> bytes:
    """Encoded images around the edges of `images.sniff_header`'s fast path."""
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 1
    buffer = io.BytesIO()
    options = {
        "jpeg-rgb": ("RGB", "JPEG", {}),
        "jpeg-gray": ("L", "JPEG", {}),
        "jpeg-progressive": ("RGB", "JPEG", {"progressive": True}),
        "jpeg-16bit-tables": ("RGB", "JPEG", {"qtables": [[300] * 64]}),
        "jpeg-exif": ("RGB", "JPEG", {"exif": exif.tobytes()}),
        "jpeg-icc": ("RGB", "JPEG", {"icc_profile": b"\0" * 200}),
        "jpeg-cmyk": ("CMYK", "JPEG", {}),
        "png-rgb": ("RGB", "PNG", {}),
        "png-gray": ("L", "PNG", {}),
        "png-interlaced": ("RGB", "PNG", {"interlace": 1}),
        "png-exif": ("RGB", "PNG", {"exif": exif.tobytes()}),
        "png-palette": ("P", "PNG", {}),
        "png-rgba": ("RGBA", "PNG", {}),
        "png-gray-alpha": ("LA", "PNG", {}),
    }
    if name == "png-16bit":
        Image.fromarray(np.arange(48 * 32, dtype=np.uint16).reshape(32, 48)).save(buffer, "PNG")
        return buffer.getvalue()
    mode, fmt, kwargs = options[name]
    gradient(mode).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


FAST = ["jpeg-rgb", "jpeg-gray", "jpeg-progressive", "jpeg-16bit-tables"]
FAST += ["png-rgb", "png-gray", "png-interlaced", "png-16bit"]
DEFERRED = ["jpeg-exif", "jpeg-icc", "jpeg-cmyk", "png-exif", "png-palette", "png-rgba"]
DEFERRED += ["png-gray-alpha"]


@pytest.mark.parametrize("name", FAST + DEFERRED)
def test_header_fast_path_reports_what_pillow_reports_or_defers(name, tmp_path, monkeypatch):
    data = _variant(name)
    header = images.sniff_header(data)
    assert (header is not None) == (name in FAST)
    if header is not None:
        image = Image.open(io.BytesIO(data))
        assert (header.format, header.width, header.height, header.mode) == (
            image.format,
            image.width,
            image.height,
            image.mode,
        )
    # Whichever path reads it, ingest stores the same thing.
    path = tmp_path / "image"
    path.write_bytes(data)
    role = "tir" if name == "png-16bit" else "rgb"
    fast = images.read_image(path, role, max_pixels=LIMIT)
    monkeypatch.setattr(images, "sniff_header", lambda data: None)
    assert images.read_image(path, role, max_pixels=LIMIT) == fast


def _damaged(name: str) -> bytes:
    jpeg, png = _variant("jpeg-rgb"), _variant("png-rgb")
    if name == "jpeg-short-table":  # a quantisation table segment cut to 30 bytes
        start = jpeg.index(b"\xff\xdb")
        return jpeg[:start] + b"\xff\xdb\x00\x20" + b"\x00" * 30 + jpeg[start:]
    if name == "jpeg-short-jfif":
        return b"\xff\xd8\xff\xe0\x00\x06JFIF" + jpeg[2:]
    if name == "jpeg-12-bit":
        start = jpeg.index(b"\xff\xc0")
        return jpeg[: start + 4] + b"\x0c" + jpeg[start + 5 :]
    if name == "jpeg-segment-past-end":
        return jpeg[:2] + b"\xff\xe0\xff\xff" + jpeg[6:200]
    if name == "jpeg-second-frame":
        start = jpeg.index(b"\xff\xc0")
        frame = jpeg[start : start + 2 + int.from_bytes(jpeg[start + 2 : start + 4], "big")]
        return jpeg[:start] + frame + jpeg[start:]
    if name == "png-bad-header-crc":
        return png[:29] + bytes([png[29] ^ 1]) + png[30:]
    if name == "png-bad-chunk-name":
        start = png.index(b"IDAT") - 4
        chunk = b"\x00\x00\x00\x01" + b"a-b!" + b"x"
        return png[:start] + chunk + zlib.crc32(b"a-b!x").to_bytes(4, "big") + png[start:]
    raise KeyError(name)


@pytest.mark.parametrize(
    "name,pillow_refuses",
    [
        ("jpeg-short-table", True),
        ("jpeg-short-jfif", True),
        ("jpeg-12-bit", True),
        ("jpeg-segment-past-end", True),
        ("jpeg-second-frame", False),
        ("png-bad-header-crc", True),
        ("png-bad-chunk-name", True),
    ],
)
def test_irregular_headers_are_left_to_pillow(name, pillow_refuses, tmp_path):
    data = _damaged(name)
    assert images.sniff_header(data) is None
    path = tmp_path / "image"
    path.write_bytes(data)
    if pillow_refuses:
        with pytest.raises(images.ImageRejected):
            images.read_image(path, "rgb", max_pixels=LIMIT)
    else:
        images.read_image(path, "rgb", max_pixels=LIMIT)


def test_exif_after_the_frame_header_still_rotates(tmp_path):
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    segment = b"Exif\0\0" + exif.tobytes()
    app1 = b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment
    jpeg = _variant("jpeg-rgb")
    scan = jpeg.index(b"\xff\xda")  # EXIF between the frame header and the scan
    path = tmp_path / "late-exif.jpg"
    path.write_bytes(jpeg[:scan] + app1 + jpeg[scan:])
    assert images.sniff_header(path.read_bytes()) is None
    stored = images.read_image(path, "rgb", max_pixels=LIMIT)
    assert (stored.width, stored.height) == (32, 48) and "exif-orientation-6" in stored.conversion


def test_daynight_estimate_reads_the_sky():
    def scene(sky, ground):
        pixels = np.full((90, 120, 3), ground, np.uint8)
        pixels[:30] = sky
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        return buffer.getvalue()

    # A brightened night frame: bright road, dark sky. Whole-image means would say day.
    assert images.estimate_daynight(scene(sky=60, ground=230))[0] == "night"
    assert images.estimate_daynight(scene(sky=220, ground=120))[0] == "day"


def _encoded(fmt: str, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format=fmt)
    return buffer.getvalue()


def test_header_fast_path_agrees_with_pillow_on_damaged_headers():
    # Random bytes changed in the first 2 KB of the built-in sample's JPEGs: whenever the
    # fast path answers, Pillow opens the file with the same format, size and mode.
    sample = Path(images.__file__).parent / "sample"
    answered = 0
    for path in sorted(sample.rglob("*.jpg")):
        data = path.read_bytes()
        rng = random.Random(path.name)
        for _ in range(100):
            damaged = bytearray(data)
            for _ in range(rng.randrange(1, 3)):
                damaged[rng.randrange(2000)] = rng.randrange(256)
            header = images.sniff_header(bytes(damaged))
            if header is None:
                continue
            answered += 1
            opened = Image.open(io.BytesIO(damaged))
            assert (opened.format, opened.size, opened.mode) == (
                header.format,
                (header.width, header.height),
                header.mode,
            )
    assert answered > 1000  # most damage falls in table contents the fast path accepts
