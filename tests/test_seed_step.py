"""The fine-tuning step against the seed's own step, and the loss against the seed's formula.

The second implementation below is written from the seed's code
(qiuqiangkong/panns_transfer_to_gtzan: pytorch/main.py's training loop, pytorch/losses.py's
clip_nll, pytorch/pytorch_utils.py's do_mixup): `model.train()`, forward with the mixup
lambdas, the targets mixed two by two, `-torch.mean(target * clipwise_output)`,
`zero_grad`, `backward`, and the seed's `optim.Adam(..., betas=(0.9, 0.999), eps=1e-08,
weight_decay=0., amsgrad=True)` (not fused). Both sides start from the same weights, see the
same batch and lambdas and draw the same SpecAugment and dropout masks (the same torch seed
before the forward pass); genreflow's Adam is fused, so the updates may differ by float32
reordering only.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from genreflow.losses import clip_nll
from genreflow.models.transfer import TransferCnn14
from genreflow.train import make_optimizer, training_step


def test_clip_nll_is_the_seeds_mean_over_clips_and_classes():
    # Two clips, three classes, the first clip's target mixed (0.7 / 0.3) as mixup makes it.
    log_probs = torch.tensor([[-0.5, -1.5, -2.0], [-1.0, -3.0, -0.25]])
    target = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    # By hand: -(0.7 * -0.5 + 0.3 * -1.5 + 1.0 * -0.25) / (2 clips * 3 classes) = 1.05 / 6.
    assert clip_nll(log_probs, target).item() == pytest.approx(0.175, abs=1e-7)
    # Not the per-clip sum averaged over clips (3x here, 10x on GTZAN's ten genres).
    per_clip = -torch.mean(torch.sum(target * log_probs, dim=-1)).item()
    assert per_clip == pytest.approx(3 * 0.175)
    # A bf16 forward pass's output is taken in float32.
    assert clip_nll(log_probs.bfloat16(), target).dtype == torch.float32


def _seed_do_mixup(x: torch.Tensor, mixup_lambda: torch.Tensor) -> torch.Tensor:
    """pytorch_utils.do_mixup: even rows weighted by their lambdas plus odd rows by theirs."""
    return (
        x[0::2].transpose(0, -1) * mixup_lambda[0::2]
        + x[1::2].transpose(0, -1) * mixup_lambda[1::2]
    ).transpose(0, -1)


def _seed_step(model, optimizer, waveform, target, mixup_lambda) -> torch.Tensor:
    """One iteration of the seed's main.py train loop with augmentation 'mixup'."""
    model.train()
    batch_output_dict = model(waveform, mixup_lambda)
    batch_target_dict = {"target": _seed_do_mixup(target, mixup_lambda)}
    loss = -torch.mean(batch_target_dict["target"] * batch_output_dict["clipwise_output"])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_one_training_step_equals_the_seeds():
    torch.manual_seed(0)
    ours = TransferCnn14(classes_num=10)
    seeds = copy.deepcopy(ours)
    before = {name: p.detach().clone() for name, p in ours.named_parameters()}

    generator = torch.Generator().manual_seed(1)
    samples = ours.base.min_training_samples + 3200  # the shortest clip SpecAugment takes
    waveform = 0.1 * torch.randn(4, samples, generator=generator)
    # Four clips mixed two by two (the sampler draws twice the batch): lam, 1 - lam per pair.
    mixup_lambda = torch.tensor([0.3, 0.7, 0.85, 0.15])
    target = torch.nn.functional.one_hot(torch.tensor([2, 5, 5, 9]), 10).float()

    seed_optimizer = torch.optim.Adam(
        seeds.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=True
    )
    torch.manual_seed(123)  # the same SpecAugment stripes and dropout masks on both sides
    seed_loss = _seed_step(seeds, seed_optimizer, waveform, target, mixup_lambda).item()

    ours.train()
    torch.manual_seed(123)
    our_loss = training_step(
        ours, make_optimizer(ours, 1e-4), waveform, target, mixup_lambda, contextlib.nullcontext
    ).item()

    assert abs(our_loss - seed_loss) <= 1e-5 * abs(seed_loss), (our_loss, seed_loss)
    ours_after, seeds_after = dict(ours.named_parameters()), dict(seeds.named_parameters())
    moved = set()
    for name, start in before.items():
        ours_update = ours_after[name].detach() - start
        seed_update = seeds_after[name].detach() - start
        size = seed_update.norm().item()
        if size == 0:  # a parameter the step leaves alone (no gradient) must stay alone
            assert ours_update.norm().item() == 0, name
            continue
        moved.add(name)
        relative = (ours_update - seed_update).norm().item() / size
        assert relative <= 1e-3, f"{name}: update {relative:.2e} away from the seed's"
    # The whole Cnn14 trains, front to back, not only the head.
    assert {"base.bn0.weight", "base.conv_block1.conv1.weight", "base.fc1.weight"} <= moved
    assert {"fc_transfer.weight", "fc_transfer.bias"} <= moved
