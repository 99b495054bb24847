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

Kept for the backward: q, k, v, the mask, S, c, out, T, g and e, coef [B, H, L, 2w + 1], the row maxima
r [B, H, L]; nothing [B, H, L, m] is kept between forward and backward (a model keeps per layer what it would
without the window, plus those [L, 2w + 1] terms). The backward recomputes the query features once (with the
forward's r) and the key features once with the window's neighbours; it holds the window's share of d phi~(K)
and the key features until dS is complete (then the FAVOR share joins it, and one product with phi~(K) makes it
d logits): two [B, H, L, m] tensors across CPU segments (``common.cpu_segment``, long inputs), traded for a third
key projection and exponential (at 8k tokens on a CPU, forward + backward 1.27-1.33x pure FAVOR+'s time instead of
1.38-1.40x; at 16k, 580 MiB peak instead of 467). The forward holds every segment's key logits until the global
stabiliser c is known, and frees each segment's features once its queries are done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..features import FeatureMap
from .common import (
    bounded_exp_,
    cat_len,
    finite_reference,
    first_order_only,
    fold_bias,
    mask_bias,
    masked_exp_,
    neg_big,
    safe_den,
    spans,
    weights,
    with_feature_bias,
    with_ones,
    without_autocast,
)
from .local import band_apply, exact_base, flip_band, near, rows, window_block


def _layout(a: int, b: int, block: int) -> tuple[int, int]:
    """(n, P) of the query segment a .. b - 1: its n queries padded to P = (ceil(n / block) + 1) block rows, the
    last block scratch (see ``local``); key row i holds position a - w + i."""
    n = b - a
    return n, (-(-n // block) + 1) * block


def _pad_rows(x: torch.Tensor, before: int, P: int) -> torch.Tensor:
    """[B, H, n, ·] or [B, H, n] -> P rows: ``before`` zero rows, x, zeros."""
    pad = (before, P - before - x.shape[2])
    return F.pad(x, (0, 0, *pad)) if x.dim() == 4 else F.pad(x, pad)


def _query_features(fmap: FeatureMap, qt: torch.Tensor, c: torch.Tensor, r: torch.Tensor | None = None,
                    outside: tuple[int, int] = (0, 0)):
    """(phi~(Q) [B,H,P,m], r [B,H,P,1]) for the transformed query rows qt [B,H,P,d] and the key stabiliser c
    (``FeatureMap.logits`` of the transformed rows: the transform, needed for the exact terms too, runs once).
    r: the row maxima when known (the backward has the forward's), else computed. ``outside``: how many rows at the
    start and at the end have no r (positions outside the sequence): their features are 1, finite, for products
    whose coefficients there are 0 (a placeholder r would take torch.exp's slow path, ``common.masked_exp_``)."""
    x = fmap.logits(qt, query=True, with_bias=False)[0].add_(fold_bias(fmap, c, query=True))
    r = x.amax(-1, keepdim=True) if r is None else r
    return bounded_exp_(_fill_rows_(x.sub_(r), outside, 0.0)), r


def _outside(start: int, P: int, L: int) -> tuple[int, int]:
    """How many of the P rows at positions start .. start + P - 1 lie before 0 and after L - 1."""
    return max(0, -start), max(0, start + P - L)


def _fill_rows_(x: torch.Tensor, outside: tuple[int, int], value: float) -> torch.Tensor:
    """x [B, H, P, ·] with its first ``outside[0]`` and last ``outside[1]`` rows set to ``value``, in place (slices:
    no full-size mask)."""
    before, after = outside
    if before:
        x[:, :, :before] = value
    if after:
        x[:, :, x.shape[2] - after :] = value
    return x


def _key_logits(fmap: FeatureMap, kt: torch.Tensor, real: torch.Tensor | None, start: int, L: int):
    """(Lg(K) [B,H,P,m] of the transformed key rows kt [B,H,P,d] at positions start .. start + P - 1 without the
    per-feature log weights b (``common.fold_bias``), -big where the row is not a real key, and the maximum of the
    true logits over the rows [B,H,1,m]). real [B,P] bool: the padding mask of the rows, or None (no padding: only
    rows outside 0 .. L - 1 are masked, by slices instead of a full-size mask)."""
    lk = fmap.logits(kt, with_bias=False)[0]
    if real is not None:
        lk.add_(mask_bias(real[:, None, :, None], lk.dtype))
    else:
        _fill_rows_(lk, _outside(start, kt.shape[2], L), neg_big(lk.dtype))
    return lk, with_feature_bias(fmap, lk.amax(2, keepdim=True))


def _key_features_(x: torch.Tensor, real: torch.Tensor | None, start: int, L: int) -> torch.Tensor:
    """phi~(K) = exp(x) in place for x = Lg(K) - (c - b) [B,H,P,m] (rows and logits as in ``_key_logits``; c - b:
    ``common.fold_bias``), exactly 0 on the rows that are not real keys; those rows never reach exp() with their own
    value (``common.masked_exp_``: a -big argument takes torch.exp's slow path on a CPU)."""
    if real is not None:
        return masked_exp_(x, real[:, None, :, None])
    outside = _outside(start, x.shape[2], L)
    x = bounded_exp_(_fill_rows_(x, outside, 0.0))  # those rows reach exp() as 0, not as -big
    return _fill_rows_(x, outside, 0.0)  # and their features are 0


def _recomputed_key_features(fmap: FeatureMap, kt: torch.Tensor, c_k: torch.Tensor, real: torch.Tensor | None,
                             start: int, L: int) -> torch.Tensor:
    """The backward's phi~(K) [B,H,P,m] of the transformed key rows kt [B,H,P,d] at positions start ..
    start + P - 1, from the forward's stabiliser as c_k = c - b (``common.fold_bias``); real: as in ``_key_logits``."""
    return _key_features_(fmap.logits(kt, with_bias=False)[0].sub_(c_k), real, start, L)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out [B,H,n,C] (a view) += a [B,H,n,K] @ b [B,H,K,C], in place."""
    B, H, n, C = out.shape
    out.view(B * H, n, C).baddbmm_(a.reshape(B * H, n, -1), b.reshape(B * H, b.shape[-2], C))


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
        parts = []  # per segment: key rows, which are real keys, their logits and maximum, their padding mask
        for a, b in spans(L, seg):
            n, P = _layout(a, b, block)
            kt = fmap.transform(rows(k, a - w, P), False)
            km = None if mask is None else rows(mask, a - w, P)
            lk, top = _key_logits(fmap, kt, km, a - w, L)
            parts.append((kt, rows(real, a - w, P), lk, top, km))
        c = finite_reference(parts[0][3] if len(parts) == 1 else torch.stack([p[3] for p in parts]).amax(0))
        S, c_k = 0, fold_bias(fmap, c, query=False)
        for (a, b), (_, _, lk, _, km) in zip(spans(L, seg), parts):
            phi_k = _key_features_(lk.sub_(c_k), km, a - w, L)  # in place: 0 for rows that are not real keys
            S = S + phi_k[:, :, w : w + b - a].transpose(-1, -2) @ with_ones(v[:, :, a:b])  # own keys only
        outs, saved = [], []
        for i, (a, b) in enumerate(spans(L, seg)):
            kt, rx, phi_k, _, _ = parts[i]
            parts[i] = None  # this segment's key features are not needed after its queries
            n, P = _layout(a, b, block)
            qt = fmap.transform(rows(q, a, P), True)  # rows past the segment: scratch (results dropped)
            phi_q, r = _query_features(fmap, qt, c)
            total = phi_q @ S  # [B, H, P, dv + 1]
            fav = near(phi_q, phi_k, block, w)
            del phi_q
            logits = near(qt, kt, block, w) + exact_base(fmap, qt, r[..., 0])[..., None]
            valid = F.pad(rx, (0, 2 * w), value=False).unfold(1, 2 * w + 1, 1)[:, None]  # [B, 1, P, 2w + 1]
            exact = torch.where(valid, logits, neg_big(logits.dtype))
            s = exact.amax(-1).clamp_min(0)  # [B, H, P]
            e = masked_exp_(exact.sub_(s[..., None]), valid)  # 0 where the pair is not real
            g = weights(-s)
            coef = e - g[..., None] * fav
            num = band_apply(coef, rows(v, a - w, P), block, w, out=total[..., :-1] * g[..., None])
            T = safe_den(g * (total[..., -1] - fav.sum(-1)).clamp_min(0) + e.sum(-1))
            outs.append((num / T[..., None])[:, :, :n])
            saved.append([t[:, :, :n] for t in (T, g, e, coef, r[..., 0])])
        out = cat_len(outs)
        T, g, e, coef, r = (cat_len([s[i] for s in saved]) for i in range(5))
        ctx.save_for_backward(q, k, v, mask, S, c, out, T, g, e, coef, r)
        ctx.fmap, ctx.window, ctx.seg = fmap, window, seg
        return out

    @staticmethod
    @first_order_only
    @without_autocast
    def backward(ctx, grad_out):
        q, k, v, mask, S, c, out, T, g, e, coef, r = ctx.saved_tensors
        fmap, w, seg = ctx.fmap, ctx.window, ctx.seg
        B, H, L, _ = q.shape
        block = window_block(w)
        real = torch.ones(B, L, dtype=torch.bool, device=q.device) if mask is None else mask
        dN = grad_out.to(out.dtype) / T[..., None]  # [B, H, L, dv]
        dT = -(dN * out).sum(-1)  # [B, H, L]
        dS, dq, c_k = None, [], fold_bias(fmap, c, query=False)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        parts = []
        # rows: queries at a - block + i (a scratch block first, 0 coefficients), keys at a - block - w + i, and the
        # keys' gradients at a - block + w + i (``flip_band``: the transposed products as forward-shaped ones)
        for a, b in spans(L, seg):  # queries with their key rows: dq, dS and the window's share of dk, dv
            n, P = _layout(a, b, block)
            P, s0 = P + block, a - block
            kx, qx, vx, rx = rows(k, s0 - w, P), rows(q, s0, P), rows(v, s0 - w, P), rows(real, s0 - w, P)
            qt, kt = fmap.transform(qx, True), fmap.transform(kx, False)
            pad = lambda x, a=a, b=b, P=P: _pad_rows(x[:, :, a:b], block, P)  # noqa: E731
            dNx, dTx, gx = pad(dN), pad(dT), pad(g)
            G = torch.cat([dNx, dTx[..., None]], -1).mul_(gx[..., None])  # [B, H, P, dv + 1], 0 off the segment
            # the forward's row maxima (rows outside the sequence: features 1, against coefficients 0)
            outside = _outside(s0, P, L)
            rq = F.pad(r[:, :, max(s0, 0) : s0 + P], outside)
            phi_q, _ = _query_features(fmap, qt, c, rq[..., None], outside)
            part = phi_q.transpose(-1, -2) @ G
            dS = part if dS is None else dS.add_(part)  # (one segment: no zero fill and sum)
            phi_k = _recomputed_key_features(fmap, kt, c_k, None if mask is None else rx, s0 - w, L)
            A = near(dNx, vx, block, w).add_(dTx[..., None])  # [B, H, P, 2w + 1], 0 off the segment
            dl = A * pad(e)
            dfav = A.mul_(-gx[..., None])
            d_phi = band_apply(dfav, phi_k, block, w, out=G @ S.transpose(-1, -2))
            dqt = band_apply(dl, kt, block, w).add_(dl.sum(-1, keepdim=True) * qt)
            dqx = fmap.logits_vjp(qx, d_phi.mul_(phi_q), True, xt=qt, grad_xt=dqt)
            dq.append(dqx[:, :, block : block + n])
            # share row r: the key at s0 + w + r (feature row r + 2w); d phi~(K) of the window's pairs, its product
            # with phi~(K) taken below, once with the FAVOR part
            share = band_apply(flip_band(dfav, w), phi_q, block, w, into=d_phi)  # d_phi's storage is free again
            shares = [band_apply(flip_band(x, w), y, block, w) for x, y in ((dl, qt), (pad(coef), dNx))]
            # the window's shares of d phi~(K), dk', dv, and the key features, held until dS is complete
            parts.append((kx, kt, share, *shares, phi_k))
            del phi_q, phi_k, d_phi
        dSv, dSt = dS[..., :-1], dS.transpose(-1, -2)
        for i, (a, b) in enumerate(spans(L, seg)):  # keys: the FAVOR shares added
            kx, kt, share, dkt, dvx, phi_k = parts[i]
            parts[i] = None
            n, s0, R = b - a, a - block, kx.shape[2] - 2 * w
            own = slice(block - w, block - w + n)  # share rows of the segment's keys
            share = share[:, :, :R]  # d phi~(K) of the R key rows this segment's queries reach
            phi = phi_k[:, :, 2 * w :]  # the key features of the share rows (the first pass's)
            _add_product(share[:, :, own], with_ones(v[:, :, a:b]), dSt)  # + [v, 1] dS^T for the own keys
            d_logits = share.mul_(phi)
            _add_product(dvx[:, :, own], phi[:, :, own], dSv)
            dkx = fmap.logits_vjp(kx[:, :, 2 * w :], d_logits, xt=kt[:, :, 2 * w :], grad_xt=dkt[:, :, :R])
            lo, hi = max(s0 + w, 0), min(s0 + w + R, L)  # rows -> positions, the overlaps added
            dk[:, :, lo:hi] += dkx[:, :, lo - s0 - w : hi - s0 - w]
            dv[:, :, lo:hi] += dvx[:, :, lo - s0 - w : hi - s0 - w]
        return cat_len(dq), dk, dv, None, None, None, None
