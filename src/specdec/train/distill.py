"""Distillation losses for draft models (DistillSpec, Zhou et al. 2023).

A draft is useful in proportion to how often the target accepts its tokens, and for one
position the acceptance rate of speculative sampling is ``1 - TV(target_probs, draft_probs)``
(Leviathan et al. 2023, Sec. 3.3). DistillSpec therefore trains the draft to match the target's
own next-token distributions on the training text; its Sec. 5 finds the forward KL
``KL(target || draft)`` a strong default, optionally mixed with the data's cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DistillLoss:
    loss: torch.Tensor  # scalar: what is back-propagated
    kl: torch.Tensor  # scalar: mean KL(target || draft) per token, detached
    ce: torch.Tensor  # scalar: mean cross-entropy against the data, detached


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` in nats; logits are ``(B, T, V)``."""
    student_logp = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)  # (B, T, V)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # (B, T)
    return kl.mean()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``logits`` ``(B, T, V)``, ``targets`` ``(B, T)``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: float = 0.0,
) -> DistillLoss:
    """``(1 - ce_weight) * KL(teacher || student) + ce_weight * CE(data)``."""
    kl = forward_kl(student_logits, teacher_logits)
    ce = cross_entropy(student_logits, targets)
    loss = (1.0 - ce_weight) * kl + ce_weight * ce if ce_weight > 0 else kl
    return DistillLoss(loss, kl.detach(), ce.detach())
