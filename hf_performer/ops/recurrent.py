"""Recurrent decoding: advance a FavorState by one or more tokens.

The state is a layer's running sums (S: m×dv, z: m, stabiliser c: m per head), so its size does not
depend on how many tokens were seen. A step runs the causal chunk recurrence from the given state,
so it equals the causal pass over the whole sequence position by position.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .causal import causal_scan
from .common import FavorState, compute_dtype, no_autocast


def favor_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    state: FavorState | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, FavorState]:
    """q, k [B,H,T,d] (already scaled), v [B,H,T,dv] for T new tokens -> (out [B,H,T,dv], new state)."""
    ct = compute_dtype(q.dtype)
    with no_autocast(q.device):
        if state is not None:
            state = state.to(dtype=ct, device=q.device)
        out, *_, state = causal_scan(fmap, q.to(ct), k.to(ct), v.to(ct), key_padding_mask, chunk_size, state)
    return out.to(v.dtype), state
