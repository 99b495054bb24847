"""Position ids from the padding mask for converted rotary models (Llama, Qwen2, GPT-NeoX, ModernBERT, ...).

Softmax attention only sees relative positions, so a stock rotary model gives a left-padded row the same logits
whether its position ids count the padding (the default ``arange``) or skip it. FAVOR+'s random features estimate
exp(q·k) from the rotated vectors themselves, which are not invariant to a joint rotation: the same row then gave
other logits for every amount of padding its batch added (a calibrated tiny Llama: up to 4.9 apart), so Trainer runs
with left-padding collators learned a function of the batch composition, and the statistics step fitted the
padding. ``generate`` already derives the positions from the mask; this makes every forward of a converted rotary
model do the same when the caller passes an attention mask and no position ids: ``position_ids = mask.cumsum(-1) -
1`` (clamped at 0), the last T columns. Right padding and unpadded rows keep the positions they had (0, 1, ...).
"""

from __future__ import annotations

import torch
from torch import nn

_HOOKED = "_favor_mask_positions"  # attribute marking a base model that has the hook


def positions_from_mask(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (``with_kwargs``) of a rotary base model: fills ``position_ids`` [B, T] from a 2D
    ``attention_mask`` [B, past + T] (1 = real) when the call passes none. Left alone: explicit position ids (packed
    sequences, generate), 4D or missing masks, a mask given positionally, and a mask that does not cover the cached
    tokens too (then the model counts from the cache as before)."""
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None or len(args) > 1 or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = 0 if cache is None else cache.get_seq_length()
    if not isinstance(past, int) or mask.shape[-1] != past + tokens.shape[1]:
        return None
    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
    return args, kwargs


def use_mask_positions(model: nn.Module) -> bool:
    """Give ``model``'s base model (``model.base_model``) the ``positions_from_mask`` hook when its family embeds
    positions by rotation (``generic.Row.positions == "rotary"``) and its forward takes ``position_ids``; once.
    Returns whether the base model has it."""
    import inspect

    from .generic import GENERIC_FAMILIES

    model_type = str(getattr(getattr(model, "config", None), "model_type", "")).removeprefix("performer_")
    family = GENERIC_FAMILIES.get(model_type)
    base = getattr(model, "base_model", model)
    if family is None or family.row.positions != "rotary":
        return False
    if getattr(base, _HOOKED, False):
        return True
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return False
    base.register_forward_pre_hook(positions_from_mask, with_kwargs=True)
    setattr(base, _HOOKED, True)
    return True
