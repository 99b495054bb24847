"""Recurrent decoding: advance a FavorState by one or more tokens.

The state is a layer's running sums (S: m×dv, z: m, stabiliser c: m per head), so its size does not
depend on how many tokens were seen. A step runs the causal chunk recurrence from the given state,
so it equals the causal pass over the whole sequence position by position. With local-window attention
the state also holds the last w keys and values (still a constant size): the new queries take their
window exactly from those and the new keys.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..features import FeatureMap
from .causal import causal_scan
from .common import FavorState, compute_dtype, no_autocast
from .local import local_window_attention


def favor_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmap: FeatureMap,
    state: FavorState | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
    local_window: int = 0,
) -> tuple[torch.Tensor, FavorState]:
    """q, k [B,H,T,d] (already scaled), v [B,H,T,dv] for T new tokens -> (out [B,H,T,dv], new state)."""
    ct = compute_dtype(q.dtype)
    with no_autocast(q.device):
        if state is not None:
            state = state.to(dtype=ct, device=q.device)
        qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
        out, den, r, U, _, new = causal_scan(fmap, qc, kc, vc, key_padding_mask, chunk_size, state)
        if local_window:
            B, T = q.shape[0], q.shape[2]
            mask = torch.ones(B, T, dtype=ct, device=q.device) if key_padding_mask is None else key_padding_mask.to(ct)
            if state is not None and state.wk is not None:
                kc, vc, mask = torch.cat([state.wk, kc], 2), torch.cat([state.wv, vc], 2), torch.cat([state.wm, mask], 1)
            out = local_window_attention(out, den, r + U, qc, kc, vc, fmap, mask > 0, local_window, True, chunk_size,
                                         key_offset=kc.shape[2] - T)
            new = replace(new, wk=kc[:, :, -local_window:], wv=vc[:, :, -local_window:], wm=mask[:, -local_window:])
    return out.to(v.dtype), new
