"""`vlm serve` end to end with the official `openai` client: images, streaming, concurrency, every bad input.

Two servers start once for the module, side by side, on 127.0.0.1:
- `strict`: the defaults (private URLs and file:// refused), an API key, at most 2 images of 1 Mpixel; it runs
  without --enforce-eager, so vLLM's warm-up pass (our dummy inputs) is exercised once;
- `open`: private URLs and one local media directory explicitly switched on, no key.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.server
import threading
import urllib.error
import urllib.request

import pytest
from vllm_helpers import Server, data_url, noise_image, png_bytes, tiny_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
MODEL = "clip-llama-mlp"


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "allowed" / "shape.png").write_bytes(png_bytes(noise_image(1)))
    (root / "secret.png").write_bytes(png_bytes(noise_image(2)))
    return root


@pytest.fixture(scope="module")
def servers(tmp_path_factory, media_dir):
    logs = tmp_path_factory.mktemp("server-logs")
    limits = ["--max-images", "2", "--max-image-pixels", "1000000"]
    ckpt = tiny_checkpoint("clip", "llama", "mlp")
    started = {
        "strict": Server("strict", ckpt, ["--api-key", API_KEY, *limits], logs, api_key=API_KEY),
        "open": Server(
            "open",
            ckpt,
            [
                "--enforce-eager",
                "--allow-private-urls",
                "--allowed-local-media-path",
                str(media_dir / "allowed"),
                *limits,
            ],
            logs,
            api_key=API_KEY,
        ),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def strict(servers):
    return servers["strict"]


@pytest.fixture(scope="module")
def open_server(servers):
    return servers["open"]


@pytest.fixture(scope="module")
def image_host(media_dir):
    """A tiny HTTP server on 127.0.0.1 (a private address: only the `open` server may fetch from it)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir / "allowed"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def chat(client, urls, text="what colour is the shape?", model=MODEL, **kwargs):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [
        {"type": "text", "text": text}
    ]
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0.0, **kwargs
    )


def test_health_and_models(strict):
    assert strict.healthy()
    assert [m.id for m in strict.client().models.list().data] == [MODEL]


def test_data_url_chat_matches_transformers(strict):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = noise_image(7)
    reply = chat(strict.client(), [data_url(png_bytes(image))], extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens > 16  # 16 image placeholders + the text
    assert choice.message.content

    # The server renders the checkpoint's own chat template and answers as transformers would.
    ckpt = str(tiny_checkpoint("clip", "llama", "mlp"))
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    content = [{"type": "image"}, {"type": "text", "text": "what colour is the shape?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert reply.usage.prompt_tokens == batch["input_ids"].shape[1]
    assert choice.model_extra["token_ids"] == out[0, batch["input_ids"].shape[1] :].tolist()


def test_streaming_equals_non_streaming(strict):
    url = data_url(png_bytes(noise_image(8)))
    full = chat(strict.client(), [url]).choices[0].message.content
    chunks = chat(strict.client(), [url], stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full


def test_concurrent_requests(strict):
    urls = [data_url(png_bytes(noise_image(100 + i))) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda u: chat(strict.client(), [u]), urls))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert all(r.usage.completion_tokens >= 1 for r in replies)


def _truncated_png() -> bytes:
    data = png_bytes(noise_image(3, size=(64, 64)))
    return data[: len(data) // 2]


BAD_INPUTS = {  # name -> (request kwargs, status, message fragment)
    "truncated image": ({"urls": [data_url(_truncated_png())]}, 400, "truncated"),
    "corrupt image bytes": ({"urls": [data_url(b"definitely not a png")]}, 400, "not a readable image"),
    "non-image data URL": ({"urls": [data_url(b"hello", "text/plain")]}, 400, "only image/*"),
    "data URL not base64": ({"urls": ["data:image/png,abc"]}, 400, "base64"),
    "unsupported scheme": ({"urls": ["ftp://example.com/a.png"]}, 400, "unsupported image URL scheme 'ftp'"),
    "too many images": ({"urls": [data_url(png_bytes(noise_image(4)))] * 3}, 400, "at most 2"),
    "decompression bomb": (
        {"urls": [data_url(png_bytes(noise_image(0, size=(8, 8)).resize((1100, 1100))))]},
        413,
        "pixel",
    ),
    "prompt longer than context": (
        {"urls": [data_url(png_bytes(noise_image(5)))], "text": "shape " * 600},
        400,
        "maximum context length",
    ),
    "unknown model": (
        {"urls": [data_url(png_bytes(noise_image(6)))], "model": "gpt-4o"},
        404,
        "does not exist",
    ),
    "<image> typed in text": ({"urls": [], "text": "what is <image> here?"}, 400, "must not contain <image>"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_4xx_and_server_survives(strict, case):
    kwargs, status, fragment = BAD_INPUTS[case]
    with pytest.raises(openai.APIStatusError) as info:
        chat(strict.client(), **kwargs)
    assert info.value.status_code == status, info.value.message
    assert fragment in info.value.message
    assert strict.healthy()


def test_file_urls_refused_by_default_and_confined_when_allowed(strict, open_server, media_dir):
    inside, outside = media_dir / "allowed" / "shape.png", media_dir / "secret.png"
    with pytest.raises(openai.PermissionDeniedError, match="allowed-local-media-path"):
        chat(strict.client(), [inside.as_uri()])
    assert chat(open_server.client(), [inside.as_uri()]).choices[0].message.content
    traversal = f"file://{media_dir / 'allowed'}/../secret.png"
    for url in (outside.as_uri(), traversal):
        with pytest.raises(openai.PermissionDeniedError, match="outside the allowed media directory"):
            chat(open_server.client(), [url])
    assert strict.healthy() and open_server.healthy()


def test_private_http_urls_refused_by_default_and_fetched_when_allowed(strict, open_server, image_host):
    url = f"{image_host}/shape.png"
    with pytest.raises(openai.PermissionDeniedError, match="non-public address 127.0.0.1"):
        chat(strict.client(), [url])
    assert chat(open_server.client(), [url]).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="HTTP 404"):
        chat(open_server.client(), [f"{image_host}/missing.png"])
    assert strict.healthy() and open_server.healthy()


def test_api_key(strict):
    with pytest.raises(openai.AuthenticationError):
        strict.client(api_key="wrong-key").models.list()
    with pytest.raises(openai.AuthenticationError):
        chat(strict.client(api_key="wrong-key"), [data_url(png_bytes(noise_image(9)))])
    # No Authorization header at all (the openai client always sends one).
    request = urllib.request.Request(
        f"{strict.base}/v1/chat/completions", data=b"{}", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401
    assert strict.healthy()  # /health stays open


def test_server_still_answers_after_bad_inputs(strict):
    assert chat(strict.client(), [data_url(png_bytes(noise_image(10)))]).choices[0].message.content


def test_binding_beyond_loopback_needs_a_flag(capsys):
    from vlm.cli import main

    ckpt = str(tiny_checkpoint("clip", "llama", "mlp"))
    assert main(["serve", ckpt, "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
