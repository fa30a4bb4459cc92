"""The request guard in front of vLLM's OpenAI server: bad input becomes a clear 4xx before the engine sees it.

A pure ASGI middleware (vLLM adds it through its `--middleware` option, outermost). For POST requests it:
- checks the API key first, on every route but the health probes (/health, /ping), so an unauthenticated
  caller can neither make the server fetch anything nor read /metrics, /tokenize, /docs, ...;
- refuses an unknown model name (404);
- loads every `image_url` of a chat request under `vlm.serve.media`'s policy (corrupt/truncated images, non-image
  data URLs, unsupported schemes, pixel bombs, file:// outside the allowed directory, private addresses) and
  rewrites http(s)/file URLs as `data:` URLs, so vLLM never fetches a URL or opens a file itself;
- refuses more images than allowed, and `<image>` typed into text (it would silently act as a plain token);
- refuses media on any other endpoint (images are served through /v1/chat/completions only), the image token
  anywhere else in a request (as text, or as its id in a token-id prompt), per-request chat templates and
  template/processor kwargs (a template decides where image placeholders go), and JSON nested absurdly deep.

Its settings come from the `VLM_GUARD` environment variable (JSON), written by `vlm serve`, because vLLM
instantiates middleware itself, by import path. It holds only SHA-256 digests of the API keys, so the keys
never reach the environment of vLLM's child processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from typing import Any

import anyio
from starlette.responses import JSONResponse

from ..constants import IMAGE_TOKEN
from .media import MediaError, MediaPolicy, load_image_url, to_data_url

ENV_VAR = "VLM_GUARD"
OPEN_PATHS = frozenset({"/health", "/ping"})  # liveness probes: no key, no body, no data
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64  # real requests nest < 10 deep; deeper only tries to exhaust recursion
# Request fields that would change how the prompt (and its image placeholders) is rendered or processed.
REFUSED_FIELDS = ("chat_template", "chat_template_kwargs", "mm_processor_kwargs")
TOKEN_FIELDS = {"prompt", "prompt_token_ids", "token_ids", "input_ids"}  # where token-id prompts are read
BODY_METHODS = {"POST", "PUT", "PATCH"}
MEDIA_PART_TYPES = {"image_url", "input_image", "image", "image_pil", "image_embeds"}
UNSUPPORTED_PART_TYPES = {
    "video_url",
    "audio_url",
    "input_audio",
    "video",
    "audio",
    "file",
    "input_file",
    "document",
}


@dataclasses.dataclass
class GuardConfig:
    served_model_names: list[str]
    api_key_sha256: list[str] = dataclasses.field(default_factory=list)  # hex digests, never the keys
    max_images: int = 4
    image_token_id: int | None = None
    policy: MediaPolicy = dataclasses.field(default_factory=MediaPolicy)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> GuardConfig:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            raise RuntimeError(f"{ENV_VAR} is not set; start the server with `vlm serve`")
        values = json.loads(raw)
        values["policy"] = MediaPolicy(**values.get("policy", {}))
        return cls(**values)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    # The OpenAI error shape, which vLLM uses too, so clients raise their usual exception classes.
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


def _image_url(part: dict[str, Any]) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise RequestError(400, "image_url part has no url")
    return url


def check_chat(body: dict[str, Any], config: GuardConfig) -> None:
    """Validate a chat request in place, replacing every image URL by a vetted data: URL."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return  # vLLM's own schema validation answers malformed requests
    images = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if not isinstance(kind, str):
                continue  # vLLM's schema validation refuses it (a list here used to crash the set lookup)
            if kind == "image_url":
                images.append(part)
            elif kind in MEDIA_PART_TYPES or kind in UNSUPPORTED_PART_TYPES:
                raise RequestError(
                    400, f"content part type {kind!r} is not supported; send images as image_url"
                )
    if len(images) > config.max_images:
        raise RequestError(
            400, f"the request has {len(images)} images; this server accepts at most {config.max_images}"
        )
    for i, part in enumerate(images):
        url = _image_url(part)
        try:
            data, image = load_image_url(url, config.policy)
        except MediaError as err:
            raise RequestError(err.status, f"image {i + 1}: {err}") from None
        if url.startswith("data:"):
            continue  # vetted as it is; no need to re-encode
        value = part["image_url"]
        url = to_data_url(data, image)
        part["image_url"] = {**value, "url": url} if isinstance(value, dict) else {"url": url}


