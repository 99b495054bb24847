"""Forward hooks that see attention as it happens, for the statistics, calibration and report steps.

* ``forward_kwargs(model)``: ``use_cache=False`` for causal models (full-sequence forwards, not decoding);
* ``attention_names(model)``: the attention modules of a converted model (those owning a ``favor``
  FavorAttention), in layer order. The stock teacher has modules of the same names (conversion keeps names).
* ``favor_inputs(model)``: records q, k, the key padding mask and the scale exactly as they reach each
  FavorAttention (a forward pre-hook on ``favor``: q/k after the projections, before any FAVOR transform).
* ``attention_outputs(model, names)``: the output of each named attention module (BERT/RoBERTa: the context
  before the output projection; GPT-2/DistilBERT: after it), overwritten on every forward.
* ``attention_inputs(model, names)`` / ``replaced_attention_inputs(model, inputs)``: read the hidden states
  entering each attention module, or substitute them (teacher forcing: the student's attention runs on the
  teacher's inputs, which isolates each layer's own approximation error).

``attention_outputs`` / ``attention_inputs`` key what they record by call: a module that runs several times in one
forward (ALBERT's attention, shared by the layers of its group) is recorded under ``name`` for its first call, then
``name#1``, ``name#2``, ... (``call_key``); ``replaced_attention_inputs`` substitutes by the same keys. Every layer
a shared module serves is thus compared (and trained) on its own inputs. The count restarts with each forward of
the model (or of its base model).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from hf_performer.attention import FavorAttention
from hf_performer.integration.registry import family_traits

_FAVOR_SIGNATURE = inspect.signature(FavorAttention.forward)


def is_causal_model(model: nn.Module) -> bool:
    """True for decoders (GPT-2, the causal rows of ``integration.generic``, BERT-style models with ``is_decoder``)."""
    config = model.config
    causal = family_traits(config.model_type).causal
    return bool(getattr(config, "is_decoder", False)) if causal is None else causal


def forward_kwargs(model: nn.Module) -> dict:
    """Keyword arguments for full-sequence forwards: causal models must not take the cached decoding path
    (``favor.step``), whose inputs the hooks here do not see."""
    return {"use_cache": False} if is_causal_model(model) else {}


def attention_names(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(getattr(m, "favor", None), FavorAttention)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no FAVOR+ attention modules (convert it first).")
    return names


def call_key(name: str, call: int) -> str:
    """The record key of call ``call`` (0-based, within one forward) of the module ``name``."""
    return name if call == 0 else f"{name}#{call}"


def module_name(key: str) -> str:
    """The module name of a record key (``call_key``)."""
    return key.split("#", 1)[0]


class _Calls:
    """Counts each module's calls within the current forward of ``model`` (restarted by a pre-hook on the model and
    on its base model: the calibration and report steps also run ``model.base_model`` alone)."""

    def __init__(self, model: nn.Module, handles: list):
        self.counts: dict[str, int] = {}
        roots = {id(m): m for m in (model, getattr(model, "base_model", model))}
        handles.extend(m.register_forward_pre_hook(lambda *_: self.counts.clear()) for m in roots.values())

    def key(self, name: str) -> str:
        call = self.counts.get(name, 0)
        self.counts[name] = call + 1
        return call_key(name, call)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def favor_inputs(model: nn.Module) -> Iterator[dict[str, list[tuple]]]:
    """{attention name: [(q, k, key_padding_mask or None, scale), ...] one entry per forward}."""
    store: dict[str, list[tuple]] = {}
    handles = []

    def make(name):
        def hook(module, args, kwargs):
            bound = _FAVOR_SIGNATURE.bind(module, *args, **kwargs)
            a = bound.arguments
            mask = a.get("key_padding_mask")
            store.setdefault(name, []).append(
                (a["q"].detach(), a["k"].detach(), None if mask is None else mask.detach(), a.get("scale"))
            )

        return hook

    modules = dict(model.named_modules())
    try:
        for name in attention_names(model):
            handles.append(modules[name].favor.register_forward_pre_hook(make(name), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def attention_outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """{record key (``call_key``): output of that attention call} (overwritten on every forward)."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles: list = []
    calls = _Calls(model, handles)

    def make(name):
        def hook(module, args, output):
            store[calls.key(name)] = _first(output)

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def attention_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """{record key (``call_key``): hidden states entering that attention call} (overwritten on every forward)."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles: list = []
    calls = _Calls(model, handles)

    def make(name):
        def hook(module, args, kwargs):
            store[calls.key(name)] = _hidden_states(args, kwargs)

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(make(name), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaced_attention_inputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run each attention call on the given hidden states instead of its own (``inputs`` keyed like
    ``attention_inputs``: by ``call_key``). Raises KeyError naming a call that ``inputs`` lacks."""
    modules = dict(model.named_modules())
    handles: list = []
    calls = _Calls(model, handles)

    def make(name):
        def hook(module, args, kwargs):
            key = calls.key(name)
            if key not in inputs:
                raise KeyError(f"replaced_attention_inputs has no hidden states for attention call {key!r} "
                               f"(recorded: {sorted(inputs)}); record them from a forward of the same inputs.")
            if args:
                return (inputs[key], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inputs[key]}

        return hook

    try:
        for name in dict.fromkeys(module_name(k) for k in inputs):
            handles.append(modules[name].register_forward_pre_hook(make(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
