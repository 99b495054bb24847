"""FavorCache: generation cache whose self-attention layers hold a constant-size FAVOR+ state.

A causal FAVOR+ layer only needs running sums over the keys seen so far (``FavorState``: S [B,H,m,dv],
z [B,H,m], c [B,H,m]), whatever the context length. ``FavorCacheLayer`` keeps that state and counts the
tokens it absorbed (transformers asks the cache for the sequence length to place positions and size
masks). Cross-attention layers attend to a fixed encoder output, so a layer used through the stock
``update(keys, values)`` API keeps them like a ``DynamicLayer`` (size fixed by the encoder length).

Performer configs set ``layer_types = ["favor_attention", ...]``; this module registers that layer
type, so ``DynamicCache(config=...)`` (what ``generate()`` builds) is made of FavorCacheLayers.
A running sum cannot be cropped: assisted decoding and anything else that calls ``crop`` is refused.

The state is fixed in size, and each step copies the new state into the layer's tensors in place (their addresses
stay fixed, as in transformers' static and linear-attention cache layers), so the layer is compileable:
``generate(cache_implementation="static")`` compiles the decoding step (on CUDA by default, with CUDA graphs; on
other devices when a ``CompileConfig`` asks for it), in one graph without breaks.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from transformers import configuration_utils
from transformers.cache_utils import (
    STATIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicLayer,
    EncoderDecoderCache,
    StaticLayer,
)

from ..ops import FavorState
from .grouped import fold_groups, query_groups, unfold_groups

LAYER_TYPE = "favor_attention"


class FavorCacheLayer(DynamicLayer):
    """One layer's cache: a recurrent FAVOR+ state (self-attention) or keys/values (cross-attention)."""

    _layer_type = LAYER_TYPE  # registers the layer type with transformers' DynamicCache
    # fixed-size state, updated in place (``_keep``): generate(cache_implementation="static") compiles the decoding
    # step (by default on CUDA, with CUDA graphs; elsewhere with a CompileConfig that asks for it)
    is_compileable = True
    supports_early_init = False  # the state is sized by the first step

    def __init__(self, **kwargs):
        super().__init__()
        self.state: FavorState | None = None  # recurrent mode: running sums of the keys seen
        self.seen_tokens = 0  # recurrent mode: tokens absorbed (padding included, like a key cache)
        # the same count as a 0-d long tensor on the state's device, advanced in place (its address fixed, like
        # transformers' StaticLayer.cumulative_length): what a compiled step reads and advances, so the graph holds
        # no Python int that changes every token (a recompile, or a new CUDA graph recording per token)
        self.cumulative_length: torch.Tensor | None = None
        self._count_behind = False  # compiled steps advanced only cumulative_length
        self.recurrent = False
        # whether this layer keeps the per-row real-token count (``FavorState.n``): every layer sees the same mask, so
        # ``favor_cache_layer`` leaves it to layer 0 alone (the one ``real_token_counts`` reads)
        self.counts_tokens = True

    # ------------------------------------------------------------------ recurrent FAVOR+ state
    def step(self, favor, q, k, v, key_padding_mask=None, scale=None) -> torch.Tensor:
        """Attend q [B,H,T,d] causally over the past state and the T new keys k, v [B,Hkv,T,·]; absorb them.

        Returns out [B,H,T,dv]. key_padding_mask [B,T] marks the new tokens (True = real). With grouped-query
        attention (H = G·Hkv, ``grouped``) the stored state has one running sum per key/value head: [B, Hkv, m, dv]."""
        if self.keys is not None and self.keys.numel() > 0:
            raise RuntimeError("this cache layer holds keys/values (cross-attention); it cannot also hold a FAVOR state")
        self.recurrent, self.is_initialized, self.device = True, True, q.device
        groups = query_groups(q, k)
        B, T = q.shape[0], q.shape[2]
        added = None
        if self.counts_tokens:  # real tokens absorbed per row (what ``check_past_mask`` compares a later mask with)
            before = None if self.state is None else self.state.n
            added = torch.full((B,), T, dtype=torch.long, device=q.device) if key_padding_mask is None else \
                key_padding_mask.sum(-1, dtype=torch.long)
        q, k, v, key_padding_mask = fold_groups(q, k, v, key_padding_mask, groups)
        state = self.state if self.state is None or groups == 1 else self.state.repeat_interleave(groups)
        # (under autograd the state carries the gradient of every key it absorbed, the prompt's included)
        out, state = favor.step(q, k, v, state, key_padding_mask=key_padding_mask, scale=scale)
        if groups > 1:  # every row of a group absorbed the same keys: keep one state per key/value head
            state = state.index_select(torch.arange(0, B * groups, groups, device=out.device))
        if added is not None:
            state.n = added if before is None else before + added
        self._keep(state)
        self._count(q.shape[2], out.device)
        return unfold_groups(out, groups)

    def _count(self, tokens: int, device: torch.device) -> None:
        """Add ``tokens`` to the count: the tensor always (in place), the Python int outside torch.compile."""
        if self.cumulative_length is None:  # filled on the device: no copy from the host
            self.cumulative_length = torch.full((), self.seen_tokens, dtype=torch.long, device=device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.cumulative_length)
        self.cumulative_length.add_(tokens)
        if torch.compiler.is_compiling():
            self._count_behind = True
        else:
            self.seen_tokens += tokens

    def _keep(self, state: FavorState) -> None:
        """Make ``state`` this layer's state. Its tensors are copied into the ones the layer holds, in place, when
        they match in shape, dtype and device and carry no gradient (``_copyable``), so their addresses stay fixed
        from step to step: what a compiled decoding step and a CUDA graph capture, as with transformers' static and
        linear-attention cache layers. The first step's state (or one of another shape or device, a batch expanded
        for beams, an offload, or one under autograd) becomes the layer's tensors instead, marked as static
        addresses for ``torch.compile``. A ``FavorState`` read from the layer earlier therefore changes with the
        next step: copy it to keep it."""
        old = self.state
        pairs = [] if old is None else [(getattr(old, f.name), getattr(state, f.name)) for f in fields(state)]
        if old is not None and all(_copyable(a, b) for a, b in pairs):
            for a, b in pairs:
                if a is not None:
                    a.copy_(b)
            return
        if not torch.compiler.is_compiling() and not any(t.requires_grad for t in state.tensors):
            # tensors of their own (the op's S and z are views of one tensor, c of the running maxima): state tensors
            # that a compiled step mutates must not alias one another
            state = state.clone()
            for a in state.tensors:
                torch._dynamo.mark_static_address(a)
        self.state = state

    # ------------------------------------------------------------------ key/value mode (cross-attention)
    def update(self, key_states, value_states, *args, **kwargs):
        if self.recurrent:
            raise RuntimeError(
                "this cache layer holds a FAVOR+ recurrent state: a module tried to store keys/values in it. "
                "Use the Performer model classes (hf_performer) with this cache."
            )
        return super().update(key_states, value_states, *args, **kwargs)

    # ------------------------------------------------------------------ Cache layer API
    @property
    def is_croppable(self) -> bool:
        return not self.recurrent

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens absorbed: an int, or under torch.compile the 0-d tensor ``cumulative_length`` (as transformers'
        StaticLayer returns), so a compiled step neither guards on nor takes as input a count that changes every
        token."""
        if not self.recurrent:
            return super().get_seq_length()
        if torch.compiler.is_compiling():
            return self.cumulative_length
        if self._count_behind:  # after compiled steps: read the tensor once
            self.seen_tokens, self._count_behind = int(self.cumulative_length), False
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # a step reads the padding mask of its new tokens only (``attention_function.key_padding_mask``): a mask of
        # the query's width, the same shape at every decoding step (a compiled step then sees no growing input)
        return (query_length, 0) if self.recurrent else super().get_mask_sizes(query_length)

    def reset(self) -> None:
        self.state, self.seen_tokens, self.recurrent, self._count_behind = None, 0, False, False
        if self.cumulative_length is not None:
            self.cumulative_length.zero_()  # (in place: its address stays fixed)
        super().reset()

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self._keep(fn(self.state))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.recurrent:
            self._map_state(lambda s: s.index_select(beam_idx))
        else:
            super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.recurrent:
            self._map_state(lambda s: s.repeat_interleave(repeats))
        else:
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.recurrent:
            index = indices.nonzero().flatten() if indices.dtype == torch.bool else indices.long()
            self._map_state(lambda s: s.index_select(index))
        else:
            super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        if self.recurrent and tokens_to_remove != 0:
            raise NotImplementedError(
                "A FAVOR+ cache holds running sums over the past keys, which cannot be cropped back to an earlier "
                "length: assisted/speculative decoding and other cache rollbacks are not supported."
            )
        if not self.recurrent:
            super().crop(tokens_to_remove)

    def offload(self) -> None:
        if self.recurrent:
            self._map_state(lambda s: s.to("cpu", non_blocking=True))
        else:
            super().offload()

    def prefetch(self) -> None:
        if self.recurrent:
            self._map_state(lambda s: s.to(self.device, non_blocking=True))
        else:
            super().prefetch()


class FavorCache(Cache):
    """A cache for Performer models: ``model(ids, cache=FavorCache(), use_cache=True)``.

    ``generate()`` builds an equivalent ``DynamicCache`` of FavorCacheLayers by itself."""

    def __init__(self, num_layers: int | None = None):
        if num_layers is None:
            super().__init__(layer_class_to_replicate=FavorCacheLayer)
        else:
            super().__init__(layers=[FavorCacheLayer() for _ in range(num_layers)])


def _copyable(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Both None, or tensors of one shape, dtype and device outside autograd (``b`` can be copied into ``a`` in
    place; a state that carries gradients is never overwritten: autograd may have saved it)."""
    if a is None or b is None:
        return a is None and b is None
    grad = a.requires_grad or b.requires_grad
    return not grad and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def register_favor_layer_type() -> None:
    """Make "favor_attention" a known layer type (idempotent): caches built from a Performer config, dynamic or
    static (a FAVOR state is fixed-size already), are made of FavorCacheLayers, and config.json files with that
    layer type load through the base ``PreTrainedConfig`` too (``Trainer`` reads checkpoints' configs with it).
    Without the plugin the stock config classes refuse that layer type, so a Performer checkpoint cannot be
    loaded silently as softmax attention."""
    STATIC_LAYER_TYPE_MAPPING.setdefault(LAYER_TYPE, FavorCacheLayer)  # DYNAMIC: registered by _layer_type
    if LAYER_TYPE not in configuration_utils.ALLOWED_ATTN_LAYER_TYPES:
        configuration_utils.ALLOWED_ATTN_LAYER_TYPES = (*configuration_utils.ALLOWED_ATTN_LAYER_TYPES, LAYER_TYPE)
        configuration_utils.ALLOWED_LAYER_TYPES = (
            configuration_utils.ALLOWED_ATTN_LAYER_TYPES + configuration_utils.ALLOWED_MLP_LAYER_TYPES
        )


