"""Serving: `vlm serve` (server.py: vLLM's OpenAI server with our plugin), the request guard (guard.py), the media
policy (media.py), the API-key check (auth.py), batch captioning (caption.py) and the vLLM plugin (engine/).

Nothing here imports vllm at package import time: `vlm` stays importable without the `serve` extra.
"""
