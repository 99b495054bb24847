"""Model-level statistics calibration: fit every FAVOR layer's statistics on a few real batches.

No training: one full-sequence forward per batch with a pre-hook on each FavorAttention that sees the
layer's q, k (as they reach FAVOR, with their padding mask, scale and causality) and calls
``FavorAttention.calibrate_statistics``. Layers are calibrated in order during the same forward,
so each layer sees inputs produced by the already-calibrated layers below it.

Causal models would otherwise take the cached decoding path (``use_cache`` defaults to True), where
attention runs through ``FavorAttention.step``: the forward runs with ``use_cache=False``, and a
``step`` that still runs on an empty state (a prefill) is calibrated like a causal forward. Every
FAVOR layer is calibrated, or the model is left as it was and one error says which layers the
forward did not reach and why.

Shared attention modules (ALBERT: one attention module serves every layer of its group; their attention module
says ``favor_shared``) are called once per layer they serve. Their one FavorAttention gets one set of statistics,
fitted at each call on the q, k of all its calls so far stacked along the batch (so the last fit covers every
layer it serves, and each call runs with statistics that include its own inputs); such a module counts once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .attention import FavorAttention, is_favor_attention
from .integration.convert import favor_modules
from .integration.zero_shot import statistics_step

_CACHE_KEYS = ("cache", "past_key_values")


def favor_layers(model: nn.Module) -> list[FavorAttention]:
    """Every FavorAttention of ``model`` (module order). Raises ValueError if there is none
    (``integration.convert.favor_modules``, the one lookup the redraw schedule uses too)."""
    return favor_modules(model)


@contextlib.contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """config.use_cache = False on every config of ``model`` for the duration (the stock forwards default
    ``use_cache`` to it, also for heads whose forward has no ``use_cache`` argument)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "use_cache")}
    saved = {k: c.use_cache for k, c in configs.items()}
    try:
        for c in configs.values():
            c.use_cache = False
        yield
    finally:
        for k, c in configs.items():
            c.use_cache = saved[k]


@contextlib.contextmanager
def _restored_on_error(layers: list[FavorAttention]) -> Iterator[None]:
    """Put every layer's buffers back as they were if the block raises (all layers or none calibrated)."""
    saved = [{n: b.clone() for n, b in m.named_buffers(recurse=False)} for m in layers]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, bufs in zip(layers, saved):
                for n, b in m.named_buffers(recurse=False):
                    b.copy_(bufs[n])
                m.refresh_buffer_values()  # (the step had set the layers' Python flags: compiled code reads those)
        raise


DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "labels")  # what an encoder-decoder's decoder reads