def favor_cache_layer(cache: Cache, layer_idx: int) -> FavorCacheLayer:
    """The self-attention FavorCacheLayer of layer ``layer_idx`` in ``cache`` (created if still empty)."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, Cache):
        raise TypeError(f"expected a transformers Cache (e.g. hf_performer FavorCache), got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        cache.layers.append(FavorCacheLayer())
    layer = cache.layers[layer_idx]
    # by layer type rather than class: the package's FavorCacheLayer and a checkpoint's portable copy (a model loaded
    # with trust_remote_code in a process that imports hf_performer too) are interchangeable
    if type(layer) is DynamicLayer and not layer.is_initialized:  # an untouched DynamicCache slot
        cache.layers[layer_idx] = layer = FavorCacheLayer()
    if isinstance(layer, FavorCacheLayer) or getattr(type(layer), "_layer_type", None) == LAYER_TYPE:
        if layer.counts_tokens != (layer_idx == 0):  # (set once: no attribute write per step)
            layer.counts_tokens = layer_idx == 0
        return layer
    raise TypeError(
        f"Performer attention keeps a constant-size FAVOR+ state per layer and cannot use a {type(layer).__name__} "
        "that stores keys/values (static, quantized or already-filled caches). Pass cache=hf_performer.FavorCache() "
        "or let the model / generate() create its cache. (PEFT's prefix tuning fills the cache with its virtual "
        "tokens' keys and values, which FAVOR+ layers cannot take: use LoRA, IA3 or prompt tuning instead.)"
    )


def _state_layer(cache) -> FavorCacheLayer | None:
    """The first FavorCacheLayer of ``cache`` (a transformers Cache, or an EncoderDecoderCache: its self-attention
    part) whose FAVOR+ state counts its real tokens (layer 0: ``FavorCacheLayer.counts_tokens``), or None when
    nothing is cached yet."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    return next((layer for layer in getattr(cache, "layers", ()) if isinstance(layer, FavorCacheLayer)
                 and layer.recurrent and layer.state is not None and layer.state.n is not None), None)