def _walk(body: Any) -> Iterator[tuple[str | None, Any]]:
    """(key it sits under, value) for every value in a parsed JSON body, iteratively, refusing deep nesting."""
    stack: list[tuple[str | None, Any, int]] = [(None, body, 1)]
    while stack:
        key, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(400, f"the request nests JSON deeper than {MAX_JSON_DEPTH} levels")
        yield key, value
        if isinstance(value, dict):
            stack.extend((k, v, depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((key, v, depth + 1) for v in value)  # list items inherit their list's key


def _is_media(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    kind = value.get("type")
    return "image_url" in value or (
        isinstance(kind, str) and kind in MEDIA_PART_TYPES | UNSUPPORTED_PART_TYPES
    )


def check_request(path: str, body: Any, config: GuardConfig) -> None:
    if not isinstance(body, dict):
        return
    values = list(_walk(body))  # first, so a too-deep body is refused before anything recurses into it
    model = body.get("model")
    if model is not None and model not in config.served_model_names:
        raise RequestError(
            404,
            f"the model {model!r} does not exist; this server serves {', '.join(config.served_model_names)}",
            "NotFoundError",
        )
    refused = [f for f in REFUSED_FIELDS if body.get(f) not in (None, {}, "")]
    if refused:
        raise RequestError(
            400, f"{', '.join(refused)}: not accepted in requests; this server renders its own chat template"
        )
    if any(isinstance(v, str) and IMAGE_TOKEN in v for _, v in values):
        raise RequestError(400, f"the request must not contain {IMAGE_TOKEN}; send images as image_url parts")
    tokens = config.image_token_id
    if tokens is not None and any(k in TOKEN_FIELDS and v == tokens and type(v) is int for k, v in values):
        raise RequestError(
            400, f"token ids must not include the image token id {tokens}; send images as image_url parts"
        )
    if path == "/v1/chat/completions":
        check_chat(body, config)
    elif any(_is_media(v) for _, v in values):
        raise RequestError(400, "images are accepted on /v1/chat/completions only")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> Any:
    """The JSON body; NaN/Infinity (Python's extensions) and recursion-exhausting nesting are refused."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(400, f"the request nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # includes UnicodeDecodeError
        raise RequestError(400, f"the request body is not valid JSON: {str(err)[:200]}") from None


def _is_preflight(scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers


def bearer_authorized(authorization: str, key_hashes: list[bytes]) -> bool:
    """An `Authorization: Bearer KEY` header against SHA-256 digests, in constant time; no keys: open.

    The field value is read as RFC 9110 defines it, without leading or trailing whitespace (servers differ in
    whether they strip it first: uvicorn >= 0.55 does), and RFC 7235 allows one or more spaces after the
    scheme. Any other byte of difference refuses the key.
    """
    if not key_hashes:
        return True
    scheme, _, token = authorization.strip(" \t").partition(" ")
    token = token.lstrip(" ")
    digest = hashlib.sha256(token.encode()).digest()
    ok = False
    for key in key_hashes:
        ok |= secrets.compare_digest(digest, key)
    return scheme.lower() == "bearer" and ok


class MediaGuard:
    def __init__(self, app, config: GuardConfig | None = None):
        self.app = app
        self.config = config or GuardConfig.from_env()
        self._key_hashes = [bytes.fromhex(h) for h in self.config.api_key_sha256]

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        return bearer_authorized(headers.get(b"authorization", b"").decode("latin-1"), self._key_hashes)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope.get("path") in OPEN_PATHS or _is_preflight(scope):
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            if scope["type"] == "websocket":
                await receive()  # websocket.connect; closing before accept rejects the handshake (403)
                return await send({"type": "websocket.close", "code": 1008})
            return await error_response(401, "missing or wrong API key", "AuthenticationError")(
                scope, receive, send
            )
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        try:
            raw = await self._checked_body(scope, receive)
        except RequestError as err:
            return await error_response(err.status, err.message, err.kind)(scope, receive, send)
        if raw is None:
            return  # the client went away

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # later messages: disconnect notifications
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        return await self.app({**scope, "headers": headers}, replay, send)

    async def _checked_body(self, scope, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
            if not message.get("more_body"):
                break
        body = parse_body(b"".join(chunks))
        # Fetching and decoding block: run them off the event loop so other requests keep flowing.
        await anyio.to_thread.run_sync(check_request, scope.get("path", ""), body, self.config)
        return json.dumps(body).encode()
