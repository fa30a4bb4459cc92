"""The API-key check shared by `vlm serve`'s guard and `vlm serve-embeddings`: keys from the command line, a
file or VLLM_API_KEY, held only as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
from pathlib import Path


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_keys(args: argparse.Namespace) -> list[str]:
    """--api-key, --api-key-file or VLLM_API_KEY. The variable is removed so no child process inherits it."""
    env_key = os.environ.pop("VLLM_API_KEY", None)
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return [key]
    return [k for k in (args.api_key or env_key,) if k]


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
