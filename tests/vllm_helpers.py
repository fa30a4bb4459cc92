"""Helpers for the serving tests: tiny checkpoints on disk (built once per session), images, free ports."""

from __future__ import annotations

import atexit
import base64
import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

_ROOT = Path(tempfile.mkdtemp(prefix="vlm-serving-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.cache
def tiny_checkpoint(tower: str, llm: str, connector: str, seed: int = 0) -> Path:
    from vlm.build import build_base_model, save_checkpoint

    model, processor = build_base_model(tower, llm, connector, seed=seed)
    return save_checkpoint(model, processor, _ROOT / f"{tower}-{llm}-{connector}")


def noise_image(seed: int, size=(40, 36)) -> Image.Image:
    """Random pixels: distinct images give distinct tower features, unlike solid colours."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def hf_greedy(model, batch, max_new_tokens: int):
    """transformers' greedy reply to one processed prompt: (new token ids, log-probs of the first step)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, batch["input_ids"].shape[1] :].tolist()
    return tokens, torch.log_softmax(out.logits[0][0].float(), dim=-1)


def vllm_greedy(llm, requests, max_tokens: int):
    """vLLM's greedy outputs (top-5 log-probs each step) for `requests`; shuts the engine down either way."""
    import gc

    from vllm import SamplingParams

    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5)
        return llm.generate(requests, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTUP_TIMEOUT_S = 300


class Server:
    """`vlm serve CKPT` in a subprocess on a free loopback port, float32; `api_key`: what client() sends."""

    def __init__(self, name: str, ckpt: Path, args: list[str], log_dir: Path, api_key: str = "none"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{name}.log"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "vlm.cli", "serve", str(ckpt), "--port", str(self.port)]
        cmd += ["--dtype", "float32", "--max-model-len", "512", *args]
        self._log = open(self.log_path, "w")
        # A new session: teardown signals the server and the engine processes it started, nothing else.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}"
                )
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log_path.read_text()[-4000:]}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def client(self, api_key: str | None = None):
        import openai

        return openai.OpenAI(
            base_url=f"{self.base}/v1", api_key=api_key or self.api_key, max_retries=0, timeout=60
        )


# vLLM's own log format: "(EngineCore pid=12) INFO 12-03 08:27:19 [core.py:133] ..." (the prefix is optional).
_VLLM_INFO = re.compile(r"(\([\w-]+ pid=\d+\) )?INFO \d\d-\d\d \d\d:\d\d:\d\d \[")


def vllm_info_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if _VLLM_INFO.match(line)]


@functools.cache
def bos_style_checkpoint(style: str) -> Path:
    """A tiny checkpoint made as `vlm init --llm PATH` makes one, from a saved LLM whose tokenizer adds BOS to
    plain text (style "llama", as Llama's does) or does not (style "qwen2", as Qwen2's does not)."""
    from transformers import AutoModelForCausalLM

    from vlm.build import build_base_model, prepare_tokenizer, save_checkpoint
    from vlm.presets import LLM_PRESETS

    llm_dir = _ROOT / f"llm-{style}"
    tokenizer = prepare_tokenizer(style, seed=0)  # the locally trained BPE, a fresh copy
    tokenizer.add_bos_token = style == "llama"  # rebuilds the post-processor, saved in tokenizer.json
    AutoModelForCausalLM.from_config(LLM_PRESETS[style].build_config()).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    model, processor = build_base_model("clip", str(llm_dir), "mlp", seed=0)
    return save_checkpoint(model, processor, _ROOT / f"bos-{style}")
