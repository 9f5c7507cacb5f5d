"""Image files for the folder tests: plain, truncated, 16-bit and EXIF-rotated ones, and a datasets cache of the test's
own for the image checks."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image


@pytest.fixture(autouse=True)
def image_check_cache(tmp_path, monkeypatch):
    """The checks of these throw-away folders are cached in the test's own folder, not in the user's datasets cache.
    Autouse where imported."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def write_image(path, color=(200, 30, 30), size=(40, 36), file_format="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=file_format)


def png_bytes(values: np.ndarray, bit_depth: int = 16) -> bytes:
    """A PNG file of `values` ([height, width] grey, or [height, width, 2 / 3 / 4] grey+alpha, RGB, RGBA) at
    `bit_depth`, written chunk by chunk: PIL writes no 16-bit RGB."""
    height, width = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    sample = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + values[row].astype(sample).tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sixteen_bit_gradient(height=36, width=40) -> np.ndarray:
    """Grey values spread over the whole 16-bit range (most of them above 255, which `convert("RGB")` clips)."""
    return np.linspace(0, 65535, height * width).round().astype(np.uint16).reshape(height, width)


def quadrants_image(size=(48, 32)) -> Image.Image:
    """A wide image whose four quadrants differ: any turn or flip changes it."""
    width, height = size
    image = Image.new("RGB", size, (250, 20, 20))
    image.paste((20, 250, 20), (width // 2, 0, width, height // 2))
    image.paste((20, 20, 250), (0, height // 2, width // 2, height))
    image.paste((240, 240, 20), (width // 2, height // 2, width, height))
    return image


def write_rotated_jpeg(path, orientation=6):
    """A real JPEG stored sideways with the EXIF tag that says how to turn it upright (6: 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    quadrants_image().save(path, format="JPEG", quality=95, exif=exif.tobytes())


def write_truncated_jpeg(path, size=(64, 64)):
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def good_folder(root, classes=("cat", "dog"), count=4):
    for label in classes:
        for i in range(count):
            write_image(root / label / f"{i}.png", (200, 30, 30) if label == "cat" else (30, 30, 200))
    return root
