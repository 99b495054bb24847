"""Causal FAVOR attention in chunk-parallel form (the layout of flash-linear-attention's ``chunk`` kernels,
in plain PyTorch): a fixed number of batched ops whatever the length, no Python loop over the sequence.

The sequence is cut into n chunks of C positions ([B, H, n, C, ·] views). For chunk i:

* reference  c_i = max(b, max_g b_g - REF_SPREAD), b = max(M_{i-1}, f), with f the logits of the chunk's first real
  key and M_i the running per-feature maximum of the real key logits (a ``cummax`` over chunk maxima): one constant
  per feature shared by every key a query of the chunk sees (the floor keeps U below from growing until float32
  products underflow when the first key, or the running maximum, is far below the later keys in some feature);
* in-chunk   U_t = max_{s<=t} max(0, max_f(Lg_k[s, f] - c_i[f])) bounds the chunk's new keys:
             phi~(k_s) = F exp(Lg_k[s] - c_i - U_s) <= 1,  phi~(q_t) = F exp(Lg_q[t] + c_i - r_t) <= 1;
* intra      A = (phi~(Q) phi~(K)^T) ⊙ D, D[t, s] = e^{U_s - U_t} for s <= t else 0   ([n, C, C] batched);
* inter      the state entering the chunk, P_i = sum_{j<i} K_j e^{M_j - c_i} with the chunk summaries
             K_j = sum_{s in j} exp(Lg_k[s] - M_j) [v_s, 1], combined by ``scan.exclusive_prefix``;
* output     [num_t, den_t] = e^{-U_t} phi~(q_t) P_i + (A [V, 1])_t,  out_t = num_t / den_t.

Every quantity at t uses keys s <= t only, so a future key cannot move an earlier output, not even in the last
bit. Padded keys are masked before every exponential (value and gradient exactly 0, no 0 * inf). Decoding
passes the running state (S, z, c) as a summary ahead of chunk 0; the state it returns is sum_j K_j e^{M_j - M_{n-1}}
(and the incoming sums rescaled likewise), relative to the maximum over all keys M_{n-1}: every weight <= 1, which
rescaling P_{n-1} would not give (c_{n-1} can lie above M_{n-1}). With a local window the w keys before each
chunk (the previous chunk's last keys, or the decoding state's) join the intra matrix as a halo, so the window's
FAVOR estimates are a band of it (``local.combine_window``). Backward: for the positive kernels (softmax, favor++;
with or without a window) the hand-written one of ``causal_backward`` (keeps q, k, v, the output, phi~(Q) and the
inter-chunk states, recomputes the key features once); for trig/relu autograd's through these batched ops (the
scan's weights are constants, so its backward is the transposed one), and above ``common.RECOMPUTE_ABOVE`` that op
keeps only q, k, v and recomputes itself in the backward. Memory: O(L (m + C) + (L / C) m dv) per head, nothing L×L.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .common import (
    FavorState,
    bounded_exp_,
    compute_dtype,
    cpu_segment,
    empty_attention,
    finite_reference,
    mask_bias,
    masked_exp_,
    maybe_checkpoint,
    neg_big,
    no_autocast,
    pad_len,
    running_max,
    safe_den,
    times,
    weights,
    with_feature_bias,
    with_ones,
)
from .local import band, combine_window, exact_base, unband
from .scan import exclusive_prefix

REF_SPREAD = 20.0  # at most this far (in log units) below the chunk's first key's largest logit: see _causal


def in_chunk_decay(U: torch.Tensor) -> torch.Tensor:
    """D [B, H, n, C, C] with D[t, s] = e^{U_s - U_t} for s <= t, else 0, from the in-chunk bounds U [B, H, n, C]
    (non-decreasing along C; the factor that turns the products of the bounded in-chunk features into the intra-chunk matrix)."""
    # U is non-decreasing along the chunk (a cummax), so U_s - U_t <= 0 on and below the diagonal; above it
    # ``weights`` clamps the logs to 0 (no overflow) and tril_ overwrites the 1s with 0
    return weights(U[..., None, :] - U[..., :, None]).tril_()


def unbiased_references(b: torch.Tensor | None, ref: torch.Tensor, M: torch.Tensor):
    """The chunk references ref [B, H, n, m'] and running maxima M [B, H, n + 1, m'] (of the true key logits) as the
    op subtracts them from logits computed without the per-feature log weights b [*P, 1, m] (``feature_bias``, in
    the compute dtype, or None): exp(lk + b - c) = exp(lk - (c - b)). -> (keys' ref - b, queries' ref + b,
    M_{i+1} - b), each [B, H, n, 1, m'] (b folded in once, on these small tensors, not on [L, m] logits)."""
    ref_c, M_c = ref[:, :, :, None], M[:, :, 1:, None]
    if b is None:
        return ref_c, ref_c, M_c
    b5 = b.unsqueeze(-3)  # [*P, 1, 1, m]: against [B, H, n, C, m]
    return ref_c - b5, ref_c + b5, M_c - b5


def with_halo(k, v, state: FavorState | None, window: int):
    """The w keys before the sequence joined in front of k [B,H,T,d] and v [B,H,T,dv]: the decoding state's window,
    else missing (zeros, masked). -> k, v [B,H,w+T,·] and the halo's mask [B,w] bool (True = a real key)."""
    B, H, T, _ = k.shape
    w = window
    if state is not None and state.wk is not None:
        hk, hv, hm = state.wk.to(k.dtype), state.wv.to(v.dtype), state.wm > 0
        if state.wk.shape[2] < w:  # fewer than w keys seen so far: missing ones in front (no copy once it is full)
            have = state.wk.shape[2]
            hk, hv, hm = pad_len(hk, w - have, 0), pad_len(hv, w - have, 0), pad_len(hm, w - have, 0, value=False)
    else:
        hk, hv = k.new_zeros(B, H, w, k.shape[-1]), v.new_zeros(B, H, w, v.shape[-1])
        hm = torch.zeros(B, w, dtype=torch.bool, device=k.device)
    return torch.cat([hk, k], 2), torch.cat([hv, v], 2), hm


def halo_rows(x: torch.Tensor, n: int, C: int, w: int) -> torch.Tensor:
    """The w key rows before each of the n chunks: x [B, H, w + nC, ·] (key position p at row w + p) ->
    [B, H, n, w, ·], a view."""
    return x[:, :, : n * C].unflatten(2, (n, C))[:, :, :, :w]


def key_spans(x: torch.Tensor, n: int, C: int, w: int) -> torch.Tensor:
    """Every chunk's w + C key rows, its halo then its own: x [B, H, w + nC, ·] -> [B, H, n, w + C, ·] (a copy; an
    overlapping ``unfold`` view would cost autograd a slow ``unfold_backward``)."""
    return torch.cat([halo_rows(x, n, C, w), x[:, :, w:].unflatten(2, (n, C))], 3)


def halo_features(fmap: FeatureMap, kt: torch.Tensor, mx: torch.Tensor, ref_k: torch.Tensor, n: int, C: int,
                  w: int) -> torch.Tensor:
    """phi~ of each chunk's w halo keys, [B, H, n, w, m] (<= 1: they come before the chunk), from the transformed key
    rows kt [B, H, w + nC, d], their mask mx [B, w + nC] bool and the chunks' key references ref_k [B, H, n, 1, m']
    (``unbiased_references``: the logits leave out the feature bias); the forward's and the backward's."""
    lh, fh = fmap.logits(halo_rows(kt, n, C, w).flatten(2, 3), with_bias=False)  # [B, H, nw, m']
    lh, fh = lh.unflatten(2, (n, w)), None if fh is None else fh.unflatten(2, (n, w))
    keep = halo_rows(mx[:, None, :, None], n, C, w)  # [B, 1, n, w, 1]
    return times(masked_exp_(lh.sub_(ref_k), keep), fh)


def carry_window(state: FavorState, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, T: int, w: int):
    """Give ``state`` the window a later call continues from: the last w keys and values of k, v [B, H, w + T (+ any
    padding), ·] (the w keys before the sequence in front, ``with_halo``) and their mask [B, w + T (+ padding)] bool,
    kept in k's dtype. Returns ``state``."""
    state.wk, state.wv, state.wm = k[:, :, T : T + w], v[:, :, T : T + w], mask[:, T : T + w].to(k.dtype)
    return state


def _causal(q, k, v, fmap: FeatureMap, mask, chunk: int, window: int, state: FavorState | None,
            internals: dict | None = None, halo_mask: torch.Tensor | None = None, with_state: bool = True):
    """q, k [B,H,T,d], v [B,H,T,dv] in the compute dtype, mask [B,T] bool -> (out [B,H,T,dv], new FavorState, or
    None when not ``with_state``: a full pass that nothing continues skips the final sums).
    ``internals``: a dict that receives what the hand-written backward needs (``causal_backward``).
    ``halo_mask`` [B, w]: k and v already carry the w keys before the sequence in front ([B, H, w + T, ·],
    ``with_halo``) and this is their mask; when None, they are taken from ``state``."""
    B, H, T, _ = q.shape
    w, big = window, neg_big(q.dtype)
    C = max(min(chunk, T), w, 1)
    n = -(-T // C)
    P = n * C - T  # padding after the last token (masked keys; their queries' outputs are cut off)
    chunked = lambda x: x.unflatten(2, (n, C))  # [B, H, nC, ·] -> [B, H, n, C, ·]

    if w and halo_mask is None:
        k, v, halo_mask = with_halo(k, v, state, w)
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if mask is None else mask
    kx, vx, mx, qx = (pad_len(x, 0, P, value=False if x.dtype == torch.bool else 0.0) if P else x
                      for x in (k, v, real, q))
    if w:
        mx = torch.cat([halo_mask, mx], 1)
    # kx [B, H, w + nC, d], vx [B, H, w + nC, dv], mx [B, w + nC]: key position p at index w + p
    # the input transforms run once (the window's exact terms read the transformed rows too)
    qt, kt = fmap.transform(qx, True), fmap.transform(kx, False)  # [B, H, nC, d], [B, H, w + nC, d]
    # the logits without the per-feature log weights b of importance-sampled rows: b joins the per-feature
    # stabilisers instead (exp(lk + b - c) = exp(lk - (c - b))), which the op subtracts anyway
    b = fmap.feature_bias  # [*P, 1, m] (broadcasting against [B, H, n, m]) or None
    b = None if b is None else b.to(qt.dtype)
    # the chunks' own keys' logits, contiguous (their products then batch without copies); the halo's come apart
    # below: each chunk's w key rows before it, as [B, H, nw, ·] rows (w / C more projection work)
    lk, fk = fmap.logits(kt[:, :, w:], with_bias=False)  # [B, H, nC, m'], F [.., m] or None
    lk, fk, mk = chunked(lk), None if fk is None else chunked(fk), mx[:, w:].unflatten(1, (n, C))
    lq, fq = fmap.logits(qt, query=True, with_bias=False)
    lq, fq = chunked(lq), None if fq is None else chunked(fq)
    # [B, 1, n, C, 1], or None when every key is real (no masking work at all)
    keep = None if (mask is None and P == 0) else mk[:, None, :, :, None]

    # without autograd, lk and lq become the features in place
    inplace = not torch.is_grad_enabled()
    with torch.no_grad():  # stabilisers: constants of the estimator (the exact output does not depend on them)
        if keep is not None:  # dropped keys below every real one (in place: masked_exp_ zeroes them below)
            real = lk.add_(mask_bias(keep, lk.dtype)) if inplace else torch.where(keep, lk, big)
        chunk_max = (lk if keep is None else real).amax(3)  # [B, H, n, m']
        chunk_max = with_feature_bias(fmap, chunk_max)  # (rounding is monotone: still the max)
        c0 = torch.full_like(lk[:, :, 0, 0], big) if state is None else state.c.to(lk.dtype)  # [B, H, m']
        M = running_max(torch.cat([c0[:, :, None], chunk_max], 2), 2)  # [B, H, n + 1, m']
        if keep is None:
            first = lk[:, :, :, 0] if b is None else lk[:, :, :, 0] + b
        else:  # the first real key of each chunk
            idx = mk.to(torch.int8).argmax(-1)[:, None, :, None, None].expand(B, H, n, 1, lk.shape[-1])
            first = lk.gather(3, idx)[:, :, :, 0]
            first = torch.where(mk.any(-1)[:, None, :, None], first if b is None else first + b, big)
        # a reference far below the largest logit seen (the chunk's first key's, or the running maximum's, which an
        # incoming state brings) would let U grow (keys later in the chunk above it in that feature) until products
        # of small features underflow: no reference sits more than REF_SPREAD below it (still a function of keys up
        # to the chunk's first: nothing looks ahead)
        base = torch.maximum(M[:, :, :-1], first)
        ref = finite_reference(torch.maximum(base, base.amax(-1, keepdim=True) - REF_SPREAD))  # [B, H, n, m']: c_i
        ref_k, ref_q, M_k = unbiased_references(b, ref, M)  # what the logits without b are measured against
    v1 = with_ones(chunked(vx[:, :, w:]))  # [B, H, n, C, dv + 1]
    # chunk summaries relative to the running maximum (before lk may be reused in place below)
    K = times(masked_exp_(lk - M_k, keep), fk).transpose(-1, -2) @ v1  # [B, H, n, m, dv + 1]
    if w:
        phi_h = halo_features(fmap, kt, mx, ref_k, n, C, w)  # [B, H, n, w, m]
    x_k = lk.sub_(ref_k) if inplace else lk - ref_k  # [B, H, n, C, m'] (shifted further in place below)
    x_q = lq.add_(ref_q) if inplace else lq + ref_q
    with torch.no_grad():
        U = x_k.detach().amax(-1)  # [B, H, n, C]
        U = (U if keep is None else torch.where(mk[:, None], U, 0.0)).clamp_min(0).cummax(-1).values
        r = x_q.detach().amax(-1, keepdim=True)  # [B, H, n, C, 1] query row maxima
        decay = in_chunk_decay(U)  # [B, H, n, C, C]
        e_u = weights(-U)[..., None]  # [B, H, n, C, 1]

    phi_k = times(masked_exp_(x_k.sub_(U[..., None]), keep), fk)  # [B, H, n, C, m]
    phi_q = times(bounded_exp_(x_q.sub_(r)), fq)  # [B, H, n, C, m]

    # the state entering each chunk
    summed = [] if with_state else None  # receives sum_j K_j e^{M_{j+1} - M_n} (the returned state's sums)
    prefix = exclusive_prefix(K, M[:, :, 1:], ref, total=summed)  # [B, H, n, m, dv + 1]
    if state is not None:  # the decoding state is the summary ahead of chunk 0 (reference c0 <= every c_i)
        S0 = torch.cat([state.S, state.z[..., None]], -1)
        prefix = prefix + S0[:, :, None] * weights(c0[:, :, None] - ref)[..., None]

    A = (phi_q @ phi_k.transpose(-1, -2)).mul_(decay)  # [B, H, n, C, C]
    total = (phi_q @ prefix) * e_u + A @ v1  # [B, H, n, C, dv + 1]
    num, den = total[..., :-1].flatten(2, 3), total[..., -1].flatten(2, 3)  # [B, H, nC, ·]
    if w:
        A_ext = torch.cat([(phi_q @ phi_h.transpose(-1, -2)) * e_u, A], -1)  # [B, H, n, C, w + C]
        fav = band(A_ext, w + 1).flatten(2, 3)  # [B, H, nC, w + 1]: the pair (t, t - w + j) at column j
        log_scale = (r[..., 0] + U).flatten(2, 3)
        # the exact dot products of the window pairs are the same band of one [C, w + C] product per chunk (its
        # queries with its halo and own keys) as fav is of A_ext
        spans = lambda x: key_spans(x, n, C, w)  # [B, H, w + nC, ·] -> [B, H, n, w + C, ·]
        dots = band(chunked(qt) @ spans(kt).transpose(-1, -2), w + 1).flatten(2, 3)  # [B, H, nC, w + 1]
        logits = dots + exact_base(fmap, qt, log_scale)[..., None]  # [B, H, nC, w + 1]
        valid = torch.stack([mx[:, j : j + n * C] for j in range(w + 1)], -1)[:, None]

        def apply_coef(coef, start):  # start + the sum over the window of coef * v, one product per chunk
            return (unband(chunked(coef), C + w) @ spans(vx)).flatten(2, 3).add_(start)

        out = combine_window(num, den, fav, logits, valid, apply_coef, internals)
    else:
        den = safe_den(den)  # (guarded once: the backward reads it too)
        out = num / den[..., None]
    if internals is not None:  # what the backward reads: the estimator's constants, the sums, A, D and phi~(Q)
        den = safe_den(den) if w else den
        internals.update(ref=ref, M=M, U=U, r=r, prefix=prefix, den=den[:, :, :T], C=C, A=A, decay=decay, phi_q=phi_q)
    if not with_state:
        return out[:, :, :T], None
    # the state after the last chunk, relative to the running maximum M_n: every chunk summary K_j (relative to
    # M_{j+1} <= M_n) and the incoming state (c_0 <= M_n) rescaled to it directly, each weight <= 1. (Not from the
    # last chunk's incoming sums: their reference c_{n-1} lies above M_n in the features where REF_SPREAD raised it,
    # and the weight e^{c_{n-1} - M_n} > 1 that would bring them back is lost where they underflowed.)
    Mn = M[:, :, -1]  # [B, H, m'] (the largest of M_1 .. M_n: the total's reference)
    final = summed[0]  # [B, H, m, dv + 1]
    if state is not None:
        final = final + S0 * weights(c0 - Mn)[..., None]
    new = FavorState(S=final[..., :-1], z=final[..., -1], c=Mn)
    if w:
        carry_window(new, kx, vx, mx, T, w)
    return out[:, :, :T], new


def causal_attention(q, k, v, fmap: FeatureMap, key_padding_mask=None, chunk_size: int = 64, local_window: int = 0,
                     state: FavorState | None = None, with_state: bool = True
                     ) -> tuple[torch.Tensor, FavorState | None]:
    """Causal FAVOR attention (optionally from a decoding state, optionally with an exact local window).

    q, k [B,H,T,d] (already scaled), v [B,H,T,dv], any float dtype (half inputs compute in float32);
    key_padding_mask [B,T] bool (True = real) or None; chunk_size C of the chunk-parallel form (the intra-chunk
    matrices are [C, C]); local_window w >= 0 (softmax/favor++ kernels only). Returns (out [B,H,T,dv] in v's
    dtype, the FavorState after the T keys, or None when not ``with_state``: a pass that no later call continues
    skips the final sums, 5 kernels). Position t attends to s <= t (and to every key in ``state``)."""
    if (empty := empty_attention(q, k, v)) is not None:  # no tokens (or an empty batch): the state stays as it is
        return empty, state
    ct, out_dtype = compute_dtype(q.dtype), v.dtype
    B, H, T, _ = q.shape
    with no_autocast(q.device):
        if state is not None:
            state = state.to(dtype=ct, device=q.device)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        # one pass; on a CPU, long inputs go segment by segment, each starting from the state of the ones before
        seg = cpu_segment(q, T, fmap.nb_features, multiple=max(chunk_size, local_window)) or T
        outs = []
        for a in range(0, T, seg):
            cut = lambda x, a=a: x[:, :, a : a + seg]
            m = None if key_padding_mask is None else key_padding_mask[:, a : a + seg]
            keep = with_state or a + seg < T  # the next segment starts from this one's state
            if fmap.exponential and torch.is_grad_enabled():  # hand-written backward
                from .causal_backward import PositiveCausal

                S0, z0, c0 = (None, None, None) if state is None else (state.S, state.z, state.c)
                ks, vs, hm, w = cut(k), cut(v), None, local_window
                if w:  # the w keys before the segment ride in front of its keys (their gradients flow back)
                    ks, vs, hm = with_halo(ks, vs, state, w)
                out = PositiveCausal.apply(cut(q), ks, vs, S0, z0, c0, fmap, m, hm, chunk_size, w, keep)
                out, state = (out[0], FavorState(*out[1:])) if keep else (out, None)
                if w and keep:
                    t, real = out.shape[2], torch.ones_like(out[:, 0, :, 0], dtype=torch.bool) if m is None else m
                    carry_window(state, ks, vs, torch.cat([hm, real], 1), t, w)
            else:
                fn = lambda q, k, v, m=m, state=state, keep=keep: _causal(q, k, v, fmap, m, chunk_size, local_window,
                                                                          state, with_state=keep)
                out, state = maybe_checkpoint(fn, cut(q), cut(k), cut(v), size=B * H * T * fmap.nb_features)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out.to(out_dtype), state


def favor_causal(q, k, v, fmap: FeatureMap, key_padding_mask=None, chunk_size: int = 64, local_window: int = 0):
    """q, k [B,H,L,d] (already scaled), v [B,H,L,dv] -> [B,H,L,dv]; position t attends to s <= t.
    See ``causal_attention`` for the arguments."""
    return causal_attention(q, k, v, fmap, key_padding_mask, chunk_size, local_window, with_state=False)[0]
