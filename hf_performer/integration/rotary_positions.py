"""Position ids from the padding mask for converted rotary models (Llama, Qwen2, GPT-NeoX, ModernBERT, ...).

Softmax attention only sees relative positions, so a stock rotary model gives a left-padded row the same logits
whether its position ids count the padding (the default ``arange``) or skip it. FAVOR+'s random features estimate
exp(q·k) from the rotated vectors themselves, which are not invariant to a joint rotation: the same row then gave
other logits for every amount of padding its batch added (a calibrated tiny Llama: up to 4.9 apart), so Trainer runs
with left-padding collators learned a function of the batch composition, and the statistics step fitted the
padding. ``generate`` already derives the positions from the mask; the Performer classes of rotary families
(``generic.prepared_forward``) wrap their stock ``forward`` so every forward does the same when the caller passes an
attention mask and no position ids: ``position_ids = mask.cumsum(-1) - 1`` (clamped at 0), and a step with a cache
continues each row from the real tokens its FAVOR+ state absorbed (``mask_positions``). Right padding and unpadded
rows keep the positions they had (0, 1, ...). A wrapper rather than a forward hook: under
``torch.compile`` a hook that rewrites the arguments split the graph.
"""

from __future__ import annotations

import torch

from .cache import real_token_counts


def mask_positions(kwargs: dict) -> torch.Tensor | None:
    """``position_ids`` [B, T] (int64) for a forward's keyword arguments, or None to leave the call as it is.

    * A cache whose FAVOR+ state already holds tokens: each row continues from the real tokens it absorbed
      (``cache.real_token_counts``), counting the new ones by the last T columns of a 2D ``attention_mask`` (all
      real without one). The positions a masked prefill gave stay consistent in later steps, whatever mask columns
      the step passes, in eager and compiled steps alike (no host read).
    * No tokens cached yet: ``mask.cumsum(-1) - 1`` (clamped at 0) of a 2D mask over the T new tokens; no mask (or a
      4D one): None, the stock positions.
    * Explicit position ids (packed sequences, generate): None, used as given."""
    if kwargs.get("position_ids") is not None:
        return None
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    T = tokens.shape[1]
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= T else None
    absorbed = real_token_counts(kwargs.get("cache", kwargs.get("past_key_values")))  # [B] or None
    if absorbed is not None:
        if mask is not None:  # the new tokens' index among the row's real new tokens
            counted = (mask[:, -T:].long().cumsum(-1) - 1).clamp_min(0)
        else:
            counted = torch.arange(T, device=absorbed.device).expand(absorbed.shape[0], T)
        return absorbed.to(counted.device)[:, None] + counted
    if mask is None or mask.shape[-1] != T:
        return None
    return (mask.long().cumsum(-1) - 1).clamp_min(0)
