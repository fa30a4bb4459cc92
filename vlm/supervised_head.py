"""The training loss with the LM head applied only where a label is supervised.

A causal LM's loss (transformers' `ForCausalLMLoss`) projects every position onto the vocabulary, then ignores
the positions labelled -100: at a 152k vocabulary and 2,048 tokens the float logits, their softmax and their
gradient are each 1.2 GB, most of it for prompt, image and padding positions. Here the final hidden states are
gathered at the supervised positions first (after the one-token shift), and the head runs on those rows alone.
The head is called as a module, so a LoRA-wrapped head and ZeRO-3's parameter gathering (a forward hook) work
as in the full path; a rank with no supervised token still calls it, on zero rows, so every rank runs the same
modules. The loss is the same sum over supervised tokens, divided by `num_items_in_batch` when given (the
trainer's global token count) or by the local count, as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .constants import IGNORE_INDEX


@dataclass
class SupervisedLMOutput(CausalLMOutputWithPast):
    """`logits` is None; `token_losses` holds the (detached) loss of each supervised token, row-major in the order
    of `labels[:, 1:] != -100`, for per-source losses without a second pass over any logits."""

    token_losses: torch.Tensor | None = None


def supervised_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions 0..T-2 whose next token is supervised, those next tokens)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return keep, targets[keep]


def supervised_head_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    num_items_in_batch: torch.Tensor | int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-token losses) of next-token prediction from final hidden states (B, T, D) and labels (B, T).

    `softcap`: the LLM's final_logit_softcapping (Gemma 2), applied to the logits as its forward does.
    """
    keep, targets = supervised_targets(labels.to(hidden.device))
    logits = head(hidden[:, :-1][keep]).float()  # (N, V): float as ForCausalLMLoss upcasts
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_losses = F.cross_entropy(logits, targets, reduction="none")
    total = token_losses.sum()
    if num_items_in_batch is None:
        # The token mean; 0/0 = nan without a supervised token, as transformers gives.
        loss = total / keep.sum()
    else:
        loss = total / torch.as_tensor(num_items_in_batch, device=total.device)
    return loss, token_losses.detach()
