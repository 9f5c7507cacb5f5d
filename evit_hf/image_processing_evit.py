"""The image processor of converted reference checkpoints: the reference's evaluation transform, to the pixel.

This file is copied next to the weights by `save_pretrained`, so it imports nothing from evit_hf.
"""

import numpy as np
from PIL import Image
from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
from transformers.processing_utils import ImagesKwargs


# ITU-R 601-2 luma, the weights of PIL's convert("L"), for images given as arrays.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class EViTImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_convert_grayscale (`bool`, *optional*, defaults to `False`):
        Convert every image to one grayscale channel (PIL's `convert("L")`; arrays by the same luma weights), for
        models whose patch embedding takes one input channel. `image_mean` and `image_std` then hold one value each.
    """

    do_convert_grayscale: bool | None


class EViTImageProcessor(DeiTImageProcessorPil):
    r"""
    DeiT's image processor (PIL backend: resize the shorter side, bicubic; center crop; normalize) with the center
    crop placed as the reference's evaluation places it, and an optional conversion to one grayscale channel.

    The reference crops at `round(margin / 2)` (Python's rounding, half to even) where transformers crops at
    `margin // 2`: for an odd margin whose half rounds up (a 640 x 427 photo resized to 383 x 256, margin 159: 80
    against 79), the crops would differ by one pixel. Everything else is [`DeiTImageProcessorPil`]'s.
    """

    valid_kwargs = EViTImageProcessorKwargs
    do_convert_grayscale = False

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, do_convert_grayscale=None, **kwargs):
        if not do_convert_grayscale:
            return super().process_image(
                image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
            )
        if do_convert_rgb:
            raise ValueError("do_convert_rgb and do_convert_grayscale exclude each other: set one of them.")
        if isinstance(image, Image.Image):
            image = image.convert("L")
        image = super().process_image(image, input_data_format=input_data_format, **kwargs)  # [channels, h, w]
        if image.shape[0] in (3, 4):  # RGB or RGBA arrays; alpha is dropped as convert("L") drops it
            luma = np.tensordot(np.asarray(LUMA_WEIGHTS), image[:3].astype(np.float64), axes=1)[None]
            image = (
                luma.round().astype(image.dtype)
                if np.issubdtype(image.dtype, np.integer)
                else luma.astype(image.dtype)
            )
        elif image.shape[0] != 1:
            raise ValueError(f"Cannot convert an image of {image.shape[0]} channels to grayscale; give 1, 3 or 4.")
        return image

    def center_crop(self, image, size, **kwargs):
        height, width = image.shape[-2:]  # [channels, height, width]
        if size.height is None or size.width is None or size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # the stock errors and padding
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["EViTImageProcessor"]
