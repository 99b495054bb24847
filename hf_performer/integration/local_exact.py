"""Exact bidirectional sliding-window attention in linear memory, for layers that keep their exact attention.

ModernBERT's local layers attend to the keys within ``window`` positions on each side (|i − j| ≤ window), exactly.
That is already linear in the sequence length, so a conversion keeps those layers exact rather than approximating
them with FAVOR+ (``generic.Row.exact_if``). transformers would build a [B, 1, L, L] mask for them (SDPA / eager);
this computes the same attention block by block instead: the queries of a block of C = window positions see the
keys of their own block and of the two neighbouring ones, so the largest tensors are [B, H, L/C, C, 3C] scores and
[B, H, L/C, 3C, d] keys: O(L · window) memory, nothing L × L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _blocks(x: torch.Tensor, C: int, n: int) -> torch.Tensor:
    """[B, H, L, d] -> [B, H, n, 3C, d]: for block j the positions [(j − 1)·C, (j + 2)·C) (zero outside [0, L))."""
    B, H, L, d = x.shape
    x = F.pad(x, (0, 0, C, (n + 1) * C - L))  # [B, H, (n + 2)·C, d]
    x = x.view(B, H, n + 2, C, d)
    return torch.cat([x[:, :, :-2], x[:, :, 1:-1], x[:, :, 2:]], dim=3)


def sliding_window_attention(q, k, v, window: int, key_padding_mask=None, scale: float | None = None,
                             dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Exact softmax attention of each query over the keys with |i − j| ≤ ``window`` (bidirectional).

    q, k [B, H, L, d], v [B, H, L, dv], key_padding_mask [B, L] bool (True = real) or None -> [B, H, L, dv].
    ``dropout`` (training only) drops attention probabilities as the stock eager attention does. A query that
    sees no real key (a padded position far from any token) gets zeros."""
    B, H, L, d = q.shape
    C = max(1, int(window))
    n = -(-L // C)
    scale = d**-0.5 if scale is None else float(scale)
    qb = F.pad(q, (0, 0, 0, n * C - L)).view(B, H, n, C, d)  # [B, H, n, C, d]
    kb, vb = _blocks(k, C, n), _blocks(v, C, n)  # [B, H, n, 3C, ·]
    scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # [B, H, n, C, 3C]
    qpos = torch.arange(n * C, device=q.device).view(n, C, 1)
    kpos = (torch.arange(n, device=q.device).view(n, 1, 1) - 1) * C + torch.arange(3 * C, device=q.device).view(1, 1, -1)
    allowed = ((qpos - kpos).abs() <= window) & (kpos >= 0) & (kpos < L)  # [n, C, 3C]
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask.bool(), (C, (n + 1) * C - L)).view(B, n + 2, C)
        real = torch.cat([real[:, :-2], real[:, 1:-1], real[:, 2:]], dim=2)  # [B, n, 3C]
        allowed = allowed[None] & real[:, :, None, :]  # [B, n, C, 3C]
        allowed = allowed[:, None]  # [B, 1, n, C, 3C]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs)  # rows without any allowed key
    if dropout > 0 and training:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.to(vb.dtype), vb)  # [B, H, n, C, dv]
    return out.reshape(B, H, n * C, -1)[:, :, :L]
