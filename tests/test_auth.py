"""The bearer-key check, in-process: RFC 9110 field-value whitespace is not part of the key, any other byte is."""

from __future__ import annotations

import hashlib

import pytest

from vlm.serve.auth import bearer_authorized

KEY = "k3y-Secret"
HASHES = [hashlib.sha256(KEY.encode()).digest()]


@pytest.mark.parametrize(
    "value", [f"Bearer {KEY}", f"bearer {KEY}", f"Bearer {KEY} ", f" Bearer {KEY}\t", f"Bearer   {KEY}"]
)
def test_the_key_with_surrounding_whitespace_is_accepted(value):
    assert bearer_authorized(value, HASHES)


@pytest.mark.parametrize(
    "value",
    [
        "",
        KEY,
        f"Basic {KEY}",
        f"Bearer {KEY[:-1]}",
        f"Bearer {KEY}x",
        f"Bearer x{KEY}",
        f"Bearer {KEY[:3]} {KEY[3:]}",
        f"Bearer {KEY.upper()}",
        f"Bearer {KEY}\u00a0",
        f"Bearer {KEY}\n",
        f"Bearer\t{KEY}",
    ],
)
def test_a_key_differing_in_any_other_byte_is_refused(value):
    assert not bearer_authorized(value, HASHES)


def test_no_configured_key_means_open():
    assert bearer_authorized("", [])
