"""Hostile input against the request guard and the media rules, in-process (no vLLM server): hypothesis fuzzing
of request bodies and URL forms, SSRF through redirects, file: variants, pixel bombs, and access control on an
ASGI stand-in. The same rules end to end against a real server: test_reliability_server.py.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import struct
import threading
import urllib.parse
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from vllm_helpers import data_url, noise_image, png_bytes

from vlm.serve import media
from vlm.serve.auth import key_digest
from vlm.serve.guard import GuardConfig, MediaGuard, RequestError, check_request, parse_body
from vlm.serve.media import MediaError, MediaPolicy, load_image_url

IMAGE_TOKEN_ID = 7
CONFIG = GuardConfig(served_model_names=["m"], max_images=2, image_token_id=IMAGE_TOKEN_ID)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height in its header; its pixel data is one tiny (wrong-sized) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def gif_header(width: int, height: int) -> bytes:
    """A real 1x1 GIF whose logical screen and frame claim width x height."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    frame = data.index(b",", 13)  # the image descriptor: x, y, width, height
    data[frame + 5 : frame + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def jpeg_header(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def chat_body(parts: list, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": parts}], **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def outcome(body) -> int:
    """200 when the guard lets the body through, else its 4xx; anything else it raises fails the test."""
    try:
        check_request("/v1/chat/completions", body, CONFIG)
    except RequestError as err:
        assert 400 <= err.status < 500, err.message
        return err.status
    return 200


@pytest.fixture(autouse=True)
def no_outbound_connections(monkeypatch):
    """Any connection attempt the tests do not expect fails loudly instead of reaching the network."""
    real = socket.create_connection
    allowed = set()

    def guarded(address, *args, **kwargs):
        if address[0] not in allowed:
            raise AssertionError(f"unexpected connection to {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return allowed


# -- bodies ------------------------------------------------------------------------------------------------------

KEYS = ["model", "messages", "role", "content", "type", "text", "image_url", "url", "prompt", "n", "detail"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=40,
)


@FUZZ
@given(json_values)
def test_any_json_body_is_passed_or_refused_with_a_4xx(body):
    outcome(body)
    outcome({"model": "m", "messages": [{"role": "user", "content": body}]})


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_either_parse_or_give_a_400(raw):
    try:
        parse_body(raw)
    except RequestError as err:
        assert err.status == 400


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 100_000, b"NaN", b'{"temperature": Infinity}'])
def test_deep_nesting_and_non_json_numbers_are_400(raw):
    with pytest.raises(RequestError) as info:
        check_request("/v1/chat/completions", parse_body(raw), CONFIG)
    assert info.value.status == 400


def test_nesting_just_under_the_json_parser_limit_is_refused_without_recursion():
    deep: dict = {"text": "x"}
    for _ in range(900):
        deep = {"content": [deep]}
    assert outcome(chat_body([deep])) == 400


bad_urls = st.sampled_from(
    [
        "data:image/png;base64,!!!not-base64",
        "data:image/png;base64," + "A" * 5,
        "data:image/png," + "x" * 10,
        "data:text/plain;base64,aGVsbG8=",
        "data:;base64,",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode(),
        data_url(png_header(100_000, 100_000)),
        data_url(png_header(1 << 31, 1)),
        data_url(gif_header(65535, 65535)),
        data_url(jpeg_header(65000, 65000)),
        data_url(png_bytes(noise_image(0))[:80]),
        "javascript:alert(1)",
        "",
        "   ",
        "//127.0.0.1/x.png",
        "ftp://example.com/x.png",
    ]
)
text_parts = st.text(max_size=50).map(lambda t: {"type": "text", "text": t})
huge_text = st.integers(1, 300_000).map(lambda n: {"type": "text", "text": "a" * n})
odd_parts = st.sampled_from(
    [
        {"type": "image_url"},
        {"type": "image_url", "image_url": None},
        {"type": "image_url", "image_url": {"url": 5}},
        {"type": "image_url", "image_url": [1, 2]},
        {"type": "input_audio", "input_audio": {"data": "AAAA"}},
        {"type": "image_embeds", "image_embeds": "AAAA"},
        {"type": "text", "text": "what is <image>?"},
        {"type": None},
        {},
        {"type": None, "image_url": {"url": "http://127.0.0.1/x.png"}},
        {"image_url": "http://169.254.169.254/"},
        {"type": "text", "text": "hi", "uuid": "u"},
        {"type": "text", "text": "hi", "uuid": "u", "image_url": "http://127.0.0.1/"},
        {"type": "image_url", "image_url": None, "uuid": "cached"},
        {"image_pil": None, "uuid": "cached"},
        {"video_url": "http://127.0.0.1/v.mp4"},
        {"type": 5, "image_url": "http://127.0.0.1/"},
    ]
)
parts = st.one_of(bad_urls.map(image_part), text_parts, huge_text, odd_parts)


@FUZZ
@given(st.lists(parts, min_size=1, max_size=6))
def test_hostile_chat_content_gets_a_4xx_or_passes_vetted(content):
    status = outcome(chat_body(content))
    plain_text = [p.get("type") == "text" and p.keys() <= {"type", "text"} for p in content]
    if not all(plain_text) or "<image>" in str(content):
        assert status >= 400  # every image URL above is bad, every other part is refused (type None too)


@pytest.mark.parametrize("n_parts", [3, 5000])
def test_many_image_parts_are_refused_before_any_is_decoded(n_parts, monkeypatch):
    decoded = []
    monkeypatch.setattr("vlm.serve.guard.load_image_url", lambda *a: decoded.append(a))
    body = chat_body([image_part(data_url(png_bytes(noise_image(1))))] * n_parts)
    assert outcome(body) == 400 and not decoded


@pytest.mark.parametrize(
    "header, mime", [(png_header, "image/png"), (gif_header, "image/gif"), (jpeg_header, "image/jpeg")]
)
def test_headers_claiming_huge_dimensions_are_413_without_decoding(header, mime):
    with pytest.raises(MediaError, match="pixel") as info:
        load_image_url(data_url(header(60_000, 60_000), mime), MediaPolicy())
    assert info.value.status == 413


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", chat_body([{"image_url": "http://127.0.0.1/x.png", "uuid": "u"}])),
        ("/v1/chat/completions", chat_body([{"type": "text", "text": "a", "uuid": "u", "image_url": "x"}])),
        ("/v1/chat/completions", chat_body("hi", media_io_kwargs={"image": {"x": 1}})),
        ("/v1/systemone", {"state": "s", "questions": {}, "images": ["http://127.0.0.1/x.png"]}),
        ("/inference/v1/generate", {"token_ids": [1], "content_parts": [{"type": "image_url", "url": "x"}]}),
        ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": [image_part("x")]}]]}),
        ("/v1/completions", {"prompt": [1, 2, IMAGE_TOKEN_ID, 3]}),
        ("/v1/completions", {"prompt": [[1, 2], [IMAGE_TOKEN_ID]]}),
        ("/inference/v1/generate", {"token_ids": [IMAGE_TOKEN_ID]}),
        ("/v1/completions", {"prompt": "a <image> b"}),
        ("/v1/responses", {"input": [{"role": "user", "content": "<image>"}]}),
        ("/v1/chat/completions", chat_body("hi", chat_template="{{ '<image>' }}")),
        ("/v1/chat/completions", chat_body("hi", chat_template_kwargs={"add_generation_prompt": False})),
        ("/v1/chat/completions", chat_body("hi", mm_processor_kwargs={"size": 100_000})),
        ("/invocations", chat_body([{"image_url": "file:///etc/passwd", "uuid": "u"}])),
        ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
    ],
)
def test_known_bypasses_are_closed(path, body):
    with pytest.raises(RequestError) as info:
        check_request(path, body, CONFIG)
    assert info.value.status == 400


