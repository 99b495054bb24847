"""PerformerRedrawCallback: follow PerformerConfig.redraw_interval during Trainer training.

    Trainer(model=model, args=args, ..., callbacks=[PerformerRedrawCallback()])

Redraws happen after optimizer steps (``state.global_step``), never inside forward, so gradient
accumulation and activation recomputation see one projection per step. Draws depend on (seed, layer id,
draw count) only: every data-parallel rank draws the same features, and a resumed run (draw counts are
persistent buffers in the checkpoint) continues the same sequence; when training begins, every rank takes rank 0's
FAVOR+ buffers (``distributed.broadcast_favor_buffers``: fitted statistics come from each rank's data). A new run
on a checkpoint that has drawn before continues from its draw count, redrawing every interval of the new run's steps
(``run_start_draws``).

A callback that could never redraw is refused at the start of training: a model without FAVOR+ layers, or
whose layers all have ``redraw_interval=0``, raises ValueError naming the fix (``PerformerTrainer``, which adds
the callback to every model, lets the second case train without redraws); a fresh run shorter than the
interval warns that no redraw will happen in it.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from .convert import favor_modules, maybe_redraw_features, redraw_schedule, run_start_draws
from .distributed import broadcast_favor_buffers


def follows_schedule(model, state, automatic: bool = False) -> bool:
    """Whether ``model`` has a redraw schedule for the callback to follow (checked at the start of training).

    Raises ValueError if the model has no FAVOR+ layers, or (unless ``automatic``: the callback was added
    for the user) if no layer has a redraw interval. Warns if a fresh run is shorter than the interval."""
    favor_modules(model)  # no FAVOR+ layers: the callback was added to the wrong model
    try:
        modules = redraw_schedule(model)
    except ValueError as e:
        if automatic:
            return False
        raise ValueError(f"PerformerRedrawCallback: {e}") from None
    interval = min(m.config.redraw_interval for m in modules)
    max_steps = int(getattr(state, "max_steps", 0) or 0)
    if int(getattr(state, "global_step", 0) or 0) == 0 and 0 < max_steps < interval:
        warnings.warn(
            f"PerformerRedrawCallback: this run has max_steps={max_steps}, fewer than the model's "
            f"redraw_interval={interval}: no FAVOR+ features will be redrawn in it.",
            UserWarning,
            stacklevel=2,
        )
    return True


class PerformerRedrawCallback(TrainerCallback):
    """Redraw FAVOR+ random features every ``PerformerConfig.redraw_interval`` optimizer steps (see the module
    docstring; ``hf_performer.PerformerRedrawCallback`` adds DDP/compile unwrapping and reporting)."""

    def __init__(self):
        self.automatic = False  # True when added by PerformerTrainer rather than asked for
        self.active = True
        self.start = None  # the layers' draw counts at step 0 of this run (``run_start_draws``)

    def _model(self, model):
        return model

    def _redraw(self, state, model) -> bool:
        return maybe_redraw_features(self._model(model), state.global_step, self.start)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            broadcast_favor_buffers(self._model(model))  # every rank starts with rank 0's FAVOR+ layers
            self.active = follows_schedule(self._model(model), state, self.automatic)
            if self.active:  # resumed from an older checkpoint: catch up (no-op otherwise)
                self.start = run_start_draws(self._model(model), state.global_step)
                self._redraw(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.active:
            self._redraw(state, model)
