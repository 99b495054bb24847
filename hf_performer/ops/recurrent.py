"""Recurrent decoding: advance a FavorState by one or more tokens.

The state is a layer's running sums (S: m×dv, z: m, stabiliser c: m per head), so its size does not depend on
how many tokens were seen; with a local window it also holds the last w keys and values (still a constant size).
A step of T tokens is the causal chunk-parallel op started from the state (the state is the summary ahead of
chunk 0), so it equals the causal pass over the whole sequence position by position. A single token without a
window (every step of ``generate``) takes a short path with the same arithmetic: the running maximum grows to
c' = max(c, Lg(k)), the sums are rescaled by e^{c - c'} and the key added (arXiv:2009.14794, sec. 2.3, with the
exact stabiliser of docs/DESIGN.md), about 25 ops instead of ~150. For a given T the shapes are fixed and there is
no host synchronisation, so static caches and CUDA graphs can capture a step.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .causal import causal_attention
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
    weights,
)


def _one_token(q, k, v, fmap: FeatureMap, state: FavorState | None, mask) -> tuple[torch.Tensor, FavorState]:
    """One new token (T = 1), no window: q, k [B,H,1,d], v [B,H,1,dv], mask [B,1] bool or None."""
    ct, out_dtype = compute_dtype(q.dtype), v.dtype
    with no_autocast(q.device):
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        lk, fk = fmap(k)  # [B, H, 1, m']
        keep = None if mask is None else mask[:, None, :, None]
        B, H, _, width = lk.shape
        if state is None:
            state = FavorState.empty(B, H, fmap.nb_features, width, v.shape[-1], ct, q.device)
        else:
            state = state.to(dtype=ct, device=q.device)
        c = state.c[:, :, None, :]  # [B, H, 1, m']
        real_lk = lk if keep is None else torch.where(keep, lk, neg_big(ct))
        c_new = torch.maximum(c, real_lk)  # the running maximum of the real key logits
        decay = weights(c - c_new)  # <= 1 (1 while no real key has been seen: the sums are still 0)
        phi_k = times(masked_exp_(lk - c_new, keep), fk)  # [B, H, 1, m]
        S = state.S * decay.transpose(-1, -2) + phi_k.transpose(-1, -2) * v  # [B, H, m, dv]
        z = state.z * decay[:, :, 0] + phi_k[:, :, 0]  # [B, H, m]
        lq, fq = fmap(q, query=True)
        x_q = lq + finite_reference(c_new)
        phi_q = times(bounded_exp_(x_q.sub_(x_q.amax(-1, keepdim=True))), fq)  # [B, H, 1, m], <= 1
        num = phi_q @ S  # [B, H, 1, dv]
        den = (phi_q * z[:, :, None]).sum(-1, keepdim=True)
        out = num / safe_den(den)
    return out.to(out_dtype), FavorState(S=S, z=z, c=c_new[:, :, 0])


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
    if q.shape[2] == 1 and not local_window:
        return _one_token(q, k, v, fmap, state, key_padding_mask)
    return causal_attention(q, k, v, fmap, key_padding_mask, chunk_size, local_window, state)
