"""Local-window attention in banded form: exact softmax on the keys nearest each query, FAVOR on all the others.

    out_i = (sum_{j in W(i)} exp(q_i.k_j) v_j + sum_{j not in W(i)} phi(q_i).phi(k_j) v_j) / (the same with v = 1)

W(i) = {j : |i - j| <= w} (bidirectional) or {j : i - w <= j <= i} (causal); padded keys are in neither sum.
Real checkpoints put much of their attention on neighbouring tokens (positional heads), where a random
feature estimate is weakest; the window takes those pairs exactly.

The FAVOR ops compute their numerator and normaliser over *all* keys in the scale exp(-log_scale_i) of their
stabilisers, and FAVOR's estimate of each window pair in that same scale from the features they already hold
(bidirectional: one product per offset; causal: the band of the intra-chunk matrix). ``combine_window`` then
subtracts those estimates and adds the exact terms. Each of the W = 2w + 1 (causal: w + 1) offsets is one
shifted tensor, so the cost is O(w) batched ops of size [B, H, L] or [B, H, L, d] whatever L, nothing L×L.
Every FAVOR pair term is <= 1 (the op's stabilisers bound it); the exact terms are rescaled per query row by
exp(-s_i), s_i = max(0, largest exact log term), so nothing overflows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..features import FeatureMap
from .common import neg_big, safe_den


def band(m: torch.Tensor, width: int) -> torch.Tensor:
    """[..., C, C + s] -> [..., C, width]: entry (i, j) = m[i, i + j] (a view through padding; width <= s + 1)."""
    C, S = m.shape[-2:]
    return F.pad(m.flatten(-2), (0, C)).unflatten(-1, (C, S + 1))[..., :width]


def shifted(x: torch.Tensor, offset: int, dim: int = 2) -> torch.Tensor:
    """y[..., i, ...] = x[..., i + offset, ...] along ``dim``, zero (False) where i + offset is out of range."""
    L = x.shape[dim]
    if offset == 0:
        return x
    if abs(offset) >= L:  # every position's partner is out of range (sequences shorter than the window)
        return torch.zeros_like(x)
    cut = x.narrow(dim, max(offset, 0), L - abs(offset))
    pad = [0, 0] * (x.dim() - 1 - dim) + ([0, offset] if offset > 0 else [-offset, 0])
    return F.pad(cut, pad)


def exact_logits(fmap: FeatureMap, q: torch.Tensor, keys: list[torch.Tensor], log_scale: torch.Tensor) -> torch.Tensor:
    """Log of each window pair's exact term exp(q'.k') in the op's scale: [B, H, T, W].

    q [B,H,T,d] queries, keys: W tensors [B,H,T,d] (the key of each query's pair at one offset), log_scale [B,H,T].
    The query features drop their row terms and carry 1/m less than the exact kernel (arXiv:2009.14794, eq. 5:
    phi(x) has a 1/sqrt(m) factor on each side), hence the base term."""
    qt = fmap.transform(q, True)
    base = -fmap.query_row_terms(qt) - log_scale + math.log(fmap.nb_features)  # [B, H, T]
    dots = torch.stack([torch.linalg.vecdot(qt, fmap.transform(kj, False)) for kj in keys], -1)
    return dots + base[..., None]


def combine_window(num, den, fav, logits, valid, values) -> torch.Tensor:
    """Replace FAVOR's estimate of each window pair by its exact term.

    num [B,H,T,dv], den [B,H,T]: FAVOR's numerator and normaliser over all keys, in the op's scale; fav [B,H,T,W]:
    FAVOR's estimate of each window pair in that scale (0 for padded or missing keys); logits [B,H,T,W]: log of
    the exact terms in that scale (``exact_logits``); valid [B or 1,1 or H,T,W] bool: the pair's key exists and is
    real; values: W tensors [B,H,T,dv], the value of each pair's key. Returns out [B,H,T,dv]."""
    exact = torch.where(valid, logits, neg_big(logits.dtype))  # masked before the exponential
    s = exact.detach().amax(-1).clamp_min(0)  # [B, H, T]: a per-row constant, cancels in the ratio
    e = torch.exp(exact - s[..., None])
    g = torch.exp(-s)
    coef = e - g[..., None] * fav  # [B, H, T, W]
    num = g[..., None] * num
    for j, vj in enumerate(values):
        num = num + coef[..., j, None] * vj
    total = g * (den - fav.sum(-1)).clamp_min(0) + e.sum(-1)
    return num / safe_den(total)[..., None]
