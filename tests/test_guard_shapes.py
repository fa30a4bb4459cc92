"""Every content-part shape vLLM 0.32 reads as media (the table in vlm/serve/parts.py), through the guard in-process.

A Starlette app with vLLM's body routes stands in for the server, the guard in front as vLLM mounts it; a
loopback canary HTTP server counts every request that reaches it. With private URLs refused, nothing may reach
it. With them allowed, the served shapes are fetched once each, by the guard (its User-Agent), and the app
receives one canonical image_url part holding a data: URL. No shape may answer 5xx.
"""

from __future__ import annotations

import http.server
import logging
import threading

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from vllm_helpers import data_url, noise_image, png_bytes

from vlm.serve.guard import GuardConfig, MediaGuard
from vlm.serve.media import MediaPolicy

IMAGE = png_bytes(noise_image(11))


class Canary(http.server.BaseHTTPRequestHandler):
    """Serves IMAGE at any path and records the User-Agent of every request."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        Canary.hits.append(self.headers.get("User-Agent", ""))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def canary_port():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canary)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture
def canary(canary_port):
    Canary.hits.clear()
    return f"http://127.0.0.1:{canary_port}/img.png"


# The POST routes vLLM 0.32's build_app mounts for a generate model, plus the pooling ones it mounts for others.
ROUTES = [
    "/v1/chat/completions", "/invocations", "/v1/chat/completions/batch", "/v1/chat/completions/render",
    "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/tokenize",
    "/v1/systemone", "/generative_scoring", "/inference/v1/generate", "/pooling", "/score", "/v1/score",
    "/rerank", "/v1/embeddings", "/v2/embed", "/classify",
]  # fmt: skip


def make_client(allow_private: bool, root_path: str = "") -> tuple[TestClient, list]:
    """A TestClient on the stand-in app, and the list of bodies the app received."""
    received = []

    async def echo(request: Request):
        received.append(await request.json())
        return JSONResponse({"ok": True})

    config = GuardConfig(
        served_model_names=["m"], max_images=4, policy=MediaPolicy(allow_private_urls=allow_private)
    )
    app = Starlette(
        routes=[Route(p, echo, methods=["POST"]) for p in ROUTES],
        middleware=[Middleware(MediaGuard, config=config)],
    )
    return TestClient(app, root_path=root_path), received


def chat(*parts) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}]}


# -- chat content parts ------------------------------------------------------------------------------------------

SERVED = {  # name -> part, given the URL
    "typed, url object": lambda u: {"type": "image_url", "image_url": {"url": u}},
    "typed, url string": lambda u: {"type": "image_url", "image_url": u},
    "typed, detail": lambda u: {"type": "image_url", "image_url": {"url": u, "detail": "high"}},
    "untyped, url string": lambda u: {"image_url": u},
    "untyped, url object": lambda u: {"image_url": {"url": u}},
    "type null": lambda u: {"type": None, "image_url": {"url": u}},
    "input_image (Responses shape)": lambda u: {"type": "input_image", "image_url": u},
}

REFUSED = {  # name -> part, given the URL; each must be a 400 naming the part
    "uuid on an image part": lambda u: {"type": "image_url", "image_url": {"url": u}, "uuid": "img-1"},
    "uuid on an untyped part": lambda u: {"image_url": u, "uuid": "img-1"},
    "uuid on a text part with image_url": lambda u: {
        "type": "text",
        "text": "x",
        "uuid": "u",
        "image_url": u,
    },
    "uuid on a text part": lambda u: {"type": "text", "text": "x", "uuid": "img-1"},
    "uuid, null image_url (cache reference)": lambda u: {"type": "image_url", "image_url": None, "uuid": "u"},
    "uuid, null image_pil (cache reference)": lambda u: {"image_pil": None, "uuid": "img-1"},
    "uuid, numeric type": lambda u: {"type": 5, "uuid": "img-1", "image_url": u},
    "uuid as a number": lambda u: {"image_url": u, "uuid": 7},
    "type a list": lambda u: {"type": ["image_url"], "image_url": u},
    "type a number": lambda u: {"type": 1, "image_url": {"url": u}},
    "text part with image_url": lambda u: {"type": "text", "text": "x", "image_url": u},
    "text part with video_url": lambda u: {"type": "text", "text": "x", "video_url": {"url": u}},
    "image_url and video_url": lambda u: {"image_url": u, "video_url": u},
    "image_url and audio_url, typed": lambda u: {
        "type": "image_url",
        "image_url": {"url": u},
        "audio_url": u,
    },
    "image_url without url": lambda u: {"type": "image_url", "image_url": {}},
    "image_url null": lambda u: {"type": "image_url", "image_url": None},
    "image_url empty": lambda u: {"image_url": ""},
    "image_pil typed": lambda u: {"type": "image_pil", "image_pil": u},
    "image_pil untyped": lambda u: {"image_pil": u},
    "image_embeds typed": lambda u: {"type": "image_embeds", "image_embeds": "AAAA"},
    "image_embeds untyped": lambda u: {"image_embeds": {"image_embeds": "AAAA"}},
    "audio_url typed": lambda u: {"type": "audio_url", "audio_url": {"url": u}},
    "audio_url untyped": lambda u: {"audio_url": u},
    "input_audio typed": lambda u: {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    "input_audio untyped": lambda u: {"input_audio": {"data": "AAAA", "format": "wav"}},
    "audio_embeds": lambda u: {"audio_embeds": "AAAA"},
    "video_url typed": lambda u: {"type": "video_url", "video_url": {"url": u}},
    "video_url untyped": lambda u: {"video_url": u},
    "video_embeds": lambda u: {"type": "video_embeds", "video_embeds": "AAAA"},
    "prompt_embeds typed": lambda u: {"type": "prompt_embeds", "data": "AAAA"},
    "prompt_embeds untyped": lambda u: {"prompt_embeds": "AAAA"},
    "input_image with file_id": lambda u: {"type": "input_image", "file_id": "file-1"},
    "input_image with file_id and url": lambda u: {"type": "input_image", "image_url": u, "file_id": "f"},
    "Anthropic image, url source": lambda u: {"type": "image", "source": {"type": "url", "url": u}},
    "HF image, url": lambda u: {"type": "image", "url": u},
    "HF image, image": lambda u: {"type": "image", "image": u},
    "HF video, path": lambda u: {"type": "video", "path": u},
    "file": lambda u: {"type": "file", "file": {"file_data": "AAAA"}},
    "input_file, file_url": lambda u: {"type": "input_file", "file_url": u},
    "document": lambda u: {"type": "document", "source": {"type": "url", "url": u}},
    "unknown type": lambda u: {"type": "picture", "src": u},
    "no type, no media": lambda u: {"text": "x"},
    "empty object": lambda u: {},
    "a number": lambda u: 5,
    "null": lambda u: None,
    "a list": lambda u: [u],
}


def post(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code < 500, response.text
    return response


@pytest.mark.parametrize("name", list(SERVED))
@pytest.mark.parametrize("allow_private", [False, True])
def test_served_shapes_are_fetched_by_the_guard_only(canary, name, allow_private):
    client, received = make_client(allow_private)
    response = post(client, "/v1/chat/completions", chat(SERVED[name](canary)))
    if not allow_private:
        assert response.status_code == 403 and "non-public address" in response.json()["error"]["message"]
        assert Canary.hits == [] and received == []
        return
    assert response.status_code == 200, response.text
    assert Canary.hits == ["vlm-serve"]  # fetched once, by the guard
    image, text = received[0]["messages"][0]["content"]
    assert image == {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}
    assert text == {"type": "text", "text": "hi"}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.parametrize("allow_private", [False, True])
def test_refused_shapes_are_400_naming_the_part(canary, name, allow_private):
    client, received = make_client(allow_private)
    body = chat({"type": "text", "text": "first"}, REFUSED[name](canary))
    response = post(client, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("messages[0].content[1]")
    assert Canary.hits == [] and received == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/invocations"])
def test_content_that_is_neither_a_string_nor_a_list_is_refused(canary, path):
    client, received = make_client(True)
    body = {"model": "m", "messages": [{"role": "user", "content": {"image_url": canary}}]}
    response = post(client, path, body)
    assert response.status_code == 400 and "messages[0].content" in response.text
    assert Canary.hits == [] and received == []


@pytest.mark.parametrize("role", ["system", "assistant", "tool", "developer"])
def test_parts_are_classified_in_every_role(canary, role):
    client, received = make_client(False)
    body = {"model": "m", "messages": [{"role": role, "content": [{"image_url": canary, "uuid": "x"}]}]}
    assert post(client, "/v1/chat/completions", body).status_code == 400
    assert Canary.hits == [] and received == []


def test_invocations_serves_images_like_chat_completions(canary):
    client, received = make_client(True)
    assert post(client, "/invocations", chat({"image_url": canary})).status_code == 200
    assert received[0]["messages"][0]["content"][0]["image_url"]["url"] == data_url(IMAGE)
    assert Canary.hits == ["vlm-serve"]


def test_root_path_does_not_disguise_a_route(canary):
    client, received = make_client(True, root_path="/api")
    assert post(client, "/api/v1/chat/completions", chat({"image_url": canary})).status_code == 200
    assert received[0]["messages"][0]["content"][0]["image_url"]["url"] == data_url(IMAGE)
    Canary.hits.clear()
    assert post(client, "/api/v1/responses", {"input": [{"image_url": canary}]}).status_code == 400
    assert Canary.hits == []


# -- media on routes that do not serve it, and outside the parts on routes that do --------------------------------


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


ELSEWHERE = {  # name -> (path, body given the URL)
    "Responses input_image": (
        "/v1/responses",
        lambda u: {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": u}]}]},
    ),
    "Responses input_file": (
        "/v1/responses",
        lambda u: {"input": [{"role": "user", "content": [{"type": "input_file", "file_url": u}]}]},
    ),
    "Anthropic image": (
        "/v1/messages",
        lambda u: {
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": u}}]}
            ]
        },
    ),
    "Anthropic image in a tool_result": (
        "/v1/messages",
        lambda u: {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "image", "source": {"url": u}}],
                        }
                    ],
                }
            ]
        },
    ),
    "Anthropic count_tokens": (
        "/v1/messages/count_tokens",
        lambda u: {"messages": [{"role": "user", "content": [{"type": "image", "source": {"url": u}}]}]},
    ),
    "chat batch": (
        "/v1/chat/completions/batch",
        lambda u: {"messages": [[{"role": "user", "content": [image(u)]}]]},
    ),
    "chat render": ("/v1/chat/completions/render", lambda u: chat(image(u))),
    "tokenize": ("/tokenize", lambda u: chat({"image_url": u})),
    "pooling": ("/pooling", lambda u: chat(image(u))),
    "embeddings": ("/v1/embeddings", lambda u: chat({"image_url": {"url": u}})),
    "score": ("/score", lambda u: {"queries": {"content": [image(u)]}, "documents": "x"}),
    "rerank": (
        "/rerank",
        lambda u: {"query": "q", "documents": {"content": [{"type": "video_url", "video_url": u}]}},
    ),
    "Cohere embed images": ("/v2/embed", lambda u: {"images": [u]}),
    "Cohere embed inputs": ("/v2/embed", lambda u: {"inputs": [{"content": [image(u)]}]}),
    "systemone images": ("/v1/systemone", lambda u: {"state": "x", "questions": {}, "images": [u]}),
    "systemone videos": ("/v1/systemone", lambda u: {"state": "x", "questions": {}, "videos": [u]}),
    "generate content_parts": (
        "/inference/v1/generate",
        lambda u: {"token_ids": [1], "content_parts": [{"type": "image_url", "url": u}]},
    ),
    "generate features": (
        "/inference/v1/generate",
        lambda u: {"token_ids": [1], "features": {"mm_hashes": {"image": ["h"]}, "mm_placeholders": {}}},
    ),
    "completions prompt_embeds": ("/v1/completions", lambda u: {"prompt_embeds": "AAAA"}),
    "generative_scoring": ("/generative_scoring", lambda u: chat({"image_url": u})),
    "an unmounted path": ("/v1/chat/completions/", lambda u: chat(image(u))),
    "chat: image_url on the message": (
        "/v1/chat/completions",
        lambda u: {"messages": [{"role": "user", "content": "hi", "image_url": u}]},
    ),
    "chat: images list at the top": ("/v1/chat/completions", lambda u: {**chat(), "images": [u]}),
    "chat: a part nested in a tool call": (
        "/v1/chat/completions",
        lambda u: {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": {"x": image(u)}},
                        }
                    ],
                }
            ]
        },
    ),
}


@pytest.mark.parametrize("name", list(ELSEWHERE))
def test_media_where_it_is_not_served_is_400(canary, name):
    client, received = make_client(True)  # even with private URLs allowed: nothing is fetched
    path, body = ELSEWHERE[name]
    response = post(client, path, {"model": "m", **body(canary)})
    assert response.status_code == 400, response.text
    assert Canary.hits == [] and received == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("media_io_kwargs", {"video": {"num_frames": 1}}),
        ("mm_processor_kwargs", {"size": 10}),
        ("chat_template", "{{ '' }}"),
        ("chat_template_kwargs", {"x": 1}),
        ("ec_transfer_params", {"do_remote_encode": True}),
        ("kv_transfer_params", {"do_remote_prefill": True}),
    ],
)
def test_fields_that_steer_media_processing_are_refused(field, value):
    client, received = make_client(True)
    response = post(client, "/v1/chat/completions", {**chat(), field: value})
    assert response.status_code == 400 and field in response.json()["error"]["message"]
    assert received == []


def test_json_schemas_naming_media_properties_pass():
    client, received = make_client(False)
    schema = {"type": "object", "properties": {"image_url": {"type": "string"}, "uuid": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert post(client, "/v1/chat/completions", {**chat(), "tools": tools}).status_code == 200
    assert post(client, "/v1/completions", {"model": "m", "prompt": "x", "tools": tools}).status_code == 200
    assert len(received) == 2


# -- no library text to the client; a request id to match the log ------------------------------------------------


def test_library_error_text_goes_to_the_log_not_the_client(canary_port, caplog):
    client, _ = make_client(True)
    truncated = png_bytes(noise_image(12, size=(64, 64)))[:300]
    cases = {
        data_url(truncated): "truncated",
        "http://127.0.0.1:1/x.png": "could not fetch",  # nothing listens: ECONNREFUSED
        "http://" + "a" * 70 + ".example/x.png": "cannot resolve",  # IDNA refuses the label
    }
    for url, fragment in cases.items():
        with caplog.at_level(logging.INFO, logger="vlm.serve.guard"):
            response = post(client, "/v1/chat/completions", chat(image(url)))
        error = response.json()["error"]
        assert response.status_code == 400 and fragment in error["message"], error
        for library_text in ("Error", "errno", "broken", "image file", "idna", "Connection refused"):
            assert library_text not in error["message"], error
        logged = [r.getMessage() for r in caplog.records if error["request_id"] in r.getMessage()]
        assert logged and "Error(" in logged[0], caplog.text  # the library's exception, by the request id


def test_malformed_json_answers_without_the_parser_text():
    client, _ = make_client(True)
    response = client.post("/v1/chat/completions", content=b'{"model": "m",,}')
    error = response.json()["error"]
    assert response.status_code == 400 and error["message"].startswith("the request body is not valid JSON")
    assert "Expecting" not in error["message"] and error["request_id"].startswith("guard-")


def test_the_mounted_routes_are_logged_at_start_up(caplog):
    client, _ = make_client(False)
    with caplog.at_level(logging.INFO, logger="vlm.serve.guard"), client:  # `with` runs the lifespan
        pass
    line = next(r.getMessage() for r in caplog.records if "images served on" in r.getMessage())
    assert "served on /invocations, /v1/chat/completions;" in line and "/v1/responses" in line
