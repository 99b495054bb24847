"""O(L^2) references, kept beside the fast ops for parity tests (never used on a hot path)."""

from __future__ import annotations

import torch

from ..features import FeatureMap


def _allowed(lq: int, lk: int, causal: bool, key_padding_mask, device) -> torch.Tensor:
    """[B or 1, 1, Lq, Lk] bool: which keys each query may see."""
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(diagonal=lk - lq)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def exact_softmax_attention(q, k, v, scale=None, causal=False, key_padding_mask=None):
    """softmax(q k^T * scale) v with padded (and, if causal, future) keys removed."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * scale
    allowed = _allowed(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(weights) @ v


def naive_linear_attention(q, k, v, fmap: FeatureMap, causal=False, key_padding_mask=None, local_window: int = 0):
    """phi(q) phi(k)^T, masked, normalised by its row sums: the exact value the fast ops compute.
    With ``local_window`` w, the pairs with |i - j| <= w use the exact exp(q'.k') instead (q', k' the
    transformed inputs). Uses unstabilised features, so call it in float64 with moderate norms."""
    attn = fmap.features(q, query=True) @ fmap.features(k).transpose(-1, -2)  # [B, H, Lq, Lk]
    if local_window:
        i, j = torch.arange(q.shape[2], device=q.device), torch.arange(k.shape[2], device=q.device)
        band = (i[:, None] - j[None, :]).abs() <= local_window
        exact = torch.exp(fmap.transform(q, True) @ fmap.transform(k, False).transpose(-1, -2))
        attn = torch.where(band, exact, attn)
    allowed = _allowed(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    attn = attn.masked_fill(~allowed, 0.0)
    return (attn @ v) / attn.sum(-1, keepdim=True)
