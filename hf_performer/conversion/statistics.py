"""Statistics step (no training, seconds): fit each FAVOR+ layer's statistics on real text.

The calibration batches are stacked into one padded batch and handed to
``hf_performer.calibrate_feature_statistics``: one forward in which a pre-hook on every FavorAttention sees
the layer's q/k as they reach FAVOR (with padding mask, scale and causality) and calls
``favor.calibrate_statistics`` — in layer order, so each layer sees inputs produced by the already calibrated
layers below it. The statistics (key shift, balance, favor++ rho, aligned-feature proposal) serve causal
attention and decoding, and the aligned features of every mode.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hf_performer import calibrate_feature_statistics

from .capture import forward_kwargs


def merge_batches(batches: Iterable[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batches [B_i, L_i] -> one batch [sum B_i, max L_i] (attention_mask 0 on padding)."""
    batches = list(batches)
    if not batches:
        raise ValueError("the statistics step needs at least one batch of text.")
    length = max(b["input_ids"].shape[1] for b in batches)
    ids = [nn.functional.pad(b["input_ids"], (0, length - b["input_ids"].shape[1]), value=pad_token_id) for b in batches]
    mask = [nn.functional.pad(b["attention_mask"], (0, length - b["attention_mask"].shape[1]), value=0) for b in batches]
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}


@torch.no_grad()
def calibrate_model_statistics(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                               progress: bool = False, pad_token_id: int = 0) -> int:
    """Calibrate every FAVOR+ layer of ``model`` on ``batches`` (one stacked forward; ``progress`` is accepted
    for compatibility, a single forward has no bar). Returns the number of layers calibrated (all of them).

    Raises ValueError (from ``calibrate_feature_statistics``) if the forward does not reach every FAVOR+ layer."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in merge_batches(batches, pad_token_id).items()}
    return calibrate_feature_statistics(model, {**batch, **forward_kwargs(model)})  # all layers, or it raises
