"""Image bytes from a client, decoded under a pixel cap (queries, localisation, the search page's thumbnails):
no torch here, so the search page decodes thumbnails without loading the models' stack."""

from __future__ import annotations

import io

from PIL import Image

from .errors import InvalidArgument, ServiceError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


def decode_image(data: bytes, max_pixels: int, target: int = 1024) -> Image.Image:
    """An RGB image from JPEG/PNG/WebP bytes; anything else, or one over ``max_pixels``: InvalidArgument.

    JPEGs are decoded at the smallest scale still at least ``target`` pixels on the short side (the
    encoders resize far below that), which bounds the memory of a large photo."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in IMAGE_FORMATS:
                raise InvalidArgument(f"image format {im.format} is not supported (JPEG, PNG or WebP)")
            if im.width * im.height > max_pixels:
                raise InvalidArgument(f"image of {im.width}x{im.height} pixels exceeds max_image_pixels {max_pixels}")
            if im.format == "JPEG":
                scale = max(1, min(im.width, im.height) // target)
                im.draft("RGB", (max(1, im.width // scale), max(1, im.height // scale)))
            return im.convert("RGB")
    except ServiceError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not an image at all
        raise InvalidArgument(f"undecodable image ({type(e).__name__}: {e})") from None
