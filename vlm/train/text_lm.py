"""Language pretraining (`objective: text`, stages/lm.yaml, `make lm`): the tiny LLM alone, on text-only records.

This is the stand-in for a pretrained Llama or Qwen2, which no hub here can provide: the LLM starts from its
preset with the tokenizer `vlm init` trains (vlm/build.py), learns the synthetic world's language through the
shared DeepSpeed loop (vlm/train/loop.py: optimizer, schedule, resumable checkpoints, metrics, the loss over
the global token count), and is saved as a plain transformers causal-LM directory with its tokenizer and chat
template, which `vlm init --llm DIR` takes like any pretrained LLM. No tower, no connector, no image tokens.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..build import build_language_model
from ..data.records import load_llava_dataset
from ..data.samples import mix_datasets
from ..data.text import TextDataset
from ..presets import LLM_PRESETS
from .loop import Trainer
from .modeling import _full_state_dict, precision_for
from .run_data import TrainData


class TextData(TrainData):
    """TrainData over text-only records: every token of the rendered conversation is supervised."""

    @staticmethod
    def _dataset(recipe, tokenizer):
        parts = [
            TextDataset(
                load_llava_dataset(source.path, image_root=source.image_root),
                tokenizer,
                recipe.template,
                max_length=recipe.max_length,
                on_error=recipe.on_bad_sample,
                source=source.path,
            )
            for source in recipe.data
        ]
        if len(parts) == 1:
            return parts[0]
        return mix_datasets(parts, [s.weight for s in recipe.data], seed=recipe.seed)


class TextTrainer(Trainer):
    def build_model(self):
        """An LLM preset (random init, the preset's tiny tokenizer) or a causal-LM directory to continue."""
        recipe = self.recipe
        if recipe.model in LLM_PRESETS:
            model, tokenizer = build_language_model(recipe.model, recipe.seed)
            model = model.to(precision_for(recipe))
            model.set_attn_implementation(self.attn)
        else:
            if not Path(recipe.model).is_dir():
                raise FileNotFoundError(
                    f"model: {recipe.model} is neither an LLM preset nor a model directory"
                )
            model = AutoModelForCausalLM.from_pretrained(
                recipe.model, dtype=precision_for(recipe), attn_implementation=self.attn
            )
            tokenizer = AutoTokenizer.from_pretrained(recipe.model)
        model.config.use_cache = False
        self.processor = self.tokenizer = tokenizer
        return model.train()

    def build_data(self):
        return TextData(self.recipe, self.tokenizer, self.rank, self.world_size, self.attn)

    def parameter_report(self, model) -> str:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"trainable parameters (language pretraining, the LLM alone): {n:,}"

    def save_final(self) -> Path:
        """A transformers causal-LM directory: weights, config, generation config, tokenizer, chat template."""
        out = self.out / "final"
        staging = out.with_name(out.name + ".partial")
        state = _full_state_dict(self.engine)  # collective under ZeRO-3
        if self.rank == 0:
            model = self.engine.module
            model.config.use_cache = True
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging, state_dict=state)
            self.tokenizer.save_pretrained(staging)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(staging, out)
        if dist.is_initialized():
            dist.barrier()
        return out
