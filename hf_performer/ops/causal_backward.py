"""Hand-written backward of causal FAVOR attention (positive kernels, no local window), in the chunk-parallel shape
of ``causal._causal``: the forward keeps q, k, v, the output, its normaliser, the stabilisers (ref, M, U, r), the
query features phi~(Q) [B, H, n, C, m] (one [L, m] tensor: traded for a second query projection and exponential),
the inter-chunk states P [B, H, n, m, dv + 1], the intra-chunk matrices A and their decay D [B, H, n, C, C] (together
half an [L, m] feature tensor at C = 64: traded for a second Q K^T product); the backward computes the key logits
once and runs a fixed number of batched ops, with no second pass through the forward.

Per chunk i (notation of ``causal``; G = [g / den, -(g . out) / den] [C, dv + 1], e_u = e^{-U}):

    total = e_u (phi~(Q) P_i) + A [V, 1],   A = (phi~(Q) phi~(K)^T) ⊙ D
    dphi~(Q) = (e_u G) P_i^T + (D ⊙ G [V, 1]^T) phi~(K)      dP_i = phi~(Q)^T (e_u G)
    dphi~(K) = (D ⊙ G [V, 1]^T)^T phi~(Q)                    d[V, 1] = A^T G + kf dK
    P_i = sum_{j<i} K_j e^{M_{j+1} - ref_i} + S_0 e^{c_0 - ref_i},   K_j = kf_j^T [V_j, 1],  kf = exp(Lg_k - M_{j+1})
    dK_j = sum_{i>j} dP_i e^{M_{j+1} - ref_i} + dS_n e^{M_{j+1} - M_n}     (a reverse scan: ``_reverse_prefix``)

and d logits = dphi~ ⊙ phi~ (+ dkf ⊙ kf for keys), which ``FeatureMap.logits_vjp`` takes to q and k. The state
entering the call (decoding, or the previous CPU segment) and the state it returns are differentiable too.
Padded keys have phi~ = kf = 0 exactly, so their gradients are exactly 0.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .causal import _causal
from .common import FavorState, masked_exp_, pad_len, with_ones
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
    dS0 = (dP * torch.exp((c0 - ref).clamp_max(0))[..., None]).sum(2) if with_state else None
    if d_final is not None:
        dK += d_final[:, :, None] * torch.exp((M[:, :, 1:] - Mn).clamp_max(0))[..., None]
        if with_state:
            dS0 += d_final * torch.exp((c0 - Mn).clamp_max(0))[:, :, 0, :, None]
    return dK, dS0


class PositiveCausal(torch.autograd.Function):
    """Causal FAVOR attention of a positive kernel without a window, with the hand-written backward above.

    forward(q, k, v [B,H,T,·] in the compute dtype, S0 [B,H,m,dv], z0 [B,H,m], c0 [B,H,m] (the incoming state, or
    three Nones), fmap, mask [B,T] bool or None, chunk) -> (out [B,H,T,dv], S [B,H,m,dv], z [B,H,m], c [B,H,m]);
    c is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, S0, z0, c0, fmap: FeatureMap, mask, chunk: int):
        state = None if S0 is None else FavorState(S=S0, z=z0, c=c0)
        internals = {}
        out, new = _causal(q, k, v, fmap, mask, chunk, 0, state, internals)
        i = internals
        ctx.save_for_backward(q, k, v, mask, out, i["den"], i["prefix"], i["ref"], i["M"], i["U"], i["r"], i["A"],
                              i["decay"], i["phi_q"])
        ctx.fmap, ctx.C, ctx.has_state = fmap, i["C"], state is not None
        ctx.mark_non_differentiable(new.c)
        ctx.set_materialize_grads(False)
        return out, new.S, new.z, new.c

    @staticmethod
    def backward(ctx, g_out, g_S, g_z, _g_c):
        q, k, v, mask, out, den, prefix, ref, M, U, r, A, decay, phi_q = ctx.saved_tensors
        fmap, C = ctx.fmap, ctx.C
        B, H, T, dv = v.shape
        n = -(-T // C)
        P = n * C - T
        pad = (lambda x: pad_len(x, 0, P)) if P else (lambda x: x)
        chunked = lambda x: pad(x).unflatten(2, (n, C))  # [B, H, T, ·] -> [B, H, n, C, ·]
        if mask is None and P == 0:
            keep = None
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=q.device) if mask is None else mask
            keep = pad_len(real, 0, P, value=False).unflatten(1, (n, C))[:, None, :, :, None]
        cut = lambda x: x.flatten(2, 3)[:, :, :T]  # [B, H, n, C, ·] -> [B, H, T, ·]
        v1 = with_ones(chunked(v))  # [B, H, n, C, dv + 1]
        if g_out is None:
            G = torch.zeros_like(v1)
        else:
            g_num = g_out.to(out.dtype) / den[..., None]  # [B, H, T, dv]
            G = chunked(torch.cat([g_num, -(g_num * out).sum(-1, keepdim=True)], -1))  # [B, H, n, C, dv + 1]
        Gp = G * torch.exp(-U)[..., None]
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
        lk = chunked(fmap(k)[0])  # [B, H, n, C, m]
        kf = masked_exp_(lk - M[:, :, 1:, None], keep)
        phi_k = masked_exp_(lk.sub_(ref[:, :, :, None]).sub_(U[..., None]), keep)
        del lk
        dB = (G @ v1.transpose(-1, -2)).mul_(decay)  # [B, H, n, C, C]
        dphi_q = dB @ phi_k  # [B, H, n, C, m], plus (e_u G) P_i^T in place:
        dphi_q.flatten(0, 2).baddbmm_(Gp.flatten(0, 2), prefix.transpose(-1, -2).flatten(0, 2))
        dq = fmap.logits_vjp(q, cut(dphi_q.mul_(phi_q)), query=True)
        del dphi_q, Gp
        dlk = (dB.transpose(-1, -2) @ phi_q).mul_(phi_k)  # dphi~(K) * phi~(K): [B, H, n, C, m]
        del dB, phi_q, phi_k
        dlk += (v1 @ dK.transpose(-1, -2)).mul_(kf)
        dV1 = A.transpose(-1, -2) @ G  # A^T G (A and D kept by the forward: [n, C, C], no second Q K^T)
        dV1 += kf @ dK
        del kf, dK
        dk = fmap.logits_vjp(k, cut(dlk))
        dv_ = cut(dV1[..., :-1])
        if ctx.has_state:
            return dq, dk, dv_, dS0[..., :-1], dS0[..., -1], None, None, None, None
        return dq, dk, dv_, None, None, None, None, None, None
