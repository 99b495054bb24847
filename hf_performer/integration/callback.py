"""PerformerRedrawCallback: follow PerformerConfig.redraw_interval during Trainer training.

    Trainer(model=model, args=args, ..., callbacks=[PerformerRedrawCallback()])

Redraws happen after optimizer steps (``state.global_step``), never inside forward, so gradient
accumulation and activation recomputation see one projection per step. Draws depend on (seed, layer id,
draw count) only: every data-parallel rank draws the same features, and a resumed run (draw counts are
persistent buffers in the checkpoint) continues the same sequence.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .convert import maybe_redraw_features


class PerformerRedrawCallback(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            maybe_redraw_features(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            maybe_redraw_features(model, state.global_step)