def test_invocations_vets_images_as_chat_completions_does():
    with pytest.raises(RequestError) as info:
        check_request("/invocations", chat_body([image_part("file:///etc/passwd")]), CONFIG)
    assert info.value.status == 403 and "allowed-local-media-path" in info.value.message


def test_plain_token_ids_and_text_pass():
    check_request("/v1/completions", {"model": "m", "prompt": [1, 2, 3, True]}, CONFIG)
    check_request("/v1/chat/completions", chat_body("hello", chat_template_kwargs={}), CONFIG)


# -- URL forms: SSRF -----------------------------------------------------------------------------------------

PRIVATE_V4 = ["127.0.0.1", "127.1.2.3", "10.0.0.1", "192.168.0.1", "172.16.5.4", "169.254.169.254", "0.0.0.0"]


def ipv4_forms(address: str) -> list[str]:
    """Spellings getaddrinfo (inet_aton) accepts for one IPv4 address."""
    a, b, c, d = (int(x) for x in address.split("."))
    n = int.from_bytes(bytes([a, b, c, d]), "big")
    return [
        address,
        str(n),  # 2130706433
        hex(n),  # 0x7f000001
        oct(n).replace("0o", "0"),  # 017700000001
        ".".join(f"0{x:o}" for x in (a, b, c, d)),  # 0177.00.00.01
        ".".join(hex(x) for x in (a, b, c, d)),
        f"{a}.{(b << 16) | (c << 8) | d}",  # 127.1
        f"{hex(a)}.{c << 8 | d}" if b == 0 else f"{a}.{b}.{c << 8 | d}",
        f"[::ffff:{address}]",
        f"[::ffff:{(a << 8 | b):x}:{(c << 8 | d):x}]",
        f"[64:ff9b::{address}]",
        f"[2002:{(a << 8 | b):x}:{(c << 8 | d):x}::1]",
        f"[::{address}]",
    ]


