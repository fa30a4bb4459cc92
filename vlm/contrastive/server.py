"""`vlm serve-embeddings CKPT`: an OpenAI-style `POST /v1/embeddings` for texts and images (stage 0 models).

A small Starlette app rather than a route inside vLLM's chat server: the dual encoder is not a vLLM model. It
follows `vlm serve`'s rules: loopback by default, the same API keys (--api-key or VLLM_API_KEY, compared as
sha256 digests in constant time, vlm/serve/guard.py), and images loaded under the same media policy (vlm/serve/media.py:
data: URLs, http(s) to public addresses only, file:// only under --allowed-local-media-path).

`input` is a string, or a list whose items are strings (texts) or `{"type": "image_url", "image_url": {"url"}}`
parts (images). Errors use the OpenAI error shape.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import anyio

from ..serve.auth import bearer_authorized, key_digest
from ..serve.guard import error_response
from ..serve.media import MediaError, MediaPolicy, load_image_url
from .embed import Encoder

log = logging.getLogger("vlm.contrastive")
MAX_INPUTS = 256


class InputError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_inputs(body, model_name: str, policy: MediaPolicy) -> list[tuple[str, object]]:
    """[(modality, text or PIL image)] from a request body, or an InputError naming the problem."""
    if not isinstance(body, dict):
        raise InputError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise InputError(404, f"the model {body['model']!r} does not exist; this server serves {model_name}")
    if body.get("encoding_format", "float") != "float":
        raise InputError(400, "encoding_format: only 'float' is supported")
    raw = body.get("input")
    items = [raw] if isinstance(raw, (str, dict)) else raw
    if not isinstance(items, list) or not items:
        raise InputError(400, "input must be a non-empty string, image part, or list of them")
    if len(items) > MAX_INPUTS:
        raise InputError(400, f"at most {MAX_INPUTS} inputs per request, got {len(items)}")
    return [_item(i, item, policy) for i, item in enumerate(items)]


def _item(i: int, item, policy: MediaPolicy) -> tuple[str, object]:
    if isinstance(item, str):
        if not item.strip():
            raise InputError(400, f"input[{i}] is an empty string")
        return "text", item
    if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
        return "text", item["text"]
    if isinstance(item, dict) and item.get("type") == "image_url":
        value = item.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise InputError(400, f"input[{i}]: image_url part has no url")
        try:
            return "image", load_image_url(url, policy)[1].convert("RGB")
        except MediaError as err:
            raise InputError(err.status, f"input[{i}]: {err}") from None
    raise InputError(400, f"input[{i}]: expected a string or an image_url part")


def embed_inputs(encoder: Encoder, inputs: list[tuple[str, object]]) -> list[list[float]]:
    """Embeddings in input order (texts and images are batched separately)."""
    out: list[list[float] | None] = [None] * len(inputs)
    for modality, fn in (("text", encoder.embed_texts), ("image", encoder.embed_images)):
        idx = [i for i, (m, _) in enumerate(inputs) if m == modality]
        if idx:
            for i, vector in zip(idx, fn([inputs[i][1] for i in idx]), strict=True):
                out[i] = vector.tolist()
    return out


def _authorized(request, key_hashes: list[bytes]) -> bool:
    return bearer_authorized(request.headers.get("authorization", ""), key_hashes)


def build_app(encoder: Encoder, model_name: str, api_keys: list[str], policy: MediaPolicy):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    key_hashes = [bytes.fromhex(key_digest(k)) for k in api_keys]
    lock = anyio.Lock()  # one forward pass at a time: the model is not shared across threads

    async def embeddings(request):
        if not _authorized(request, key_hashes):
            return error_response(401, "missing or wrong API key", "AuthenticationError")
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the request body is not valid JSON", "BadRequestError")
        try:
            inputs = await anyio.to_thread.run_sync(parse_inputs, body, model_name, policy)
        except InputError as err:
            kind = "NotFoundError" if err.status == 404 else "BadRequestError"
            return error_response(err.status, str(err), kind)
        async with lock:
            vectors = await anyio.to_thread.run_sync(embed_inputs, encoder, inputs)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        n_text = sum(m == "text" for m, _ in inputs)
        usage = {"prompt_tokens": n_text, "total_tokens": n_text}
        return JSONResponse({"object": "list", "data": data, "model": model_name, "usage": usage})

    async def models(request):
        if not _authorized(request, key_hashes):
            return error_response(401, "missing or wrong API key", "AuthenticationError")
        return JSONResponse(
            {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "vlm"}]}
        )

    return Starlette(
        routes=[Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/v1/models", models)]
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.auth import api_keys
    from ..serve.server import _is_loopback

    if not _is_loopback(args.host):
        raise ValueError(
            f"--host {args.host} would expose the embeddings server beyond this machine; use loopback"
        )
    keys = api_keys(args)
    encoder = Encoder(args.checkpoint)
    name = Path(args.checkpoint).resolve().name
    policy = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path)
    log.info("serving embeddings of %s as %r on http://%s:%d", args.checkpoint, name, args.host, args.port)
    uvicorn.run(build_app(encoder, name, keys, policy), host=args.host, port=args.port, log_level="warning")
    return 0
