"""The guard's request path: off the event loop, the client's bytes forwarded when nothing changed, decoded images
handed over once (vlm.serve.vetted), bounded."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time

import pytest
from PIL import Image
from vllm_helpers import data_url, noise_image, png_bytes

from vlm.serve.guard import GuardConfig, MediaGuard, check_request
from vlm.serve.media import MediaPolicy
from vlm.serve.vetted import VettedImages

httpx = pytest.importorskip("httpx")

PNG_URL = data_url(png_bytes(noise_image(3)))


def chat(parts, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": parts}], **extra}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


class Recorder:
    """The app behind the guard: records the body it receives, answers 200."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def post_all(guard, bodies: list[bytes]) -> list[tuple[int, float]]:
    """POST the bodies concurrently on one event loop; (status, seconds from the common start to its answer)."""
    start = time.perf_counter()

    async def one(client, body):
        response = await client.post("/v1/chat/completions", content=body)
        return response.status_code, time.perf_counter() - start

    async def main():
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    return asyncio.run(main())


def test_an_unchanged_body_is_forwarded_byte_for_byte():
    app = Recorder()
    guard = MediaGuard(app, GuardConfig(served_model_names=["m"]))
    part = json.dumps(image(PNG_URL))
    text = (
        '{ "messages" : [{"role":"user","content":[{"type":"text","text":"hi"}, PART]}], "max_tokens":  3.0 }'
    )
    raw = text.replace("PART", part).encode()
    assert post_all(guard, [raw])[0][0] == 200
    assert app.bodies == [raw]  # spacing, key order, 3.0: the client's own bytes


@pytest.mark.parametrize(
    "part",
    [
        {"image_url": PNG_URL},  # untyped
        {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "high"}},  # extra keys dropped
        image(PNG_URL.replace("image/png", "image/PNG", 1)),  # a MIME spelling vLLM need not know
    ],
)
def test_a_rewritten_part_is_serialized_in_the_canonical_shape(part):
    app = Recorder()
    guard = MediaGuard(app, GuardConfig(served_model_names=["m"]))
    assert post_all(guard, [json.dumps(chat([part])).encode()])[0][0] == 200
    assert json.loads(app.bodies[0])["messages"][0]["content"] == [image(PNG_URL)]


def test_check_request_says_whether_it_changed_the_body():
    config = GuardConfig(served_model_names=["m"])
    assert (
        check_request("/v1/chat/completions", chat([image(PNG_URL), {"type": "text", "text": "x"}]), config)
        is False
    )
    assert check_request("/v1/chat/completions", chat([{"image_url": PNG_URL}]), config) is True


class SlowImages(http.server.BaseHTTPRequestHandler):
    delay_s = 2.0
    body = png_bytes(noise_image(4))

    def do_GET(self):  # noqa: N802
        time.sleep(self.delay_s)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    server.shutdown()


@pytest.fixture(scope="module")
def big_image_body() -> bytes:
    """A 4000x4000 PNG that compresses to little: decoding it (zlib, off the GIL) takes a good part of a second,
    while the body stays small, so the test measures where decoding runs, not the GIL held by JSON parsing."""
    gradient = Image.linear_gradient("L").resize((4000, 4000)).convert("RGB")
    return json.dumps(chat([image(data_url(png_bytes(gradient)))])).encode()


def test_a_big_image_does_not_delay_other_requests(big_image_body):
    """Decoding runs off the event loop: small requests sent beside a slow-to-decode image finish first."""
    app = Recorder()
    guard = MediaGuard(app, GuardConfig(served_model_names=["m"]))
    fast = [json.dumps(chat("hello")).encode()] * 8
    results = post_all(guard, [big_image_body, *fast])
    assert all(status == 200 for status, _ in results)
    slow_s, fast_s = results[0][1], [seconds for _, seconds in results[1:]]
    assert max(fast_s) < slow_s / 2, (slow_s, fast_s)


def test_a_slow_image_does_not_delay_other_requests(slow_host):
    """A 2 s image fetch in flight beside 16 fast requests (text, and small data: images, which are decoded):
    each fast one answers in a fraction of the slow one's time. On the event loop, all would wait >= 2 s."""
    app = Recorder()
    policy = MediaPolicy(allow_private_urls=True)
    guard = MediaGuard(app, GuardConfig(served_model_names=["m"], policy=policy))
    slow = json.dumps(chat([image(slow_host)])).encode()
    fast = [json.dumps(chat("hello")).encode(), json.dumps(chat([image(PNG_URL)])).encode()] * 8
    results = post_all(guard, [slow, *fast])
    assert all(status == 200 for status, _ in results)
    slow_s, fast_s = results[0][1], [seconds for _, seconds in results[1:]]
    assert slow_s >= SlowImages.delay_s
    assert max(fast_s) < SlowImages.delay_s / 4, fast_s


def test_decoded_images_are_handed_over_once_when_enabled(monkeypatch):
    store = VettedImages()
    monkeypatch.setattr("vlm.serve.guard.VETTED", store)
    config = GuardConfig(served_model_names=["m"], hand_off_images=True)
    check_request("/v1/chat/completions", chat([image(PNG_URL), image(PNG_URL)]), config)
    assert len(store) == 1
    first, second = store.take(PNG_URL), store.take(PNG_URL)  # two parts, two takes
    assert first is not None and second is not None and store.take(PNG_URL) is None
    assert first[1] == png_bytes(noise_image(3)) and first[0].size == (40, 36)


def test_the_guard_hands_over_nothing_unless_enabled():
    from vlm.serve.vetted import VETTED

    before = len(VETTED)
    check_request(
        "/v1/chat/completions", chat([image(data_url(png_bytes(noise_image(9))))]), GuardConfig(["m"])
    )
    assert len(VETTED) == before


def test_the_store_is_bounded_in_entries_and_pixels():
    store = VettedImages(max_entries=3, max_pixel_bytes=10**9)
    img = Image.new("RGB", (10, 10))
    for i in range(5):
        store.put(f"u{i}", img, b"")
    assert len(store) == 3 and store.take("u0") is None and store.take("u4") is not None
    store = VettedImages(max_entries=100, max_pixel_bytes=3 * 300)  # three 10x10 RGB images
    for i in range(5):
        store.put(f"u{i}", img, b"")
    assert len(store) == 3 and store.take("u1") is None and store.take("u2") is not None
