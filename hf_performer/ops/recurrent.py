"""Recurrent decoding: advance a FavorState by one or more tokens.

The state is a layer's running sums (S: m×dv, z: m, stabiliser c: m per head), so its size does not depend on
how many tokens were seen; with a local window it also holds the last w keys and values (still a constant size).
A step of T tokens is the causal chunk-parallel op started from the state (the state is the summary ahead of
chunk 0), so it equals the causal pass over the whole sequence position by position. A single token (every step
of ``generate``) takes a short path with the same arithmetic: the running maximum grows to c' = max(c, Lg(k)), the
sums are rescaled by e^{c - c'} and the key added (arXiv:2009.14794, sec. 2.3, with the exact stabiliser of
docs/DESIGN.md); with a window, the state's last w keys and the new one get their exact terms in place of FAVOR's
estimates (``local.combine_window``). A calibrated layer launches 29 kernels per step that way (62 with a window of
4, against 154 through the chunked op; with a padding mask, as ``generate`` passes, 34 and 64). For a given T the shapes are fixed and there is no host synchronisation, so
static caches and CUDA graphs can capture a step.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .causal import carry_window, causal_attention, with_halo
from .common import (
    FavorState,
    bounded_exp_,
    compute_dtype,
    finite_reference,
    masked_exp_,
    neg_big,
    no_autocast,
    safe_den,
    times,
)
from .local import combine_window, exact_base


def _window_rows(k, v, state: FavorState | None, w: int, new_real: torch.Tensor):
    """The window of a one-token step: the state's last w keys and values with the new one last, k [B,H,w+1,d], v
    [B,H,w+1,dv], and which of them are real keys as factors [B, w+1] (1.0 = real, in k's dtype; ``new_real``
    [B, 1]: the new key's). Once w keys have been seen (every later step): the state's rows and its float mask
    joined as they are (no conversions); before, ``causal.with_halo`` supplies the missing ones."""
    if state is None or state.wk is None or state.wk.shape[2] < w:
        k, v, halo = with_halo(k, v, state, w)
        return k, v, torch.cat([halo.to(k.dtype), new_real], 1)
    join = lambda old, new: torch.cat([old.to(new.dtype), new], -2 if new.dim() == 4 else 1)  # noqa: E731
    return join(state.wk, k), join(state.wv, v), join(state.wm, new_real)


def _one_token(q, k, v, fmap: FeatureMap, state: FavorState | None, mask, window: int = 0
               ) -> tuple[torch.Tensor, FavorState]:
    """One new token (T = 1): q, k [B,H,1,d], v [B,H,1,dv], mask [B,1] bool or None. With a local window w the
    state's last w keys and the new one (``_window_rows``) are the window: their FAVOR estimates are taken out
    of the sums' and their exact terms put in (``local.combine_window``), in the scale of the sums (keys relative to
    the running maximum c', which bounds the window's keys too: they were seen before or are the new one).
    Written for few kernels (each is a launch on a GPU, where decoding is launch-bound): the new key's features
    are the window's last row, sums grow by fused multiply-adds, and the masks stay 1.0 / 0.0 factors."""
    ct, out_dtype = compute_dtype(q.dtype), v.dtype
    w = window
    with no_autocast(q.device):
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        keep = None if mask is None else mask[:, None, :, None]  # [B, 1, 1, 1]
        if w:  # the window's keys, the new one last: [B, H, w + 1, ·], one projection for all of them
            real = torch.ones_like(k[:, 0, :, 0]) if mask is None else mask.to(ct)  # [B, 1]
            k, v, factors = _window_rows(k, v, state, w, real)
        kt = fmap.transform(k, False)
        lk_all, fk_all = fmap.logits(kt)  # [B, H, 1 or w + 1, m']
        lk = lk_all[:, :, -1:]  # the new key
        B, H, _, width = lk.shape
        if state is None:
            state = FavorState.empty(B, H, fmap.nb_features, width, v.shape[-1], ct, q.device)
        else:
            state = state.to(dtype=ct, device=q.device)
        c = state.c[:, :, None, :]  # [B, H, 1, m']
        # the running maximum, a constant of the estimator (as in the chunked op, which takes a state's c as one: a
        # gradient through it would cancel only within this step, not in a chunked step that continues the state)
        top = lk.detach()
        c_new = torch.maximum(c, top if keep is None else torch.where(keep, top, neg_big(ct)))
        decay = bounded_exp_(c - c_new)  # <= 1 (1 while no real key has been seen: the sums are still 0)
        ref = finite_reference(c_new)  # = c_new once a real key has been seen
        if w:  # the window's features (0 for keys that are not real), the new key's among them
            phi_w = times(masked_exp_(lk_all - ref, factors[:, None, :, None]), fk_all)  # [B, H, w + 1, m]
            phi_k = phi_w[:, :, -1:]
        else:
            phi_k = times(masked_exp_(lk - c_new, keep), None if fk_all is None else fk_all[:, :, -1:])  # [B,H,1,m]
        S = (state.S * decay.transpose(-1, -2)).addcmul_(phi_k.transpose(-1, -2), v[:, :, -1:])  # [B, H, m, dv]
        z = torch.addcmul(phi_k[:, :, 0], state.z, decay[:, :, 0])  # [B, H, m]
        qt = fmap.transform(q, True)
        lq, fq = fmap.logits(qt, query=True)
        x_q = lq + ref
        r = x_q.detach().amax(-1, keepdim=True)  # [B, H, 1, 1]: a constant (cancels in the ratio, as in the chunked op)
        phi_q = times(bounded_exp_(x_q.sub_(r)), fq)  # [B, H, 1, m], <= 1
        num = phi_q @ S  # [B, H, 1, dv]
        den = (phi_q @ z[..., None])[..., 0]  # [B, H, 1]
        new = FavorState(S=S, z=z, c=c_new[:, :, 0])
        if not w:
            return (num / safe_den(den)[..., None]).to(out_dtype), new
        fav = phi_q @ phi_w.transpose(-1, -2)  # [B, H, 1, w + 1]: FAVOR's estimates of the window's pairs
        # the exact terms' logits and the window's values: batched products with their additions fused (baddbmm)
        flat = lambda x: x.flatten(0, 1)  # noqa: E731  [B, H, ·, ·] -> [B·H, ·, ·]
        base = exact_base(fmap, qt, r[..., 0])[..., None]  # [B, H, 1, 1]
        logits = torch.baddbmm(flat(base), flat(qt), flat(kt).transpose(-1, -2)).unflatten(0, (B, H))  # [B,H,1,w+1]
        apply = lambda coef, start: torch.baddbmm(flat(start), flat(coef), flat(v)).unflatten(0, (B, H))  # noqa: E731
        f = factors[:, None, None, :]  # [B, 1, 1, w + 1]
        out = combine_window(num, den, fav, logits, f > 0, apply, factor=f)
        return out.to(out_dtype), carry_window(new, k, v, factors, 1, w)


def favor_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    state: FavorState | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    local_window: int = 0,
) -> tuple[torch.Tensor, FavorState]:
    """q, k [B,H,T,d] (already scaled), v [B,H,T,dv] for T new tokens, the state after the earlier tokens (None at
    the start), key_padding_mask [B,T] bool (True = real) -> (out [B,H,T,dv], the new state)."""
    if q.shape[2] == 1:
        return _one_token(q, k, v, fmap, state, key_padding_mask, local_window)
    return causal_attention(q, k, v, fmap, key_padding_mask, chunk_size, local_window, state)
