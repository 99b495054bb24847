"""FAVOR attention ops: fast chunked kernels and their O(L^2) references."""

from .bidirectional import favor_bidirectional, favor_bidirectional_with_normalizer
from .causal import favor_causal, favor_causal_with_normalizer
from .common import FavorState
from .local import local_window_attention
from .naive import exact_softmax_attention, naive_linear_attention
from .recurrent import favor_step

__all__ = [
    "FavorState",
    "exact_softmax_attention",
    "favor_bidirectional",
    "favor_bidirectional_with_normalizer",
    "favor_causal",
    "favor_causal_with_normalizer",
    "favor_step",
    "local_window_attention",
    "naive_linear_attention",
]
