"""Text-only samples for language pretraining (`objective: text`, `make lm`): LLaVA records -> token ids.

Each record is rendered with the recipe's chat template, as a document, and every token carries loss: the
user's questions and the template's scaffolding are language the LLM must read, not only the answers it writes
(a pretrained Llama saw whole documents too). Records with an image, or an `<image>` marker in any turn, are
refused: this stage trains the LLM alone and has no tower to fill the placeholders. Samples longer than
max_length are refused, not truncated, as in `samples.py`. Bad records raise a SampleError naming the file
and the record, or are counted by reason with on_error="skip".
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import IMAGE_TOKEN
from ..templates import chat_template_for, get_template
from .records import conversation_to_messages
from .samples import OnError, SampleError

log = logging.getLogger(__name__)


def encode_text_record(
    record: dict[str, Any], tokenizer, template_name: str, max_length: int | None
) -> np.ndarray:
    """The record rendered by the template as token ids (all supervised), or a SampleError naming why not."""
    sid = record.get("id")
    if record.get("images") or record.get("image"):
        raise SampleError(sid, "has_image", "language pretraining takes text-only records (no 'image' key)")
    try:
        messages = conversation_to_messages(record)
    except (KeyError, TypeError, ValueError) as e:
        raise SampleError(sid, "bad_record", str(e)) from e
    if any(IMAGE_TOKEN in m["content"] for m in messages):
        raise SampleError(
            sid, "has_image", f"a turn holds {IMAGE_TOKEN}; language pretraining takes text only"
        )
    try:
        out = tokenizer.apply_chat_template(  # BOS as serving renders it (templates.led_by_bos)
            messages,
            chat_template=chat_template_for(template_name, tokenizer),
            tokenize=True,
            return_dict=True,
        )
    except Exception as e:  # jinja raise_exception, bad content types
        raise SampleError(sid, "bad_record", f"{type(e).__name__}: {e}") from e
    ids = np.asarray(out["input_ids"], dtype=np.int64)
    if len(ids) < 2:
        raise SampleError(sid, "empty_mask", "fewer than 2 tokens: nothing to predict")
    if max_length is not None and len(ids) > max_length:
        raise SampleError(
            sid,
            "too_long",
            f"{len(ids)} tokens > max_length {max_length}; samples are refused, not truncated",
        )
    return ids


class TextDataset(Dataset):
    """Pre-encoded text-only samples: items are {id, input_ids, labels} with labels = input_ids.

    Items carry no pixel_values: the collators then put no image entry in the batch (the LLM alone trains).
    `lengths`, `skip_report()` and `source` (the file, for error messages) match `SupervisedDataset`'s.
    """

    def __init__(
        self,
        records,
        tokenizer,
        template_name: str,
        max_length: int | None = None,
        on_error: OnError = "raise",
        source: str = "",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        get_template(template_name)  # fail fast on a typo
        self.source = source
        self.skipped: Counter[str] = Counter()
        self.ids: list[Any] = []
        self._ids: list[np.ndarray] = []
        for record in records:
            try:
                encoded = encode_text_record(record, tokenizer, template_name, max_length)
            except SampleError as e:
                if on_error == "raise":
                    raise ValueError(f"{source}: {e}" if source else str(e)) from e
                self.skipped[e.reason] += 1
                continue
            self.ids.append(record.get("id"))
            self._ids.append(encoded.astype(np.int32))
        if not self.ids:
            raise ValueError(
                f"{source or 'text data'}: no usable text-only record (skipped: {dict(self.skipped)})"
            )
        self.lengths: list[int] = [len(ids) for ids in self._ids]
        if self.skipped:
            log.warning("%s: skipped %d records: %s", source, sum(self.skipped.values()), dict(self.skipped))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids = torch.from_numpy(self._ids[i].astype(np.int64))
        return {"id": self.ids[i], "input_ids": ids, "labels": ids.clone()}

    def skip_report(self) -> dict[str, int]:
        return dict(self.skipped)
