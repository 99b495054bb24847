"""Attention-transfer losses (all over real tokens only; ``mask`` [B, L], 1 = real token).

* ``relative_mse``: ||student - teacher||² / ||teacher||², per-layer attention outputs;
* ``cosine_distance``: mean over tokens of 1 - cos(student, teacher), last hidden states of encoders;
* ``token_kl``: mean over tokens of KL(teacher || student) of next-token distributions, causal LMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.float32, device=like.device)
    return mask.to(device=like.device, dtype=torch.float32)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """student, teacher [B, L, ...]."""
    w = _weights(mask, teacher).reshape(*teacher.shape[:2], *([1] * (teacher.dim() - 2)))
    s, t = student.float(), teacher.float()
    return ((s - t).pow(2) * w).sum() / (t.pow(2) * w).sum().clamp_min(1e-12)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """student, teacher [B, L, H]."""
    w = _weights(mask, teacher)
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return ((1 - cos) * w).sum() / w.sum().clamp_min(1)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """logits [B, L, V] -> mean KL(teacher || student) over real tokens (nats)."""
    w = _weights(mask, teacher_logits)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * w).sum() / w.sum().clamp_min(1)
