"""FAVOR attention ops: fast chunked kernels and their O(L^2) references."""

from .bidirectional import favor_bidirectional
from .causal import favor_causal
from .common import FavorState
from .naive import exact_softmax_attention, naive_linear_attention
from .recurrent import favor_step

__all__ = [
    "FavorState",
    "exact_softmax_attention",
    "favor_bidirectional",
    "favor_causal",
    "favor_step",
    "naive_linear_attention",
]
