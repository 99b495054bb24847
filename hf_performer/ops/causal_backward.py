"""Hand-written backward of causal FAVOR attention (positive kernels, with or without the local window), in the
chunk-parallel shape of ``causal._causal``: the forward keeps q, k, v, the output, its normaliser, the stabilisers
(ref, M, U, r), the query features phi~(Q) [B, H, n, C, m] (one [L, m] tensor: traded for a second query projection
and exponential), the inter-chunk states P [B, H, n, m, dv + 1], the intra-chunk matrices A and their decay D
[B, H, n, C, C] (together half an [L, m] feature tensor at C = 64: traded for a second Q K^T product); the backward
computes the key logits once and runs a fixed number of batched ops, with no second pass through the forward.

Per chunk i (notation of ``causal``; G = [g / den, -(g . out) / den] [C, dv + 1], e_u = e^{-U}):

    total = e_u (phi~(Q) P_i) + A [V, 1],   A = (phi~(Q) phi~(K)^T) ⊙ D
    dphi~(Q) = (e_u G) P_i^T + (D ⊙ G [V, 1]^T) phi~(K)      dP_i = phi~(Q)^T (e_u G)
    dphi~(K) = (D ⊙ G [V, 1]^T)^T phi~(Q)                    d[V, 1] = A^T G + kf dK
    P_i = sum_{j<i} K_j e^{M_{j+1} - ref_i} + S_0 e^{c_0 - ref_i},   K_j = kf_j^T [V_j, 1],  kf = exp(Lg_k - M_{j+1})
    dK_j = sum_{i>j} dP_i e^{M_{j+1} - ref_i} + dS_n e^{M_{j+1} - M_n}     (a reverse scan: ``_reverse_prefix``)

and d logits = dphi~ ⊙ phi~ (+ dkf ⊙ kf for keys), which ``FeatureMap.logits_vjp`` takes to q and k. The state
entering the call (decoding, or the previous CPU segment) and the state it returns are differentiable too.
Padded keys have phi~ = kf = 0 exactly, so their gradients are exactly 0.

With a local window (w > 0) the w keys before the sequence ride in front of k and v (``causal.with_halo``: the
previous segment's or the decoding state's last keys, so their gradients flow back through autograd), and
``_window_grads`` turns the output's gradient into G = d[num, den] plus the gradients of FAVOR's window-pair
estimates (dA: a band of the [C, w + C] products of each chunk's queries with its halo and own keys, joined to the
intra matrix's) and of the exact terms (one [C, w + C] product per chunk, like the forward's).
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .causal import _causal, halo_features, halo_rows, key_spans, unbiased_references
from .common import (
    FavorState,
    first_order_only,
    masked_exp_,
    pad_len,
    safe_den,
    weights,
    with_ones,
    without_autocast,
)
from .local import band, unband
from .scan import exclusive_prefix


def _reverse_prefix(dP, d_final, ref, M, with_state: bool):
    """(dK [B,H,n,m,e], dS_0 [B,H,m,e] or None unless ``with_state``): the transpose of the forward's inter-chunk
    states.

    dP [B,H,n,m,e] the gradients of P_i, d_final [B,H,m,e] (or None) that of the returned state; ref [B,H,n,m']
    the chunk references, M [B,H,n+1,m'] the running maxima (M_0 = c_0, the incoming state's).
        dK_j = sum_{i>j} dP_i e^{M_{j+1} - ref_i} + d_final e^{M_{j+1} - M_n}
        dS_0 = sum_i dP_i e^{c_0 - ref_i} + d_final e^{c_0 - M_n}
    The first sum is ``scan.exclusive_prefix(reverse=True)`` with references -ref_i and targets -M_{j+1}
    (weights <= 1, since ref_i >= M_{j+1} for i > j)."""
    c0, Mn = M[:, :, :1], M[:, :, -1:]  # [B, H, 1, m']
    dK = exclusive_prefix(dP, -ref, -M[:, :, 1:], reverse=True)
    dS0 = (dP * weights(c0 - ref)[..., None]).sum(2) if with_state else None
    if d_final is not None:
        dK += d_final[:, :, None] * weights(M[:, :, 1:] - Mn)[..., None]
        if with_state:
            dS0 += d_final * weights(c0 - Mn)[:, :, 0, :, None]
    return dK, dS0


class PositiveCausal(torch.autograd.Function):
    """Causal FAVOR attention of a positive kernel, with the hand-written backward above (and, with a local window
    w > 0, the window's terms: see ``_window_grads``).

    forward(q [B,H,T,d], k [B,H,w+T,d], v [B,H,w+T,dv] in the compute dtype (with a window, the w keys before the
    sequence in front: ``causal.with_halo``), S0 [B,H,m,dv], z0 [B,H,m], c0 [B,H,m] (the incoming state, or three
    Nones), fmap, mask [B,T] bool or None, halo_mask [B,w] bool (None without a window), chunk, window)
    -> (out [B,H,T,dv], S [B,H,m,dv], z [B,H,m], c [B,H,m]); c is not differentiable. With ``with_state`` False
    only out (no None outputs: dynamo cannot trace those)."""

    @staticmethod
    def forward(ctx, q, k, v, S0, z0, c0, fmap: FeatureMap, mask, halo_mask, chunk: int, window: int = 0,
                with_state: bool = True):
        state = None if S0 is None else FavorState(S=S0, z=z0, c=c0)
        internals = {}
        out, new = _causal(q, k, v, fmap, mask, chunk, window, state, internals, halo_mask, with_state)
        i = internals
        extra = [i["e"], i["g"], i["coef"], i["kept"], i["total"]] if window else []
        ctx.save_for_backward(q, k, v, mask, halo_mask, out, i["den"], i["prefix"], i["ref"], i["M"], i["U"], i["r"],
                              i["A"], i["decay"], i["phi_q"], *extra)
        ctx.fmap, ctx.C, ctx.has_state, ctx.window = fmap, i["C"], state is not None, window
        ctx.set_materialize_grads(False)
        if new is None:  # no state wanted (``with_state``): the final sums were skipped, out is the only output
            return out
        ctx.mark_non_differentiable(new.c)
        return out, new.S, new.z, new.c

    @staticmethod
    @first_order_only
    @without_autocast
    def backward(ctx, g_out, g_S=None, g_z=None, _g_c=None):
        q, k, v, mask, halo_mask, out, den, prefix, ref, M, U, r, A, decay, phi_q, *win = ctx.saved_tensors
        fmap, C, w = ctx.fmap, ctx.C, ctx.window
        B, H, T, _ = q.shape
        n = -(-T // C)
        P = n * C - T
        pad = (lambda x: pad_len(x, 0, P)) if P else (lambda x: x)
        chunked = lambda x: x.unflatten(2, (n, C))  # [B, H, nC, ·] -> [B, H, n, C, ·]
        kx, vx = pad(k), pad(v)  # [B, H, w + nC, ·]: key position p at index w + p
        qt, kt = fmap.transform(pad(q), True), fmap.transform(kx, False)  # the input transforms, once
        real = torch.ones(B, T, dtype=torch.bool, device=q.device) if mask is None else mask
        mx = pad_len(real, 0, P, value=False)  # [B, nC]
        keep = None if (mask is None and P == 0) else mx.unflatten(1, (n, C))[:, None, :, :, None]
        if w:
            mx = torch.cat([halo_mask, mx], 1)  # [B, w + nC]
        cut = lambda x: x.flatten(2, 3)[:, :, :T]  # [B, H, n, C, ·] -> [B, H, T, ·]
        v1 = with_ones(chunked(vx[:, :, w:]))  # [B, H, n, C, dv + 1]
        if g_out is None:
            G, win_grads = torch.zeros_like(v1), None
        elif w:
            G, win_grads = _window_grads(pad(g_out), pad(out), qt, kt, vx, *win, chunked, w)
        else:
            g_num = g_out.to(out.dtype) / den[..., None]  # [B, H, T, dv]
            G = chunked(pad(torch.cat([g_num, -(g_num * out).sum(-1, keepdim=True)], -1)))  # [B, H, n, C, dv + 1]
            win_grads = None
        e_u = weights(-U)[..., None]  # [B, H, n, C, 1]
        Gp = G * e_u
        # the inter-chunk part first (small tensors): dP, then its transpose through the scan
        dP = phi_q.transpose(-1, -2) @ Gp  # [B, H, n, m, dv + 1]
        d_final = None
        if g_S is not None or g_z is not None:
            zS = torch.zeros_like(prefix[:, :, 0, :, :-1]) if g_S is None else g_S.to(prefix.dtype)
            zz = torch.zeros_like(prefix[:, :, 0, :, -1]) if g_z is None else g_z.to(prefix.dtype)
            d_final = torch.cat([zS, zz[..., None]], -1)  # [B, H, m, dv + 1]
        dK, dS0 = _reverse_prefix(dP, d_final, ref, M, ctx.has_state)
        del dP
        # the keys' logits once: relative to the running maximum (kf, the chunk summaries' features) and to the
        # chunk's reference and in-chunk bound (phi~(K)); at most ~5 [B, H, L, m] tensors alive from here on
        # (without the features' log weights b, folded into the references as in the forward)
        lk = chunked(fmap.logits(kt[:, :, w:], with_bias=False)[0])  # [B, H, n, C, m]
        b = fmap.feature_bias
        ref_k, _, M_k = unbiased_references(None if b is None else b.to(lk.dtype), ref, M)
        if win_grads is not None:  # the halo's features, as the forward computed them
            phi_h = halo_features(fmap, kt, mx, ref_k, n, C, w)  # [B, H, n, w, m]
        kf = masked_exp_(lk - M_k, keep)
        phi_k = masked_exp_(lk.sub_(ref_k).sub_(U[..., None]), keep)
        del lk
        dB = G @ v1.transpose(-1, -2)  # [B, H, n, C, C]
        if win_grads is not None:
            dB += win_grads["dA"][..., w:]
        dB.mul_(decay)
        dphi_q = dB @ phi_k  # [B, H, n, C, m], plus (e_u G) P_i^T in place:
        dphi_q.flatten(0, 2).baddbmm_(Gp.flatten(0, 2), prefix.transpose(-1, -2).flatten(0, 2))
        if win_grads is not None:  # the halo's FAVOR estimates: A_h = (phi~(Q) phi~(K_h)^T) e_u
            dA_h = win_grads["dA"][..., :w] * e_u  # [B, H, n, C, w]
            dphi_q.flatten(0, 2).baddbmm_(dA_h.flatten(0, 2), phi_h.flatten(0, 2))
            dlh = (dA_h.transpose(-1, -2) @ phi_q).mul_(phi_h)  # [B, H, n, w, m]: gradient of the halo's logits
            del phi_h, dA_h
        dq = fmap.logits_vjp(q, cut(dphi_q.mul_(phi_q)), query=True, xt=qt[:, :, :T],
                             grad_xt=None if win_grads is None else win_grads["dqt"][:, :, :T])
        del dphi_q, Gp
        dlk = (dB.transpose(-1, -2) @ phi_q).mul_(phi_k)  # dphi~(K) * phi~(K): [B, H, n, C, m]
        del dB, phi_q, phi_k
        dlk.addcmul_(v1 @ dK.transpose(-1, -2), kf)  # + d kf * kf, one pass
        dV1 = A.transpose(-1, -2) @ G  # A^T G (A and D kept by the forward: [n, C, C], no second Q K^T)
        dV1 += kf @ dK
        del kf, dK
        if w:  # key rows w + nC: each chunk's halo rows join the previous chunk's (or the incoming window's) keys
            # (logits_vjp works row by row: the chunks' own rows and their halo rows go through it apart, and only
            # the [L, d] results are summed into key rows)
            own = fmap.logits_vjp(kx[:, :, w:], dlk.flatten(2, 3), xt=kt[:, :, w:],
                                  grad_xt=None if win_grads is None else win_grads["dkt_own"])  # [B, H, nC, d]
            own_v = dV1[..., :-1].flatten(2, 3)
            if win_grads is None:  # no gradient reached the output: the window's terms have none either
                dk, dv_ = pad_len(own, w, 0), pad_len(own_v, w, 0)
            else:
                # (as [B, H, nw, ·] rows: the feature map's per-head terms broadcast against [B, H, L, ·])
                halo = fmap.logits_vjp(halo_rows(kx, n, C, w).flatten(2, 3), dlh.flatten(2, 3),
                                       xt=halo_rows(kt, n, C, w).flatten(2, 3),
                                       grad_xt=win_grads["dkt_h"].flatten(2, 3))  # [B, H, nw, d]
                dk = _unspan(halo.unflatten(2, (n, w)), chunked(own), w)
                dv_ = _unspan(win_grads["dv_h"], chunked(own_v + win_grads["dv_own"]), w)
            dk, dv_ = dk[:, :, : w + T], dv_[:, :, : w + T]
        else:
            dk = fmap.logits_vjp(k, cut(dlk), xt=kt[:, :, :T])
            dv_ = cut(dV1[..., :-1])
        if ctx.has_state:
            return dq, dk, dv_, dS0[..., :-1], dS0[..., -1], None, None, None, None, None, None, None
        return dq, dk, dv_, None, None, None, None, None, None, None, None, None


def _unspan(halo: torch.Tensor, own: torch.Tensor, w: int) -> torch.Tensor:
    """Gradients of each chunk's w halo rows [B, H, n, w, ·] and of its own C rows [B, H, n, C, ·] summed into the
    key rows they came from: [B, H, w + nC, ·] (the transpose of ``causal.key_spans``)."""
    full = pad_len(own.flatten(2, 3), w, 0)  # [B, H, w + nC, ·], the first w rows 0
    n, C = own.shape[2], own.shape[3]
    full[:, :, : n * C].unflatten(2, (n, C))[:, :, :, :w] += halo
    return full


def _window_grads(g_out, out, qt, kt, vx, e, g, coef, kept, total, chunked, w: int):
    """The local window's part of the backward (notation of ``local.combine_window``, all rows padded to nC; qt
    [B, H, nC, d] and kt [B, H, w + nC, d] the transformed queries and keys, vx [B, H, w + nC, dv] the values):

        out = (g num + apply(coef)) / total,   coef = e - g fav,   total = g max(den - sum fav, 0) + sum e,
        e = exp(exact - s),   exact = q'.k' + |q'|^2 / 2 + const   (the window pairs, masked where not real)

    -> (G [B, H, n, C, dv + 1]: the gradient of FAVOR's [num, den]; a dict with dA [B, H, n, C, w + C] (of the
    chunk's [halo, own] FAVOR products, from fav), and from the exact terms dqt [B, H, nC, d] (of the transformed
    queries), dkt_h [B, H, n, w, d] / dkt_own [B, H, nC, d] (of the transformed keys, read as each chunk's halo rows
    and as its own rows) and dv_h / dv_own (of the values, likewise))."""
    n, C = chunked(qt).shape[2:4]
    spans = lambda x: key_spans(x, n, C, w)  # [B, H, n, w + C, ·]
    span = w + C
    safe = safe_den(total)
    d_num = g_out.to(out.dtype) / safe[..., None]  # [B, H, nC, dv]: of g num + apply(coef)
    d_total = -(d_num * out).sum(-1) * (total != 0)  # [B, H, nC]
    vs = spans(vx)  # [B, H, n, w + C, dv]
    d_coef = band(chunked(d_num) @ vs.transpose(-1, -2), w + 1).flatten(2, 3)  # [B, H, nC, w + 1]
    d_rest = d_total * kept  # of max(den - sum fav, 0), through the clamp
    G = chunked(torch.cat([g[..., None] * d_num, (g * d_rest)[..., None]], -1))  # [B, H, n, C, dv + 1]
    d_fav = -g[..., None] * (d_coef + d_rest[..., None])
    d_exact = (d_coef + d_total[..., None]) * e  # e = 0 where the pair is not real
    dv_spans = unband(chunked(coef), span).transpose(-1, -2) @ chunked(d_num)  # [B, H, n, w + C, dv]
    D = unband(chunked(d_exact), span)  # [B, H, n, C, w + C]
    dqt = (D @ spans(kt)).flatten(2, 3) + d_exact.sum(-1, keepdim=True) * qt  # d(|q'|^2 / 2) = q'
    dkt_spans = D.transpose(-1, -2) @ chunked(qt)  # [B, H, n, w + C, d]
    dA = unband(chunked(d_fav), span)  # [B, H, n, C, w + C]
    return G, {"dA": dA, "dqt": dqt, "dkt_h": dkt_spans[:, :, :, :w], "dkt_own": dkt_spans[:, :, :, w:].flatten(2, 3),
               "dv_h": dv_spans[:, :, :, :w], "dv_own": dv_spans[:, :, :, w:].flatten(2, 3)}
