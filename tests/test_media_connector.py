"""Our vLLM media connector (vlm.serve.engine.media) gives vLLM exactly what its own loader makes, from the image
the guard decoded, and never fetches."""

from __future__ import annotations

import asyncio
import io
import socket

import numpy as np
import pytest
from PIL import Image
from vllm_helpers import data_url, noise_image, png_bytes

from vlm.serve.guard import GuardConfig, check_request
from vlm.serve.vetted import VETTED

pytestmark = pytest.mark.vllm


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    return encoded(noise_image(1, (40, 24)), "JPEG", exif=exif)


def rgba_png() -> bytes:
    rgba = noise_image(2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return encoded(rgba, "PNG")


IMAGES = {
    "png-rgb": (png_bytes(noise_image(0)), "image/png"),
    "png-rgba": (rgba_png(), "image/png"),
    "gif-palette-transparent": (encoded(noise_image(3).convert("P"), "GIF", transparency=0), "image/gif"),
    "jpeg-grey": (encoded(noise_image(4).convert("L"), "JPEG"), "image/jpeg"),
    "jpeg-exif-rotated": (rotated_jpeg(), "image/jpeg"),
    "bmp": (encoded(noise_image(5), "BMP"), "image/bmp"),
}


@pytest.fixture(scope="module")
def connectors():
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    from vlm.serve.engine import register
    from vlm.serve.engine.media import CONNECTOR_NAME

    register()
    return MEDIA_CONNECTOR_REGISTRY.load(CONNECTOR_NAME), MEDIA_CONNECTOR_REGISTRY.load("http")


@pytest.mark.parametrize("name", IMAGES)
def test_a_handed_over_image_is_what_vllm_would_decode(connectors, name):
    ours, stock = connectors
    data, mime = IMAGES[name]
    url = data_url(data, mime)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }
    changed = check_request("/v1/chat/completions", body, GuardConfig(["m"], hand_off_images=True))
    assert not changed  # a canonical data: URL goes to vLLM as the client sent it
    hits = VETTED.hits
    got, want = ours.fetch_image(url), stock.fetch_image(url)
    assert VETTED.hits == hits + 1  # taken from the guard, not decoded again
    assert got.original_bytes == want.original_bytes == data and got.io_config == want.io_config
    assert got.media.mode == want.media.mode == "RGB" and got.media.size == want.media.size
    assert np.array_equal(np.asarray(got.media), np.asarray(want.media))
    assert VETTED.take(url) is None  # taken once


def test_a_miss_decodes_as_vllm_does(connectors):
    ours, stock = connectors
    url = data_url(rgba_png())
    misses = VETTED.misses
    got, want = ours.fetch_image(url), stock.fetch_image(url)
    assert VETTED.misses == misses + 1
    assert np.array_equal(np.asarray(got.media), np.asarray(want.media)) and got.io_config == want.io_config


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/x.png", "https://example.com/x.png", "file:///etc/passwd"]
)
def test_it_never_fetches(connectors, url, monkeypatch):
    def no_connect(*args, **kwargs):
        raise AssertionError("the connector tried to connect")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    with pytest.raises(ValueError, match="only from data: URLs"):
        connectors[0].fetch_image(url)


def test_the_async_path_takes_the_handed_over_image(connectors):
    ours, _ = connectors
    data = png_bytes(noise_image(6))
    url = data_url(data)
    VETTED.put(url, Image.open(io.BytesIO(data)), data)
    hits = VETTED.hits
    got = asyncio.run(ours.fetch_image_async(url))
    assert VETTED.hits == hits + 1 and got.original_bytes == data
    with pytest.raises(ValueError, match="only from data: URLs"):
        asyncio.run(ours.fetch_image_async("http://127.0.0.1:9/x.png"))
