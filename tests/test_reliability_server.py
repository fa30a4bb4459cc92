"""Hostile input and access control against a real `vlm serve` (one server for the module, on 127.0.0.1).

The key comes through VLLM_API_KEY, the path that used to leak it into every child process's environment. The
long load/soak run is `make load` (bench/reliability.py load); here one burst of 64 concurrent requests.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import os
import threading
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability_guard import (
    SSRF_HOSTS,
    build_media_root,
    file_url_forms,
    gif_header,
    jpeg_header,
    png_header,
)
from test_serve import MODEL, Server
from vllm_helpers import data_url, noise_image, png_bytes, tiny_checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

psutil = pytest.importorskip("psutil")

KEY = "reliability-key-4f1c"
OPEN_PATHS = {"/health", "/ping"}
EXTRA_ROUTES = [("GET", p) for p in ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json", "/metrics")]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    return build_media_root(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, media_root):
    os.environ["VLLM_API_KEY"] = KEY  # inherited by the server only; removed again right after the start
    try:
        started = Server(
            "reliability",
            tiny_checkpoint("clip", "llama", "mlp"),
            ["--enforce-eager", "--allowed-local-media-path", str(media_root), "--max-images", "2"],
            tmp_path_factory.mktemp("logs"),
        )
    finally:
        del os.environ["VLLM_API_KEY"]
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def call(
    server, method: str, path: str, body: bytes | None = b"{}", key: str | None = KEY, timeout=120, auth=None
):
    """(status, parsed JSON or text) of one raw HTTP request; `auth` is a raw Authorization value."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if auth is not None:
        headers["Authorization"] = auth
    data = body if method in ("POST", "PUT", "PATCH") else None
    request = urllib.request.Request(server.base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def chat_body(content, **extra) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}
    return json.dumps(body).encode()


def image_chat(url: str) -> bytes:
    return chat_body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "colour?"}])


def assert_serves(server):
    status, reply = call(
        server, "POST", "/v1/chat/completions", image_chat(data_url(png_bytes(noise_image(9))))
    )
    assert status == 200 and reply["choices"][0]["message"]["content"] is not None, reply


# -- access control ----------------------------------------------------------------------------------------------


def mounted_routes(server) -> list[tuple[str, str]]:
    status, schema = call(server, "GET", "/openapi.json")
    assert status == 200
    routes = [(m.upper(), p.replace("{response_id}", "x")) for p, ops in schema["paths"].items() for m in ops]
    return sorted(set(routes + EXTRA_ROUTES))


def test_every_mounted_route_but_health_needs_the_key(server):
    routes = mounted_routes(server)
    assert ("POST", "/v1/chat/completions") in routes and ("POST", "/invocations") in routes
    assert len(routes) >= 25  # 27 on vLLM 0.32 for a generate model
    for method, path in routes:
        if path in OPEN_PATHS:
            assert call(server, method, path, key=None)[0] == 200, (method, path)
            continue
        for key in (None, *WRONG_KEYS):
            status, _ = call(server, method, path, key=key)
            assert status == 401, (method, path, key, status)


# Keys that differ from KEY in a byte that is not whitespace around the header's field value: all refused.
WRONG_KEYS = ["wrong", KEY[:-1], KEY + "x", "x" + KEY, KEY[:4] + " " + KEY[4:], KEY.upper(), KEY + "\u00a0"]
# RFC 9110: a field value excludes leading and trailing whitespace, whatever the server version strips.
PADDED = [f"Bearer {KEY} ", f" Bearer {KEY}", f"\tBearer {KEY}\t", f"Bearer  {KEY}"]


def test_a_padded_key_is_the_key_and_any_other_byte_refuses_it(server):
    for auth in PADDED:
        assert call(server, "GET", "/v1/models", auth=auth)[0] == 200, repr(auth)
    for key in WRONG_KEYS:
        assert call(server, "GET", "/v1/models", key=key)[0] == 401, repr(key)


def test_the_key_is_in_no_process_environment_and_no_log(server):
    # /proc/PID/environ of the server itself shows the environment it was started with (VLLM_API_KEY, as the
    # user set it); what matters is that no process it starts inherits the key.
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children  # vLLM's engine core
    for process in children:
        environ = process.environ()
        assert KEY not in json.dumps(environ), process.cmdline()
        assert "VLLM_API_KEY" not in environ
    assert KEY not in server.log_path.read_text()


# -- hostile input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, expected",
    [
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2, "IMAGE_ID", 3], "max_tokens": 2}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "the <image> here", "max_tokens": 2}, 400),
        ("/v1/chat/completions", {"chat_template": "{{ '<image>' * 3 }}"}, 400),
        ("/v1/chat/completions", {"chat_template_kwargs": {"add_generation_prompt": False}}, 400),
        ("/v1/chat/completions", {"mm_processor_kwargs": {"size": {"shortest_edge": 100000}}}, 400),
        ("/v1/chat/completions", {"media_io_kwargs": {"image": {"mode": "RGBA"}}}, 400),
        ("/invocations", json.loads(image_chat("http://169.254.169.254/latest/meta-data/")), 403),  # vetted
        ("/v1/chat/completions/render", json.loads(image_chat("file:///etc/passwd")), 400),
        ("/tokenize", {"model": MODEL, "prompt": "<image>"}, 400),
    ],
)
def test_closed_gaps_answer_4xx(server, path, body, expected):
    image_id = json.loads((tiny_checkpoint("clip", "llama", "mlp") / "config.json").read_text())[
        "image_token_index"
    ]
    if "prompt" in body and isinstance(body["prompt"], list):
        body = {**body, "prompt": [image_id if t == "IMAGE_ID" else t for t in body["prompt"]]}
    if path == "/v1/chat/completions":
        body = json.loads(chat_body("hi", **body))
    status, reply = call(server, "POST", path, json.dumps(body).encode())
    assert status == expected, reply