def _check_batch(model: nn.Module, batch) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"calibrate_feature_statistics takes the model's forward kwargs as a mapping (e.g. "
            f"tokenizer(texts, padding=True, return_tensors='pt')), got {type(batch).__name__}."
        )
    for key in _CACHE_KEYS:
        if batch.get(key) is not None:
            raise ValueError(
                f"calibrate_feature_statistics got a {key!r}: the statistics step runs full-sequence forwards "
                f"from the first token. Pass the whole sequences without {key!r}."
            )
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            f"calibrate_feature_statistics got a {type(model).__name__} whose weights are on the meta device (no "
            "data): the statistics step runs real forwards. Load the model with from_pretrained, or materialise it "
            "(model.to_empty(device=...) and load_state_dict) first."
        )
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and not any(
            batch.get(key) is not None for key in DECODER_KEYS):
        raise ValueError(
            f"calibrate_feature_statistics got a batch without decoder inputs for the encoder-decoder model "
            f"{type(model).__name__}: its decoder's self- and cross-attention layers are calibrated on the decoder's "
            "tokens. Add them to the batch: labels=tokenizer(targets, padding=True, return_tensors='pt')['input_ids'] "
            "(or decoder_input_ids and decoder_attention_mask).")
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.any()):
        raise ValueError("calibrate_feature_statistics got an attention_mask without any real token (all 0): the "
                         "statistics are measured on real tokens; pass a batch of real text.")
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else None
    out = {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in batch.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def calibrate_feature_statistics(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> int:
    """Calibrate every FAVOR layer of ``model`` on ``batch`` and return the number of layers calibrated
    (all of them).

    Args:
        model: a converted (Performer) model, or its ``torch.compile`` wrapper (the step runs the original eagerly).
        batch: the model's forward kwargs, e.g. ``tokenizer(texts, padding=True, return_tensors="pt")``
            (input_ids / attention_mask [B, L]; moved to the model's device). Causal models run without a
            cache whatever ``use_cache`` or ``config.use_cache`` say; cross-attention layers need
            ``encoder_hidden_states`` in the batch.

    Raises:
        ValueError: the model has no FAVOR layers or its weights are on the meta device; the batch carries a
            cache (``cache`` / ``past_key_values``) or no real token, or no decoder inputs (``labels``,
            ``decoder_input_ids``) for an encoder-decoder model; a layer's real queries see no real key; or
            the forward did not reach every FAVOR layer (the error names them).
            On error no layer's statistics are changed.
        TypeError: ``batch`` is not a mapping.
    """
    # a torch.compile'd model: its cached graphs would skip the hooks below (and its parameters are the original's)
    model = getattr(model, "_orig_mod", model)
    layers = favor_layers(model)
    batch = _check_batch(model, batch)
    if not any(m.config.uses_statistics() for m in layers):
        warnings.warn(
            "calibrate_feature_statistics changes nothing for this model: its FAVOR+ settings read no fitted statistic "
            "(center_keys, balance_qk and aligned_features off, kernel neither favor++ nor with aligned features). "
            "Turn one of them on, or skip the statistics step.", UserWarning, stacklevel=2)
    seen: set[int] = set()
    shared = _shared_favor_layers(model)
    calls: dict[int, list[tuple]] = {}  # shared layers: (q, k, mask) of each call so far

    def calibrate(module: FavorAttention, q, k, mask, scale, causal) -> None:
        if id(module) in shared:
            pooled = calls.setdefault(id(module), [])
            pooled.append((q, k, mask))
            q, k, mask = _stacked(pooled)
        module.calibrate_statistics(q, k, key_padding_mask=mask, scale=scale, causal=bool(causal))
        seen.add(id(module))

    def pre_hook(module: FavorAttention, args, kwargs):
        q, k = args[0], args[1]
        calibrate(module, q, k, kwargs.get("key_padding_mask"), kwargs.get("scale"), kwargs.get("causal", False))

    def step_guard(module: FavorAttention):
        step = module.step  # the bound method

        def guarded(q, k, v, state=None, key_padding_mask=None, scale=None):
            if state is not None:
                raise ValueError(
                    "calibrate_feature_statistics reached a FAVOR+ decoding step that continues a cached state; "
                    "the statistics step needs whole sequences: pass them without a cache."
                )
            calibrate(module, q, k, key_padding_mask, scale, True)  # a prefill: the same q, k as causal forward
            return step(q, k, v, state, key_padding_mask=key_padding_mask, scale=scale)

        return guarded

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in layers]
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode (a model may mix them)
    try:
        for m in layers:
            m.step = step_guard(m)  # instance attribute: shadows FavorAttention.step until removed
        with _restored_on_error(layers), _no_cache(model), statistics_step():
            model.eval()
            model(**batch)
            _check_all_reached(model, layers, seen)
    finally:
        for h in handles:
            h.remove()
        for m in layers:
            m.__dict__.pop("step", None)
        for m, training in modes:
            m.training = training
    return len(layers)


def _shared_favor_layers(model: nn.Module) -> set[int]:
    """ids of the FavorAttention layers whose attention module serves several layers (``favor_shared``)."""
    return {id(m.favor) for m in model.modules()
            if getattr(m, "favor_shared", False) and is_favor_attention(getattr(m, "favor", None))}


def _stacked(calls: list[tuple]) -> tuple:
    """(q, k, key padding mask) of several calls of one layer, stacked along the batch ([N*B, H, L, d], [N*B, L])."""
    if len(calls) == 1:
        return calls[0]
    q = torch.cat([c[0] for c in calls])
    k = torch.cat([c[1] for c in calls])
    if all(c[2] is None for c in calls):
        return q, k, None
    masks = [torch.ones(c[1].shape[0], c[1].shape[2], dtype=torch.bool, device=c[1].device) if c[2] is None
             else c[2].bool() for c in calls]
    return q, k, torch.cat(masks)


def _check_all_reached(model: nn.Module, layers: list[FavorAttention], seen: set[int]) -> None:
    missed = [m for m in layers if id(m) not in seen]
    if not missed:
        return
    names = {id(m): n for n, m in model.named_modules()}
    listed = ", ".join(names.get(id(m), type(m).__name__) for m in missed[:6]) + (" ..." if len(missed) > 6 else "")
    raise ValueError(
        f"calibrate_feature_statistics: the forward reached {len(layers) - len(missed)} of the {len(layers)} FAVOR+ "
        f"layers of {type(model).__name__}; not reached: {listed}. Pass the inputs that run them (cross-attention "
        "layers need encoder_hidden_states, and encoder_attention_mask if padded, in the batch). No layer was changed."
    )
