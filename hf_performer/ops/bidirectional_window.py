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
and d logits = dphi~ * phi~ to q and k (``FeatureMap.logits_vjp``'s arithmetic); s, g, r, c are constants of the
estimator, and the forward's clamp of den_i - sum_j fav_ij at 0 (a guard against rounding) is differentiated as
the identity.
Every window product is banded (``local.near``, ``band_apply``: blocks of queries against overlapping views of
their key spans; the transposed ones through ``local.flip_band``), a fixed number of batched ops, nothing L x L.

Kept for the backward: q, k, v, the mask, S, c, out, T, g and e, coef [B, H, L, 2w + 1], and the query features
phi~(Q) (one [B, H, L, m] tensor, per segment on its rows of ``_layout``: traded for a second query projection and
exponential, and it lets dS be complete before any key needs it); the backward computes the key features once
(each segment's rows with the window's neighbours). On a CPU a long input runs over segments
(``common.cpu_segment``); the forward then holds every segment's key logits until the global stabiliser c is
known, and frees each segment's key features once its queries are done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..features import FeatureMap
from .common import cat_len, finite_reference, neg_big, safe_den, spans, with_ones
from .local import band_apply, exact_base, flip_band, near, rows, window_block


def _layout(a: int, b: int, block: int) -> tuple[int, int, int]:
    """(n, s0, P) of the query segment a .. b - 1, laid out on P rows from position s0 = a - block: a scratch block
    first (0 coefficients; it lets the transposed products of ``flip_band`` reach the w keys before a), the n
    queries, then scratch rows up to a multiple of the block plus a last scratch block (see ``local``). Query row i
    holds position s0 + i, key row i position s0 - w + i, and key-gradient row i (the transposed products) the
    key at s0 + w + i. The forward and the backward share this layout, so the backward reads the forward's
    phi~(Q) of every segment as it is."""
    n = b - a
    return n, a - block, (-(-n // block) + 2) * block


def _pad_rows(x: torch.Tensor, before: int, P: int) -> torch.Tensor:
    """[B, H, n, ·] or [B, H, n] -> P rows: ``before`` zero rows, x, zeros."""
    pad = (before, P - before - x.shape[2])
    return F.pad(x, (0, 0, *pad)) if x.dim() == 4 else F.pad(x, pad)


def _query_features(fmap: FeatureMap, qt: torch.Tensor, c: torch.Tensor):
    """(phi~(Q) [B,H,P,m], r [B,H,P,1]) for the transformed query rows qt [B,H,P,d] and the key stabiliser c
    (``FeatureMap.logits`` of the transformed rows: the transform, needed for the exact terms too, runs once),
    r the row maxima."""
    x = fmap.logits(qt, query=True)[0].add_(c)
    r = x.amax(-1, keepdim=True)
    return x.sub_(r).exp_(), r


def _key_logits(fmap: FeatureMap, kt: torch.Tensor, real: torch.Tensor | None, start: int, L: int, top: bool = True):
    """(Lg(K) [B,H,P,m] of the transformed key rows kt [B,H,P,d] at positions start .. start + P - 1, -big where
    the row is not a real key, and its maximum over the rows [B,H,1,m], or None when not ``top``: the backward
    knows c). real [B,P] bool: the padding mask of the rows, or None (no padding: only rows outside 0 .. L - 1
    are masked, by slices instead of a full-size mask)."""
    lk = fmap.logits(kt)[0]
    big = neg_big(lk.dtype)
    if real is not None:
        lk.masked_fill_(~real[:, None, :, None], big)
    else:
        before, after = max(0, -start), max(0, start + kt.shape[2] - L)
        if before:
            lk[:, :, :before] = big
        if after:
            lk[:, :, kt.shape[2] - after :] = big
    return lk, lk.amax(2, keepdim=True) if top else None


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out [B,H,n,C] (a view) += a [B,H,n,K] @ b [B,H,K,C], in place."""
    B, H, n, C = out.shape
    out.view(B * H, n, C).baddbmm_(a.reshape(B * H, n, -1), b.reshape(B * H, b.shape[-2], C))


class PositiveWindow(torch.autograd.Function):
    """Bidirectional FAVOR of a positive kernel with the exact local window w >= 1 (self-attention: Lq = Lk),
    forward and hand-written backward as in the module docstring. Inputs q, k [B,H,L,d], v [B,H,L,dv] in the
    compute dtype, mask [B,L] bool or None, seg: positions per segment (CPU) or None, keep: whether a backward
    will run (then the forward keeps phi~(Q) for it; False under no_grad or without inputs that need gradients).
    Returns [B,H,L,dv]; padded keys contribute exactly 0 to the output and get exactly 0 gradient."""

    @staticmethod
    def forward(ctx, q, k, v, fmap: FeatureMap, mask, window: int, seg, keep: bool = True):
        B, H, L, _ = q.shape
        w, block = window, window_block(window)
        real = torch.ones(B, L, dtype=torch.bool, device=q.device) if mask is None else mask
        parts = []  # per segment: key rows, their mask, their logits
        for a, b in spans(L, seg):
            n, s0, P = _layout(a, b, block)
            kt = fmap.transform(rows(k, s0 - w, P), False)
            lk, top = _key_logits(fmap, kt, None if mask is None else rows(mask, s0 - w, P), s0 - w, L)
            parts.append((kt, rows(real, s0 - w, P), lk, top))
        c = finite_reference(parts[0][3] if len(parts) == 1 else torch.stack([p[3] for p in parts]).amax(0))
        S = 0
        for (a, b), (_, _, lk, _) in zip(spans(L, seg), parts):
            phi_k = lk.sub_(c).exp_()  # in place: the key features, 0 for rows that are not real keys
            own = phi_k[:, :, block + w : block + w + b - a]  # the segment's own keys
            S = S + own.transpose(-1, -2) @ with_ones(v[:, :, a:b])
        outs, saved, kept_q = [], [], []
        for i, (a, b) in enumerate(spans(L, seg)):
            kt, rx, phi_k, _ = parts[i]
            parts[i] = None  # this segment's key features are not needed after its queries
            n, s0, P = _layout(a, b, block)
            qt = fmap.transform(rows(q, s0, P), True)  # rows off the segment: scratch (results dropped)
            phi_q, r = _query_features(fmap, qt, c)
            total = phi_q @ S  # [B, H, P, dv + 1]
            fav = near(phi_q, phi_k, block, w)
            if keep:  # for the backward, which runs on the same rows
                kept_q.append(phi_q)
            del phi_q, phi_k
            logits = near(qt, kt, block, w) + exact_base(fmap, qt, r[..., 0])[..., None]
            valid = F.pad(rx, (0, 2 * w), value=False).unfold(1, 2 * w + 1, 1)[:, None]  # [B, 1, P, 2w + 1]
            exact = torch.where(valid, logits, neg_big(logits.dtype))
            s = exact.amax(-1).clamp_min(0)  # [B, H, P]
            e = torch.exp(exact - s[..., None])
            g = torch.exp(-s)
            coef = e - g[..., None] * fav
            num = band_apply(coef, rows(v, s0 - w, P), block, w, out=total[..., :-1] * g[..., None])
            T = safe_den(g * (total[..., -1] - fav.sum(-1)).clamp_min(0) + e.sum(-1))
            outs.append((num / T[..., None])[:, :, block : block + n])
            saved.append([t[:, :, block : block + n] for t in (T, g, e, coef)])
        out = cat_len(outs)
        T, g, e, coef = (cat_len([s[i] for s in saved]) for i in range(4))
        ctx.save_for_backward(q, k, v, mask, S, c, out, T, g, e, coef, *kept_q)
        ctx.fmap, ctx.window, ctx.seg = fmap, window, seg
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, S, c, out, T, g, e, coef, *kept_q = ctx.saved_tensors
        fmap, w, seg = ctx.fmap, ctx.window, ctx.seg
        B, H, L, _ = q.shape
        if len(kept_q) != len(spans(L, seg)):
            raise RuntimeError("PositiveWindow: the forward ran with keep=False and kept no query features")
        block = window_block(w)
        real = torch.ones(B, L, dtype=torch.bool, device=q.device) if mask is None else mask
        dN = grad_out.to(out.dtype) / T[..., None]  # [B, H, L, dv]
        dT = -(dN * out).sum(-1)  # [B, H, L]
        G = torch.cat([dN, dT[..., None]], -1).mul_(g[..., None])  # [B, H, L, dv + 1]
        dS = 0  # complete before any key needs it: the queries' features are the forward's
        for (a, b), phi_q in zip(spans(L, seg), kept_q):
            dS = dS + phi_q[:, :, block : block + b - a].transpose(-1, -2) @ G[:, :, a:b]
        dSv, dSt = dS[..., :-1], dS.transpose(-1, -2)
        dk, dv, dq = torch.zeros_like(k), torch.zeros_like(v), []
        for (a, b), phi_q in zip(spans(L, seg), kept_q):  # rows as in ``_layout``
            n, s0, P = _layout(a, b, block)
            kx, qx, vx, rx = rows(k, s0 - w, P), rows(q, s0, P), rows(v, s0 - w, P), rows(real, s0 - w, P)
            qt, kt = fmap.transform(qx, True), fmap.transform(kx, False)
            pad = lambda x, a=a, b=b, P=P: _pad_rows(x[:, :, a:b], block, P)  # noqa: E731
            dNx, dTx, gx = pad(dN), pad(dT), pad(g)
            phi_k = _key_logits(fmap, kt, None if mask is None else rx, s0 - w, L, top=False)[0].sub_(c).exp_()
            A = near(dNx, vx, block, w).add_(dTx[..., None])  # [B, H, P, 2w + 1], 0 off the segment
            dl = A * pad(e)
            dfav = A.mul_(-gx[..., None])
            d_phi = band_apply(dfav, phi_k, block, w, out=pad(G) @ S.transpose(-1, -2))
            dqt = band_apply(dl, kt, block, w).add_(dl.sum(-1, keepdim=True) * qt)
            dqx = fmap.logits_vjp(qx, d_phi.mul_(phi_q), True, xt=qt, grad_xt=dqt)
            dq.append(dqx[:, :, block : block + n])
            R = P - 2 * w  # key-gradient rows: row r is the key at s0 + w + r, key feature row r + 2w
            own = slice(block - w, block - w + n)  # key-gradient rows of the segment's own keys
            # d logits(K): the window's share (the transposed band; d_phi's storage reused), the FAVOR one for own keys
            d_logits = band_apply(flip_band(dfav, w), phi_q, block, w, into=d_phi)[:, :, :R]
            d_logits[:, :, own] += with_ones(v[:, :, a:b]) @ dSt  # [v, 1] dS^T
            d_logits.mul_(phi_k[:, :, 2 * w :])
            dkt, dvx = (band_apply(flip_band(x, w), y, block, w) for x, y in ((dl, qt), (pad(coef), dNx)))
            _add_product(dvx[:, :, own], phi_k[:, :, block + w : block + w + n], dSv)
            dkx = fmap.logits_vjp(kx[:, :, 2 * w :], d_logits, xt=kt[:, :, 2 * w :], grad_xt=dkt[:, :, :R])
            del phi_k, d_phi, d_logits
            lo, hi = max(s0 + w, 0), min(s0 + w + R, L)  # rows -> positions, the overlaps added
            dk[:, :, lo:hi] += dkx[:, :, lo - s0 - w : hi - s0 - w]
            dv[:, :, lo:hi] += dvx[:, :, lo - s0 - w : hi - s0 - w]
        return cat_len(dq), dk, dv, None, None, None, None, None
