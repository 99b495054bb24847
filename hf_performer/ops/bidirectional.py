"""Bidirectional FAVOR attention in one pass (a fixed number of batched ops whatever the length).

    out = phi(Q) (phi(K)^T [V, 1]) split into numerator and normaliser     (arXiv:2009.14794, sec. 2.2, eq. 5)

Keys: phi~(k) = F exp(Lg(k) - c), c the per-feature maximum over the real keys (one constant shared by every key
every query sees, so the estimator is unchanged); queries: phi~(q) = F exp(Lg(q) + c - r), r the row maximum
(cancels in the ratio). Both are <= 1. Padded keys are masked before the exponential: they contribute to
neither sum, in value or gradient. With a local window (positive kernels) the op is
``bidirectional_window.PositiveWindow``.
Backward: for the positive kernels, a hand-written one (``_PositiveBidirectional`` here keeps q, k, v, the output,
its normaliser, the row maxima and S, and recomputes the features one side at a time); otherwise autograd's, and
above ``common.RECOMPUTE_ABOVE`` the op keeps only q, k, v and recomputes itself in the backward. Memory: a few
[B, H, L, m] feature tensors and S [B, H, m, dv + 1], nothing L×L.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .bidirectional_window import PositiveWindow
from .common import (
    bounded_exp_,
    cat_len,
    compute_dtype,
    cpu_segment,
    empty_attention,
    finite_reference,
    first_order_only,
    fold_bias,
    mask_bias,
    masked_exp_,
    maybe_checkpoint,
    neg_big,
    no_autocast,
    safe_den,
    spans,
    times,
    weights,
    with_feature_bias,
    with_ones,
    without_autocast,
)


def _key_side(k, v, fmap: FeatureMap, mask):
    """(phi~(K) [B,H,Lk,m], S = phi~(K)^T [V, 1] [B,H,m,dv+1], c [B,H,1,m'], the real keys' maximum logit
    [B,H,1,m'] (-big without a real key; c is that or 0)) for k [B,H,Lk,d], v [B,H,Lk,dv]."""
    keep = None if mask is None else mask[:, None, :, None]
    lk, fk = fmap(k, with_bias=False)  # [B, H, Lk, m'] (b: ``fold_bias``)
    # without autograd (inference, the hand-written backward's forward) lk itself becomes the features
    inplace = not torch.is_grad_enabled()
    with torch.no_grad():  # the stabilisers are constants of the estimator
        if keep is not None:  # dropped keys below every real one (in place: masked_exp_ zeroes them below)
            real = lk.add_(mask_bias(keep, lk.dtype)) if inplace else torch.where(keep, lk, neg_big(lk.dtype))
        top = with_feature_bias(fmap, (lk if keep is None else real).amax(2, keepdim=True))  # of the true logits
        c = finite_reference(top)  # [B, H, 1, m']
        c_k = fold_bias(fmap, c, query=False)
    phi_k = times(masked_exp_(lk.sub_(c_k) if inplace else lk - c_k, keep), fk)  # [B, H, Lk, m]
    return phi_k, phi_k.transpose(-1, -2) @ with_ones(v), c, top


def _query_side(q, S, c, fmap: FeatureMap):
    """(phi~(Q) [B,H,Lq,m], its row maxima r [B,H,Lq,1], phi~(Q) S [B,H,Lq,dv+1]) for q [B,H,Lq,d]."""
    lq, fq = fmap(q, query=True, with_bias=False)
    c_q = fold_bias(fmap, c, query=True)
    x_q = lq + c_q if torch.is_grad_enabled() else lq.add_(c_q)
    with torch.no_grad():
        r = x_q.detach().amax(-1, keepdim=True)  # [B, H, Lq, 1]
    phi_q = times(bounded_exp_(x_q.sub_(r)), fq)
    return phi_q, r, phi_q @ S


def _attention(q, S, c, fmap: FeatureMap):
    total = _query_side(q, S, c, fmap)[2]
    return total[..., :-1] / safe_den(total[..., -1])[..., None]


def _segment_sums(k, v, fmap: FeatureMap, mask, seg: int, size: int):
    """(S [B,H,m,dv+1], c [B,H,1,m']) over all keys, key segment by key segment: each segment's sums S_j relative to
    its own stabiliser c_j are combined with (S_1, c_1) (+) (S_2, c_2) = (S_1 e^{c_1 - c} + S_2 e^{c_2 - c},
    c = max) (exact); each segment is recomputed in the backward on its own."""
    sums, refs = [], []
    for a in range(0, k.shape[2], seg):
        m = None if mask is None else mask[:, a : a + seg]
        S, c_j, top = maybe_checkpoint(lambda k, v, m=m: _key_side(k, v, fmap, m)[1:], k[:, :, a : a + seg],
                                       v[:, :, a : a + seg], size=size)
        sums.append(S)
        refs.append((c_j, top))
    if len(sums) == 1:  # one segment (GPUs, short inputs): its c is the maximum over all keys, its weight 1 exactly
        return sums[0], refs[0][0]
    with torch.no_grad():
        c_seg = torch.stack([c_j for c_j, _ in refs])  # [segments, B, H, 1, m']
        c = finite_reference(torch.stack([top for _, top in refs]).amax(0))  # the maximum over all real keys
        # <= 1; a segment without a real key (c_j = 0, S_j = 0) gets 1 instead of a possible overflow
        factors = weights(c_seg - c).transpose(-1, -2)  # [segments, B, H, m', 1]
    return sum(S_j * f for S_j, f in zip(sums, factors)), c


def _segmented(q, k, v, fmap: FeatureMap, mask, seg: int, size: int):
    """_bidirectional over key and query segments of ``seg`` positions (a CPU and a long input, see
    ``common.cpu_segment``): the sums over all keys first (``_segment_sums``), then each query segment; each
    segment is recomputed in the backward on its own. ``size``: B·H·L·m of the whole op, which decides whether to
    recompute."""
    S, c = _segment_sums(k, v, fmap, mask, seg, size)
    outs = [maybe_checkpoint(lambda q, S: _attention(q, S, c, fmap), q[:, :, a : a + seg], S, size=size)
            for a in range(0, q.shape[2], seg)]
    return torch.cat(outs, 2)


class _PositiveBidirectional(torch.autograd.Function):
    """Bidirectional FAVOR attention of a positive kernel (softmax, favor++) without a window, with a hand-written
    backward that keeps only q, k, v, the output, its normaliser, the row maxima and S [B,H,m,dv+1], and recomputes
    the features one side at a time (no second pass through the sums).

    Forward (per batch row and head): S = phi~(K)^T [V, 1]; [num, den] = phi~(Q) S; out = num / den.
    Backward, with G = [g / den, -(g . out) / den] [Lq, dv + 1]:
        dphi~(Q) = G S^T,   dS = phi~(Q)^T G,   dphi~(K) = [V, 1] dS^T,   d[V, 1] = phi~(K) dS,
    and d logits = dphi~ * phi~ (the features are exponentials of their logits, the stabilisers constants),
    which ``FeatureMap.logits_vjp`` takes back to q and k. Padded keys have phi~ = 0 exactly, so their
    gradients are exactly 0. ``seg``: positions per segment (CPU, see ``common.cpu_segment``) or None."""

    @staticmethod
    def forward(ctx, q, k, v, fmap: FeatureMap, mask, seg):
        S, c = _segment_sums(k, v, fmap, mask, seg or k.shape[2], size=0)  # no autograd here: nothing kept
        outs, dens, rows = [], [], []
        for a, b in spans(q.shape[2], seg):
            r, total = _query_side(q[:, :, a:b], S, c, fmap)[1:]
            den = safe_den(total[..., -1])
            outs.append(total[..., :-1] / den[..., None])
            dens.append(den)
            rows.append(r)
        out, den, r = cat_len(outs), cat_len(dens), cat_len(rows)
        ctx.save_for_backward(q, k, v, mask, S, c, out, den, r)
        ctx.fmap, ctx.seg = fmap, seg
        return out

    @staticmethod
    @first_order_only
    @without_autocast
    def backward(ctx, grad_out):
        q, k, v, mask, S, c, out, den, r = ctx.saved_tensors
        fmap, seg = ctx.fmap, ctx.seg
        g_num = grad_out.to(out.dtype) / den[..., None]  # [B, H, Lq, dv]
        G = torch.cat([g_num, -(g_num * out).sum(-1, keepdim=True)], -1)  # [B, H, Lq, dv + 1]
        dS, dq = None, []
        c_k, c_q = fold_bias(fmap, c, query=False), fold_bias(fmap, c, query=True)
        for a, b in spans(q.shape[2], seg):  # queries: dq, and the gradient reaching S
            lq, _ = fmap(q[:, :, a:b], query=True, with_bias=False)
            phi_q = bounded_exp_(lq.add_(c_q).sub_(r[:, :, a:b]))  # [B, H, s, m]
            part = phi_q.transpose(-1, -2) @ G[:, :, a:b]
            dS = part if dS is None else dS.add_(part)  # (one segment: no zero fill and sum)
            dq.append(fmap.logits_vjp(q[:, :, a:b], (G[:, :, a:b] @ S.transpose(-1, -2)).mul_(phi_q), query=True))
            del lq, phi_q
        dk, dv = [], []
        for a, b in spans(k.shape[2], seg):  # keys and values
            keep = None if mask is None else mask[:, None, a:b, None]
            kt = fmap.transform(k[:, :, a:b], False)
            lk, _ = fmap.logits(kt, with_bias=False)
            phi_k = masked_exp_(lk.sub_(c_k), keep)  # [B, H, s, m]
            dv.append(phi_k @ dS[..., :-1])
            d_phi = v[:, :, a:b] @ dS[..., :-1].transpose(-1, -2)
            d_phi += dS[..., -1][:, :, None, :]
            dk.append(fmap.logits_vjp(k[:, :, a:b], d_phi.mul_(phi_k), xt=kt))
            del kt, lk, phi_k, d_phi
        return cat_len(dq), cat_len(dk), cat_len(dv), None, None, None


def _bidirectional(q, k, v, fmap: FeatureMap, mask, size: int):
    """q [B,H,Lq,d], k [B,H,Lk,d], v [B,H,Lk,dv] in the compute dtype, mask [B,Lk] bool or None -> [B,H,Lq,dv].

    The key side (-> S) and the query side are recomputed separately in the backward above ``RECOMPUTE_ABOVE``,
    so the backward holds the features of one side at a time."""
    S, c = maybe_checkpoint(lambda k, v: _key_side(k, v, fmap, mask)[1:3], k, v, size=size)
    return maybe_checkpoint(lambda q, S: _attention(q, S, c, fmap), q, S, size=size)


def favor_bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    key_padding_mask: torch.Tensor | None = None,
    local_window: int = 0,
) -> torch.Tensor:
    """Bidirectional FAVOR attention.

    q [B,H,Lq,d], k [B,H,Lk,d] (already scaled by d^-1/4 and transformed by ``fmap``'s exact identities), v
    [B,H,Lk,dv], any float dtype (half inputs compute in float32); key_padding_mask [B,Lk] bool (True = real) or
    None; local_window w >= 0: exact softmax terms for |i - j| <= w (self-attention, softmax/favor++ only).
    Returns [B,H,Lq,dv] in v's dtype; a query with no real key gets 0. Raises ValueError for a window with Lq != Lk
    or with a kernel without an exact exponential form (trig, relu)."""
    if local_window and q.shape[2] != k.shape[2]:
        raise ValueError("local_window attention needs as many queries as keys (self-attention).")
    if local_window and not fmap.exponential:
        raise ValueError(f"local_window needs a kernel with an exact exponential form (softmax or favor++), not "
                         f"{fmap.kernel!r}: use local_window=0 or one of those kernels.")
    if (empty := empty_attention(q, k, v)) is not None:
        return empty
    ct = compute_dtype(q.dtype)
    B, H, L, _ = q.shape
    size = B * H * max(L, k.shape[2]) * fmap.nb_features
    with no_autocast(q.device):
        args = (q.to(ct), k.to(ct), v.to(ct))
        seg = cpu_segment(q, max(L, k.shape[2]), fmap.nb_features)
        if local_window:  # hand-written backward (positive kernels only)
            out = PositiveWindow.apply(*args, fmap, key_padding_mask, local_window, seg)
        elif fmap.exponential:  # hand-written backward
            out = _PositiveBidirectional.apply(*args, fmap, key_padding_mask, seg)
        elif seg:  # a CPU and a long input: segment by segment (see common.cpu_segment)
            out = _segmented(*args, fmap, key_padding_mask, seg, size)
        else:
            out = _bidirectional(*args, fmap, key_padding_mask, size)
    return out.to(v.dtype)
