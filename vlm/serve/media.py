"""Untrusted image input: decode safely, fetch URLs without SSRF, read local files only inside an allowed root.

Shared by the server's guard (`vlm.serve.guard`) and batch captioning (`vlm.serve.caption`). Every refusal is a `MediaError`
carrying the HTTP status it should become and a message that says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import io
import ipaddress
import os
import socket
import ssl
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from PIL import Image

from ..data.images import load_strict

MAX_REDIRECTS = 3


class MediaError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    allowed_local_media_path: str | None = None  # file:// is refused unless the file is under this directory
    allow_private_urls: bool = False  # http(s) to loopback/private/link-local addresses (SSRF) is refused
    fetch_timeout_s: float = 10.0


def decode_image(data: bytes, policy: MediaPolicy, what: str = "image") -> Image.Image:
    """Decode fully (so truncation shows now, not inside the engine), refusing bombs before decompressing."""
    if len(data) > policy.max_image_bytes:
        raise MediaError(413, f"{what} is {len(data)} bytes; the limit is {policy.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header: nothing is decompressed yet
            if width * height > policy.max_image_pixels:
                raise MediaError(
                    413,
                    f"{what} is {width}x{height} = {width * height} pixels; the limit is "
                    f"{policy.max_image_pixels} (decompression-bomb guard)",
                )
            load_strict(image)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(413, f"{what} exceeds the pixel limit: {err}") from None
    except Image.UnidentifiedImageError:
        raise MediaError(400, f"{what} is not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated/corrupt data
        raise MediaError(400, f"{what} is corrupt or truncated: {err}") from None
    return image


def parse_data_url(url: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 `data:` URL."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError(400, "malformed data URL: no ',' between header and payload")
    parts = header.split(";")
    mime = parts[0].strip().lower() or "text/plain"
    if not mime.startswith("image/"):
        raise MediaError(400, f"data URL has media type {mime!r}; only image/* is accepted")
    if "base64" not in [p.strip().lower() for p in parts[1:]]:
        raise MediaError(400, "data URL must be base64-encoded (data:image/...;base64,...)")
    try:
        return mime, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(400, "data URL payload is not valid base64") from None


def to_data_url(data: bytes, image: Image.Image) -> str:
    mime = Image.MIME.get(image.format or "", "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def read_local(path: str | Path, policy: MediaPolicy) -> bytes:
    """A local file, only when it resolves (symlinks and `..` included) inside the allowed directory."""
    root = policy.allowed_local_media_path
    if not root:
        raise MediaError(
            403,
            "file:// URLs are refused; start the server with --allowed-local-media-path DIR to allow a directory",
        )
    if "\0" in str(path):
        raise MediaError(400, "file path contains a NUL byte")
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise MediaError(403, f"{path} is outside the allowed media directory {root}")
    if not os.path.isfile(real):
        raise MediaError(400, f"no such file: {path}")
    if os.path.getsize(real) > policy.max_image_bytes:
        raise MediaError(413, f"{path} is larger than {policy.max_image_bytes} bytes")
    return Path(real).read_bytes()


NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64, compatible): vetted as well."""
    if ip.version == 4:
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [a for a in found if a is not None]


def _vetted_address(host: str, port: int, policy: MediaPolicy) -> str:
    """Resolve once and refuse non-public addresses; the caller connects to this very address (no rebinding)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise MediaError(400, f"cannot resolve image host {host!r}: {err.strerror}") from None
    addresses = [info[4][0] for info in infos]
    if not policy.allow_private_urls:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not all(a.is_global for a in (ip, *_embedded_ipv4(ip))):
                raise MediaError(
                    403,
                    f"image URL host {host!r} resolves to the non-public address {ip}; refused "
                    f"(start the server with --allow-private-urls to allow it)",
                )
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, address, **kwargs):
        super().__init__(host, **kwargs)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, address, **kwargs):
        super().__init__(host, context=ssl.create_default_context(), **kwargs)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """GET an http(s) image, vetting the address of every hop (redirects are followed by hand)."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(400, f"unsupported image URL {url[:80]!r}")
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        address = _vetted_address(parts.hostname, port, policy)
        conn_cls = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
        conn = conn_cls(parts.hostname, address, port=port, timeout=policy.fetch_timeout_s)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            conn.request("GET", target, headers={"User-Agent": "vlm-serve", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise MediaError(400, f"fetching the image URL gave HTTP {response.status}")
            data = response.read(policy.max_image_bytes + 1)
        except (OSError, http.client.HTTPException) as err:
            raise MediaError(400, f"could not fetch the image URL: {err}") from None
        finally:
            conn.close()
        if len(data) > policy.max_image_bytes:
            raise MediaError(413, f"image at the URL is larger than {policy.max_image_bytes} bytes")
        return data
    raise MediaError(400, f"image URL redirected more than {MAX_REDIRECTS} times")


def load_image_url(url: str, policy: MediaPolicy) -> tuple[bytes, Image.Image]:
    """Bytes and decoded image of a `data:`, `http(s)://` or `file://` URL, under the policy."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        _, data = parse_data_url(url)
    elif scheme in ("http", "https"):
        data = fetch_url(url, policy)
    elif scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(400, f"file:// URL names a remote host {parts.netloc!r}")
        data = read_local(urllib.request.url2pathname(parts.path), policy)
    else:
        raise MediaError(
            400, f"unsupported image URL scheme {scheme or '(none)'!r}; use data:, http(s): or file:"
        )
    return data, decode_image(data, policy)
