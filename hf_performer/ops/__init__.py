"""FAVOR attention ops: chunk-parallel / one-pass batched forms, the recurrent step, and O(L^2) references."""

from .bidirectional import favor_bidirectional
from .causal import causal_attention, favor_causal
from .common import FavorState
from .naive import exact_softmax_attention, naive_linear_attention
from .recurrent import favor_step

__all__ = [
    "FavorState",
    "causal_attention",
    "exact_softmax_attention",
    "favor_bidirectional",
    "favor_causal",
    "favor_step",
    "naive_linear_attention",
]
