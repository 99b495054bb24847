"""The "favor" attention implementation for transformers' AttentionInterface / AttentionMaskInterface.

Stock attention modules (BERT, RoBERTa, DistilBERT, GPT-2, self- and cross-attention) look up
``config._attn_implementation`` in ``ALL_ATTENTION_FUNCTIONS`` and call

    attn_fn(module, q [B,H,Lq,d], k [B,H,Lk,d], v [B,H,Lk,dv], attention_mask, dropout=, scaling=, **kw)
        -> (out [B,Lq,H,dv], None)

Masks are built once per forward by ``ALL_MASK_ATTENTION_FUNCTIONS[name]``: the sdpa/eager ones
build a 4D [B,1,Lq,Lk] mask (O(L²) memory before attention even runs), so "favor" registers its own
mask function returning a 2D [B, Lk] padding mask (True = real token) or None. Every module that
uses this function must carry a ``FavorAttention`` child named ``favor`` (see ``modeling.attach_favor``).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

from .caller import warn_user
from .grouped import fold_groups, query_groups, unfold_groups
from .local_exact import sliding_window_attention
from .redraw_notice import notice_unfollowed_redraw
from .zero_shot import notice_uncalibrated

ATTN_IMPLEMENTATION = "favor"

_DROPOUT_WARNED = False


def warn_ignored_dropout(p: float) -> None:
    """Attention-probability dropout has no FAVOR+ counterpart (no probability matrix exists): warn once,
    attributed to the user's code that ran the model (not to transformers' attention module)."""
    global _DROPOUT_WARNED
    if p > 0 and not _DROPOUT_WARNED and not torch.compiler.is_compiling():  # (a warning would break the graph)
        _DROPOUT_WARNED = True
        warn_user(  # (the first training step runs inside the Trainer's bar)
            f"Performer FAVOR+ attention ignores attention-probability dropout (p={p}): there is no attention "
            "matrix to drop entries from. Hidden-state dropout still applies. This warning is shown once."
        )


def reject_attention_weights(requested: bool | None = False) -> None:
    """Raise when attention weights are asked for (kwarg, config, or transformers' output capture)."""
    try:  # transformers collects output_attentions through forward hooks; look at the active collector
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get()
        requested = bool(requested) or bool(collected and ("attentions" in collected or "cross_attentions" in collected))
    except ImportError:  # pragma: no cover - older/newer transformers layout
        pass
    if requested:
        raise ValueError(
            "output_attentions=True is not supported by Performer FAVOR+ attention: it never forms the L×L "
            "attention matrix (that is what keeps it linear in the sequence length). Call the model without "
            "output_attentions."
        )


def key_padding_mask(attention_mask: torch.Tensor | None, key_length: int) -> torch.Tensor | None:
    """The favor mask [B, Lkv] (or None) -> key padding mask of the last ``key_length`` keys [B, key_length]."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(
            f"Performer FAVOR+ attention takes a 2D padding mask [batch, kv_length] (1 = real token, 0 = padding); "
            f"got an attention mask of shape {shape}. A 4D [batch, heads, q_len, kv_len] mask cannot be honoured "
            "without building an L×L matrix: pass the 2D padding mask instead."
        )
    if attention_mask.shape[-1] < key_length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but attention sees {key_length} keys; "
            "pass a mask over the whole sequence (past and new tokens)."
        )
    if attention_mask.dtype.is_floating_point:
        raise ValueError("Performer FAVOR+ attention expects a boolean/integer padding mask (1 = real token).")
    return attention_mask[:, -key_length:].bool()


# keyword arguments of the attention interface that change the attention FAVOR+ computes: refused when set
_UNSUPPORTED_KWARGS = {
    "sliding_window": "a sliding attention window (FAVOR+ layers attend to the whole context; convert with "
                      "hf_performer.convert_to_performer, which makes every layer global)",
    "softcap": "attention-logit soft-capping (tanh of the logits has no random-feature estimate)",
    "s_aux": "attention sinks (a learned extra logit per head in the softmax normaliser)",
    "sinks": "attention sinks (a learned extra logit per head in the softmax normaliser)",
}

# the kwarg through which ``RecurrentDecodingMixin`` hands the layer's FavorCacheLayer to the attention function
STEP_KWARG = "favor_cache_layer"


def reject_unsupported_kwargs(module, kwargs) -> None:
    """Raise NotImplementedError when the module asks for an attention variant FAVOR+ does not compute."""
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{type(module).__name__} asked the attention function for {what} ({name}={kwargs[name]!r}); "
                "Performer FAVOR+ attention cannot honour it."
            )


def _is_bidirectional_band(mask_function, kwargs) -> bool:
    """True for transformers' plain bidirectional sliding-window mask (``create_bidirectional_sliding_window_mask``,
    |i − j| ≤ local_size; ModernBERT's local layers). Such layers keep exact attention in linear memory
    (``local_exact``), which takes the window from its ``sliding_window`` argument: the mask is the padding mask."""
    w = kwargs.get("local_size")
    if not isinstance(w, int) or kwargs.get("use_vmap"):  # (use_vmap: custom and/or mask functions joined)
        return False
    # the one mask maker that passes both keywords: known without a probe (which reads tensors on the host every
    # forward, and breaks the graph under torch.compile)
    if "allow_is_bidirectional_skip" in kwargs:
        return True
    if torch.compiler.is_compiling():
        return False
    # transformers releases without that keyword: probe the mask function
    t = lambda i: torch.tensor(i)  # noqa: E731
    try:
        probe = [bool(mask_function(t(0), t(0), t(q), t(kv))) for q, kv in ((w, 0), (0, w), (w + 1, 0), (0, w + 1))]
    except Exception:
        return False
    return probe == [True, True, False, False]


def favor_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function: the 2D padding mask [B, kv_length] (bool, True = real), or None without an attention_mask.

    Causality is not encoded in the mask: the attention function takes it from the module. A mask without any
    padding is passed on as it is: asking whether it has padding would read a device tensor (a host
    synchronisation per forward and per generated token)."""
    plain = mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    if not plain and not _is_bidirectional_band(mask_function, kwargs):
        raise NotImplementedError(
            "Performer FAVOR+ attention supports plain causal or bidirectional attention with a 2D padding mask. "
            "This forward asked for another mask pattern (packed sequences detected from position_ids without an "
            "attention_mask, which transformers also assumes under torch.compile for every batch without one, or "
            "custom or/and mask functions); pass an attention_mask (all ones where nothing is padded; with Trainer's "
            "torch_compile=True, a data collator that returns it) and one sequence per row."
        )
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] < kv_length:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns but the keys span {kv_length} positions "
            "(cached and new tokens); pass a mask over the whole sequence."
        )
    return attention_mask[:, -kv_length:].bool()  # [B, kv_length]


