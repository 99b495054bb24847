"""Bidirectional FAVOR with the exact local window, for the positive kernels (softmax, favor++), with a hand-written
backward.

    out_i = (sum_{|i-j|<=w} exp(q'_i.k'_j) v_j + sum_{|i-j|>w} phi(q_i).phi(k_j) v_j) / (the same with v_j = 1)

In the op's scale (see ``bidirectional``: phi~(k) = exp(Lg(k) - c), phi~(q) = exp(Lg(q) + c - r)), with
[num, den] = phi~(Q) S over all keys, fav_ij = phi~(q_i).phi~(k_j) FAVOR's estimate of a window pair and
l_ij = q'_i.k'_j + base_i the log of its exact term (``local.exact_base``), per query row i and window column j:

    s_i = max(0, max_j l_ij),  g_i = e^{-s_i},  e_ij = e^{l_ij - s_i} (0 for padded / missing keys),
    coef_ij = e_ij - g_i fav_ij,  N_i = g_i num_i + sum_j coef_ij v_j,  T_i = g_i (den_i - sum_j fav_ij) + sum_j e_ij,
    out_i = N_i / T_i.

Backward, with dN_i = dout_i / T_i, dT_i = -(dN_i . out_i), G_i = g_i [dN_i, dT_i], A_ij = dN_i . v_j + dT_i:
    dl_ij = A_ij e_ij,  dfav_ij = -g_i A_ij,  dS = phi~(Q)^T G,  dv_j += sum_i coef_ij dN_i,
    dphi~(q_i) = G_i S^T + sum_j dfav_ij phi~(k_j),   dphi~(k_j) = [v_j, 1] dS^T + sum_i dfav_ij phi~(q_i),
    dq'_i = sum_j dl_ij k'_j + (sum_j dl_ij) q'_i  (base_i carries |q'_i|^2 / 2),   dk'_j = sum_i dl_ij q'_i,
and d logits = dphi~ * phi~ to q and k through ``FeatureMap.logits_vjp`` (s, g, r, c are constants of the estimator).
Every window product is banded (``local.near``, ``band_apply``, ``band_apply_t``: blocks of queries against
their key spans, a fixed number of batched ops), nothing L x L.

Kept for the backward: q, k, v, the mask, S, c, out, T, g and e, coef [B, H, L, 2w + 1]; the features are
recomputed one segment at a time. On a CPU a long input runs over segments (``common.cpu_segment``); the forward
then holds every segment's key features until the global stabiliser c is known (one [B, H, L, m] in all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..features import FeatureMap
from .common import cat_len, finite_reference, masked_exp_, neg_big, safe_den, spans, with_ones
from .local import band_apply, band_apply_t, exact_base, near, rows, window_block


def _layout(a: int, b: int, block: int, window: int) -> tuple[int, int]:
    """(n, P) of the query segment a .. b - 1: its n queries padded to P = (ceil(n / block) + 1) block rows, the
    last block scratch (see ``local``); key row i holds position a - w + i."""
    n = b - a
    return n, (-(-n // block) + 1) * block


def _pad_rows(x: torch.Tensor, P: int) -> torch.Tensor:
    """[B, H, n, ·] or [B, H, n] -> P rows, zero past n."""
    pad = P - x.shape[2]
    return F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))


def _transform_vjp(fmap: FeatureMap, x: torch.Tensor, grad: torch.Tensor, query: bool) -> torch.Tensor:
    """The gradient reaching x [..., d] from ``grad`` of ``fmap.transform(x, query)`` (a per-dimension scale)."""
    scale = fmap.q_scale if query else fmap.k_scale
    if scale is not None:
        grad = grad * scale.to(grad.dtype)
    return grad.sum_to_size(x.shape) if grad.shape != x.shape else grad


def _query_features(fmap: FeatureMap, qx: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi~(Q) [B,H,P,m], r [B,H,P,1]) for the padded queries qx [B,H,P,d] and the key stabiliser c."""
    x = fmap(qx, query=True)[0].add_(c)
    r = x.amax(-1, keepdim=True)
    return x.sub_(r).exp_(), r


