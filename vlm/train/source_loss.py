"""The loss of each data source in a mix, for logging: the per-token losses the step computed anyway, summed per
source by the batch's `token_sources`. The training loss itself is untouched.

The VLM's training forward returns them (`token_losses`, from the head applied at supervised positions only:
vlm/supervised_head.py); a plain causal LM (language pretraining) returns full logits, and they are computed
from those. Under several ranks the (sum, count) per source are all-reduced, so each source's loss is its token
mean over the global batch, as the training loss is over all sources. A source with no supervised token in a step
has no value that step. `SourceEMA` smooths the series for the log, TensorBoard and loss.png.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from ..supervised_head import supervised_targets

EMA_DECAY = 0.9  # smoothing of the logged per-source curves: ~10 steps of memory


@torch.no_grad()
def token_losses_of(out, labels: torch.Tensor) -> torch.Tensor:
    """The next-token loss of each supervised token, row-major in the order of `labels[:, 1:] != -100`.

    From the output's `token_losses` when the forward gave them, else from its full logits with transformers'
    ForCausalLMLoss shift and float cross-entropy, a row at a time to bound the extra memory to one row."""
    if getattr(out, "token_losses", None) is not None:
        return out.token_losses
    logits = out.logits
    targets = labels[:, 1:].to(logits.device)
    keep = targets != IGNORE_INDEX
    rows = [
        F.cross_entropy(logits[r, :-1][keep[r]].float(), targets[r][keep[r]], reduction="none")
        for r in range(logits.shape[0])
    ]
    return torch.cat(rows)


@torch.no_grad()
def source_token_sums(out, labels: torch.Tensor, token_sources: torch.Tensor, n_sources: int) -> torch.Tensor:
    """(2, n_sources) float64: summed next-token loss and supervised-token count per source, from a forward's
    output (`token_losses`, or full `logits`) and the batch's labels and token sources."""
    losses = token_losses_of(out, labels).double()
    keep, _ = supervised_targets(labels.to(losses.device))
    sources = token_sources[:, 1:].to(losses.device)[keep]
    # Sums stay on the losses' device until the end: one host transfer per step.
    sums = torch.zeros(2, n_sources, dtype=torch.float64, device=losses.device)
    sums[0].index_add_(0, sources, losses)
    sums[1].index_add_(0, sources, torch.ones_like(losses))
    return sums.cpu()


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
