"""Eval during training (recipe `eval:`): every `eval.every` optimizer steps and at the last step.

The evaluation itself lives in the eval layer, a sibling of this one: it is the `vlm.training_evals` entry point
"tasks" (vlm/eval/during_training.py), loaded by name as objectives are. It runs on rank 0 while the other ranks
wait at a barrier, except under ZeRO-3 with several ranks: there each forward gathers partitioned weights, a
collective, so every rank generates the same requests with `synced_gpus` (generation keeps stepping until all
ranks are done) and rank 0 keeps the scores. That costs each rank the eval compute instead of gathering the
whole model onto rank 0 outside DeepSpeed's hooks.
"""

from __future__ import annotations

import torch.distributed as dist

from ..plugins import load_plugin
from .freeze import vlm_of
from .recipe import Recipe

ENTRY_POINT_GROUP, EVALUATOR = "vlm.training_evals", "tasks"


class PeriodicEval:
    def __init__(self, recipe: Recipe, processor, rank: int, world_size: int, zero_stage: int):
        self.every, self.rank = recipe.eval.every, rank
        self.all_ranks = zero_stage == 3 and world_size > 1
        self.runner = None
        if self.every and (rank == 0 or self.all_ranks):  # reads the eval files now: bad ones fail at start
            self.runner = load_plugin(ENTRY_POINT_GROUP, EVALUATOR)(recipe.eval, processor)

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    def __call__(self, module, step: int) -> dict[str, float] | None:
        """Scores on rank 0 (None elsewhere); `module` (the engine's) is in eval mode meanwhile."""
        results = None
        if self.runner is not None:
            was_training = module.training
            module.eval()  # dropout off, as at serving
            try:
                results = self.runner(vlm_of(module), synced_gpus=self.all_ranks, label=f"step {step}")
            finally:
                module.train(was_training)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return results if self.rank == 0 else None
