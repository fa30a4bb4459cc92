"""The training process: one per GPU (or per CPU rank), started by the `deepspeed` launcher (see launch.py).

It owns `deepspeed.initialize` directly (no HF Trainer): the traps of accelerate/Trainer on CPU-only DeepSpeed
(../shared/notes/deepspeed-cpu.md) do not apply, and the loss is normalised by the global count of supervised
tokens so 1 process and N processes with the same global batch compute the same loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..constants import IGNORE_INDEX
from ..data.collate import model_inputs
from ..logs import setup_logging
from . import objectives
from .checkpoints import CheckpointManager
from .feature_cache import setup_feature_cache
from .flops import FlopModel, batch_flops, device_peak_flops
from .freeze import apply_freeze_policy, format_parameter_table, param_groups, parameter_counts, vlm_of
from .metrics import MetricsLogger
from .modeling import attn_implementation_for, load_model_for_training, precision_for, save_final_checkpoint
from .periodic_eval import PeriodicEval
from .preflight import check_inputs
from .recipe import Recipe, load_recipe
from .run_data import build_train_data
from .source_loss import SourceEMA, source_means, source_token_sums

log = logging.getLogger("vlm.train")


class DivergenceError(RuntimeError):
    pass


def deepspeed_config(recipe: Recipe, world_size: int, bf16: bool) -> dict:
    path = Path(recipe.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    config = json.loads(path.read_text())
    config["train_micro_batch_size_per_gpu"] = recipe.micro_batch_size
    config["gradient_accumulation_steps"] = recipe.gradient_accumulation(world_size)
    config["train_batch_size"] = recipe.global_batch_size
    config["gradient_clipping"] = recipe.gradient_clipping  # DeepSpeed 0.19 would otherwise default to 1.0
    config["bf16"] = {"enabled": bf16}
    config.pop("fp16", None)
    leftover = [k for k, v in _flatten(config).items() if v == "auto"]
    if leftover:
        raise ValueError(f"{path}: 'auto' values the trainer does not fill: {', '.join(leftover)}")
    return config


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def build_optimizer(model, recipe: Recipe, ds_config: dict):
    groups = param_groups(model, recipe)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offload:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam (JIT-builds cpu_adam once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=recipe.lr, adamw_mode=True)
    # A torch optimizer avoids DeepSpeed's fused_adam build (~40 s) and is what the CPU path needs anyway.
    return torch.optim.AdamW(groups, lr=recipe.lr)


def build_scheduler(optimizer, recipe: Recipe, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[recipe.lr_scheduler]
    warmup = int(round(recipe.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool):
        import deepspeed

        self.recipe, self.resume = recipe, resume
        use_cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        torch.manual_seed(recipe.seed)
        self.out = Path(recipe.output_dir)
        self.bf16 = precision_for(recipe) == torch.bfloat16
        self.ds_config = deepspeed_config(recipe, self.world_size, self.bf16)
        self.accum = self.ds_config["gradient_accumulation_steps"]

        self.attn = attn_implementation_for(recipe)
        model = self.build_model()
        self.data = self.build_data()
        self.total_steps = self._total_steps()
        optimizer = build_optimizer(model, recipe, self.ds_config)
        scheduler = build_scheduler(optimizer, recipe, self.total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.checkpoints = CheckpointManager(
            self.out / "checkpoints", self.rank, self.world_size, recipe.keep_checkpoints
        )
        self.metrics = MetricsLogger(self.out, enabled=self.rank == 0)
        # After initialize: the cache runs the tower exactly as the engine's module holds it (device, dtype).
        self.cached_features = setup_feature_cache(
            recipe,
            vlm_of(self.engine.module) if recipe.feature_cache else None,
            self.processor,
            self.data,
            zero_stage(self.ds_config),
            self.rank,
            self.world_size,
            self.device,
        )
        self._setup_throughput()
        self.source_names = recipe.source_names()
        self.source_losses: dict[str, float] = {}  # the last step's, set by train_step (lm objective)
        self.source_ema = SourceEMA()
        self.periodic_eval = PeriodicEval(
            recipe, self.processor, self.rank, self.world_size, zero_stage(self.ds_config)
        )
        if self.rank == 0:
            log.info(self.parameter_report(model))

    # -- objective hooks (an objective's trainer overrides them, and train_step: vlm/contrastive/train.py) -----
    def build_model(self):
        """The module to train, with the recipe's freeze policy applied; sets self.processor."""
        model, self.processor = load_model_for_training(self.recipe, self.ds_config, self.attn)
        model = apply_freeze_policy(model, self.recipe)
        if self.recipe.gradient_checkpointing:
            vlm_of(model).language_model.gradient_checkpointing_enable({"use_reentrant": False})
            vlm_of(model).enable_input_require_grads()
        return model

    def build_data(self):
        return build_train_data(self.recipe, self.processor, self.rank, self.world_size, self.attn)

    def parameter_report(self, model) -> str:
        return "parameters (tower frozen in every stage):\n" + format_parameter_table(parameter_counts(model))

    def save_final(self) -> Path:
        return save_final_checkpoint(self.engine, self.processor, self.recipe, self.out / "final", self.rank)

    def _total_steps(self) -> int:
        per_epoch = self.data.batches_per_epoch // self.accum
        if per_epoch < 1:
            raise ValueError(
                f"the data yields {self.data.batches_per_epoch} micro-batches per process per epoch, fewer than one "
                f"optimizer step ({self.accum} micro-batches); lower global_batch_size or add data"
            )
        total = per_epoch * self.recipe.epochs
        return min(total, self.recipe.max_steps) if self.recipe.max_steps else total

    # -- one optimizer step ----------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        # non_blocking: batches come pinned from the DataLoader on CUDA, so the copy overlaps the host work
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def train_step(self, micro_batches: list[dict]) -> tuple[float, int, int]:
        """Forward/backward over the accumulation window; returns (loss, supervised tokens, samples), global."""
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        local_samples = sum(b.get("n_samples", len(b["ids"])) for b in micro_batches)
        local = torch.zeros(2 + self.world_size, dtype=torch.float64)
        local[0], local[1] = local_tokens, local_samples
        local[2 + self.rank] = sum(_text_only(b) for b in micro_batches)
        counts = all_reduce_sum(local)
        global_tokens, global_samples = int(counts[0]), int(counts[1])
        # The case where ZeRO-3 ranks could diverge in their collectives (one rank without an image): say it ran.
        text_only = {rank: int(n) for rank, n in enumerate(counts[2:].tolist()) if n}
        if text_only and self.rank == 0:
            log.info("step %d: text-only micro-batches by rank %s", self.engine.global_steps + 1, text_only)
        if global_tokens == 0:
            raise ValueError(
                f"a step with no supervised tokens: samples {[i for b in micro_batches for i in b['ids']]}"
            )
        # Each micro-batch loss is its token-loss sum / (global tokens / (world x accum)): DeepSpeed's 1/accum
        # scaling and cross-rank gradient averaging then yield exactly sum(all token losses) / global tokens.
        denom = torch.tensor(global_tokens / (self.world_size * self.accum), dtype=torch.float32)
        loss_sum = torch.zeros((), dtype=torch.float64)
        mixed = len(self.source_names) > 1
        by_source = torch.zeros(2, len(self.source_names), dtype=torch.float64)
        for batch in micro_batches:
            ids = batch["ids"]
            inputs = self._to_device(model_inputs(batch))
            # use_cache=False: a cache would also make transformers skip packed-sequence detection.
            out = self.engine(**inputs, num_items_in_batch=denom.to(self.device), use_cache=False)
            loss_sum += out.loss.detach().double().cpu() * float(denom)
            if not torch.isfinite(out.loss):
                self._diverged(ids)
            if mixed:
                by_source += source_token_sums(
                    out, batch["labels"], batch["token_sources"], len(self.source_names)
                )
            self.engine.backward(out.loss)
            self.engine.step()
        loss = float(all_reduce_sum(loss_sum)) / global_tokens
        # One source: its loss is the loss (no per-source sums).
        self.source_losses = (
            source_means(all_reduce_sum(by_source), self.source_names)
            if mixed
            else {self.source_names[0]: loss}
        )
        return loss, global_tokens, global_samples

    def _diverged(self, ids: list[str]) -> None:
        step = self.engine.global_steps + 1
        raise DivergenceError(
            f"loss is not finite at step {step} (rank {self.rank}); batch ids: {', '.join(map(str, ids))}. "
            f"Lower lr, check these samples, or resume from the last checkpoint in {self.checkpoints.root}"
        )

    # -- throughput ------------------------------------------------------------------------------------------
    def _setup_throughput(self) -> None:
        """The FLOP model for tflops_per_s and MFU (lm objective only; see flops.py for what it counts)."""
        self.flop_model, self.peak_flops = None, None
        if self.recipe.objective != "lm":
            return
        self.flop_model = FlopModel.for_model(
            vlm_of(self.engine.module), llm_trains=self.recipe.tune == "full"
        )
        self.peak_flops, why = device_peak_flops(precision_for(self.recipe))
        if self.rank == 0 and self.peak_flops is None:
            log.info("MFU is not logged: %s", why)

    def throughput(self, window: list[dict], dt: float) -> dict[str, float]:
        """Global input tokens/s (placeholders included, padding not), model TFLOP/s and MFU for one step."""
        if self.flop_model is None:
            return {}
        local = [
            sum(sum(b["seq_lengths"]) for b in window),
            sum(batch_flops(self.flop_model, b) for b in window),
        ]
        tokens, flops = all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        out = {"input_tokens_per_s": tokens / dt, "tflops_per_s": flops / dt / 1e12}
        if self.peak_flops:
            out["mfu"] = flops / dt / (self.peak_flops * self.world_size)
        return out

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        step, micro_done = 0, 0
        if self.resume:
            step, micro_done = self._try_resume()
        start_step, started = step, time.time()
        progress = self.metrics.progress(self.total_steps, initial=step)
        window: list[dict] = []
        for batch in self.data.iterate(micro_done):
            window.append(batch)
            if len(window) < self.accum:
                continue
            t0 = time.time()
            loss, tokens, samples = self.train_step(window)
            dt = time.time() - t0
            extra = self.throughput(window, dt)
            window, step, micro_done = [], step + 1, micro_done + self.accum
            lr = self.scheduler.get_last_lr()[0]
            extra.update(self._step_extras(step))
            self.metrics.step(
                step,
                loss=loss,
                lr=lr,
                samples_per_s=samples / dt,
                tokens_per_s=tokens / dt,
                **extra,
                epoch=self.data.epoch_of(micro_done),
                elapsed_s=round(time.time() - started, 3),
            )
            if self.recipe.log_every and (step % self.recipe.log_every == 0 or step == self.total_steps):
                self.metrics.log_line(step, self.total_steps)
            progress.update(1)
            if self.recipe.save_every and step % self.recipe.save_every == 0 and step < self.total_steps:
                self.checkpoints.save(self.engine, step, {"micro_batches_done": micro_done})
            if step >= self.total_steps:
                break
        progress.close()
        self.checkpoints.save(self.engine, step, {"micro_batches_done": micro_done})
        final = self.save_final()
        report = {
            "steps": step,
            "steps_this_run": step - start_step,
            "wall_s": round(time.time() - started, 2),
            "final_checkpoint": str(final),
            "skipped_samples": self.data.skipped_report(),
        }
        if self.rank == 0:
            self.metrics.finish(report)
        return report

    def _step_extras(self, step: int) -> dict:
        """Per-source losses (raw and smoothed) and, when due, the eval scores, for this step's metrics row."""
        out = {}
        if self.source_losses:
            out["source_loss"] = dict(self.source_losses)
            out["source_loss_ema"] = self.source_ema.update(self.source_losses)
        if self.periodic_eval.due(step, self.total_steps):
            scores = self.periodic_eval(self.engine.module, step)
            if scores:
                out["eval"] = scores
        return out

    def _try_resume(self) -> tuple[int, int]:
        found = self.checkpoints.load_latest_good(self.engine)  # skips (and reports) corrupt checkpoints
        if found is None:
            if self.rank == 0:
                log.info("--resume: no checkpoint in %s yet, starting from scratch", self.checkpoints.root)
            return 0, 0
        path, state = found
        if self.rank == 0:
            log.info("resumed from %s (step %d)", path, state["step"])
        self.metrics.truncate_after(state["step"])
        for row in self.metrics.read():  # the smoothed curves continue where they were
            self.source_ema.update(row.get("source_loss", {}))
        return state["step"], state["micro_batches_done"]


def _text_only(batch: dict) -> bool:
    """A micro-batch of a multimodal run with no image in it (text datasets carry no image key at all)."""
    images = batch.get("pixel_values", batch.get("image_features"))
    return images is not None and len(images) == 0


def trainer_class(recipe: Recipe) -> type[Trainer]:
    return objectives.trainer_class(recipe.objective)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm.train.loop")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    setup_logging(fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        check_inputs(recipe, args.recipe)
        report = trainer_class(recipe)(recipe, resume=args.resume).run()
    except Exception as err:  # noqa: BLE001  one clear line per rank, then a non-zero exit for the launcher
        log.error("%s: %s", type(err).__name__, err)
        if os.environ.get("VLM_TRACEBACK"):
            raise
        return 1
    if dist.get_rank() == 0:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Trainer", "main", "deepspeed_config", "zero_stage"]
