"""Baselines (a) and (b) of bench/serve_realistic.py: an OpenAI-compatible /v1/chat/completions on transformers
`generate()`, as research repos ship it (FastAPI + uvicorn, one model in the process, images as data: URLs).

    python bench/hf_serve.py CKPT --port 8001 --dtype float32 --max-batch 1             # (a) one at a time
    python bench/hf_serve.py CKPT --port 8001 --dtype float32 --max-batch 32 --wait-ms 20  # (b) static batches

One worker thread owns the model. It takes the oldest waiting request, then gathers more until the batch holds
`--max-batch` requests or `--wait-ms` have passed since the first, decodes the images, runs the processor on the
whole batch (prompts left-padded to the longest), and calls `generate()` once for it, up to the batch's largest
`max_tokens`. Each request's tokens are streamed (SSE) as they come, and its answer ends at its own EOS or
`max_tokens`; the next batch starts only when `generate()` returns, which is what static batching means.
POST /admin/max_batch?size=N changes the batch size between runs (the benchmark sets it to the concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Job:
    body: dict
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    prompt_tokens: int = 0

    def send(self, kind: str, value) -> None:  # from the worker thread
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))


def to_hf(messages: list[dict]) -> tuple[list[dict], list]:
    """OpenAI chat messages -> (the processor's chat template messages, decoded images in order)."""
    from PIL import Image

    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image_url":
                payload = part["image_url"]["url"].split(",", 1)[1]
                images.append(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported content part type {part['type']!r}")
        out.append({"role": m["role"], "content": parts})
    return out, images


class RowStreamer:
    """A `generate()` streamer for a batch: routes each row's new token to its request, ending each row at its own
    stop token or max_tokens while the batch runs on (transformers' streamers take batch size 1 only)."""

    def __init__(self, jobs: list[Job], tokenizer, stop_ids: set[int] | None):
        self.jobs, self.tokenizer, self.stop_ids = jobs, tokenizer, stop_ids
        self.limits = [int(j.body.get("max_tokens") or 16) for j in jobs]
        self.counts = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            if self.stop_ids is not None and token in self.stop_ids:
                self.finish(i, "stop")
                continue
            self.counts[i] += 1
            self.jobs[i].send("text", self.tokenizer.decode([token]))
            if self.counts[i] >= self.limits[i]:
                self.finish(i, "length")

    def finish(self, i: int, reason: str) -> None:
        self.done[i] = True
        self.jobs[i].send("end", (reason, self.counts[i]))

    def end(self) -> None:
        for i in range(len(self.jobs)):
            if not self.done[i]:
                self.finish(i, "length")


class Worker:
    def __init__(self, ckpt: str, dtype: str, max_batch: int, wait_s: float):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import vlm  # noqa: F401  (registers the model with the Auto classes)

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.processor = AutoProcessor.from_pretrained(ckpt)
        self.processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.max_batch, self.wait_s = max_batch, wait_s
        self.pending: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self.loop, daemon=True).start()

    def take_batch(self) -> list[Job]:
        batch = [self.pending.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.pending.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def loop(self) -> None:
        while True:
            batch = self.take_batch()
            try:
                self.run(batch)
            except Exception as err:  # one bad batch answers its requests with the error, the server stays up
                for job in batch:
                    job.send("error", f"{type(err).__name__}: {err}")

    def run(self, batch: list[Job]) -> None:
        import torch

        prompts, images = [], []
        for job in batch:
            messages, imgs = to_hf(job.body["messages"])
            prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
            images += imgs
        inputs = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt").to(
            self.device
        )
        for job, mask in zip(batch, inputs["attention_mask"], strict=True):
            job.prompt_tokens = int(mask.sum())
        ignore_eos = all(j.body.get("ignore_eos") for j in batch)
        streamer = RowStreamer(batch, self.processor.tokenizer, None if ignore_eos else self.stop_ids)
        # ignore_eos: no stop token at all, so the batch runs to its largest max_tokens (as vLLM's ignore_eos).
        stop = {"eos_token_id": None} if ignore_eos else {}
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max(streamer.limits),
                streamer=streamer,
                **stop,
            )
        streamer.end()


def chunk(rid: str, model: str, delta: dict | None, finish: str | None = None, usage=None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    body["choices"] = choices
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


async def stream(job: Job, model: str):
    rid, first = f"chatcmpl-{uuid.uuid4().hex}", True
    while True:
        kind, value = await job.out.get()
        if kind == "text":
            delta = {"role": "assistant", "content": value} if first else {"content": value}
            first = False
            yield chunk(rid, model, delta)
        elif kind == "error":
            yield f"data: {json.dumps({'error': {'message': value}})}\n\n".encode()
            return
        else:
            reason, n = value
            yield chunk(rid, model, {} if not first else {"role": "assistant", "content": ""}, reason)
            if (job.body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": n}
                yield chunk(rid, model, None, usage=usage | {"total_tokens": job.prompt_tokens + n})
            yield b"data: [DONE]\n\n"
            return


def build_app(worker: Worker, model_name: str):
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/admin/max_batch")
    async def set_max_batch(size: int):
        worker.max_batch = size
        return {"max_batch": size}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        job = Job(body, asyncio.get_running_loop())
        worker.pending.put(job)
        if body.get("stream"):
            return StreamingResponse(stream(job, model_name), media_type="text/event-stream")
        parts = []
        while True:  # the same events the stream gets, gathered
            kind, value = await job.out.get()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                return JSONResponse({"error": {"message": value}}, status_code=500)
            else:
                break
        reason, n = value
        message = {"role": "assistant", "content": "".join(parts)}
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "model": model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": n},
            }
        )

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="float32", help="torch dtype name: float32, bfloat16, float16")
    parser.add_argument("--max-batch", type=int, default=1, help="1: one request at a time (a)")
    parser.add_argument("--wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    parser.add_argument("--served-model-name", default="m")
    args = parser.parse_args()
    worker = Worker(args.checkpoint, args.dtype, args.max_batch, args.wait_ms / 1000)
    app = build_app(worker, args.served_model_name)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
