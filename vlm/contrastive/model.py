"""Dual-encoder (image tower + text tower) models for stage 0, as transformers' own CLIPModel / SiglipModel.

Tiny models are built from the same tower presets `vlm init` uses (vlm/presets.py), so the trained vision half
drops into `vlm init --tower PATH` (vlm/towers.py reads the `vision_config` of a full CLIP/SigLIP checkpoint).
A checkpoint is a transformers directory: config.json + model.safetensors, the image processor and the tokenizer.
config.json carries a `contrastive` entry (family, loss, text length, tower fingerprint), so no side file is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
)

from ..presets import TOWER_PRESETS
from ..towers import tower_spec
from .losses import LOSSES, contrastive_loss

META_KEY = "contrastive"  # the config.json entry that marks a stage 0 checkpoint
END_TOKEN = "<|endoftext|>"  # pooled by CLIP's text tower; added last, so it also has the largest id
FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "clip": (CLIPConfig, CLIPModel),
    "siglip": (SiglipConfig, SiglipModel),
}
_TINY_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
# Initial logit scale/bias: CLIP's 1/0.07 temperature for InfoNCE; SigLIP's t' = log 10, b = -10.
_INIT = {"infonce": (math.log(1 / 0.07), 0.0), "sigmoid": (math.log(10.0), -10.0)}


@dataclasses.dataclass
class ContrastiveMeta:
    family: str  # clip | siglip
    loss: str  # infonce | sigmoid
    max_text_length: int = 32

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown tower family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown contrastive loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.loss == "sigmoid" and self.family != "siglip":
            raise ValueError("loss 'sigmoid' needs a learnable logit bias: use tower 'siglip' (SiglipModel)")


class DualEncoder(nn.Module):
    """A CLIPModel/SiglipModel whose forward returns the contrastive loss and the normalised embeddings."""

    def __init__(self, hf: PreTrainedModel, meta: ContrastiveMeta):
        super().__init__()
        self.scale_shape = tuple(hf.logit_scale.shape)  # the shape the HF class loads
        if hf.logit_scale.dim() == 0:  # CLIP's is 0-d, which DeepSpeed cannot broadcast; saved back as 0-d
            hf.logit_scale = nn.Parameter(hf.logit_scale.detach().reshape(1))
        self.hf, self.meta = hf, meta
        self.config = hf.config  # DeepSpeed reads a few settings from module.config when present

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(_pooled(self.hf.get_image_features(pixel_values=pixel_values)), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.hf.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(_pooled(out), dim=-1)

    def forward(self, pixel_values, input_ids, attention_mask):
        image, text = self.image_embeds(pixel_values), self.text_embeds(input_ids, attention_mask)
        bias = getattr(self.hf, "logit_bias", None)
        loss = contrastive_loss(self.meta.loss, image, text, self.hf.logit_scale, bias)
        return loss, image, text


def _pooled(out) -> torch.Tensor:
    """get_*_features returns the projected tensor, or an output object carrying it as pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """The tiny BPE of `vlm init` (trained on the synthetic corpus) plus the text tower's end-of-text token."""
    from ..build import prepare_tokenizer

    tokenizer = prepare_tokenizer("llama", seed)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [END_TOKEN]}, replace_extra_special_tokens=False
    )
    return tokenizer


def build_dual_encoder(
    family: str, loss: str, seed: int = 0, projection_dim: int = 64, max_text_length: int = 32
) -> tuple:
    """(DualEncoder, tokenizer, image processor): a random-init tiny model on the `family` tower preset."""
    meta = ContrastiveMeta(family, loss, max_text_length)
    tokenizer = build_tokenizer(seed)
    vision = TOWER_PRESETS[family].build_config()
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    text = dict(
        _TINY_TEXT,
        vocab_size=len(tokenizer),
        max_position_embeddings=meta.max_text_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_id,
    )
    config_cls, model_cls = FAMILIES[family]
    extra = {"projection_dim": projection_dim} if family == "clip" else {}
    config = config_cls(text_config=text, vision_config=vision.to_dict(), **extra)
    torch.manual_seed(seed)
    hf = model_cls(config)
    init_scale, init_bias = _INIT[loss]
    with torch.no_grad():
        hf.logit_scale.fill_(init_scale)
        if hasattr(hf, "logit_bias"):
            hf.logit_bias.fill_(init_bias)
            hf.logit_bias.requires_grad_(loss == "sigmoid")  # unused by InfoNCE
    processor = tower_spec(vision).image_processor(vision.image_size)
    return DualEncoder(hf, meta), tokenizer, processor


def load_dual_encoder(path: str | Path) -> tuple:
    """(DualEncoder in eval mode, tokenizer, image processor) from a stage 0 checkpoint directory."""
    path = Path(path)
    config_file = path / "config.json"
    values = json.loads(config_file.read_text()).get(META_KEY) if config_file.is_file() else None
    if not values:
        raise FileNotFoundError(
            f"{path} is not a contrastive checkpoint (no '{META_KEY}' entry in config.json); "
            "train one with `vlm train stages/stage0.yaml`"
        )
    meta = ContrastiveMeta(values["family"], values["loss"], values["max_text_length"])
    hf = FAMILIES[meta.family][1].from_pretrained(str(path))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    return DualEncoder(hf, meta).eval(), tokenizer, processor


def save_dual_encoder(model: DualEncoder, tokenizer, processor, out: str | Path, state_dict=None) -> Path:
    """The HF model (loadable by CLIPModel/SiglipModel and by `vlm init --tower`), processor, tokenizer, meta."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # `state_dict`: gathered by the trainer, with the wrapper's "hf." prefix
    state = (
        model.hf.state_dict()
        if state_dict is None
        else {k.removeprefix("hf."): v for k, v in state_dict.items()}
    )
    state["logit_scale"] = state["logit_scale"].reshape(model.scale_shape)
    # Fingerprint first: save_pretrained may drop tied entries from `state`.
    fingerprint = tower_fingerprint(model.hf, state)
    setattr(model.hf.config, META_KEY, {**dataclasses.asdict(model.meta), "tower_fingerprint": fingerprint})
    model.hf.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tower_fingerprint(hf: PreTrainedModel, state_dict: dict | None = None) -> str:
    """sha256 over both towers' weights (names, shapes, values): identifies the embedding space of an index.

    The logit scale/bias are left out: they calibrate scores but do not move the (unit) embeddings."""
    state = state_dict if state_dict is not None else hf.state_dict()
    digest = hashlib.sha256()
    for name in sorted(k for k in state if not k.startswith("logit_")):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Fixed-length ids: the text, the end-of-text token (CLIP pools it), then padding (SigLIP pools the last)."""
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    pad_id = tokenizer.pad_token_id
    ids = torch.full((len(texts), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), max_length), dtype=torch.long)
    for i, text in enumerate(texts):
        row = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1] + [end_id]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}
