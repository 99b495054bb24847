"""Statistics step (no training, seconds): fit each FAVOR+ layer's per-head statistics on real text.

The converted model runs on a few calibration batches; each layer's q/k are recorded as they reach FAVOR
(scaled as the model scales them) and ``favor.calibrate_statistics(q, k, mask, scale)`` stores the per-head
key shift / balance / favor++ statistics that causal attention and decoding use (bidirectional attention
measures them per sequence, so for encoders this is harmless bookkeeping).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import favor_inputs, forward_kwargs


def _merge(records: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """Stack (q, k, mask, scale) records of several batches: pad along the length, concatenate the batches."""
    scales = {r[3] for r in records}
    if len(scales) > 1:
        raise ValueError(f"one layer received different attention scales across batches: {sorted(map(str, scales))}")
    lq = max(r[0].shape[2] for r in records)
    lk = max(r[1].shape[2] for r in records)
    qs, ks, masks = [], [], []
    padded = False
    for q, k, mask, _ in records:
        B = q.shape[0]
        m = torch.ones(B, k.shape[2], dtype=torch.bool, device=k.device) if mask is None else mask.bool()
        qs.append(nn.functional.pad(q.float(), (0, 0, 0, lq - q.shape[2])))
        ks.append(nn.functional.pad(k.float(), (0, 0, 0, lk - k.shape[2])))
        masks.append(nn.functional.pad(m, (0, lk - k.shape[2]), value=False))
        padded |= mask is not None or k.shape[2] != lk
    mask = torch.cat(masks) if padded else None
    return torch.cat(qs), torch.cat(ks), mask, scales.pop()


@torch.no_grad()
def calibrate_model_statistics(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], progress: bool = True
) -> int:
    """Run ``model`` on ``batches`` and calibrate every FAVOR+ layer's statistics. Returns the layer count."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = list(batches)
    if not batches:
        raise ValueError("the statistics step needs at least one batch of text.")
    try:
        with favor_inputs(model) as store:
            for batch in tqdm(batches, desc="statistics", disable=not progress, leave=False):
                model(**{k: v.to(device) for k, v in batch.items()}, **forward_kwargs(model))
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    for name, records in store.items():
        q, k, mask, scale = _merge(records)
        modules[name].favor.calibrate_statistics(q, k, key_padding_mask=mask, scale=scale)
    return len(store)