SSRF_HOSTS = sorted({form for a in PRIVATE_V4 for form in ipv4_forms(a)}) + [
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[fe80::1]",
    "[fc00::1]",
    "[::]",
    "localhost",
    "LOCALHOST",
    "0",
]


@FUZZ
@given(
    st.sampled_from(SSRF_HOSTS),
    st.sampled_from(["http", "https", "HTTP", "hTTps"]),
    st.sampled_from(["", ":80", ":8000", ":1"]),
    st.sampled_from(["", "user@", "user:pw@", "evil.example@"]),
    st.sampled_from(["/x.png", "/latest/meta-data/", "/?a=b#frag", ""]),
)
def test_private_hosts_in_any_spelling_are_refused_without_connecting(host, scheme, port, userinfo, path):
    url = f"{scheme}://{userinfo}{host}{port}{path}"
    with pytest.raises(MediaError) as info:
        load_image_url(url, MediaPolicy(fetch_timeout_s=1))
    assert info.value.status == 403, (url, str(info.value))


class _Redirector(http.server.BaseHTTPRequestHandler):
    """/r?to=URL answers 302 to URL; /img.png is a real image (served if a redirect were followed blindly)."""

    image = png_bytes(noise_image(5))

    def do_GET(self):  # noqa: N802
        parts = urllib.parse.urlsplit(self.path)
        if parts.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        if parts.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(self.image)
            return
        self.send_response(302)
        self.send_header("Location", urllib.parse.parse_qs(parts.query)["to"][0])
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def redirector(monkeypatch, no_outbound_connections):
    """A 302 server on loopback that the media code treats as public under the name `public.test`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    real = media._vetted_address
    monkeypatch.setattr(
        media, "_vetted_address", lambda h, p, pol: "127.0.0.1" if h == "public.test" else real(h, p, pol)
    )
    no_outbound_connections.add("127.0.0.1")
    yield httpd.server_address[1]
    httpd.shutdown()


def test_the_redirector_itself_serves_images(redirector):
    assert load_image_url(f"http://public.test:{redirector}/img.png", MediaPolicy())[1].size == (40, 36)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://localhost:{port}/img.png",
        "http://[::1]:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",
        "http://2130706433:{port}/img.png",
        "http://0177.0.0.1:{port}/img.png",
        "http://0x7f.1:{port}/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
    ],
)
def test_redirects_to_private_addresses_are_refused(redirector, target):
    target = target.format(port=redirector)
    url = f"http://public.test:{redirector}/r?to={urllib.parse.quote(target)}"
    with pytest.raises(MediaError, match="non-public address") as info:
        load_image_url(url, MediaPolicy(fetch_timeout_s=2))
    assert info.value.status == 403


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://public.test/x", "gopher://x/"])
def test_redirects_to_other_schemes_are_refused(redirector, target):
    url = f"http://public.test:{redirector}/r?to={urllib.parse.quote(target)}"
    with pytest.raises(MediaError, match="unsupported image URL") as info:
        load_image_url(url, MediaPolicy())
    assert info.value.status == 400


def test_redirect_loops_stop(redirector):
    url = f"http://public.test:{redirector}/loop"
    with pytest.raises(MediaError, match="redirected more than"):
        load_image_url(url, MediaPolicy())


# -- URL forms: local files ------------------------------------------------------------------------------------


def build_media_root(root: Path) -> Path:
    """root/allowed (the allowed media dir) with traps: links out, /dev/zero, a fifo, an oversized sparse file."""
    allowed = root / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "ok.png").write_bytes(png_bytes(noise_image(2)))
    (root / "secret.png").write_bytes(png_bytes(noise_image(3)))
    (allowed / "link.png").symlink_to(root / "secret.png")
    (allowed / "dirlink").symlink_to(root)
    (allowed / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(allowed / "fifo.png")
    with open(allowed / "sparse.png", "wb") as f:
        f.truncate(MediaPolicy.max_image_bytes + 1)
    return allowed


@pytest.fixture
def media_root(tmp_path):
    return build_media_root(tmp_path)


def file_url_forms(allowed) -> dict[str, int]:
    """file: URL -> the status it must get with `allowed` as the allowed directory."""
    a = str(allowed)
    return {
        "file:///etc/passwd": 403,
        "FILE:///etc/passwd": 403,
        "File://localhost/etc/passwd": 403,
        "file:/etc/passwd": 403,
        "file:etc/passwd": 403,
        "file:///proc/self/environ": 403,
        f"file://{a}/../secret.png": 403,
        f"file://{a}/%2e%2e/secret.png": 403,
        f"file://{a}/sub/..%2f..%2fsecret.png": 403,
        f"file://{a}/link.png": 403,
        f"file://{a}/dirlink/secret.png": 403,
        f"file://{a}/zero.png": 403,
        f"file://{a}/ok.png%00.txt": 400,
        f"file://{a}/fifo.png": 400,
        f"file://{a}/missing.png": 400,
        f"file://{a}/sub": 400,
        f"file://{a}/sparse.png": 413,
        f"file://127.0.0.1{a}/ok.png": 400,
        f"file://evil.example{a}/ok.png": 400,
    }


def test_file_url_variants(media_root):
    policy = MediaPolicy(allowed_local_media_path=str(media_root))
    assert load_image_url(f"file://{media_root}/ok.png", policy)[1].size == (40, 36)
    assert load_image_url(f"file://localhost{media_root}/sub/../ok.png", policy)[1].size == (40, 36)
    for url, status in file_url_forms(media_root).items():
        with pytest.raises(MediaError) as info:
            load_image_url(url, policy)
        assert info.value.status == status, (url, str(info.value))
        with pytest.raises(MediaError) as info:
            load_image_url(url, MediaPolicy())  # no allowed directory: every file: URL is refused
        assert info.value.status in (400, 403)


# -- access control ----------------------------------------------------------------------------------------------


@pytest.fixture
def guarded_app():
    from starlette.testclient import TestClient

    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": "secret"})
            return await send({"type": "websocket.close"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data"})

    config = GuardConfig(served_model_names=["m"], api_key_sha256=[key_digest("k3y")])
    return TestClient(MediaGuard(app, config))


VLLM_ROUTES = [  # what vLLM 0.32's build_app mounts for a generate model (test_reliability_server checks live)
    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/load"), ("GET", "/version"),
    ("GET", "/kv_event_sources"), ("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/v1/models"), ("POST", "/invocations"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"), ("POST", "/v1/responses"), ("POST", "/v1/messages"),
    ("POST", "/generative_scoring"), ("POST", "/scale_elastic_ep"), ("POST", "/is_scaling_elastic_ep"),
    ("POST", "/inference/v1/generate"),
    ("POST", "/inference/v1/abort_requests"),
    ("POST", "/v1/systemone"), ("POST", "/v1/chat/completions/render"), ("DELETE", "/anything"),
    ("OPTIONS", "/v1/models"), ("HEAD", "/version"),
]  # fmt: skip


@pytest.mark.parametrize("method, path", VLLM_ROUTES)
def test_every_route_but_health_needs_the_key(guarded_app, method, path):
    assert guarded_app.request(method, path, content=b"{}").status_code == 401
    for wrong in ("Bearer k3", "Bearer k3yy", "Bearer K3Y", "Bearer k 3y", "Basic k3y"):
        status = guarded_app.request(
            method, path, content=b"{}", headers={"Authorization": wrong}
        ).status_code
        assert status == 401, wrong
    # RFC 9110: whitespace around a field value is not part of it, whichever server strips it first.
    for ok in ("Bearer k3y", "Bearer k3y ", " Bearer k3y\t"):
        assert (
            guarded_app.request(method, path, content=b"{}", headers={"Authorization": ok}).status_code == 200
        )


@pytest.mark.parametrize("method, path", [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")])
def test_health_probes_are_open(guarded_app, method, path):
    assert guarded_app.request(method, path).status_code == 200


def test_cors_preflight_passes_but_carries_no_data_without_the_key(guarded_app):
    preflight = {"Origin": "http://x", "Access-Control-Request-Method": "POST"}
    assert guarded_app.options("/v1/chat/completions", headers=preflight).status_code == 200
    assert guarded_app.get("/v1/models", headers={"Access-Control-Request-Method": "GET"}).status_code == 401


def test_websockets_need_the_key(guarded_app):
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect):
        with guarded_app.websocket_connect("/v1/realtime") as ws:
            ws.receive_text()
    with guarded_app.websocket_connect("/v1/realtime", headers={"Authorization": "Bearer k3y"}) as ws:
        assert ws.receive_text() == "secret"


def test_the_environment_holds_only_a_digest_of_the_key():
    env = GuardConfig(served_model_names=["m"], api_key_sha256=[key_digest("k3y")]).to_env()
    assert "k3y" not in env and key_digest("k3y") in json.loads(env)["api_key_sha256"]
