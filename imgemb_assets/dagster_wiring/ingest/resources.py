"""The `image_limits` resource: what an original image may cost before it is rejected instead of decoded."""

import dagster as dg
from pydantic import Field

from imgemb_assets.core.imaging.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_IMAGE_BYTES, ImageLimits


class ImageLimitsResource(dg.ConfigurableResource):
    """What an original image may cost before it is rejected (with the reason) instead of decoded."""

    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, description="Larger objects are rejected without being downloaded."
    )
    max_image_pixels: int | None = Field(
        default=None,
        description="Larger images are rejected before decoding; default: Pillow's decompression-bomb limit.",
    )
    max_decode_bytes: int = Field(
        default=DEFAULT_MAX_DECODE_BYTES,
        description="Memory the images decoded at once may take, estimated from their headers (an image estimated "
        "above it decodes alone).",
    )
    full_size_jpeg_decode: bool = Field(
        default=False,
        description="Decode every JPEG at its full size before the bilinear resize to 224x224, as the article does. "
        "Default (false): a JPEG at least twice 224 px on both sides is decoded at 1/2, 1/4 or 1/8 scale in the DCT "
        "domain first (Pillow's draft), which is faster and needs far less memory but gives slightly different "
        "thumbnails and vectors (see the README). PNG and WebP are always decoded at full size. Changing it "
        "makes every stored thumbnail again.",
    )

    def limits(self) -> ImageLimits:
        return ImageLimits(
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
            max_decode_bytes=self.max_decode_bytes,
            full_size_jpeg_decode=self.full_size_jpeg_decode,
        )
