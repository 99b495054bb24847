"""Position ids from the padding mask for converted rotary models (Llama, Qwen2, GPT-NeoX, ModernBERT, ...).

Softmax attention only sees relative positions, so a stock rotary model gives a left-padded row the same logits
whether its position ids count the padding (the default ``arange``) or skip it. FAVOR+'s random features estimate
exp(q·k) from the rotated vectors themselves, which are not invariant to a joint rotation: the same row then gave
other logits for every amount of padding its batch added (a calibrated tiny Llama: up to 4.9 apart), so Trainer runs
with left-padding collators learned a function of the batch composition, and the statistics step fitted the
padding. ``generate`` already derives the positions from the mask; the Performer classes of rotary families
(``generic.prepared_forward``) wrap their stock ``forward`` so every forward does the same when the caller passes an
attention mask and no position ids: ``position_ids = mask.cumsum(-1) - 1`` (clamped at 0), the last T columns. Right
padding and unpadded rows keep the positions they had (0, 1, ...). A wrapper rather than a forward hook: under
``torch.compile`` a hook that rewrites the arguments split the graph.
"""

from __future__ import annotations

import torch


def mask_positions(kwargs: dict) -> torch.Tensor | None:
    """``position_ids`` [B, T] (int64) from a 2D ``attention_mask`` [B, past + T] (1 = real) in a forward's
    keyword arguments, or None to leave the call as it is: explicit position ids (packed sequences, generate), 4D or
    missing masks, and a mask that does not cover the cached tokens too (the model counts from the cache then)."""
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = 0 if cache is None else cache.get_seq_length()
    if not isinstance(past, int) or mask.shape[-1] != past + tokens.shape[1]:
        return None
    return (mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
