"""The training loss: the seed's clip_nll, exactly.

qiuqiangkong/panns_transfer_to_gtzan, pytorch/losses.py: `-torch.mean(target *
clipwise_output)`, where clipwise_output is the model's log-softmax and target the (mixup-
mixed) one-hot rows: a mean over all batch x classes elements, so the per-clip negative
log-likelihood divided by the number of classes. Adam divides most of that scale out, but not
near eps, so only this reduction follows the seed's trajectory step for step (and prints the
loss the seed prints). Both the fine-tune and the frozen-base head train with it.
"""

from __future__ import annotations

import torch

NAME = "clip_nll"


def clip_nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The seed's clip_nll of log-probabilities (batch, classes) against targets of the
    same shape, computed in float32 whatever the autocast dtype of `log_probs`."""
    return -torch.mean(target * log_probs.float())
