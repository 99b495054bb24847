"""Bidirectional FAVOR attention, chunked over L, with a hand-written backward.

    out = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1))

Keys are absorbed chunk by chunk into S = phi~(K)^T V [m, dv] and z = phi~(K)^T 1 [m] with one
per-feature stabiliser c shared by every key (the running maximum, sums rescaled when it grows);
queries carry +c and subtract their own row maximum. Padded keys contribute to neither S nor z.
The backward recomputes features chunk by chunk, so peak memory is O(chunk * (m + d) + m * dv)
per head on top of q, k, v and the output; the stabilisers are constants of the forward (the
exact output does not depend on them).
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .common import (
    FavorState,
    absorb_keys,
    chunks,
    compute_dtype,
    key_features,
    no_autocast,
    query_features,
    read_state,
    safe_den,
)


def _key_state(fmap, k, v, mask, chunk_size) -> FavorState:
    B, H, L, _ = k.shape
    m = fmap.nb_features
    logits_width = fmap(k[:, :, :1])[0].shape[-1]
    state = FavorState.empty(B, H, m, logits_width, v.shape[-1], k.dtype, k.device)
    for a, b in chunks(L, chunk_size):
        state = absorb_keys(state, fmap, k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b])
    return state


class _FavorBidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fmap: FeatureMap, mask, chunk_size: int):
        in_dtype = v.dtype
        ct = compute_dtype(q.dtype)
        with no_autocast(q.device):
            qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
            state = _key_state(fmap, kc, vc, mask, chunk_size)
            c = state.c[:, :, None, :]  # [B, H, 1, m']
            out = vc.new_empty(*qc.shape[:-1], vc.shape[-1])  # [B, H, Lq, dv]
            den = qc.new_empty(qc.shape[:-1])  # [B, H, Lq]
            rmax = qc.new_empty(qc.shape[:-1])
            for a, b in chunks(qc.shape[2], chunk_size):
                phi_q, r = query_features(*fmap(qc[:, :, a:b], query=True), c)  # [B, H, C, m]
                num, d = read_state(phi_q, state)
                out[:, :, a:b] = num / safe_den(d)[..., None]
                den[:, :, a:b], rmax[:, :, a:b] = d, r.squeeze(-1)
        ctx.save_for_backward(q, k, v, out, safe_den(den), rmax, state.S, state.z, state.c, mask)
        ctx.fmap, ctx.chunk_size, ctx.ct = fmap, chunk_size, ct
        ctx.mark_non_differentiable(rmax)
        return out.to(in_dtype), den, rmax

    @staticmethod
    def backward(ctx, grad_out, grad_den=None, _grad_rmax=None):
        q, k, v, out, den, rmax, S, z, c, mask = ctx.saved_tensors
        q, k, v = q.detach(), k.detach(), v.detach()  # no autograd graph across chunks (see causal.py)
        fmap, chunk_size, ct = ctx.fmap, ctx.chunk_size, ctx.ct
        c = c[:, :, None, :]
        dq, dk, dv = torch.zeros_like(q, dtype=ct), torch.zeros_like(k, dtype=ct), torch.zeros_like(v, dtype=ct)
        dS, dz = torch.zeros_like(S), torch.zeros_like(z)
        with no_autocast(q.device), torch.enable_grad():
            g = grad_out.to(ct)
            # queries: dq, and the gradient reaching S and z
            for a, b in chunks(q.shape[2], chunk_size):
                qa = q[:, :, a:b].to(ct).detach().requires_grad_(True)
                logits, factor = fmap(qa, query=True)
                phi_q = torch.exp(logits + c - rmax[:, :, a:b, None])
                if factor is not None:
                    phi_q = phi_q * factor
                g_num = g[:, :, a:b] / den[:, :, a:b, None]  # [B, H, C, dv]
                g_den = -(g_num * out[:, :, a:b]).sum(-1)  # [B, H, C]
                if grad_den is not None:  # the normaliser is an output too (local-window attention)
                    g_den = g_den + grad_den[:, :, a:b].to(ct)
                d_phi = g_num @ S.transpose(-1, -2) + g_den[..., None] * z[:, :, None, :]
                (dq[:, :, a:b],) = torch.autograd.grad(phi_q, qa, d_phi)
                phi_q = phi_q.detach()
                dS += phi_q.transpose(-1, -2) @ g_num
                dz += (phi_q * g_den[..., None]).sum(dim=2)
            # keys and values
            for a, b in chunks(k.shape[2], chunk_size):
                ka = k[:, :, a:b].to(ct).detach().requires_grad_(True)
                m_a = None if mask is None else mask[:, a:b]
                phi_k = key_features(*fmap(ka), c, m_a)  # [B, H, C, m]
                va = v[:, :, a:b].to(ct)
                d_phi = va @ dS.transpose(-1, -2) + dz[:, :, None, :]
                (dk[:, :, a:b],) = torch.autograd.grad(phi_k, ka, d_phi)
                dv[:, :, a:b] = phi_k.detach() @ dS
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def favor_bidirectional(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """q [B,H,Lq,d], k [B,H,Lk,d], v [B,H,Lk,dv] (q, k already scaled) -> [B,H,Lq,dv]."""
    return _FavorBidirectional.apply(q, k, v, fmap, key_padding_mask, chunk_size)[0]


def favor_bidirectional_with_normalizer(q, k, v, fmap: FeatureMap, key_padding_mask=None, chunk_size: int = 128):
    """(out [B,H,Lq,dv], den [B,H,Lq], log_scale [B,H,Lq]): the output and its normaliser
    den_i = sum_j sum_f exp(Lg_q[i, f] + Lg_k[j, f] - log_scale_i) (0 where no real key), both differentiable;
    ``log_scale`` is the forward's stabiliser (a constant). Local-window attention combines these with
    exact terms in the same scale."""
    return _FavorBidirectional.apply(q, k, v, fmap, key_padding_mask, chunk_size)
