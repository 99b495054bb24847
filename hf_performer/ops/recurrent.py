"""Recurrent decoding: advance a FavorState by one or more tokens.

The state is a layer's running sums (S: m×dv, z: m, stabiliser c: m per head), so its size does not depend on
how many tokens were seen; with a local window it also holds the last w keys and values (still a constant size).
A step is the causal chunk-parallel op started from the state (the state is the summary ahead of chunk 0), so
it equals the causal pass over the whole sequence position by position. For a given T the shapes are fixed and
there is no host synchronisation, so static caches and CUDA graphs can capture a step.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from .causal import causal_attention
from .common import FavorState


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
    return causal_attention(q, k, v, fmap, key_padding_mask, chunk_size, local_window, state)