@pytest.fixture(scope="module")
def canary():
    """(URL, hits) of a loopback HTTP server that records every request reaching it: none may."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png_bytes(noise_image(4)))

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/x.png", hits
    httpd.shutdown()


def media_shapes(url: str) -> list[tuple[str, dict]]:
    """Shapes that vLLM itself fetched a loopback URL for, before the guard classified parts by their keys."""
    chat = [
        {"image_url": url},
        {"image_url": {"url": url}},
        {"type": None, "image_url": {"url": url}},
        {"type": "text", "text": "hi", "uuid": "u1", "image_url": url},
        {"type": "image_url", "image_url": None, "uuid": "u1"},
        {"video_url": url},
    ]
    user = {"role": "user", "content": [{"type": "input_image", "image_url": url}]}
    anthropic = {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": url}}]}
    return [("/v1/chat/completions", json.loads(chat_body([part]))) for part in chat] + [
        ("/v1/responses", {"model": MODEL, "input": [user], "max_output_tokens": 2}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 2, "messages": [anthropic]}),
        ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": [{"image_url": url}]}]}),
        ("/v1/systemone", {"model": MODEL, "state": "s", "questions": {}, "images": [url]}),
    ]


def test_media_shapes_reach_no_url(server, canary):
    url, hits = canary
    request_ids = []
    for path, body in media_shapes(url):
        status, reply = call(server, "POST", path, json.dumps(body).encode())
        assert 400 <= status < 500, (path, body, reply)
        request_ids.append(reply["error"]["request_id"])  # the guard refused it, not vLLM
    assert hits == []
    log = server.log_path.read_text()
    assert all(r in log for r in request_ids)  # an operator can find each refusal in the server log


URL_FORMS = [f"http://{h}/x.png" for h in SSRF_HOSTS[::3]] + [
    "http://[::ffff:127.0.0.1]:8000/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://169.254.169.254/latest/meta-data/",
]


def test_ssrf_url_forms_are_refused(server):
    for url in URL_FORMS:
        status, reply = call(server, "POST", "/v1/chat/completions", image_chat(url))
        assert status == 403 and "non-public address" in reply["error"]["message"], (url, reply)


def test_file_url_forms_are_confined(server, media_root):
    status, _ = call(server, "POST", "/v1/chat/completions", image_chat(f"file://{media_root}/ok.png"))
    assert status == 200
    for url, expected in file_url_forms(media_root).items():
        status, reply = call(server, "POST", "/v1/chat/completions", image_chat(url))
        assert status == expected, (url, reply)


MALFORMED = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"text"',
    b"\xff\xfe\x00garbage",
    b'{"model": "' + MODEL.encode() + b'", "messages": NaN}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b'{"max_tokens": ' + b"9" * 5000 + b"}",
]


@pytest.mark.parametrize("raw", MALFORMED, ids=lambda r: repr(r[:20]))
def test_malformed_bodies_are_4xx(server, raw):
    assert 400 <= call(server, "POST", "/v1/chat/completions", raw)[0] < 500


bad_image_urls = st.sampled_from(
    [
        "data:image/png;base64,!!!",
        "data:image/png;base64," + "A" * 7,
        data_url(png_header(100_000, 100_000)),
        data_url(gif_header(65535, 65535)),
        data_url(jpeg_header(65000, 65000)),
        data_url(png_bytes(noise_image(0))[:100]),
        data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        "data:text/html;base64,PGgxPg==",
    ]
)
odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20)
)
parts = st.one_of(
    bad_image_urls.map(lambda u: {"type": "image_url", "image_url": {"url": u}}),
    st.text(max_size=40).map(lambda t: {"type": "text", "text": t}),
    st.integers(1, 200_000).map(lambda n: {"type": "text", "text": "word " * n}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "url"]), odd_values, max_size=3),
    odd_values,
)
contents = st.one_of(st.lists(parts, max_size=6), st.text(max_size=50), odd_values)
fields = st.dictionaries(
    st.sampled_from(
        ["max_tokens", "temperature", "n", "stream", "top_p", "logprobs", "stop", "seed", "model"]
    ),
    odd_values,
    max_size=3,
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(contents, fields, st.sampled_from(["user", "assistant", "system", "tool", "robot", 5]))
def test_fuzzed_chat_requests_get_no_5xx(server, content, extra, role):
    body = {"model": MODEL, "messages": [{"role": role, "content": content}], "max_tokens": 2, **extra}
    status, reply = call(server, "POST", "/v1/chat/completions", json.dumps(body).encode(), timeout=60)
    assert status < 500, (body, reply)


def test_thousands_of_parts_and_deep_nesting(server):
    many = [{"type": "text", "text": "a"}] * 5000 + [{"type": "image_url", "image_url": {"url": "x"}}] * 3000
    assert call(server, "POST", "/v1/chat/completions", chat_body(many))[0] == 400
    deep = '{"type": "text", "text": [' * 2000 + '"x"' + "]}" * 2000  # deeper than json.dumps can write
    body = chat_body(["DEEP"]).replace(b'"DEEP"', deep.encode())
    assert call(server, "POST", "/v1/chat/completions", body)[0] == 400
    assert_serves(server)


def test_a_burst_of_64_concurrent_image_requests_has_no_5xx(server):
    bodies = [image_chat(data_url(png_bytes(noise_image(200 + i)))) for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        statuses = list(pool.map(lambda b: call(server, "POST", "/v1/chat/completions", b)[0], bodies))
    assert statuses == [200] * 64


def test_server_still_answers_after_all_of_it(server):
    assert server.healthy()
    assert_serves(server)
