"""Grouped-query attention (GQA) on FAVOR+: query heads folded onto their key/value head.

In a GQA layer ``H = Hkv · G`` query heads share ``Hkv`` key/value heads; transformers maps query head ``h`` to
key/value head ``h // G`` (``repeat_kv``). FAVOR+'s key-side work (the features of the keys and the running sums of
decoding) belongs to the key/value head, so a GQA layer's ``FavorAttention`` is built with ``num_heads = Hkv``
(statistics and aligned features per key/value head) and the G query heads of a group are folded into the batch:

    q [B, Hkv·G, L, d] -> [B·G, Hkv, L, d]      k, v [B, Hkv, L, ·] -> repeated to [B·G, Hkv, L, ·]

The full-sequence op then sees equal head counts (the key/value copies are what ``repeat_kv`` makes for eager / SDPA
attention too). Decoding keeps ONE running FAVOR state per key/value head (``FavorCacheLayer.step``): the stored state
is [B, Hkv, m, dv]; during a step it is repeated over the G rows of the fold and the new state is read back from one
of them (every row of a group holds the same keys, hence bit-identical sums). The ideal op would take q with G·Hkv
heads and k, v with Hkv heads directly and update the state once per key/value head.
"""

from __future__ import annotations

import torch


def query_groups(query: torch.Tensor, key: torch.Tensor) -> int:
    """G = query heads per key/value head (1 without GQA). Raises ValueError when they do not divide."""
    hq, hkv = query.shape[1], key.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} key/value heads evenly (grouped-query attention).")
    return hq // hkv


def fold_groups(q, k, v, mask, groups: int):
    """q [B, Hkv·G, Lq, d], k [B, Hkv, Lk, d], v [B, Hkv, Lk, dv], mask [B, Lk] or None ->
    q [B·G, Hkv, Lq, d], k [B·G, Hkv, Lk, d], v [B·G, Hkv, Lk, dv], mask [B·G, Lk] (row b·G + g: batch b, group g)."""
    if groups == 1:
        return q, k, v, mask
    B, H, L, d = q.shape
    q = q.view(B, H // groups, groups, L, d).transpose(1, 2).reshape(B * groups, H // groups, L, d)
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    return q, k, v, None if mask is None else mask.repeat_interleave(groups, dim=0)


def unfold_groups(out: torch.Tensor, groups: int) -> torch.Tensor:
    """[B·G, Hkv, L, dv] -> [B, Hkv·G, L, dv] (inverse of ``fold_groups`` for the queries)."""
    if groups == 1:
        return out
    BG, Hkv, L, dv = out.shape
    return out.view(BG // groups, groups, Hkv, L, dv).transpose(1, 2).reshape(BG // groups, Hkv * groups, L, dv)
