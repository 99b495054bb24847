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


def unband(b: torch.Tensor, span: int) -> torch.Tensor:
    """Inverse of ``band``: [..., C, width] -> [..., C, span] with b[i, j] at column i + j, zeros elsewhere."""
    C, width = b.shape[-2:]
    return F.pad(b, (0, span + 1 - width)).flatten(-2)[..., : C * span].unflatten(-1, (C, span))


BLOCK = 32  # queries per block of the bidirectional window: its [BLOCK, BLOCK + 2w] products stay near the band


def query_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, L, ·] -> [B, H, nb, block, ·] (zero padded to nb · block positions)."""
    pad = -x.shape[2] % block
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(2, (-1, block))


def key_spans(x: torch.Tensor, block: int, window: int) -> torch.Tensor:
    """[B, H, L, ·] (or a [B, L] mask) -> the keys of each query block, positions [b·block - w, (b + 1)·block + w):
    [B, H, nb, block + 2w, ·] (mask: [B, nb, block + 2w]), zero (False) outside the sequence. Overlapping views."""
    L, span = x.shape[-1 if x.dim() == 2 else 2], block + 2 * window
    pad = (window, -L % block + window)
    if x.dim() == 2:
        return F.pad(x, pad, value=False).unfold(1, span, block)
    return F.pad(x, (0, 0, *pad)).unfold(2, span, block).transpose(-1, -2)


def exact_base(fmap: FeatureMap, qt: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """What turns q'.k' into the log of the exact term in the op's scale: [B, H, T] for transformed queries qt
    [B,H,T,d] and the op's log_scale [B,H,T]. The query features drop their row terms and carry 1/m less than
    the exact kernel (arXiv:2009.14794, eq. 5: phi(x) has a 1/sqrt(m) factor on each side)."""
    return -fmap.query_row_terms(qt) - log_scale + math.log(fmap.nb_features)


def combine_window(num, den, fav, logits, valid, apply_coef) -> torch.Tensor:
    """Replace FAVOR's estimate of each window pair by its exact term.

    num [B,H,T,dv], den [B,H,T]: FAVOR's numerator and normaliser over all keys, in the op's scale; fav [B,H,T,W]:
    FAVOR's estimate of each window pair in that scale (0 for padded or missing keys); logits [B,H,T,W]: log of
    the exact terms in that scale; valid [B or 1,1 or H,T,W] bool: the pair's key exists and is real;
    apply_coef(coef [B,H,T,W]) -> [B,H,T,dv]: sum_j coef[..., j] * (value of the pair's key at column j).
    Returns out [B,H,T,dv]."""
    exact = torch.where(valid, logits, neg_big(logits.dtype))  # masked before the exponential
    s = exact.detach().amax(-1).clamp_min(0)  # [B, H, T]: a per-row constant, cancels in the ratio
    e = torch.exp(exact - s[..., None])
    g = torch.exp(-s)
    num = g[..., None] * num + apply_coef(e - g[..., None] * fav)
    total = g * (den - fav.sum(-1)).clamp_min(0) + e.sum(-1)
    return num / safe_den(total)[..., None]


def near_products(a: torch.Tensor, b_ext: torch.Tensor, block: int, window: int) -> torch.Tensor:
    """The products of each block of ``block`` queries with the keys it can reach, without materialising the
    overlapping key spans: [B, H, nb, block, block + 2w], column j of block t the product with key t·block - w + j.

    a [B, H, L, ·] queries (positions 0 .. L - 1, zero-padded to nb·block); b_ext [B, H, nb·block + 2w, ·] the keys
    at positions -w .. nb·block + w - 1 (zeros outside the sequence). Three products per block: with the w keys
    before it, its own block and the w keys after it (strided views of b_ext; w <= block), else the explicit
    overlapping spans."""
    qa = query_blocks(a, block)  # [B, H, nb, block, ·]
    nb, w = qa.shape[2], window
    if w > block:  # the neighbours span several blocks
        return qa @ b_ext.unfold(2, block + 2 * w, block)  # [B, H, nb, ·, block + 2w] spans
    own = b_ext[:, :, w : w + nb * block].unflatten(2, (nb, block))
    before = b_ext[:, :, : nb * block].unflatten(2, (nb, block))[:, :, :, :w]  # keys t·block - w .. t·block - 1
    after = b_ext[:, :, 2 * w : 2 * w + nb * block].unflatten(2, (nb, block))[:, :, :, block - w :]
    parts = (qa @ before.transpose(-1, -2), qa @ own.transpose(-1, -2), qa @ after.transpose(-1, -2))
    return torch.cat(parts, -1)
