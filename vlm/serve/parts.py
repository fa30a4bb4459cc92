"""Which JSON shapes vLLM 0.32 reads as media, and how the guard classifies a chat content part by its keys.

vLLM's chat parser (`vllm/renderers/chat_utils.py`, `_parse_chat_message_content_mm_part`, line 1691) looks at a
part's `type` only when it is a known string and no `uuid` is given (line 1714); otherwise it picks the media by
the keys present (lines 1728-1799). So a part is classified here by its keys as well as its type.

| shape | where vLLM reads it | vLLM makes it | guard |
| --- | --- | --- | --- |
| `{"type": "image_url", "image_url": {"url": U}}` | chat_utils.py:1656 | image, fetched (1078, 1277) | vetted |
| `{"image_url": U}`, `{"image_url": {"url": U}}`, `"type": null` | chat_utils.py:1728-1736 | image, fetched | vetted |
| `{"type": "input_image", "image_url": U}` (Responses' shape) | chat_utils.py:1655 | image, fetched | vetted |
| any part with a `uuid`, whatever its type (`text` too) | chat_utils.py:1712, 1728, 1951 | media keyed by that uuid in the multimodal caches; with a null payload, a reference to a cached item | 400 |
| `image_pil` (key or type) | chat_utils.py:1661, 1737 | image | 400 |
| `image_embeds` (key or type) | chat_utils.py:1657, 1744 | image embeddings | 400 |
| `audio_url`, `input_audio`, `audio_embeds` | chat_utils.py:1658, 1662-1663, 1751, 1770-1782 | audio, fetched | 400 |
| `video_url`, `video_embeds` | chat_utils.py:1659, 1665, 1758, 1783 | video, fetched | 400 |
| `prompt_embeds` (key or type) | chat_utils.py:1660, 1765 | prompt embeddings | 400 |
| `text`, `input_text`, `output_text`, `refusal`, `thinking`, `tool_reference` | chat_utils.py:1650-1654, 1666, 1815 | text | passed, if it has no media key |
| no type and no media key, a type that is not a string, an unknown type | chat_utils.py:1797-1805, 2008 | vLLM's own 400 | 400 |
| Responses `input_image` (`image_url` or `file_id`), `input_file` | responses/protocol.py:228, then the chat parser | image | 400 * |
| Anthropic `{"type": "image", "source": {"type": "url" or "base64", ...}}`, also inside `tool_result` | anthropic/serving.py:302-320, 487-489, 556-583 | an `image_url` part | 400 * |
| `/v1/systemone`: `images`, `audio`, `videos` (lists of URLs) | structured_decisions/protocol.py:33-41, strategies.py:246-256 | fetched | 400 * |
| `/inference/v1/generate`: `content_parts` `{"type": "image_url", "url": U, "uuid": ...}` | scale_out/token_in_token_out/serving.py:245-257 | fetched | 400 * |
| `/inference/v1/generate`: `features` (multimodal hashes and tensors) | scale_out/token_in_token_out/protocol.py:188 | cache entries by hash | refused field |
| `/v2/embed`: `images`, `inputs[].content[]` typed `image_url` | pooling/embed/protocol.py:211-233 | image | 400 * |
| score/rerank content (`image_url`, `image_embeds`, `video_url` parts) | pooling/scoring/typing.py:15-20 | image, video | 400 * |
| `/v1/completions`: `prompt_embeds` | completion/protocol.py:116 | prompt embeddings | refused field |

"vetted": loaded by the guard under the media policy and rewritten as `{"type": "image_url", "image_url": {"url":
<data: URL of the vetted bytes>}}`, so vLLM never fetches, and never parses a shape other than that one.
"*": media anywhere but a route that serves images (`/v1/chat/completions` and its `/invocations` alias).
"""

from __future__ import annotations

from typing import Any

TEXT_TYPES = frozenset({"text", "input_text", "output_text", "refusal", "thinking", "tool_reference"})
IMAGE_TYPES = frozenset({"image_url", "input_image"})  # the part types served, besides an untyped image_url
# Keys that make a part media whatever its type (chat_utils.py:1728-1790), and other routes' media fields.
MEDIA_KEYS = frozenset(
    {
        "image_url",
        "image_pil",
        "image_embeds",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "video_embeds",
        "prompt_embeds",
        "file_id",
        "file_data",
        "file_url",
    }
)
MEDIA_TYPES = frozenset(
    {
        *IMAGE_TYPES,
        "image",
        "image_pil",
        "image_embeds",
        "audio",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video",
        "video_url",
        "video_embeds",
        "prompt_embeds",
        "file",
        "input_file",
        "document",
    }
)
MEDIA_LISTS = frozenset({"images", "audio", "videos"})  # lists of URLs (/v1/systemone, /v2/embed)
# Keys whose object maps names to JSON schemas: its keys are property names, not a part's keys.
NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})


ONLY_IMAGES = "this server accepts images only, as image_url parts"


class PartError(ValueError):
    """A content part the guard refuses; the message says why, the caller says where."""


def media_marker(value: Any) -> str | None:
    """What makes vLLM read this JSON object as media (a key, a type, a uuid, a URL list), or None."""
    if not isinstance(value, dict):
        return None
    keys = sorted(MEDIA_KEYS.intersection(value))
    if keys:
        return f"key {keys[0]!r}"
    kind = value.get("type")
    if isinstance(kind, str) and kind in MEDIA_TYPES:
        return f"type {kind!r}"
    if value.get("uuid") is not None and "type" in value:
        return "key 'uuid'"
    lists = sorted(k for k in MEDIA_LISTS.intersection(value) if isinstance(value[k], list) and value[k])
    return f"key {lists[0]!r}" if lists else None


def _url(part: dict[str, Any]) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.strip():
        raise PartError("image_url has no url")
    return url


def classify_part(part: Any) -> str | None:
    """The image URL of one chat content part, None for text; a PartError for anything else.

    Served: `image_url` typed, untyped or null-typed, and `input_image`, each with an `image_url` and no other
    media key. Refused: a client `uuid` (it names an item in vLLM's multimodal caches, shared by all clients),
    every other media shape, and whatever is not recognisably text.
    """
    if isinstance(part, str):
        return None  # vLLM reads a bare string as text
    if not isinstance(part, dict):
        raise PartError("is neither an object nor a string")
    if part.get("uuid") is not None:
        raise PartError(
            "carries a uuid; client uuids name items in the server's shared multimodal cache and are refused"
        )
    kind = part.get("type")
    if kind is not None and not isinstance(kind, str):
        raise PartError("has a type that is not a string")
    if kind in IMAGE_TYPES or (kind is None and "image_url" in part):
        others = sorted(MEDIA_KEYS.intersection(part) - {"image_url"})
        if others:
            raise PartError(
                f"carries {', '.join(others)}; an image part carries an image_url and no other media"
            )
        return _url(part)
    if kind in MEDIA_TYPES:
        raise PartError(f"has type {kind!r}; {ONLY_IMAGES}")
    marker = media_marker(part)
    if marker is not None:
        typed = "has no type" if kind is None else f"has type {kind!r}"
        raise PartError(f"{typed} but carries {marker}; {ONLY_IMAGES}")
    if kind in TEXT_TYPES:
        return None
    if kind is None:
        raise PartError("has no type and no image_url")
    raise PartError(f"has type {kind!r}, which this server does not accept; send text or image_url parts")


def image_part(url: str) -> dict[str, Any]:
    """The one shape the guard hands vLLM for an image."""
    return {"type": "image_url", "image_url": {"url": url}}
