"""Images the guard has decoded, handed to vLLM's media loader in the same process so nothing decodes twice.

The guard (`vlm.serve.guard`) decodes every image to vet it, then gives vLLM a `data:` URL of the vetted bytes.
vLLM's chat parser would decode those bytes again; instead our media connector (`vlm.serve.engine.media`, picked
by `VLLM_MEDIA_CONNECTOR`, which `vlm serve` sets) takes the decoded image from here, keyed by that very URL.
Both run in the API-server process: the guard is its outermost middleware.

Bounded in entries and pixel bytes: an entry whose request never reaches the parser (a client gone, a refusal by
vLLM) is evicted oldest-first. A miss is always safe, it only costs the decode: the connector then decodes the
URL's bytes as vLLM would. Each `put` is taken once, so an image never outlives its request for long and no
request reads an image another put there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from PIL import Image

MAX_ENTRIES = 64
MAX_PIXEL_BYTES = 256 * 1024 * 1024  # decoded RGB(A) data held at once, all entries together


def _pixel_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


class VettedImages:
    """URL -> (decoded image, its bytes), each put taken once, oldest evicted past the bounds; thread-safe."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_pixel_bytes: int = MAX_PIXEL_BYTES):
        self.max_entries, self.max_pixel_bytes = max_entries, max_pixel_bytes
        self._items: OrderedDict[str, list] = OrderedDict()  # url -> [image, data, puts left to take]
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def put(self, url: str, image: Image.Image, data: bytes) -> None:
        with self._lock:
            entry = self._items.get(url)
            if entry is not None:
                entry[2] += 1  # the same image twice in flight: two takes
                self._items.move_to_end(url)
                return
            self._items[url] = [image, data, 1]
            self._bytes += _pixel_bytes(image)
            while len(self._items) > self.max_entries or (
                self._bytes > self.max_pixel_bytes and len(self._items) > 1
            ):
                _, (old, _, _) = self._items.popitem(last=False)
                self._bytes -= _pixel_bytes(old)

    def take(self, url: str) -> tuple[Image.Image, bytes] | None:
        with self._lock:
            entry = self._items.get(url)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            entry[2] -= 1
            if entry[2] == 0:
                del self._items[url]
                self._bytes -= _pixel_bytes(entry[0])
            return entry[0], entry[1]

    def __len__(self) -> int:
        return len(self._items)


VETTED = VettedImages()  # the API server's one store: its guard puts, its chat parser takes