def _key_features(fmap: FeatureMap, kx: torch.Tensor, real: torch.Tensor, c: torch.Tensor | None):
    """(phi~(K) [B,H,P,m], c, top) for the key rows kx [B,H,P,d] and their mask real [B,P]; c None: the stabiliser
    of these rows (their real keys' maximum logit ``top``, [B,H,1,m], 0 without a real key)."""
    keep = real[:, None, :, None]
    lk = fmap(kx)[0]
    top = None
    if c is None:
        top = torch.where(keep, lk, neg_big(lk.dtype)).amax(2, keepdim=True)
        c = finite_reference(top)
    return masked_exp_(lk.sub_(c), keep), c, top


class PositiveWindow(torch.autograd.Function):
    """Bidirectional FAVOR of a positive kernel with the exact local window w >= 1 (self-attention: Lq = Lk),
    forward and hand-written backward as in the module docstring. Inputs q, k [B,H,L,d], v [B,H,L,dv] in the
    compute dtype, mask [B,L] bool or None, seg: positions per segment (CPU) or None. Returns [B,H,L,dv]; padded
    keys contribute exactly 0 to the output and get exactly 0 gradient."""

    @staticmethod
    def forward(ctx, q, k, v, fmap: FeatureMap, mask, window: int, seg):
        B, H, L, _ = q.shape
        w, block = window, window_block(window)
        real = torch.ones(B, L, dtype=torch.bool, device=q.device) if mask is None else mask
        parts = []  # per segment: key rows, their mask, features (in the segment's stabiliser), c_j, top_j, S_j
        for a, b in spans(L, seg):
            n, P = _layout(a, b, block, w)
            kx, rx = rows(k, a - w, P), rows(real, a - w, P)
            phi_k, c_j, top = _key_features(fmap, kx, rx, None)
            own = phi_k[:, :, w : w + n]  # the segment's own keys (the others belong to its neighbours' sums)
            parts.append([kx, rx, phi_k, c_j, top, own.transpose(-1, -2) @ with_ones(v[:, :, a:b])])
        if len(parts) == 1:
            c, S = parts[0][3], parts[0][5]
        else:  # (S_1, c_1) (+) (S_2, c_2) = (S_1 e^{c_1 - c} + S_2 e^{c_2 - c}, c = max): exact
            c = finite_reference(torch.stack([p[4] for p in parts]).amax(0))
            S = 0
            for p in parts:
                f = torch.exp((p[3] - c).clamp_max(0))  # [B, H, 1, m] <= 1
                S = S + p[5] * f.transpose(-1, -2)
                p[2].mul_(f)  # the key features in the common scale
        outs, saved = [], []
        for (a, b), (kx, rx, phi_k, *_) in zip(spans(L, seg), parts):
            n, P = _layout(a, b, block, w)
            qx = _pad_rows(q[:, :, a:b], P)
            phi_q, r = _query_features(fmap, qx, c)
            total = phi_q @ S  # [B, H, P, dv + 1]
            fav = near(phi_q, phi_k, block, w)
            del phi_q
            qt = fmap.transform(qx, True)
            logits = near(qt, fmap.transform(kx, False), block, w) + exact_base(fmap, qt, r[..., 0])[..., None]
            valid = F.pad(rx, (0, 2 * w), value=False).unfold(1, 2 * w + 1, 1)[:, None]  # [B, 1, P, 2w + 1]
            exact = torch.where(valid, logits, neg_big(logits.dtype))
            s = exact.amax(-1).clamp_min(0)  # [B, H, P]
            e = torch.exp(exact - s[..., None])
            g = torch.exp(-s)
            coef = e - g[..., None] * fav
            num = band_apply(coef, rows(v, a - w, P), block, w, out=total[..., :-1] * g[..., None])
            T = safe_den(g * (total[..., -1] - fav.sum(-1)).clamp_min(0) + e.sum(-1))
            outs.append((num / T[..., None])[:, :, :n])
            saved.append([t[:, :, :n] for t in (T, g, e, coef)])
        out = cat_len(outs)
        T, g, e, coef = (cat_len([s[i] for s in saved]) for i in range(4))
        ctx.save_for_backward(q, k, v, mask, S, c, out, T, g, e, coef)
        ctx.fmap, ctx.window, ctx.seg = fmap, window, seg
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, S, c, out, T, g, e, coef = ctx.saved_tensors
        fmap, w, seg = ctx.fmap, ctx.window, ctx.seg
        B, H, L, _ = q.shape
        block = window_block(w)
        real = torch.ones(B, L, dtype=torch.bool, device=q.device) if mask is None else mask
        dN = grad_out.to(out.dtype) / T[..., None]  # [B, H, L, dv]
        dT = -(dN * out).sum(-1)  # [B, H, L]
        dS, dq = torch.zeros_like(S), []
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for a, b in spans(L, seg):  # queries with their key rows: dq, dS and the window's share of dk, dv
            n, P = _layout(a, b, block, w)
            kx, vx, rx = rows(k, a - w, P), rows(v, a - w, P), rows(real, a - w, P)
            qx = _pad_rows(q[:, :, a:b], P)
            dNx, dTx, gx = _pad_rows(dN[:, :, a:b], P), _pad_rows(dT[:, :, a:b], P), _pad_rows(g[:, :, a:b], P)
            G = torch.cat([dNx, dTx[..., None]], -1).mul_(gx[..., None])  # [B, H, P, dv + 1], 0 past n
            phi_q, _ = _query_features(fmap, qx, c)
            dS += phi_q.transpose(-1, -2) @ G
            phi_k = _key_features(fmap, kx, rx, c)[0]
            A = near(dNx, vx, block, w).add_(dTx[..., None])  # [B, H, P, 2w + 1], 0 past n
            dl = A * _pad_rows(e[:, :, a:b], P)
            dfav = A.mul_(-gx[..., None])
            d_phi = band_apply(dfav, phi_k, block, w, out=G @ S.transpose(-1, -2))
            qt, kt = fmap.transform(qx, True), fmap.transform(kx, False)
            dqt = band_apply(dl, kt, block, w).add_(dl.sum(-1, keepdim=True) * qt)
            dqx = fmap.logits_vjp(qx, d_phi.mul_(phi_q), query=True) + _transform_vjp(fmap, qx, dqt, True)
            dq.append(dqx[:, :, :n])
            d_phi = band_apply_t(dfav, phi_q, block, w).mul_(phi_k)  # the window's share, key rows
            del phi_q, phi_k
            dkx = fmap.logits_vjp(kx, d_phi) + _transform_vjp(fmap, kx, band_apply_t(dl, qt, block, w), False)
            dvx = band_apply_t(_pad_rows(coef[:, :, a:b], P), dNx, block, w)
            lo, hi = max(a - w, 0), min(a - w + P, L)  # key rows -> positions, the overlaps added
            dk[:, :, lo:hi] += dkx[:, :, lo - a + w : hi - a + w]
            dv[:, :, lo:hi] += dvx[:, :, lo - a + w : hi - a + w]
        for a, b in spans(L, seg):  # keys: the FAVOR share of dk, dv
            phi_k = _key_features(fmap, k[:, :, a:b], real[:, a:b], c)[0]
            dv[:, :, a:b] += phi_k @ dS[..., :-1]
            d_phi = v[:, :, a:b] @ dS[..., :-1].transpose(-1, -2)
            d_phi += dS[..., -1][:, :, None, :]
            dk[:, :, a:b] += fmap.logits_vjp(k[:, :, a:b], d_phi.mul_(phi_k))
        return cat_len(dq), dk, dv, None, None, None, None
