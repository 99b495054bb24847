"""Training helpers: the FAVOR+ feature-redraw schedule as a transformers ``TrainerCallback``.

    from hf_performer.training import PerformerRedrawCallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[PerformerRedrawCallback()])

The schedule is ``PerformerConfig.redraw_interval`` (saved in the model's config.json), counted in
optimizer steps: after ``state.global_step`` steps every FAVOR+ layer holds draw number
``start + global_step // redraw_interval`` (``hf_performer.integration.maybe_redraw_features``), start being
the draws the model had made before the run (0 for a freshly converted model). Hence:

* gradient accumulation: one redraw per optimizer step at most, never between micro-batches, and the
  forward and its recomputation (gradient checkpointing) always see the same features;
* data parallelism (DDP, FSDP, accelerate): every rank runs the same callback at the same global step
  and a draw depends only on (seed, layer id, draw count), so every rank holds identical features
  without any communication;
* resuming: ``draw_count`` and ``projection`` are persistent buffers saved in every checkpoint; a
  resumed run loads them and continues with exactly the features an uninterrupted run would have.
  ``on_train_begin`` also catches up (never goes back) if a checkpoint holds an older draw;
* a new run on a saved model that has drawn before (a second fine-tuning) redraws every interval of its own
  steps, continuing the model's sequence.

``PerformerTrainer`` is ``Trainer`` with the callback added (the examples use it).
"""

from __future__ import annotations

from transformers import Trainer

from .integration.callback import PerformerRedrawCallback as _BaseRedrawCallback
from .integration.convert import favor_modules

__all__ = ["PerformerRedrawCallback", "PerformerTrainer", "feature_draw_counts"]


def _unwrap(model):
    """The model under DDP / torch.compile wrappers (FSDP keeps the module tree, buffers unsharded)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and not hasattr(model, "config"):
            model = getattr(model, attr)
    return model


def feature_draw_counts(model) -> list[int]:
    """The draw count of every FAVOR+ layer (model order): handy to check a schedule or a resumed run."""
    return [int(m.draw_count) for m in favor_modules(_unwrap(model))]


class PerformerRedrawCallback(_BaseRedrawCallback):
    """Redraw FAVOR+ random features every ``PerformerConfig.redraw_interval`` optimizer steps.

    Same schedule as ``hf_performer.integration.PerformerRedrawCallback`` (a subclass of it), plus: it
    unwraps DDP / compiled models and can report redraws.

    At the start of training it raises ValueError for a model without FAVOR+ layers (the callback was added to
    the wrong model) and for a model whose layers all have ``redraw_interval=0`` (it would never redraw: convert
    with ``PerformerConfig(redraw_interval=N)``, or drop the callback; ``PerformerTrainer``, which adds it to
    every model, trains such a model without redraws). A fresh run shorter than the interval warns.

    Args:
        verbose: print a line on the main process whenever features are redrawn.
    """

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose
        self.redraws = 0  # redraw events seen by this callback (this process)

    def _model(self, model):
        return _unwrap(model)

    def _redraw(self, state, model) -> bool:
        redrew = super()._redraw(state, model)
        if redrew:
            self.redraws += 1
            if self.verbose and state.is_world_process_zero:
                counts = sorted(set(feature_draw_counts(model)))
                print(f"[hf-performer] step {state.global_step}: redrew FAVOR+ features (draw {counts})")
        return redrew


class PerformerTrainer(Trainer):
    """``transformers.Trainer`` for Performer models: adds a ``PerformerRedrawCallback`` unless one (or the
    integration's) is given; it redraws if the model has a ``redraw_interval`` and stays idle otherwise.
    Everything else is ``Trainer``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, _BaseRedrawCallback) for cb in self.callback_handler.callbacks):
            callback = PerformerRedrawCallback()
            callback.automatic = True  # a model without a redraw interval trains without redraws
            self.add_callback(callback)
