"""The loss of each data source in a mix, for logging: per-token losses from the logits the step computed anyway,
summed per source by the batch's `token_sources`. The training loss itself is untouched.

Under several ranks the (sum, count) per source are all-reduced, so each source's loss is its token mean over
the global batch, as the training loss is over all sources. A source with no supervised token in a step has no
value that step. `SourceEMA` smooths the series for the log, TensorBoard and loss.png.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

EMA_DECAY = 0.9  # smoothing of the logged per-source curves: ~10 steps of memory


@torch.no_grad()
def source_token_sums(
    logits: torch.Tensor, labels: torch.Tensor, token_sources: torch.Tensor, n_sources: int
) -> torch.Tensor:
    """(2, n_sources) float64: summed next-token loss and supervised-token count per source.

    The shift and float cross-entropy are transformers' ForCausalLMLoss; rows one at a time bound the extra
    memory to one row of float logits.
    """
    # Sums stay on the logits' device until the end: one host transfer per step, not a sync per row.
    out = torch.zeros(2, n_sources, dtype=torch.float64, device=logits.device)
    targets, sources = labels[:, 1:].to(logits.device), token_sources[:, 1:].to(logits.device)
    for row in range(logits.shape[0]):
        keep = targets[row] != IGNORE_INDEX
        losses = F.cross_entropy(logits[row, :-1][keep].float(), targets[row][keep], reduction="none")
        src = sources[row][keep]
        out[0].index_add_(0, src, losses.double())
        out[1].index_add_(0, src, torch.ones_like(losses, dtype=torch.float64))
    return out.cpu()


def source_means(sums: torch.Tensor, names: list[str]) -> dict[str, float]:
    """{name: token-mean loss} for the sources with supervised tokens."""
    return {name: float(sums[0, i] / sums[1, i]) for i, name in enumerate(names) if sums[1, i] > 0}


class SourceEMA:
    """Exponential moving average per source, started at a source's first value (no bias towards 0)."""

    def __init__(self, decay: float = EMA_DECAY):
        self.decay, self.values = decay, {}

    def update(self, losses: dict[str, float]) -> dict[str, float]:
        for name, value in losses.items():
            old = self.values.get(name)
            self.values[name] = value if old is None else self.decay * old + (1 - self.decay) * value
        return dict(self.values)
