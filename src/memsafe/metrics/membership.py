"""Membership inference: the loss attack. A model that memorized its training images denoises them better
than images it never saw, so a low denoising error marks a member. Members and non-members are noised
with the same seeded noise at the same timesteps, in the low-noise range where the two differ most (the
per-timestep error of SecMI / PIA, here averaged over a fixed grid instead of attacked step by step).
AUC 0.5: the model does not tell them apart; 1.0: every member is recognised."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

from memsafe.train.loss import per_sample_diffusion_loss

ATTACK_TIMESTEPS = (20, 50, 100, 150, 200, 300)  # of 1000 training timesteps, scaled to the scheduler's


@torch.no_grad()
def attack_losses(unet: torch.nn.Module, noise_scheduler, images: torch.Tensor,
                  hidden_states: torch.Tensor | None = None, seed: int = 0, batch_size: int = 128) -> torch.Tensor:
    """(len(images),) denoising error of each image averaged over ATTACK_TIMESTEPS; image i gets the same
    noise whatever set it is in (the noise depends on `seed` and i only)."""
    total_steps = noise_scheduler.config.num_train_timesteps
    steps = [min(total_steps - 1, round(t * total_steps / 1000)) for t in ATTACK_TIMESTEPS]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(steps), *images.shape), generator=generator)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total = torch.zeros(len(images))
    try:
        for draw, step in enumerate(steps):
            for start in range(0, len(images), batch_size):
                chosen = slice(start, start + batch_size)
                kwargs = {} if hidden_states is None else {"encoder_hidden_states": hidden_states[chosen].to(device)}
                timesteps = torch.full((len(images[chosen]),), step, dtype=torch.long)
                losses, _ = per_sample_diffusion_loss(unet, noise_scheduler, images[chosen].to(device),
                                                      noise[draw, chosen], timesteps, **kwargs)
                total[chosen] += losses.float().cpu()
    finally:
        unet.train(was_training)
    return total / len(steps)


def loss_attack(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> dict[str, float]:
    """AUC of the score -loss (members positive), and the true-positive rate at 1 % false positives (the
    largest TPR whose FPR does not exceed it; with fewer than 100 non-members that is at 0 false positives)."""
    scores = -torch.cat([member_losses, nonmember_losses]).double()
    labels = torch.cat([torch.ones(len(member_losses)), torch.zeros(len(nonmember_losses))]).long()
    false_positive, true_positive, _ = binary_roc(scores, labels)
    allowed = false_positive <= 0.01 + 1e-12
    return {
        "mia_auc": binary_auroc(scores, labels).item(),
        "mia_tpr_at_1pct_fpr": true_positive[allowed].max().item(),
        "mia_members": len(member_losses),
        "mia_nonmembers": len(nonmember_losses),
    }


def balanced_sets(num_train: int, num_holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), as many of each (the smaller count), drawn with `seed`: a
    balanced attack, whose AUC and TPR do not depend on how many images each side has."""
    generator = torch.Generator().manual_seed(seed)
    count = min(num_train, num_holdout)
    return (sorted(torch.randperm(num_train, generator=generator)[:count].tolist()),
            sorted(torch.randperm(num_holdout, generator=generator)[:count].tolist()))
