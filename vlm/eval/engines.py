"""The small inference API evaluation and the benchmark adapters share: greedy answers for (images, prompt) pairs.

    engine = make_engine("vllm" | "hf", "runs/mlp/stage2/final")
    engine.generate([([image], "What colour is shown?"), ([image], messages)], max_new_tokens=8) -> [str, ...]

A prompt is a user question (one image placeholder per image is put before it), or chat messages whose content is
a string with literal `<image>` markers or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` parts.
Images are PIL images or paths. Both engines render prompts with the checkpoint's own chat template and decode
greedily, so on the same prompts they agree token for token (tests/test_engine_parity.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

ImageLike = Image.Image | str | Path
Prompt = str | list[dict[str, Any]]
Request = tuple[Sequence[ImageLike], Prompt]
ENGINES = ("vllm", "hf")


def load_image(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as img:
        return img.convert("RGB")


def to_messages(prompt: Prompt, n_images: int) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        if "<image>" in prompt:
            return [{"role": "user", "content": prompt}]
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]
    return list(prompt)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Engine:
    name = ""

    def __init__(self, checkpoint: str | Path, batch_size: int):
        from ..processing import VLMProcessor

        self.checkpoint = Path(checkpoint)
        if not (self.checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"not a checkpoint directory (no config.json): {self.checkpoint}")
        self.batch_size = batch_size
        self.processor = VLMProcessor.from_pretrained(str(self.checkpoint))

    def render(self, request: Request) -> tuple[list[Image.Image], str]:
        images, prompt = request
        images = [load_image(i) for i in images]
        text = self.processor.apply_chat_template(
            to_messages(prompt, len(images)), add_generation_prompt=True
        )
        return images, text

    def generate(
        self, requests: Sequence[Request], max_new_tokens: int = 32, progress: bool = False
    ) -> list[str]:
        from tqdm.auto import tqdm

        outputs: list[str] = []
        with tqdm(total=len(requests), desc=f"{self.name} generate", unit="q", disable=not progress) as bar:
            for chunk in _chunks(list(requests), self.batch_size):
                outputs += self._generate([self.render(r) for r in chunk], max_new_tokens)
                bar.update(len(chunk))
        return outputs

    def _generate(self, rendered: list[tuple[list[Image.Image], str]], max_new_tokens: int) -> list[str]:
        raise NotImplementedError


class HFEngine(_Engine):
    """transformers `generate`, greedy, batched with left padding."""

    name = "hf"

    def __init__(self, checkpoint: str | Path, batch_size: int = 32, dtype: str | None = None):
        import torch

        from ..model import VLMForConditionalGeneration

        super().__init__(checkpoint, batch_size)
        kwargs = {"dtype": getattr(torch, dtype)} if dtype and dtype != "auto" else {}
        self.model = VLMForConditionalGeneration.from_pretrained(str(checkpoint), **kwargs).eval()
        self.processor.tokenizer.padding_side = "left"  # batched greedy decoding of a decoder-only LLM

    def inputs(self, rendered: list[tuple[list[Image.Image], str]]):
        """The model inputs of rendered requests: the template's text, tokenized as training tokenizes it (the
        processor adds no special tokens of its own), each <image> expanded into its placeholders."""
        images = [img for imgs, _ in rendered for img in imgs]
        return self.processor(
            text=[t for _, t in rendered], images=images or None, padding=True, return_tensors="pt"
        ).to(self.model.device)

    def _generate(self, rendered, max_new_tokens, **generate_kwargs):
        import torch

        inputs = self.inputs(rendered)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs
            )
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [t.strip() for t in texts]


class ModelEngine(HFEngine):
    """HFEngine on a model already in memory (eval during training): no checkpoint is read.

    synced_gpus: every rank calls generate on the same requests and keeps stepping until all are done (needed
    when the weights are ZeRO-3 partitions: each forward is collective).
    """

    def __init__(self, model, processor, batch_size: int = 16, label: str = "in-training", synced_gpus=False):
        import copy

        self.checkpoint, self.batch_size, self.model = label, batch_size, model
        self.processor = copy.deepcopy(processor)  # the trainer's own keeps its padding side
        self.processor.tokenizer.padding_side = "left"
        self.synced_gpus = synced_gpus

    def _generate(self, rendered, max_new_tokens):
        return super()._generate(rendered, max_new_tokens, synced_gpus=self.synced_gpus, use_cache=True)


class VLLMEngine(_Engine):
    """Offline `vllm.LLM` with our plugin, greedy (temperature 0). Needs the serve extra."""

    name = "vllm"

    def __init__(
        self,
        checkpoint: str | Path,
        batch_size: int = 256,
        dtype: str = "auto",
        max_images: int = 1,
        enforce_eager: bool = False,
        max_model_len: int | None = None,
        verbose: bool = False,
    ):
        from ..vllm_env import engine_dtype, set_engine_env

        super().__init__(checkpoint, batch_size)
        set_engine_env(verbose=verbose)  # verbose: vLLM's INFO logs too
        from vllm import LLM

        self.llm = LLM(
            model=str(checkpoint),
            dtype=engine_dtype(dtype),
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max(1, max_images)},
            enforce_eager=enforce_eager,
            seed=0,
        )

    def _generate(self, rendered, max_new_tokens):
        from vllm import SamplingParams

        requests = []
        for images, text in rendered:
            request: dict[str, Any] = {"prompt": text}
            if images:
                request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            requests.append(request)
        sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


def make_engine(kind: str, checkpoint: str | Path, **options: Any) -> _Engine:
    """options: batch_size, dtype; vllm also max_images, enforce_eager, max_model_len, verbose."""
    if kind == "hf":
        options = {k: v for k, v in options.items() if k in ("batch_size", "dtype")}
        return HFEngine(checkpoint, **options)
    if kind == "vllm":
        return VLLMEngine(checkpoint, **options)
    raise ValueError(f"unknown engine {kind!r}; expected one of {', '.join(ENGINES)}")
