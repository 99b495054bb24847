"""Local-window attention: exact softmax on the keys nearest each query, FAVOR on all the others.

    out_i = (sum_{j in W(i)} exp(q_i.k_j) v_j + sum_{j not in W(i)} phi(q_i).phi(k_j) v_j) / (the same with v = 1)

W(i) = {j : |i - j| <= w} (bidirectional) or {j : i - w <= j <= i} (causal); padded keys are in neither sum.
Real checkpoints put much of their attention on neighbouring tokens (positional heads), where a random
feature estimate is weakest; the window takes those pairs exactly, at O(L * w * (m + d)) extra cost.

The FAVOR op returns its output and normaliser over *all* keys, in the scale exp(-log_scale_i) (its
stabiliser); here, in that same scale, the FAVOR terms of the window's keys are subtracted and their exact
terms added. Every FAVOR pair term exp(Lg_q + Lg_k - log_scale) is <= 1 (the op's stabilisers bound it); the
exact terms are rescaled per query row by exp(-s_i), s_i = max(0, largest exact log term), so nothing overflows.
Work goes by blocks of at most 32 queries; above 4M (batch · heads · length · features) they are recomputed in
the backward, so memory stays O(block * (w + m + d)) on top of the op's, nothing L×L.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..features import FeatureMap
from .common import neg_big, no_autocast, safe_den

LOCAL_CHUNK = 32  # queries per block: the block's [C, C + 2w] pair products stay close to the band's C × (2w + 1)
RECOMPUTE_ABOVE = 1 << 22  # B·H·L·m above which blocks are recomputed in the backward instead of kept


def band(m: torch.Tensor, width: int) -> torch.Tensor:
    """[..., C, C + s] -> [..., C, width]: entry (i, j) = m[i, i + j] (a view through padding; width <= s + 1)."""
    C, S = m.shape[-2:]
    return F.pad(m.flatten(-2), (0, C)).unflatten(-1, (C, S + 1))[..., :width]


def unband(b: torch.Tensor, span: int) -> torch.Tensor:
    """Inverse of ``band``: [..., C, width] -> [..., C, span] with b[i, j] at column i + j, zeros elsewhere."""
    C, width = b.shape[-2:]
    return F.pad(b, (0, span + 1 - width)).flatten(-2)[..., : C * span].unflatten(-1, (C, span))


def _chunk(out, den, log_scale, q, k, v, kmask, fmap: FeatureMap, window: int, causal: bool):
    """One chunk of C queries; k, v, kmask hold keys [first query - w, last query + w] (zero/False padded).
    out [B,H,C,dv], den/log_scale [B,H,C], q [B,H,C,d], k [B,H,C+2w,d], v [B,H,C+2w,dv], kmask [B,C+2w]."""
    C, span, big = q.shape[2], k.shape[2], neg_big(q.dtype)
    width = window + 1 if causal else 2 * window + 1  # offsets -w .. 0 or -w .. w: column j is offset j - w
    lq, _ = fmap(q, query=True)  # [B, H, C, m]
    lk, _ = fmap(k)  # [B, H, span, m]
    valid = kmask.unfold(-1, width, 1)[:, None, :C]  # [B, 1, C, width]: is key i + j real
    if causal:  # the causal op's stabilisers bound exp(Lg_q + Lg_k - log_scale) by 1 only pair by pair
        fav = torch.stack([
            torch.exp(torch.where(valid[..., j, None], lq + lk[:, :, j : j + C] - log_scale[..., None], big)).sum(-1)
            for j in range(width)
        ], -1)  # [B, H, C, width]: FAVOR's estimate of each window pair, in the op's scale
    else:
        # factored: every real key's logit is <= the op's per-feature stabiliser c, so with the span's own
        # maximum c' <= c both exp(Lg_k - c') and exp(Lg_q + c' - log_scale) are <= 1 (2 exps per feature)
        key_ok = kmask[:, None, :, None]
        c = torch.where(key_ok, lk, big).amax(2, keepdim=True).detach()  # [B, H, 1, m]
        phi_q = torch.exp(lq + c - log_scale[..., None])
        phi_k = torch.exp(torch.where(key_ok, lk - c, big))
        fav = band(phi_q @ phi_k.transpose(-1, -2), width)  # padded keys have phi_k = 0
    qt, kt = fmap.transform(q, True), fmap.transform(k, False)
    base = -fmap.query_row_terms(qt) - log_scale + math.log(fmap.nb_features)  # [B, H, C]
    exact = torch.where(valid, band(qt @ kt.transpose(-1, -2), width) + base[..., None], big)  # log exact terms
    s = exact.amax(-1).clamp_min(0)  # [B, H, C]
    e = torch.exp(exact - s[..., None])
    g = torch.exp(-s)
    far_den = (den - fav.sum(-1)).clamp_min(0)  # FAVOR's normaliser without the window's keys
    num = (g * den)[..., None] * out + unband(e - g[..., None] * fav, span) @ v
    total = g * far_den + e.sum(-1)
    return num / safe_den(total)[..., None]


def local_window_attention(
    out: torch.Tensor,
    den: torch.Tensor,
    log_scale: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    key_padding_mask: torch.Tensor | None,
    window: int,
    causal: bool,
    chunk_size: int = 128,
    key_offset: int = 0,
) -> torch.Tensor:
    """Replace the FAVOR terms of each query's window by exact ones.

    out [B,H,T,dv], den, log_scale [B,H,T]: a FAVOR op's output and normaliser over all keys (``*_with_normalizer``);
    q [B,H,T,d] are the queries at key positions key_offset .. key_offset + T - 1 of k [B,H,Lk,d], v [B,H,Lk,dv]
    (the forward: key_offset 0, Lk = T; decoding: k holds the cached window then the new keys). All in the
    compute dtype. key_padding_mask [B, Lk] bool (True = real) or None. Returns [B,H,T,dv]."""
    if window < 1:
        raise ValueError(f"window={window}: expected >= 1.")
    B, H, T, _ = q.shape
    mask = torch.ones(B, k.shape[2], dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
    size = min(chunk_size, LOCAL_CHUNK)
    n = -(-T // size)  # blocks; the last one may hold fewer queries
    span = size + 2 * window  # keys of a block: [first query - w, last query + w]
    # padded so that key position p sits at index p + w and every block's span exists; split/unfold/unbind make
    # one autograd node each (slicing a full-length tensor per block would cost O(L) per block in the backward)
    tail = n * size - T + window
    kp, vp = (F.pad(x, (0, 0, window, tail))[:, :, key_offset:] for x in (k, v))
    mp = F.pad(mask, (window, tail), value=False)[:, key_offset:]
    k_blocks = kp.unfold(2, span, size).transpose(-1, -2).unbind(2)  # n × [B, H, span, d]
    v_blocks = vp.unfold(2, span, size).transpose(-1, -2).unbind(2)
    m_blocks = mp.unfold(1, span, size).unbind(1)  # n × [B, span]
    q_blocks, o_blocks, d_blocks, s_blocks = (x.split(size, dim=2) for x in (q, out, den, log_scale))
    # blocks are recomputed in the backward once what they would keep (a few [T, m] per head) gets large
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (out, den, q, k, v)) and (
        B * H * T * fmap.nb_features > RECOMPUTE_ABOVE)
    result = []
    with no_autocast(q.device):
        for args in zip(o_blocks, d_blocks, s_blocks, q_blocks, k_blocks, v_blocks, m_blocks):
            if recompute:
                result.append(checkpoint(_chunk, *args, fmap, window, causal, use_reentrant=False))
            else:
                result.append(_chunk(*args, fmap, window, causal))
    return torch.cat(result, dim=2)
