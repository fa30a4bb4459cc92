"""Model FLOPs of a training step, and MFU against the device's peak dense bf16 FLOP/s.

Per forward pass:
- LLM: 2·N·tokens + 4·L·(heads·head_dim)·Σ n_i², where N = Σ in·out over the LLM's linear layers (lm_head
  included; the embedding lookup is not a matmul) and n_i are the sample lengths (attention scores and the
  weighted sum, full n² as in the PaLM/Megatron convention; padding and cross-sample pairs in packed rows are
  not counted: MFU measures useful work);
- tower and connector: counted once per image on `meta`-device copies with torch's FlopCounterMode (all
  matmuls, convolutions and attention, whatever the tower or connector type), so no real compute is spent.

A step multiplies the forward by what runs backward: a trained part costs 3x its forward (forward, input
gradient, weight gradient); the frozen LLM of stage 1 / LoRA costs 2x (forward + the input gradient that reaches
the connector); the frozen tower costs 1x, and nothing when its features come from the feature cache.
Activation recomputation (gradient checkpointing) is not counted: this is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("vlm.train")

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, matched as substrings of
# torch.cuda.get_device_name() in this order (more specific names first).
PEAK_BF16_DENSE = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 / HBM3
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when the name is not in the table (or no GPU)."""
    if not device_name:
        return None
    return next((peak for key, peak in PEAK_BF16_DENSE if key in device_name), None)


def device_peak_flops(precision: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s per device, why none) for this process's device; MFU needs bf16 on a known GPU."""
    if not torch.cuda.is_available():
        return None, "no GPU (the peak FLOP/s table covers NVIDIA GPUs)"
    name = torch.cuda.get_device_name()
    if precision != torch.bfloat16:
        return None, f"precision is {precision}, the table holds bf16 peaks"
    peak = peak_flops(name)
    return peak, "" if peak else f"{name!r} is not in vlm.train.flops.PEAK_BF16_DENSE"


def linear_weights(module: nn.Module) -> int:
    """Σ in·out over the module's linear layers (from their shapes, so ZeRO-3 partitioning does not matter)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _forward_flops(build, *shape: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build().requires_grad_(False)  # not no_grad(): FlopCounterMode's module tracker trips on it
        x = torch.empty(*shape)
    with FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def tower_flops_per_image(config) -> int:
    """Forward FLOPs of the vision tower for one image (all layers run, whatever the feature layer)."""
    from ..towers import build_tower

    vc = config.vision_config
    size = vc.image_size
    return _forward_flops(lambda: build_tower(vc), 1, vc.num_channels, size, size)


def connector_flops_per_image(config) -> int:
    from ..connectors import build_connector

    def build():
        return build_connector(
            config.connector_config,
            vision_hidden_size=config.vision_config.hidden_size,
            text_hidden_size=config.text_config.hidden_size,
            num_patches=config.num_patches,
        )

    return _forward_flops(build, 1, config.num_patches, config.vision_config.hidden_size)


@dataclass(frozen=True)
class FlopModel:
    llm_linear: int  # Σ in·out over the LLM's linear layers
    llm_attention: int  # 4 · layers · heads · head_dim: attention FLOPs per (query, key) pair, forward
    tower_per_image: int  # forward
    connector_per_image: int  # forward
    llm_trains: bool  # full fine-tuning: the LLM's weight gradients are computed too

    @classmethod
    def for_model(cls, vlm, llm_trains: bool) -> FlopModel:
        text = vlm.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            llm_linear=linear_weights(vlm.language_model),
            llm_attention=4 * text.num_hidden_layers * text.num_attention_heads * head_dim,
            tower_per_image=tower_flops_per_image(vlm.config),
            connector_per_image=connector_flops_per_image(vlm.config),
            llm_trains=llm_trains,
        )

    def llm_forward(self, seq_lengths: Sequence[int]) -> int:
        return 2 * self.llm_linear * sum(seq_lengths) + self.llm_attention * sum(n * n for n in seq_lengths)

    def step_flops(self, seq_lengths: Sequence[int], n_images: int, tower_ran: bool) -> int:
        """Model FLOPs of forward + backward over one micro-batch."""
        llm = self.llm_forward(seq_lengths) * (3 if self.llm_trains else 2)
        tower = self.tower_per_image * n_images if tower_ran else 0
        return llm + 3 * self.connector_per_image * n_images + tower


def batch_flops(model: FlopModel, batch: dict) -> int:
    """FLOPs of one collated micro-batch (its `seq_lengths` and images; cached features skip the tower)."""
    pixels, features = batch.get("pixel_values"), batch.get("image_features")
    images = pixels if pixels is not None else features
    n_images = 0 if images is None else int(images.shape[0])
    return model.step_flops(batch["seq_lengths"], n_images, tower_ran=pixels is not None)


__all__ = [
    "PEAK_BF16_DENSE",
    "FlopModel",
    "batch_flops",
    "connector_flops_per_image",
    "device_peak_flops",
    "linear_weights",
    "peak_flops",
    "tower_flops_per_image",
]