def favor_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """q [B,H,Lq,d], k [B,H,Lk,d], v [B,H,Lk,dv] -> (out [B,Lq,H,dv], None)."""
    favor = getattr(module, "favor", None)
    window = kwargs.get("sliding_window")
    if favor is None and window is not None and not getattr(module, "is_causal", False) and is_causal is not True:
        # a layer the conversion kept exact (ModernBERT's local layers): already linear in memory (``local_exact``)
        reject_attention_weights(kwargs.get("output_attentions"))
        mask = key_padding_mask(attention_mask, key.shape[2])
        out = sliding_window_attention(query, key, value, int(window) - 1, mask, scaling, dropout, module.training)
        return out.transpose(1, 2), None  # sliding_window s (flash-attention convention): |i − j| <= s − 1
    if favor is None:
        raise RuntimeError(
            f"attn_implementation='{ATTN_IMPLEMENTATION}' needs a FavorAttention on {type(module).__name__}; "
            "build the model with hf_performer.convert_to_performer or load a saved Performer checkpoint."
        )
    reject_attention_weights(kwargs.get("output_attentions"))
    warn_ignored_dropout(dropout if module.training else 0.0)
    notice_uncalibrated(favor)
    notice_unfollowed_redraw(favor, module.training)
    reject_unsupported_kwargs(module, kwargs)
    causal = getattr(module, "is_causal", False) if is_causal is None else bool(is_causal)
    if getattr(module, "favor_query_scaled", False):  # (OPT: q = q_proj(x) * scaling, called with scaling=1.0)
        # FAVOR+ splits the scale evenly between q and k: q·k·s = (q·√s)·(k·√s); left on q alone, q' and k' are
        # unbalanced and the estimator's variance, exp(|q' + k'|^2), grows (``generic.Row.query_scaled``)
        query, scaling = query / module.scaling, (1.0 if scaling is None else scaling) * module.scaling
    step_layer = kwargs.get(STEP_KWARG)
    if step_layer is not None:  # recurrent decoding (``RecurrentDecodingMixin``): k, v are the new tokens only
        if not causal:
            raise ValueError("a bidirectional (encoder) self-attention cannot decode incrementally with a cache")
        mask = key_padding_mask(attention_mask, key.shape[2])
        out = step_layer.step(favor, query, key, value, mask, scaling)  # [B, H, T, dv]
        return out.to(value.dtype).transpose(1, 2), None
    if causal and query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"{type(module).__name__} got {query.shape[2]} queries for {key.shape[2]} cached keys: incremental "
            "causal decoding needs the recurrent FAVOR+ state (hf_performer FavorCache), not a key/value cache."
        )
    mask = key_padding_mask(attention_mask, key.shape[2])  # [B, Lk] or None
    out_dtype = value.dtype
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2: attention math in float32
        query, key, value = query.float(), key.float(), value.float()
    groups = query_groups(query, key)  # grouped-query attention: G query heads per key/value head (``grouped``)
    query, key, value, mask = fold_groups(query, key, value, mask, groups)
    out = favor(query, key, value, causal=causal, key_padding_mask=mask, scale=scaling)  # [B·G, Hkv, Lq, dv]
    return unfold_groups(out, groups).to(out_dtype).transpose(1, 2), None


def register_favor_attention() -> None:
    """Make attn_implementation="favor" known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, favor_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, favor_mask)
