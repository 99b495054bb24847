"""The unfollowed-redraw notice: ``PerformerConfig.redraw_interval`` > 0 redraws a layer's random features only when
something follows the schedule after each optimizer step (``PerformerRedrawCallback`` or ``PerformerTrainer`` under
transformers' Trainer, ``maybe_redraw_features`` in a loop of one's own). A plain ``Trainer`` without the callback
would train with the first features throughout and never say so; this notice says so once, naming the fixes.

Following the schedule marks the layers (``convert.redraw_schedule``: the callback at the start of training, or the
first ``maybe_redraw_features`` call, which a loop makes after its first optimizer step). A layer that runs
``TRAINING_CALLS`` training forwards (training mode, gradients on) without that mark warns, once per process: more
forwards than any gradient-accumulation run makes before its first optimizer step. Counting is Python state only
(no device read) and is skipped under torch.compile.
"""

from __future__ import annotations

import torch

from ..attention import FavorAttention
from .caller import warn_user

TRAINING_CALLS = 64
_WARNED = False


def notice_unfollowed_redraw(favor: FavorAttention, training: bool) -> None:
    """Count a forward of ``favor``'s layer (``training``: its attention module's training mode) and warn once
    when its redraw interval has gone unfollowed for ``TRAINING_CALLS`` training forwards."""
    global _WARNED
    if (torch.compiler.is_compiling() or _WARNED or not training or favor.redraw_followed
            or favor.config.redraw_interval <= 0 or not torch.is_grad_enabled()):
        return
    favor.unfollowed_training_calls += 1
    if favor.unfollowed_training_calls < TRAINING_CALLS:
        return
    _WARNED = True
    warn_user(  # (inside the Trainer's progress bar)
        f"this Performer model's FAVOR+ layers have redraw_interval={favor.config.redraw_interval}, but they ran "
        f"{TRAINING_CALLS} training forwards and nothing follows that schedule, so their random features are "
        "never redrawn. With transformers' Trainer pass callbacks=[hf_performer.PerformerRedrawCallback()] (or "
        "use hf_performer.PerformerTrainer); in a loop of your own call hf_performer.maybe_redraw_features(model, "
        "step) after each optimizer step; or convert with redraw_interval=0 for fixed features. This warning is "
        "shown once."
    )
