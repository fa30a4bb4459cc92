"""Contrastive losses on L2-normalised image and text embeddings, gathered across ranks.

- `infonce_loss`: CLIP's symmetric cross-entropy over the image-text similarity matrix, with a learnable
  temperature `logit_scale` (log of the multiplier) clamped at ln(100) as CLIP does.
- `sigmoid_loss`: SigLIP's pairwise sigmoid loss with learnable scale and bias (paper init: t' = log 10, b = -10),
  summed over all pairs and divided by the batch size.

Multiple ranks: every rank gathers all ranks' embeddings (`gather_with_grad`) and computes the loss over the
full global batch. The gather's backward all-reduces (sums) the incoming gradient and keeps this rank's slice, so
each rank receives the whole global loss's gradient for its own embeddings (times the world size, because every
rank computes the same loss); DeepSpeed's averaging of parameter gradients over ranks then yields exactly the
gradient of the global-batch loss, for the towers and for the replicated scale/bias alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps the temperature multiplier at 100
LOSSES = ("infonce", "sigmoid")


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's rows
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (rank order, equal sizes), differentiable w.r.t. this rank's rows; identity on 1 rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def infonce_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; row i of each matrix is a positive pair."""
    scale = logit_scale.clamp(max=max_logit_scale).exp()
    logits = scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sigmoid_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """-sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / n with z = +1 on the diagonal and -1 elsewhere."""
    logits = logit_scale.exp() * image @ text.T + logit_bias
    signs = 2 * torch.eye(len(image), device=image.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(image)


def contrastive_loss(
    kind: str,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The global-batch loss from this rank's normalised embeddings (see the module docstring for ranks)."""
    image, text = gather_with_grad(image), gather_with_grad(text)
    if kind == "infonce":
        return infonce_loss(image, text, logit_scale)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a learnable logit_bias (a SigLIP model)")
        return sigmoid_loss(image, text, logit_scale, logit_bias)
    raise ValueError(f"unknown contrastive loss {kind!r}; expected one of {', '.join(LOSSES)}")
