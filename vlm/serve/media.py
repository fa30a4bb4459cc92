"""Untrusted image input: decode safely, fetch URLs without SSRF, read local files only inside an allowed root.

Shared by the server's guard (`vlm.serve.guard`) and batch captioning (`vlm.serve.caption`). Every refusal is a `MediaError`
carrying the HTTP status it should become and a message of our own that says what was wrong. A library's error
text (PIL's, the resolver's, the socket's) never goes into that message, which a client sees; it goes into
`detail`, for the server's log.

Only PNG, JPEG, WebP, GIF and BMP are decoded, recognised by their first bytes before any PIL plugin runs: PIL
would otherwise pick among all its plugins, some of which start external programs (EPS and PDF run Ghostscript).
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
    def __init__(self, status: int, message: str, detail: str | None = None):
        super().__init__(message)
        self.status, self.detail = status, detail  # detail: library text, for the log only


# PIL format -> (the MIME type we write, declared MIME types that agree with it)
FORMATS = {
    "PNG": ("image/png", {"image/png"}),
    "JPEG": ("image/jpeg", {"image/jpeg", "image/jpg", "image/pjpeg"}),
    "WEBP": ("image/webp", {"image/webp"}),
    "GIF": ("image/gif", {"image/gif"}),
    "BMP": ("image/bmp", {"image/bmp", "image/x-bmp", "image/x-ms-bmp"}),
}
FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"


def sniff_format(data: bytes) -> str | None:
    """The allowed format the bytes start with (its PIL name), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    return None


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    allowed_local_media_path: str | None = None  # file:// is refused unless the file is under this directory
    allow_private_urls: bool = False  # http(s) to loopback/private/link-local addresses (SSRF) is refused
    fetch_timeout_s: float = 10.0


def decode_image(data: bytes, policy: MediaPolicy, what: str = "image") -> Image.Image:
    """Decode fully (so truncation shows now, not inside the engine), refusing bombs before decompressing.

    Only the allowed formats, checked on the first bytes; PIL then tries that one plugin and no other.
    """
    if len(data) > policy.max_image_bytes:
        raise MediaError(413, f"{what} is {len(data)} bytes; the limit is {policy.max_image_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise MediaError(400, f"{what} is not a readable image: its bytes are not {FORMAT_NAMES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
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
        limit = policy.max_image_pixels
        raise MediaError(413, f"{what} exceeds the pixel limit of {limit}", str(err)) from None
    except Image.UnidentifiedImageError as err:
        raise MediaError(400, f"{what} is not a readable {fmt} image (corrupt header)", str(err)) from None
    except Exception as err:  # PIL's errors for truncated/corrupt data, and its bugs on hostile input
        raise MediaError(400, f"{what} is a corrupt or truncated {fmt} image", repr(err)) from None
    return image


def check_declared_type(mime: str, data: bytes) -> None:
    """A data URL's declared MIME type must name an allowed format, and the one its bytes are in."""
    fmt = sniff_format(data)
    if not any(mime in accepted for _, accepted in FORMATS.values()):
        raise MediaError(400, f"data URL has media type {mime!r}; accepted: {FORMAT_NAMES}")
    if fmt is not None and mime not in FORMATS[fmt][1]:
        raise MediaError(400, f"data URL says {mime} but its bytes are a {fmt} image")


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
    fmt = sniff_format(data) or image.format or ""
    mime = FORMATS[fmt][0] if fmt in FORMATS else Image.MIME.get(fmt, "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def is_canonical_data_url(url: str, data: bytes) -> bool:
    """Whether `url` is exactly the `data:` URL to_data_url would write for these (already decoded) bytes."""
    fmt = sniff_format(data)
    if fmt not in FORMATS or not url.startswith(f"data:{FORMATS[fmt][0]};base64,"):
        return False
    # Same bytes, same length: base64 is canonical unless the payload has padding the decoder ignored.
    return len(url) - url.index(",") - 1 == 4 * ((len(data) + 2) // 3)


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
        # The directory is not named: it is the server's own path, no business of the client.
        raise MediaError(403, f"{path} is outside the allowed media directory")
    if not os.path.isfile(real):
        raise MediaError(400, f"no such file: {path}")
    try:
        if os.path.getsize(real) > policy.max_image_bytes:
            raise MediaError(413, f"{path} is larger than {policy.max_image_bytes} bytes")
        return Path(real).read_bytes()
    except OSError as err:  # unreadable (permissions), or gone since the check
        raise MediaError(400, f"cannot read {path}", repr(err)) from None


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
    except (OSError, UnicodeError) as err:  # gaierror; UnicodeError: a name IDNA cannot encode
        raise MediaError(400, f"cannot resolve image host {host!r}", repr(err)) from None
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


def _split_http_url(url: str) -> tuple[urllib.parse.SplitResult, int]:
    """The parts and port of an http(s) URL; a bad port or bracketed host is the client's error, not a 500."""
    try:
        parts = urllib.parse.urlsplit(url)
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
    except ValueError:  # "Port out of range", "Invalid IPv6 URL"
        raise MediaError(400, f"malformed image URL {url[:80]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MediaError(400, f"unsupported image URL {url[:80]!r}")
    return parts, port


def fetch_url(url: str, policy: MediaPolicy) -> bytes:
    """GET an http(s) image, vetting the address of every hop (redirects are followed by hand)."""
    for _ in range(MAX_REDIRECTS + 1):
        parts, port = _split_http_url(url)
        https = parts.scheme == "https"
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
        except MediaError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as err:  # ValueError: a bad Location, ...
            raise MediaError(400, "could not fetch the image URL", repr(err)) from None
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
        mime, data = parse_data_url(url)
        check_declared_type(mime, data)
    elif scheme in ("http", "https"):
        data = fetch_url(url, policy)
    elif scheme == "file":
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            raise MediaError(400, f"malformed image URL {url[:80]!r}") from None
        if parts.netloc not in ("", "localhost"):
            raise MediaError(400, f"file:// URL names a remote host {parts.netloc!r}")
        data = read_local(urllib.request.url2pathname(parts.path), policy)
    else:
        raise MediaError(
            400, f"unsupported image URL scheme {scheme or '(none)'!r}; use data:, http(s): or file:"
        )
    return data, decode_image(data, policy)
