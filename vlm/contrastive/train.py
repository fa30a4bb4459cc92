"""Stage 0 in the shared DeepSpeed loop: `objective: contrastive` recipes train an image and a text tower.

`ContrastiveTrainer` reuses vlm/train/loop.Trainer (DeepSpeed set-up, optimizer, schedule, resumable
checkpoints, metrics, the step loop) and replaces only the objective-specific parts: the model, the data, the
step's loss and the final checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..train.loop import Trainer, all_reduce_sum
from ..train.modeling import _full_state_dict
from .data import PairData
from .model import FAMILIES, build_dual_encoder, load_dual_encoder, save_dual_encoder


class ContrastiveTrainer(Trainer):
    def build_model(self):
        recipe = self.recipe
        settings = recipe.contrastive
        if recipe.model in FAMILIES:  # a tower family: random-init tiny towers from the presets
            model, self.tokenizer, self.image_processor = build_dual_encoder(
                recipe.model, settings.loss, recipe.seed, settings.projection_dim, recipe.max_length
            )
        else:
            model, self.tokenizer, self.image_processor = load_dual_encoder(recipe.model)
            if model.meta.loss != settings.loss or model.meta.max_text_length != recipe.max_length:
                raise ValueError(
                    f"{recipe.model} was trained with loss {model.meta.loss!r} and max_length "
                    f"{model.meta.max_text_length}; the recipe asks for {settings.loss!r} and {recipe.max_length}"
                )
        self.processor = self.image_processor
        return model.train()

    def build_data(self):
        return PairData(self.recipe, self.tokenizer, self.image_processor, self.rank, self.world_size)

    def parameter_report(self, model) -> str:
        counts = {"vision": 0, "text": 0, "scale/bias": 0}
        for name, p in model.named_parameters():
            part = (
                "vision"
                if "visual" in name or "vision" in name
                else "text"
                if "text" in name
                else "scale/bias"
            )
            counts[part] += p.numel() if p.requires_grad else 0
        return "trainable parameters (stage 0, both towers): " + ", ".join(
            f"{k} {v:,}" for k, v in counts.items()
        )

    def train_step(self, micro_batches: list[dict]) -> tuple[float, int, int]:
        """Each micro-batch loss is already the global (all ranks) batch's loss; returns (loss, text tokens,
        pairs), global."""
        losses = []
        for batch in micro_batches:
            inputs = self._to_device({k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")})
            loss, _, _ = self.engine(**inputs)
            if not torch.isfinite(loss):
                self._diverged(batch["ids"])
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
        tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        counts = all_reduce_sum(
            torch.tensor([tokens, sum(len(b["ids"]) for b in micro_batches)], dtype=torch.float64)
        )
        return sum(losses) / len(losses), int(counts[0]), int(counts[1])

    def save_final(self) -> Path:
        out = self.out / "final"
        staging = out.with_name(out.name + ".partial")
        state = _full_state_dict(self.engine)  # collective under ZeRO-3
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            save_dual_encoder(
                self.engine.module, self.tokenizer, self.image_processor, staging, state_dict=state
            )
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
        if dist.is_initialized():
            dist.barrier()
        return out
