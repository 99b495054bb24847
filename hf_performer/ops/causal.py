"""Causal FAVOR attention by chunked prefix sums, with a hand-written backward.

For a chunk [a, b) the state (S, z) holds the keys before a, relative to the chunk's per-feature
reference c = max(running maximum, logits of the chunk's first real key) — every query of the chunk
sees all of those keys, so c is a constant shared by all keys a query sees. Inside the chunk a
per-position prefix maximum U_t = max_{s<=t} max(0, max_j(Lg_k[s, j] - c_j)) bounds the new keys:

    phi~(k_s) = F exp(Lg_k[s] - c - U_s)      (<= 1)
    num_t = e^{-U_t} phi~(q_t) S + sum_{s<=t in chunk} (phi~(q_t).phi~(k_s)) e^{U_s - U_t} v_s
    den_t = the same with v = 1;  out_t = num_t / den_t

Every quantity uses keys s <= t only, so a future key cannot move an earlier output, not even in
the last bit. Memory: O(chunk * (m + d) + chunk^2 + m * dv) per head besides q, k, v, out; nothing
per position of size m × dv, nothing L × L. The backward recomputes features: a forward sweep
rebuilds the prefix states for dq, a reverse sweep carries the gradient of the future states for
dk and dv.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .common import (
    FavorState,
    absorb,
    chunks,
    compute_dtype,
    key_features,
    neg_big,
    no_autocast,
    query_features,
    read_state,
    safe_den,
    with_ones,
)


def chunk_reference(logits: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """max(c, logits of the first real key of the chunk): [B, H, m']. logits [B, H, C, m']."""
    if mask is None:
        first = logits[:, :, 0]
    else:
        idx = mask.to(torch.int8).argmax(dim=1)  # first real position per row, [B]
        first = logits[torch.arange(logits.shape[0], device=logits.device), :, idx]
        first = first.masked_fill(~mask.any(dim=1)[:, None, None], neg_big(logits.dtype))
    return torch.maximum(c, first)


def prefix_shift(logits, c_ref, mask) -> torch.Tensor:
    """U: [B, H, C], the running maximum of max(0, max_j(Lg - c_ref)) over the chunk."""
    u = (logits - c_ref[:, :, None, :]).amax(dim=-1).clamp_min(0)
    if mask is not None:
        u = u.masked_fill(~mask[:, None, :], 0.0)
    return torch.cummax(u, dim=-1).values


def decay_matrix(U: torch.Tensor) -> torch.Tensor:
    """[B, H, C, C]: e^{U_s - U_t} for s <= t, else 0 (rows t, columns s)."""
    C = U.shape[-1]
    lower = torch.ones(C, C, dtype=torch.bool, device=U.device).tril()
    diff = (U[..., None, :] - U[..., :, None]).clamp_max(0)
    return torch.where(lower, torch.exp(diff), torch.zeros((), dtype=U.dtype, device=U.device))


def causal_chunk(fmap: FeatureMap, q, k, v, mask, state: FavorState):
    """One chunk of causal attention from the state of all earlier keys.

    Returns (out [B,H,C,dv], den [B,H,C], r [B,H,C], U [B,H,C], c_ref [B,H,m'], next state)."""
    lk, fk = fmap(k)
    c_ref = chunk_reference(lk, state.c, mask)
    state = state.rescaled(c_ref)
    U = prefix_shift(lk, c_ref, mask)
    phi_k = key_features(lk, fk, c_ref[:, :, None, :] + U[..., None], mask)  # [B, H, C, m]
    phi_q, r = query_features(*fmap(q, query=True), c_ref[:, :, None, :])  # [B, H, C, m]
    attn = (phi_q @ phi_k.transpose(-1, -2)) * decay_matrix(U)  # [B, H, C, C]
    e_u = torch.exp(-U)
    v1 = with_ones(v)
    inter_num, inter_den = read_state(phi_q, state)
    intra = attn @ v1  # [B, H, C, dv + 1]
    den = inter_den * e_u + intra[..., -1]
    out = (inter_num * e_u[..., None] + intra[..., :-1]) / safe_den(den)[..., None]
    return out, den, r.squeeze(-1), U, c_ref, absorb(state, lk, fk, v1, mask)


def causal_scan(fmap, q, k, v, mask, chunk_size, state: FavorState | None = None):
    """Causal attention over the whole sequence (differentiable by autograd, used without grad by the
    autograd Function and by decoding). Returns (out, den, r, U, c_refs [n_chunks, B, H, m'], state); den is
    the normaliser in the scale exp(-(r + U)) (0 where a query saw no real key)."""
    B, H, L, _ = q.shape
    if state is None:
        width = fmap(k[:, :, :1])[0].shape[-1]
        state = FavorState.empty(B, H, fmap.nb_features, width, v.shape[-1], q.dtype, q.device)
    out = v.new_empty(B, H, L, v.shape[-1])  # written chunk by chunk (autograd tracks the slices)
    den, rmax, shift = (q.new_empty(B, H, L) for _ in range(3))
    refs = []
    for a, b in chunks(L, chunk_size):
        m_a = None if mask is None else mask[:, a:b]
        o, d, r, U, c_ref, state = causal_chunk(fmap, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], m_a, state)
        out[:, :, a:b], den[:, :, a:b], rmax[:, :, a:b], shift[:, :, a:b] = o, d, r, U
        refs.append(c_ref)
    return out, den, rmax, shift, torch.stack(refs), state


class _FavorCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fmap: FeatureMap, mask, chunk_size: int):
        ct = compute_dtype(q.dtype)
        with no_autocast(q.device):
            out, den, r, U, refs, _ = causal_scan(fmap, q.to(ct), k.to(ct), v.to(ct), mask, chunk_size)
        ctx.save_for_backward(q, k, v, out, safe_den(den), r, U, refs, mask)
        ctx.fmap, ctx.chunk_size, ctx.ct = fmap, chunk_size, ct
        log_scale = r + U
        ctx.mark_non_differentiable(log_scale)
        return out.to(v.dtype), den, log_scale

    @staticmethod
    def backward(ctx, grad_out, grad_den=None, _grad_log_scale=None):
        q, k, v, out, den, r, U, refs, mask = ctx.saved_tensors
        # detached: under enable_grad, ops on the saved leaves would chain an autograd graph through
        # every chunk's state and keep each chunk's features alive until the backward ends
        q, k, v = q.detach(), k.detach(), v.detach()
        fmap, size, ct = ctx.fmap, ctx.chunk_size, ctx.ct
        B, H, L, _ = q.shape
        spans = list(chunks(L, size))
        dq, dk, dv = torch.zeros_like(q, dtype=ct), torch.zeros_like(k, dtype=ct), torch.zeros_like(v, dtype=ct)
        with no_autocast(q.device), torch.enable_grad():
            g = grad_out.to(ct)

            def grads_of_num_den(a, b):  # d loss / d num and d loss / d den of the chunk's queries
                g_num = g[:, :, a:b] / den[:, :, a:b, None]  # [B, H, C, dv]
                g_den = -(g_num * out[:, :, a:b]).sum(-1)  # [B, H, C]
                if grad_den is not None:  # the normaliser is an output too (local-window attention)
                    g_den = g_den + grad_den[:, :, a:b].to(ct)
                return g_num, g_den

            def chunk_terms(i, a, b, q_grad: bool, k_grad: bool):
                qa = q[:, :, a:b].to(ct).detach().requires_grad_(q_grad)
                ka = k[:, :, a:b].to(ct).detach().requires_grad_(k_grad)
                m_a = None if mask is None else mask[:, a:b]
                lq, fq = fmap(qa, query=True)
                lk, fk = fmap(ka)
                c_ref, Ua = refs[i][:, :, None, :], U[:, :, a:b]
                phi_q = torch.exp(lq + c_ref - r[:, :, a:b, None])
                if fq is not None:
                    phi_q = phi_q * fq
                phi_k = key_features(lk, fk, c_ref + Ua[..., None], m_a)
                decay = decay_matrix(Ua)
                va = v[:, :, a:b].to(ct)
                g_num, g_den = grads_of_num_den(a, b)
                # d loss / d attn[t, s] through num and den, times the decay
                b_mat = (g_num @ va.transpose(-1, -2) + g_den[..., None]) * decay
                return qa, ka, m_a, lk, fk, phi_q, phi_k, decay, va, b_mat, g_num, g_den

            # forward sweep: prefix states -> dq
            width = refs.shape[-1]
            state = FavorState.empty(B, H, fmap.nb_features, width, v.shape[-1], ct, q.device)
            for i, (a, b) in enumerate(spans):
                qa, _, m_a, lk, fk, phi_q, phi_k, _, va, b_mat, g_num, g_den = chunk_terms(i, a, b, True, False)
                state = state.rescaled(refs[i])
                e_u = torch.exp(-U[:, :, a:b])[..., None]
                d_phi_q = e_u * (
                    g_num @ state.S.transpose(-1, -2) + g_den[..., None] * state.z[:, :, None, :]
                ) + b_mat @ phi_k.detach()
                (dq[:, :, a:b],) = torch.autograd.grad(phi_q, qa, d_phi_q)
                state = absorb(state, lk.detach(), None if fk is None else fk.detach(), with_ones(va), m_a)

            # reverse sweep: gradient of the future states (R, rz relative to the next chunk's c_ref)
            R = rz = None
            for i in range(len(spans) - 1, -1, -1):
                a, b = spans[i]
                _, ka, m_a, lk, fk, phi_q, phi_k, decay, va, b_mat, g_num, g_den = chunk_terms(i, a, b, False, True)
                phi_q = phi_q.detach()
                attn = (phi_q @ phi_k.detach().transpose(-1, -2)) * decay
                outs, grads = [phi_k], [b_mat.transpose(-1, -2) @ phi_q]
                dv[:, :, a:b] = attn.transpose(-1, -2) @ g_num
                if R is not None:
                    phi_hat = key_features(lk, fk, refs[i + 1][:, :, None, :], m_a)
                    outs.append(phi_hat)
                    grads.append(va @ R.transpose(-1, -2) + rz[:, :, None, :])
                    dv[:, :, a:b] += phi_hat.detach() @ R
                dk[:, :, a:b] = torch.autograd.grad(outs, ka, grads)[0]
                q_eu = phi_q * torch.exp(-U[:, :, a:b])[..., None]  # [B, H, C, m]
                dS = q_eu.transpose(-1, -2) @ g_num
                dz = (q_eu * g_den[..., None]).sum(dim=2)
                if R is None:
                    R, rz = dS, dz
                else:
                    f = torch.exp(refs[i] - refs[i + 1])  # [B, H, m'] <= 1
                    R, rz = dS + f[..., None] * R, dz + f * rz
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def favor_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> torch.Tensor:
    """q, k [B,H,L,d] (already scaled), v [B,H,L,dv] -> [B,H,L,dv]; position t attends to s <= t."""
    return _FavorCausal.apply(q, k, v, fmap, key_padding_mask, chunk_size)[0]


def favor_causal_with_normalizer(q, k, v, fmap: FeatureMap, key_padding_mask=None, chunk_size: int = 128):
    """(out, den [B,H,L], log_scale [B,H,L]) as ``favor_bidirectional_with_normalizer``, for causal attention."""
    return _FavorCausal.apply(q, k, v, fmap, key_padding_mask, chunk_size)
