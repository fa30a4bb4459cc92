"""The untrusted-input rules of `vlm.serve.media`, without a server (the end-to-end checks are in test_serve.py)."""

from __future__ import annotations

import pytest
from vllm_helpers import data_url, noise_image, png_bytes

from vlm.serve.media import MediaError, MediaPolicy, decode_image, load_image_url, parse_data_url


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "[::1]",
        "[fe80::1]",
    ],
)
def test_non_public_addresses_are_refused_by_default(host):
    with pytest.raises(MediaError, match="non-public address") as info:
        load_image_url(f"http://{host}:9/x.png", MediaPolicy())
    assert info.value.status == 403


def test_private_addresses_are_fetched_when_switched_on():
    # Allowed through the address check, the fetch itself then fails (nothing listens on port 9): a 400.
    with pytest.raises(MediaError, match="could not fetch") as info:
        load_image_url("http://127.0.0.1:9/x.png", MediaPolicy(allow_private_urls=True, fetch_timeout_s=2))
    assert info.value.status == 400


def test_pixel_limit_is_checked_before_decoding():
    big = png_bytes(noise_image(0, size=(4, 4)).resize((2000, 1000)))
    with pytest.raises(MediaError, match="2000x1000") as info:
        decode_image(big, MediaPolicy(max_image_pixels=1_000_000))
    assert info.value.status == 413
    assert decode_image(big, MediaPolicy()).size == (2000, 1000)


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:text/html;base64,PGI+", "only image/*"),
        ("data:image/png;base64", "no ','"),
        ("gopher://example.com/x", "unsupported image URL scheme"),
        ("file://remote-host/etc/passwd", "remote host"),
    ],
)
def test_malformed_urls(url, fragment):
    with pytest.raises(MediaError, match=fragment):
        load_image_url(url, MediaPolicy())


def test_data_url_round_trip():
    mime, data = parse_data_url(data_url(png_bytes(noise_image(1))))
    assert mime == "image/png" and decode_image(data, MediaPolicy()).size == (40, 36)


def test_local_files_confined_to_the_allowed_directory(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png_bytes(noise_image(2)))
    (tmp_path / "secret.png").write_bytes(png_bytes(noise_image(3)))
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    policy = MediaPolicy(allowed_local_media_path=str(allowed))
    assert load_image_url((allowed / "ok.png").as_uri(), policy)[1].size == (40, 36)
    for path in (tmp_path / "secret.png", allowed / "link.png"):
        with pytest.raises(MediaError, match="outside the allowed media directory"):
            load_image_url(path.as_uri(), policy)
    with pytest.raises(MediaError, match="allowed-local-media-path"):
        load_image_url((allowed / "ok.png").as_uri(), MediaPolicy())


def test_truncated_image_is_refused_even_when_another_library_relaxed_pil(monkeypatch):
    # lmms-eval sets this process-global flag to True on import; our decoder must not inherit that.
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    truncated = png_bytes(noise_image(0))[:80]
    with pytest.raises(MediaError, match="corrupt or truncated"):
        decode_image(truncated, MediaPolicy())
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for the library that set it


def encoded(fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    noise_image(3).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif"),
                  ("BMP", "image/bmp")],
)  # fmt: skip
def test_the_allowed_formats_decode(fmt, mime):
    data, image = load_image_url(data_url(encoded(fmt), mime), MediaPolicy())
    assert image.format == fmt and image.size == (40, 36)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


@pytest.mark.parametrize(
    "data",
    [EPS, PDF, b"\xc5\xd0\xd3\xc6" + EPS, b"II*\x00" + b"\x00" * 20, b"\x00\x00\x01\x00" + b"\x00" * 20],
)
def test_other_formats_are_refused_before_any_pil_plugin_runs(data, monkeypatch):
    from PIL import Image

    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a))
    for source in (data_url(data), data_url(data, "image/png")):
        with pytest.raises(MediaError, match="not a readable image") as info:
            load_image_url(source, MediaPolicy())
        assert info.value.status == 400
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image(data, MediaPolicy(), what="file.eps")  # batch captioning's entry point
    assert opened == []  # no decoder ran: EPS and PDF would start Ghostscript


def test_pil_is_told_the_one_format_the_bytes_are_in(monkeypatch):
    from PIL import Image

    real, formats = Image.open, []
    monkeypatch.setattr(Image, "open", lambda fp, **k: formats.append(k) or real(fp, **k))
    decode_image(encoded("JPEG"), MediaPolicy())
    assert formats == [{"formats": ["JPEG"]}]


@pytest.mark.parametrize(
    "declared, fmt, fragment",
    [
        ("image/jpeg", "PNG", "says image/jpeg but its bytes are a PNG"),
        ("image/png", "GIF", "says image/png but its bytes are a GIF"),
        ("image/svg+xml", "PNG", "accepted: PNG, JPEG"),
        ("image/tiff", "PNG", "accepted: PNG, JPEG"),
    ],
)
def test_a_data_url_type_that_disagrees_with_its_bytes_is_400(declared, fmt, fragment):
    with pytest.raises(MediaError, match=fragment) as info:
        load_image_url(data_url(encoded(fmt), declared), MediaPolicy())
    assert info.value.status == 400


def test_errors_carry_our_message_and_keep_the_library_text_for_the_log():
    truncated = png_bytes(noise_image(0))[:80]
    with pytest.raises(MediaError) as info:
        decode_image(truncated, MediaPolicy(), what="x.png")
    assert str(info.value) == "x.png is a corrupt or truncated PNG image"
    assert info.value.detail and "Error(" in info.value.detail


@pytest.mark.parametrize(
    "url", ["http://a:99999/x.png", "http://a:port/x.png", "http://[::1/x.png", "file://[x/y"]
)
def test_malformed_urls_are_400_not_500(url):
    with pytest.raises(MediaError, match="malformed image URL") as info:
        load_image_url(url, MediaPolicy())
    assert info.value.status == 400
