"""vLLM's media loader for `vlm serve`: the image the guard decoded, or the bytes of a `data:` URL, never a fetch.

Registered as the media connector "vlm-vetted"; `vlm serve` selects it through `VLLM_MEDIA_CONNECTOR`. The guard
(`vlm.serve.guard`) has already turned every image into a `data:` URL of bytes it decoded and vetted and put the
decoded image in `vlm.serve.vetted.VETTED`; here vLLM's chat parser takes it instead of decoding a second time. It
then finishes the image as vLLM's own `ImageMediaIO.load_bytes` does (EXIF orientation, mode conversion), so the
pixels, and the bytes vLLM's multimodal cache hashes, are exactly what vLLM would have made. A miss (an entry
evicted) decodes the URL's bytes as vLLM would. Any URL but `data:` is refused: only the guard fetches.
"""

from __future__ import annotations

from vllm.multimodal.image import normalize_image
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector
from vllm.multimodal.media.base import MediaWithBytes
from vllm.multimodal.media.image import ImageMediaIO

from ..vetted import VETTED

CONNECTOR_NAME = "vlm-vetted"


def finish_vetted(image, data: bytes, media_io: ImageMediaIO) -> MediaWithBytes:
    """What `ImageMediaIO.load_bytes(data)` returns, from the image already decoded from `data`."""
    normalized = normalize_image(image)
    converted = media_io._convert_image_mode(normalized)
    io_config = None
    if converted is not normalized:
        io_config = {
            "image_mode": media_io.image_mode,
            "rgba_background_color": media_io.rgba_background_color,
        }
    return MediaWithBytes(converted, data, io_config)


@MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)
class VettedMediaConnector(MediaConnector):
    def _load_data_url(self, url, media_io):
        if isinstance(media_io, ImageMediaIO):
            vetted = VETTED.take(url)
            if vetted is not None:
                return finish_vetted(*vetted, media_io)
        return super()._load_data_url(url, media_io)

    @staticmethod
    def _refuse_fetch(url: str) -> None:
        if url[:5].lower() != "data:":
            raise ValueError("this server loads media only from data: URLs written by its request guard")

    def load_from_url(self, url, media_io, *, fetch_timeout=None):
        self._refuse_fetch(url)
        return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)

    async def load_from_url_async(self, url, media_io, *, fetch_timeout=None):
        self._refuse_fetch(url)
        return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)
