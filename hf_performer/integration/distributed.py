"""Multi-process runs: every rank must attend with the same FAVOR+ buffers.

Random features need no communication: a draw depends on (seed, layer id, draw count) only. What the statistics
step fits (``calibrate_feature_statistics``: key shift, balance factor, favor++ parameter, proposal centres and the
importance-sampled features drawn from them) comes from the data a process sees, so ranks that calibrate on their
own shards, or only rank 0, hold different FAVOR+ layers. DDP hides that while it broadcasts buffers from rank 0
before each forward (its default); with ``broadcast_buffers=False`` or under FSDP nothing does, and the ranks would
train different models. ``broadcast_favor_buffers`` makes them all rank 0's; ``PerformerRedrawCallback`` (and so
``PerformerTrainer``) calls it when training begins.
"""

from __future__ import annotations

import torch
from torch import nn

from .caller import warn_user
from .convert import favor_modules


def broadcast_favor_buffers(model: nn.Module, src: int = 0) -> int:
    """Copy rank ``src``'s FAVOR+ buffers (random features, draw counts, fitted statistics, importance-sampled
    features: every buffer of every FavorAttention in ``model``) to every rank of the default process group, in
    place. A no-op outside a multi-process run (torch.distributed not initialised, or one process). Collective:
    every rank must call it. Buffers travel as float64 (exact for their float32, int64 and bool values; any
    backend). Returns how many layers' buffers changed on this rank; a rank whose buffers differed warns once
    (the statistics step saw other data, or did not run, there).

    Raises ValueError if ``model`` has no FAVOR+ layers."""
    layers = favor_modules(model)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0
    changed = 0
    with torch.no_grad():
        for layer in layers:
            differed = False
            for buf in layer.buffers(recurse=False):
                wire = buf.detach().to(torch.float64)
                before = wire.clone()
                dist.broadcast(wire, src)
                if not torch.equal(before, wire):
                    differed = True
                    buf.copy_(wire.to(buf.dtype))
            if differed:  # (an eager forward would re-read them; a compiled one would not)
                layer.refresh_buffer_values()
            changed += differed
    if changed:
        warn_user(f"broadcast_favor_buffers: {changed} of the {len(layers)} FAVOR+ layers on rank {dist.get_rank()} "
                  f"differed from rank {src}'s (fitted statistics from other data, or none): every rank now uses "
                  f"rank {src}'s. Run the statistics step on the same data on every rank, or on rank {src} only.")
    return changed
