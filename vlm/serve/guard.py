"""The request guard in front of vLLM's OpenAI server: bad input becomes a clear 4xx before the engine sees it.

A pure ASGI middleware (vLLM adds it through its `--middleware` option, outermost). For POST requests it:
- checks the API key first, on every route but the health probes (/health, /ping), so an unauthenticated
  caller can neither make the server fetch anything nor read /metrics, /tokenize, /docs, ...;
- refuses an unknown model name (404);
- classifies every content part of a chat request by its keys, as vLLM does (`vlm.serve.parts`): an image part
  (typed or not) is loaded under `vlm.serve.media`'s policy (corrupt/truncated images, formats outside the allow-list,
  non-image data URLs, unsupported schemes, pixel bombs, file:// outside the allowed directory, private
  addresses) and replaced by one canonical `image_url` part holding a `data:` URL of the vetted bytes, so vLLM
  never fetches a URL, opens a file or parses another shape; any other media, a client `uuid`, and a part it
  cannot classify are refused, naming the message and the part;
- refuses more images than allowed, and `<image>` typed into text (it would silently act as a plain token);
- refuses media anywhere but in the content parts of the routes that serve images (/v1/chat/completions and
  its /invocations alias), the route being the one the app itself matches for the request (its routes, read
  from `scope["app"]` and logged at start-up), so a root_path prefix or a trailing slash cannot disguise one;
- refuses the image token anywhere in a request (as text, or as its id in a token-id prompt), request fields
  that steer rendering or media processing (REFUSED_FIELDS), and JSON nested absurdly deep.

The body is parsed and checked in a bounded thread pool of the guard's own (`guard_threads`), never on the event
loop. When the check changes nothing (text, and images already sent as canonical `data:` URL parts) vLLM gets
the client's own bytes, not a re-serialization. With `hand_off_images` (set by `vlm serve`) each decoded image
goes to `vlm.serve.vetted`, where vLLM's media loader (our connector, `vlm.serve.engine.media`) takes it instead of
decoding the same bytes a second time.

Refusals carry a request id, which the server log repeats next to any library error text behind it; that text
never goes to the client.

Its settings come from the `VLM_GUARD` environment variable (JSON), written by `vlm serve`, because vLLM
instantiates middleware itself, by import path. It holds only SHA-256 digests of the API keys, so the keys
never reach the environment of vLLM's child processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from collections.abc import Iterator
from typing import Any

import anyio
import prometheus_client
from starlette.responses import JSONResponse
from starlette.routing import Match

from ..constants import IMAGE_TOKEN
from .auth import bearer_authorized
from .media import MediaError, MediaPolicy, is_canonical_data_url, load_image_url, to_data_url
from .parts import NAME_MAPS, PartError, classify_part, image_part, media_marker
from .vetted import VETTED

log = logging.getLogger(__name__)

ENV_VAR = "VLM_GUARD"
OPEN_PATHS = frozenset({"/health", "/ping"})  # liveness probes: no key, no body, no data
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64  # real requests nest < 10 deep; deeper only tries to exhaust recursion
# Request fields (vLLM 0.32's protocol classes) that change how the prompt and its image placeholders are
# rendered, or how media is loaded and processed, or that hand the engine media state it did not compute.
REFUSED_FIELDS = (
    "chat_template",  # a template decides where image placeholders go
    "chat_template_kwargs",
    "mm_processor_kwargs",  # processor settings: image size, tiling, ... (cost and placeholders)
    "media_io_kwargs",  # how media is loaded (video frames, ...)
    "features",  # /inference/v1/generate: precomputed multimodal tensors and their cache hashes
    "ec_transfer_params",  # encoder-cache transfer: image features from elsewhere
    "kv_transfer_params",  # KV-cache transfer from another prefill (disaggregated serving only)
    "prompt_embeds",  # /v1/completions: embeddings in place of tokens
)
TOKEN_FIELDS = {"prompt", "prompt_token_ids", "token_ids", "input_ids"}  # where token-id prompts are read
BODY_METHODS = {"POST", "PUT", "PATCH"}
SERVING_PATHS = frozenset({"/v1/chat/completions", "/invocations"})  # the routes that serve images
# On vLLM's /metrics (one API server: prometheus_client's default registry): what the guard adds to each request.
GUARD_SECONDS = prometheus_client.Histogram(
    "vlm:guard_seconds",
    "Seconds the request guard held a request body: JSON parsing, image fetch and decode, checks, serialization, "
    "and the wait for its thread pool",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


@dataclasses.dataclass
class GuardConfig:
    served_model_names: list[str]
    api_key_sha256: list[str] = dataclasses.field(default_factory=list)  # hex digests, never the keys
    max_images: int = 4
    image_token_id: int | None = None
    policy: MediaPolicy = dataclasses.field(default_factory=MediaPolicy)
    # Hand decoded images to vLLM's loader (vlm.serve.vetted): only where our media connector takes them.
    hand_off_images: bool = False
    guard_threads: int = 8  # requests checked at once, off the event loop

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
    def __init__(self, status: int, message: str, kind: str = "BadRequestError", detail: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.detail = status, message, kind, detail


def error_response(status: int, message: str, kind: str, request_id: str | None = None) -> JSONResponse:
    # The OpenAI error shape, which vLLM uses too, so clients raise their usual exception classes.
    error = {"message": message, "type": kind, "param": None, "code": status}
    if request_id:
        error["request_id"] = request_id
    return JSONResponse({"error": error}, status)


def _chat_images(messages: Any) -> list[tuple[str, list, int, str]]:
    """(where, content list, index, URL) of every image part; a 400 naming the first part it refuses."""
    images = []
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"messages[{i}].content must be a string or a list of content parts")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            try:
                url = classify_part(part)
            except PartError as err:
                raise RequestError(400, f"{where} {err}") from None
            if url is not None:
                images.append((where, content, j, url))
    return images


def _load_images(images: list[tuple[str, list, int, str]], config: GuardConfig) -> bool:
    """Load every image under the policy; a part not already in the canonical shape, holding a `data:` URL of
    the vetted bytes, is replaced by one that is. True when a part changed."""
    if len(images) > config.max_images:
        raise RequestError(
            400, f"the request has {len(images)} images; this server accepts at most {config.max_images}"
        )
    changed = False
    for where, content, j, url in images:
        try:
            data, image = load_image_url(url, config.policy)
        except MediaError as err:
            raise RequestError(err.status, f"{where}: {err}", detail=err.detail) from None
        # A data: URL already in our canonical form is kept as is (no base64 round trip); any other URL
        # becomes one, so vLLM decodes exactly the bytes vetted here and never fetches or opens anything.
        vetted = url if is_canonical_data_url(url, data) else to_data_url(data, image)
        if config.hand_off_images:
            VETTED.put(vetted, image, data)  # vLLM's loader takes the decoded image instead of decoding again
        part = image_part(vetted)
        if content[j] != part:
            content[j], changed = part, True
    return changed


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


def _media_outside_parts(
    body: dict[str, Any], values: list[tuple[str | None, Any]], serving: bool
) -> str | None:
    """The first media marker in the body, outside the chat content parts a serving route classifies itself."""
    parts: set[int] = set()
    messages = body.get("messages") if serving else None
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts.update(id(p) for p in content)
    for key, value in values:
        if key in NAME_MAPS or id(value) in parts:
            continue
        marker = media_marker(value)
        if marker is not None:
            return marker
    return None


def check_request(path: str, body: Any, config: GuardConfig) -> bool:
    """Check a request body for the route `path` (the template of the route the app matched), in place.

    True when it rewrote an image part (the body must then be serialized again), False when it changed nothing.
    """
    if not isinstance(body, dict):
        return False
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
            400,
            f"{', '.join(refused)}: not accepted in requests; this server renders its own chat template "
            f"and processes media with its own settings",
        )
    if any(isinstance(v, str) and IMAGE_TOKEN in v for _, v in values):
        raise RequestError(400, f"the request must not contain {IMAGE_TOKEN}; send images as image_url parts")
    tokens = config.image_token_id
    if tokens is not None and any(k in TOKEN_FIELDS and v == tokens and type(v) is int for k, v in values):
        raise RequestError(
            400, f"token ids must not include the image token id {tokens}; send images as image_url parts"
        )
    serving = path in SERVING_PATHS
    images = _chat_images(body.get("messages")) if serving else []  # first: a refused part is named
    marker = _media_outside_parts(body, values, serving)
    if marker is not None:
        where = "outside the messages' content parts" if serving else f"on {path}"
        raise RequestError(
            400,
            f"media ({marker}) {where}: images are accepted as image_url content parts of chat messages, "
            f"on {' and '.join(sorted(SERVING_PATHS))} only",
        )
    return _load_images(images, config)


class _NotAJSONNumber(ValueError):
    pass


def _refuse_constant(name: str) -> None:
    raise _NotAJSONNumber(name)


def parse_body(raw: bytes) -> Any:
    """The JSON body; NaN/Infinity (Python's extensions) and recursion-exhausting nesting are refused."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(400, f"the request nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except _NotAJSONNumber as err:
        raise RequestError(400, f"the request body holds {err}, which is not a JSON number") from None
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise RequestError(400, f"the request body is not valid JSON ({where})", detail=err.msg) from None
    except UnicodeDecodeError as err:
        raise RequestError(
            400, "the request body is not valid JSON (not UTF-8 text)", detail=repr(err)
        ) from None
    except ValueError as err:  # an integer over Python's digit limit, ...
        raise RequestError(400, "the request body is not valid JSON", detail=repr(err)) from None


def route_path(scope) -> str:
    """The path template of the route the app will pick for this request, by the app's own matching (a
    root_path prefix or a path parameter changes nothing); the raw path when there is no app to ask."""
    app = scope.get("app")
    for route in getattr(app, "routes", None) or ():
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route type that cannot match this scope: not the one
            continue
        if match == Match.FULL:
            return getattr(route, "path", scope.get("path", ""))
    return scope.get("path", "")


def _is_preflight(scope) -> bool:
    headers = dict(scope.get("headers") or [])
    return scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers


def _log_routes(app) -> None:
    """Say once, at start-up, which mounted routes take a body and which of them serve images."""
    routes = [
        r for r in getattr(app, "routes", None) or () if BODY_METHODS & set(getattr(r, "methods", ()) or ())
    ]
    paths = sorted({r.path for r in routes if isinstance(getattr(r, "path", None), str)})
    serving = [p for p in paths if p in SERVING_PATHS]
    log.info(
        "guard: images served on %s; refused on the %d other body routes (%s)",
        ", ".join(serving) or "no route",
        len(paths) - len(serving),
        ", ".join(p for p in paths if p not in SERVING_PATHS),
    )


class MediaGuard:
    def __init__(self, app, config: GuardConfig | None = None):
        self.app = app
        self.config = config or GuardConfig.from_env()
        self._key_hashes = [bytes.fromhex(h) for h in self.config.api_key_sha256]
        self._routes_logged = False
        self._limiter = anyio.CapacityLimiter(self.config.guard_threads)
        if log.level == logging.NOTSET:
            # Our own level: importing vLLM's SageMaker routes sets the root logger to ERROR, which would
            # silence the refusal lines (and the library text they carry) that operators match by request id.
            log.setLevel(logging.INFO)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        return bearer_authorized(headers.get(b"authorization", b"").decode("latin-1"), self._key_hashes)

    async def __call__(self, scope, receive, send):
        if not self._routes_logged and scope.get("app") is not None:
            self._routes_logged = True
            _log_routes(scope["app"])
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
            return await self._refuse(err, scope)(scope, receive, send)
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

    @staticmethod
    def _refuse(err: RequestError, scope) -> JSONResponse:
        """The error response, with a request id that the log line (and any library text behind it) repeats."""
        request_id = f"guard-{secrets.token_hex(8)}"
        level = logging.WARNING if err.detail else logging.INFO
        detail = f" [{err.detail}]" if err.detail else ""
        log.log(level, "%s %s %s: %d %s%s", request_id, scope.get("method"), scope.get("path"), err.status,
                err.message, detail)  # fmt: skip
        return error_response(err.status, err.message, err.kind, request_id)

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
        raw = b"".join(chunks)
        # JSON parsing, fetching and decoding block: they run in a bounded thread pool of their own, off the
        # event loop, so a slow image never stalls other requests (nor the threads vLLM's routes borrow).
        with GUARD_SECONDS.time():
            return await anyio.to_thread.run_sync(
                self._check_raw, route_path(scope), raw, limiter=self._limiter
            )

    def _check_raw(self, path: str, raw: bytes) -> bytes:
        """The body to forward: the client's own bytes when the check changed nothing, else the rewritten one."""
        body = parse_body(raw)
        try:
            changed = check_request(path, body, self.config)
        except RequestError:
            raise
        except Exception as err:  # a guard bug: refuse (never pass unchecked), log the traceback, no 500
            log.exception("guard: checking a request failed")
            raise RequestError(400, "the request could not be checked", detail=repr(err)) from None
        # vLLM parses with the same json.loads, so unchanged bytes mean the very body checked here.
        return json.dumps(body).encode() if changed else raw