def real_token_counts(cache) -> torch.Tensor | None:
    """The real (unpadded) tokens each batch row's FAVOR+ state in ``cache`` absorbed, [B] int64 (``FavorState.n``
    of layer 0; a device tensor, no host read), or None when nothing is cached yet."""
    layer = _state_layer(cache)
    return None if layer is None else layer.state.n


def check_past_mask(cache, attention_mask) -> None:
    """Raise ValueError when the first columns of ``attention_mask`` [B, past + new] (1 = real token), those of the
    tokens already absorbed in ``cache``'s FAVOR+ states, mark another number of real tokens in some row than the
    state absorbed as real. A key/value cache applies the whole mask again at every call, so a stock model drops a
    cached token that a later mask marks 0 (a batched chat continuation whose mask is ``sequences != pad`` marks the
    padding ``generate`` appended after an early end of text, which it fed as real); a running sum cannot take a token
    back out, so that call would silently attend to other tokens than the stock model. One host read of a [B]
    tensor: ``generate`` calls it once, before its first step (decoding steps take only their new tokens' mask)."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    layer = _state_layer(cache)
    if layer is None:
        return
    past, n = layer.get_seq_length(), layer.state.n
    if not isinstance(past, int) or past == 0 or attention_mask.shape[-1] < past or n.shape[0] != attention_mask.shape[0]:
        return  # (a mask of other shape: the forward's own checks name the problem)
    marked = attention_mask[:, :past].to(device=n.device).sum(-1, dtype=torch.long)
    rows = (marked != n).nonzero().flatten().tolist()
    if rows:
        r = rows[0]
        raise ValueError(
            f"attention_mask marks {int(marked[r])} of the {past} tokens already in the cache as real in row {r}, but "
            f"its FAVOR+ state absorbed {int(n[r])} real tokens there ({len(rows)} row(s) differ). The state is a "
            "running sum: it cannot drop a token it absorbed, nor add one it skipped. Pass the mask the earlier calls "
            "used for those positions (generate feeds every token it appends, padding after an early end of text "
            "included, as real: a mask built as `sequences != pad_token_id` marks those 0), or run the whole sequence "
            "again without the cache."
        )


def use_favor_layers(cache) -> int:
    """Replace the fresh full-attention ``StaticLayer``s of ``cache`` (a transformers Cache, or an
    EncoderDecoderCache: its self-attention part) by FavorCacheLayers; returns how many. ``generate(
    cache_implementation="static")`` builds a StaticCache by the config's in-memory layer types: "favor_attention"
    gives FavorCacheLayers (``register_favor_layer_type``), but the families whose model code picks masks by layer type
    (Qwen2, Qwen3, SmolLM3: ``generic.Row.masks_by_layer_type``) keep "full_attention" there, which gives key/value
    layers sized to the whole generation (the prefill's mask then spanned them, and the layers refused to decode).
    Only layers that hold no token yet are replaced: nothing is lost."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, Cache):
        return 0
    fresh = [i for i, layer in enumerate(cache.layers) if type(layer) is StaticLayer and layer.get_seq_length() == 0]
    for i in fresh:
        cache.layers[i] = FavorCacheLayer()
    return len(fresh)
