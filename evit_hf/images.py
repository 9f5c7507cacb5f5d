"""Images as the models see them: upright (EXIF orientation applied) and 8-bit RGB, whatever the file's mode and bit
depth. Training, evaluation and `evit-hf visualize` all go through `to_rgb`, so that one file gives the same pixels in
each of them. Only PIL and numpy are imported here: the command line opens images before it imports torch."""

import functools
import io
import mimetypes

import numpy as np
from PIL import ExifTags, Image, ImageOps


# The file types read as images, everywhere: image folders (`evit_hf.data`), `evit-hf calibrate`'s --images, and the
# pictures `evit-hf visualize` writes (`picture_extensions`, derived from this list). They are `datasets`' imagefolder
# loader's (`ImageFolder.EXTENSIONS`), so that a folder holds the same images whether evit_hf or
# `load_dataset("imagefolder")` reads it; written out here because importing `datasets` takes seconds, and the command
# line checks a name before that (tests/test_command_line.py compares the two lists).
IMAGE_EXTENSIONS = frozenset(
    {
        ".apng", ".blp", ".bmp", ".bufr", ".bw", ".cur", ".dcx", ".dds", ".dib", ".emf", ".eps", ".fit", ".fits",
        ".flc", ".fli", ".ftc", ".ftu", ".gbr", ".gif", ".grib", ".icb", ".icns", ".ico", ".iim", ".im", ".j2c",
        ".j2k", ".jfif", ".jp2", ".jpc", ".jpe", ".jpeg", ".jpf", ".jpg", ".jpx", ".mpeg", ".mpg", ".msp", ".pbm",
        ".pcd", ".pcx", ".pgm", ".png", ".pnm", ".ppm", ".ps", ".psd", ".pxr", ".ras", ".rgb", ".rgba", ".sgi",
        ".tga", ".tif", ".tiff", ".vda", ".vst", ".webp", ".wmf", ".xbm", ".xpm",
    }
)  # fmt: skip


# Modes whose values are not 8-bit: 16-bit integers, 32-bit integers and 32-bit floats (one channel each).
# `convert("RGB")` clips them at 255, which turns a 16-bit photograph black and white.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
WIDE_MODES = SIXTEEN_BIT_MODES | {"I", "F"}
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation tag says, as `datasets`' `Image` feature does on decoding (it
    transposes whenever the tag is present); the result carries no orientation tag, so turning it again changes
    nothing."""
    if image.getexif().get(ExifTags.Base.Orientation) is None:
        return image
    return ImageOps.exif_transpose(image)


def wide_values_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """One channel of a 16-bit, 32-bit integer or float image as 8-bit values, scaled, never clipped.

    - 16-bit modes (`I;16*`): 0..65535 maps to 0..255.
    - `I` (32-bit integers): read as 16-bit where the values fit 0..65535 (what 16-bit PNG, TIFF and PGM files hold
      in this mode), otherwise stretched from their minimum to their maximum.
    - `F` (floats): 0..1 maps to 0..255, values within 0..255 are kept, anything else is stretched from minimum to
      maximum; NaN becomes 0.
    """
    values = values.astype(np.float64)
    if mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif mode == "F" and low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` upright and in 8-bit RGB.

    16-bit and other wide single-channel modes are scaled to 8 bits (`wide_values_to_uint8`). Images with
    transparency (RGBA, LA, PA, palette or grey with a transparent colour) are composited over white, as
    transformers' `convert_to_rgb` does, so that transparent pixels do not show whatever colour they happen to store.
    Everything else (L, 1, P, CMYK, YCbCr, ...) goes through PIL's own conversion. 16-bit RGB files need nothing
    more: PIL reads them as 8-bit RGB(A), from the high bytes.
    """
    image = upright(image)
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_MODES:
        return Image.fromarray(wide_values_to_uint8(np.asarray(image), image.mode), mode="L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(path: str) -> Image.Image:
    """The image file at `path`, decoded in full (a truncated file fails here), upright and in 8-bit RGB
    (`to_rgb`)."""
    with Image.open(path) as opened:
        opened.load()
        return to_rgb(opened)


# The picture formats every viewer opens, named first where the extensions are listed for a user.
FAMILIAR_PICTURE_FORMATS = ("PNG", "JPEG")


@functools.cache
def picture_extensions() -> tuple[str, ...]:
    """The `IMAGE_EXTENSIONS` that this PIL writes a drawn RGB picture in whole. Listed for a user: first each
    format's usual extension (by its MIME type), PNG's and JPEG's leading, then the other spellings (.jpeg, .tif).

    Written differs from read: PIL reads formats it cannot write (EPS without Ghostscript, WMF), writes some only in
    other modes (XBM: 1-bit) or only small (ICO: at most 256 pixels), and writes WebP only with libwebp. So each
    candidate is tried: a canvas wider than 256 pixels in six colours must read back at its size with its colours
    (within JPEG's loss). A picture written in one of these is also an image the project reads."""
    colours = np.array([[230, 30, 30], [30, 200, 30], [30, 30, 220], [240, 240, 240], [20, 20, 20], [200, 180, 40]])
    canvas = np.repeat(np.repeat(colours[None].astype(np.uint8), 20, axis=0), 50, axis=1)  # [20, 300, 3]
    Image.init()
    usual_extensions = mimetypes.MimeTypes()  # Python's own table, not the system's: the same order everywhere
    order = {}
    for extension in IMAGE_EXTENSIONS:
        picture_format = Image.registered_extensions().get(extension)
        if picture_format is None or picture_format not in Image.SAVE:
            continue
        written = io.BytesIO()
        try:
            Image.fromarray(canvas).save(written, format=picture_format)
            written.seek(0)
            with Image.open(written) as opened:
                read_back = np.asarray(to_rgb(opened))
        except (OSError, ValueError, KeyError, SyntaxError):  # no encoder, a mode the format cannot hold
            continue
        if read_back.shape == canvas.shape and np.abs(read_back.astype(int) - canvas).mean() < 8:
            usual = usual_extensions.guess_extension(Image.MIME.get(picture_format, "")) == extension
            familiar = (
                FAMILIAR_PICTURE_FORMATS.index(picture_format) if picture_format in FAMILIAR_PICTURE_FORMATS else 2
            )
            order[extension] = (not usual, familiar, extension)
    return tuple(sorted(order, key=order.get))
