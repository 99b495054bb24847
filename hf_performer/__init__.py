"""hf-performer: Performer FAVOR+ attention for Hugging Face Transformers models.

``import hf_performer`` registers the "favor" attention and the Performer model types with
transformers' Auto classes, so a saved Performer checkpoint loads with plain ``from_pretrained``.
"""

from .attention import FavorAttention
from .features import FeatureMap, draw_projection
from .integration import (
    FavorCache,
    broadcast_favor_buffers,
    convert_to_performer,
    maybe_redraw_features,
    redraw_features,
    run_start_draws,
    supported_model_classes,
    supported_model_types,
)
from .ops import FavorState
from .settings import PerformerConfig
from .statistics import calibrate_feature_statistics
from .version import __version__

_TRAINING = ("PerformerRedrawCallback", "PerformerTrainer", "feature_draw_counts")


def __getattr__(name):  # the Trainer helpers import transformers.Trainer: load them on first use
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'hf_performer' has no attribute {name!r}")


__all__ = [
    "FavorAttention",
    "FavorCache",
    "FavorState",
    "FeatureMap",
    "PerformerConfig",
    "PerformerRedrawCallback",
    "PerformerTrainer",
    "__version__",
    "broadcast_favor_buffers",
    "calibrate_feature_statistics",
    "convert_to_performer",
    "draw_projection",
    "feature_draw_counts",
    "maybe_redraw_features",
    "redraw_features",
    "run_start_draws",
    "supported_model_classes",
    "supported_model_types",
]
