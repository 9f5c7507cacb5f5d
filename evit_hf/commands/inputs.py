"""How the `evit-hf` commands read their model and image arguments: each failure becomes the parser's one-line error
naming the option to fix, and the cheap checks (a missing folder, a configuration) come before a model is loaded."""

import os

from ..configuration_evit_base import vision_config_of
from ..messages import one_line
from .arguments import looks_like_path


def load_config(parser, model: str):
    """The configuration of `model` (a folder or a Hub id), or a parser error saying why there is none."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            parser.error(f"argument --model: {model} has no config.json; give a folder written by save_pretrained")
    elif looks_like_path(model):
        parser.error(f"argument --model: {model} is not a folder; give a checkpoint folder or a Hub id")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        parser.error(f"argument --model: cannot load a configuration from {model}: {one_line(error)}")


def read_image_argument(parser, flag: str, path: str):
    """The image file at `path`, decoded in full (a truncated file fails here, not after the model is built), upright
    and 8-bit RGB as in training and evaluation; a parser error naming `flag` for a file that is no readable image,
    a decompression bomb included."""
    from PIL import Image

    from ..images import load_rgb_image

    try:
        return load_rgb_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        parser.error(f"argument {flag}: cannot read {path} as an image ({one_line(error)})")


def image_processor_argument(parser, model: str, config, image_processor: str | None):
    """The image processor given (`--image-processor`), else the checkpoint's own (a damaged one is an error, not a
    reason to fall back), else the default one for `config`."""
    from transformers import AutoImageProcessor

    from ..visualization import load_image_processor_or_default

    if image_processor:
        if looks_like_path(image_processor) and not os.path.isdir(image_processor):
            parser.error(f"argument --image-processor: {image_processor} is not a folder")
        try:
            return AutoImageProcessor.from_pretrained(image_processor)
        except (OSError, ValueError) as error:
            parser.error(f"argument --image-processor: cannot load an image processor: {one_line(error)}")
    if os.path.isfile(os.path.join(model, "preprocessor_config.json")):
        try:
            return AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as error:
            parser.error(
                f"argument --model: cannot load the image processor in {model}: "
                f"{one_line(error).rstrip('.')}; repair its preprocessor_config.json or pass --image-processor"
            )
    return load_image_processor_or_default(model, config)


def processed_pixels(parser, processor, images, source: str, model: str, config):
    """`processor`'s pixel values `[images, channels, height, width]` of `images` (read from `source`); a parser error
    when the processor fails on them or makes pixels of another channel count than `model` takes."""
    try:
        pixel_values = processor(images=images, return_tensors="pt").pixel_values
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"argument --image-processor: the image processor fails on {source}: {one_line(error)}")
    num_channels = vision_config_of(config).num_channels  # a two-tower model keeps it in its tower's
    if pixel_values.shape[1] != num_channels:
        parser.error(
            f"argument --image-processor: the image processor makes {pixel_values.shape[1]}-channel pixels, but "
            f"{model} takes {num_channels}; pass an --image-processor made for this model"
        )
    return pixel_values


def load_model_argument(parser, load, model: str):
    """`load(model)`, or a parser error: damaged weights (truncated, not safetensors) raise safetensors', torch's or
    transformers' own errors, which all become one line."""
    try:
        return load(model)
    except Exception as error:
        parser.error(f"argument --model: cannot load the model from {model}: {one_line(error)}")
