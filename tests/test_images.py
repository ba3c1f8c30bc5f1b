import io

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
