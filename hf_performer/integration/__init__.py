"""Transformers integration: Performer model types, the "favor" attention, FavorCache, conversion.

Importing this package registers everything with transformers (AttentionInterface,
AttentionMaskInterface, AutoConfig, AutoModelFor*), and PEFT's default target modules for the Performer
model types (``peft_support``; when peft is imported).
"""

from .attention_function import ATTN_IMPLEMENTATION
from .bert import PerformerBertConfig
from .cache import FavorCache, FavorCacheLayer
from .callback import PerformerRedrawCallback
from .convert import (
    convert_to_performer,
    maybe_redraw_features,
    redraw_features,
    run_start_draws,
    supported_model_classes,
    supported_model_types,
)
from .distilbert import PerformerDistilBertConfig
from .distributed import broadcast_favor_buffers
from .gpt2 import PerformerGPT2Config
from .peft_support import register_peft_hook
from .registry import register_performer_models
from .roberta import PerformerRobertaConfig

register_performer_models()
register_peft_hook()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FavorCache",
    "FavorCacheLayer",
    "PerformerBertConfig",
    "PerformerDistilBertConfig",
    "PerformerGPT2Config",
    "PerformerRedrawCallback",
    "PerformerRobertaConfig",
    "broadcast_favor_buffers",
    "convert_to_performer",
    "maybe_redraw_features",
    "redraw_features",
    "run_start_draws",
    "register_performer_models",
    "supported_model_classes",
    "supported_model_types",
]
