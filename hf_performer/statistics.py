"""Model-level statistics calibration: fit every FAVOR layer's statistics on a few real batches.

No training: one forward per batch with a pre-hook on each FavorAttention that sees the layer's
q, k (as they reach FAVOR, with their padding mask, scale and causality) and calls
``FavorAttention.calibrate_statistics``. Layers are calibrated in order during the same forward,
so each layer sees inputs produced by the already-calibrated layers below it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .attention import FavorAttention


def favor_layers(model: nn.Module) -> list[FavorAttention]:
    layers = [m for m in model.modules() if isinstance(m, FavorAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FavorAttention layers; convert it with convert_to_performer.")
    return layers


@torch.no_grad()
def calibrate_feature_statistics(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """Calibrate every FAVOR layer of ``model`` on ``batch`` (the model's forward kwargs, e.g. a
    tokenizer output with padding). Returns the number of layers calibrated."""
    seen: list[FavorAttention] = []

    def pre_hook(module: FavorAttention, args, kwargs):
        q, k = args[0], args[1]
        module.calibrate_statistics(
            q, k, key_padding_mask=kwargs.get("key_padding_mask"), scale=kwargs.get("scale"),
            causal=bool(kwargs.get("causal", False)),
        )
        seen.append(module)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in favor_layers(model)]
    was_training = model.training
    try:
        model.eval()
        model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return len(set(map(id, seen)))
