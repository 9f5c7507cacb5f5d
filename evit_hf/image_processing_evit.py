"""The image processor of converted reference checkpoints: the reference's evaluation transform, to the pixel.

This file is copied next to the weights by `save_pretrained`, so it imports nothing from evit_hf.
"""

from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil


class EViTImageProcessor(DeiTImageProcessorPil):
    r"""
    DeiT's image processor (PIL backend: resize the shorter side, bicubic; center crop; normalize) with the center
    crop placed as the reference's evaluation places it.

    The reference crops at `round(margin / 2)` (Python's rounding, half to even) where transformers crops at
    `margin // 2`: for an odd margin whose half rounds up (a 640 x 427 photo resized to 383 x 256, margin 159: 80
    against 79), the crops would differ by one pixel. Everything else is [`DeiTImageProcessorPil`]'s.
    """

    def center_crop(self, image, size, **kwargs):
        height, width = image.shape[-2:]  # [channels, height, width]
        if size.height is None or size.width is None or size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # the stock errors and padding
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["EViTImageProcessor"]
