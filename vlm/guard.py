"""The request guard in front of vLLM's OpenAI server: bad input becomes a clear 4xx before the engine sees it.

A pure ASGI middleware (vLLM adds it through its `--middleware` option, outermost). For POST requests it:
- checks the API key first, so an unauthenticated caller cannot make the server fetch anything;
- refuses an unknown model name (404);
- loads every `image_url` of a chat request under `vlm.media`'s policy (corrupt/truncated images, non-image
  data URLs, unsupported schemes, pixel bombs, file:// outside the allowed directory, private addresses) and
  rewrites http(s)/file URLs as `data:` URLs, so vLLM never fetches a URL or opens a file itself;
- refuses more images than allowed, and `<image>` typed into text (it would silently act as a plain token);
- refuses media on any other endpoint (images are served through /v1/chat/completions only).

Its settings come from the `VLM_GUARD` environment variable (JSON), written by `vlm serve`, because vLLM
instantiates middleware itself, by import path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from typing import Any

import anyio
from starlette.responses import JSONResponse

from .media import MediaError, MediaPolicy, load_image_url, to_data_url
from .templates import IMAGE_TOKEN

ENV_VAR = "VLM_GUARD"
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere", "/pooling", "/classify", "/score", "/rerank")
MAX_BODY_BYTES = 64 * 1024 * 1024
MEDIA_PART_TYPES = {"image_url", "input_image", "image", "image_pil", "image_embeds"}
UNSUPPORTED_PART_TYPES = {"video_url", "audio_url", "input_audio", "video", "audio", "file"}


@dataclasses.dataclass
class GuardConfig:
    served_model_names: list[str]
    api_keys: list[str] = dataclasses.field(default_factory=list)
    max_images: int = 4
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
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and IMAGE_TOKEN in str(part.get("text", "")):
                raise RequestError(
                    400, f"text must not contain {IMAGE_TOKEN}; send images as image_url parts"
                )
            elif kind == "image_url":
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


def _has_media(value: Any) -> bool:
    if isinstance(value, dict):
        if value.get("type") in MEDIA_PART_TYPES | UNSUPPORTED_PART_TYPES or "image_url" in value:
            return True
        return any(_has_media(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_media(v) for v in value)
    return False


def _has_image_token(value: Any) -> bool:
    if isinstance(value, str):
        return IMAGE_TOKEN in value
    if isinstance(value, list):
        return any(_has_image_token(v) for v in value)
    return False


def check_request(path: str, body: Any, config: GuardConfig) -> None:
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if model is not None and model not in config.served_model_names:
        raise RequestError(
            404,
            f"the model {model!r} does not exist; this server serves {', '.join(config.served_model_names)}",
            "NotFoundError",
        )
    if path == "/v1/chat/completions":
        check_chat(body, config)
    elif _has_media(body):
        raise RequestError(400, "images are accepted on /v1/chat/completions only")
    elif _has_image_token(body.get("prompt")):
        raise RequestError(
            400, f"the prompt must not contain {IMAGE_TOKEN}; send images to /v1/chat/completions"
        )


class MediaGuard:
    def __init__(self, app, config: GuardConfig | None = None):
        self.app = app
        self.config = config or GuardConfig.from_env()
        self._key_hashes = [hashlib.sha256(k.encode()).digest() for k in self.config.api_keys]

    def _authorized(self, scope) -> bool:
        if not self._key_hashes:
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for key in self._key_hashes:
            ok |= secrets.compare_digest(digest, key)
        return scheme.lower() == "bearer" and ok

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(GUARDED_PREFIXES) or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await error_response(401, "missing or wrong API key", "AuthenticationError")(
                scope, receive, send
            )
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return await error_response(
                    413, f"request body over {MAX_BODY_BYTES} bytes", "BadRequestError"
                )(scope, receive, send)
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # not JSON: vLLM answers it
        if body is not None:
            try:
                # Fetching and decoding block: run them off the event loop so other requests keep flowing.
                await anyio.to_thread.run_sync(check_request, path, body, self.config)
            except RequestError as err:
                return await error_response(err.status, err.message, err.kind)(scope, receive, send)
            raw = json.dumps(body).encode()

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
