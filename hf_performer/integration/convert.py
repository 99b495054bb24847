"""convert_to_performer: turn a stock model of a supported family (BERT, RoBERTa, DistilBERT, GPT-2, and the
rows of ``generic.ROWS``: Llama, Mistral, Qwen2, Qwen3, ...) into its Performer class.

The conversion is in place and keeps every weight: the model's class becomes the Performer subclass
of its class, its config the Performer config (same fields + FAVOR+ settings), and each attention
module gains a ``favor`` FavorAttention. ``redraw_features`` / ``maybe_redraw_features`` redraw the
random features of every layer; a draw depends on (seed, layer id, draw count) only, so every
data-parallel rank draws the same features without communicating.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..attention import KEEP_IN_FP32, FavorAttention, is_favor_attention
from ..settings import PerformerConfig
from .attention_function import ATTN_IMPLEMENTATION
from .caller import warn_user
from .modeling import PerformerModelMixin, attach_favor, plan_favor
from .refusals import unconvertible_reason
from .registry import FAMILIES, family_traits
from .zero_shot import share_notice


def supported_model_classes() -> list[str]:
    """The name of every stock model class ``convert_to_performer`` converts."""
    return [stock.__name__ for _, classes in FAMILIES.values() for stock in classes]


def supported_model_types() -> list[str]:
    """The stock ``model_type`` of every family ``convert_to_performer`` converts."""
    return list(FAMILIES)


def _family(model) -> tuple | None:
    """The ``registry.FAMILIES`` entry (Performer config class, {stock class: Performer class}) that converts
    ``model``'s class, or None when no family does."""
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    return family if family is not None and type(model) in family[1] else None


def _unsupported(model) -> ValueError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reason = unconvertible_reason(model_type)
    if reason is not None:
        return ValueError(
            f"convert_to_performer refuses {type(model).__name__} (model_type {model_type!r}): its attention uses "
            f"{reason}. FAVOR+ cannot compute that honestly, so the converted model would silently differ."
        )
    if model_type in FAMILIES:
        return ValueError(
            f"convert_to_performer does not support {type(model).__name__}. Supported {model_type} classes: "
            f"{', '.join(c.__name__ for c in FAMILIES[model_type][1])}."
        )
    return ValueError(
        f"convert_to_performer does not support {type(model).__name__} (model_type {model_type!r}). Supported model "
        f"types: {', '.join(supported_model_types())}."
    )


def _composite_parts(model: nn.Module) -> list[str] | None:
    """The sub-model attributes of a composite encoder-decoder (``EncoderDecoderModel``, ``VisionEncoderDecoderModel``,
    ...: a config holding ``encoder`` and ``decoder`` configs, each the ``.config`` of the sub-model of that name), or
    None for any other model."""
    cfg = getattr(model, "config", None)
    parts = [name for name in ("encoder", "decoder") if isinstance(getattr(cfg, name, None), PretrainedConfig)
             and getattr(getattr(model, name, None), "config", None) is getattr(cfg, name)]
    return parts if len(parts) == 2 else None


def convert_to_performer(model: nn.Module, config: PerformerConfig | dict | None = None) -> nn.Module:
    """Give ``model`` FAVOR+ attention in place (same weights, same task API) and return it.

    Args:
        model: a transformers BertModel/BertFor*, GPT2Model/GPT2LMHeadModel/GPT2For*/GPT2DoubleHeadsModel,
            RobertaModel/RobertaFor*, DistilBertModel/DistilBertFor*, or a model class of a ``generic.ROWS`` family
            (LlamaModel/LlamaFor*, MistralFor*, Qwen2For*, Qwen3For*, ...). Configs with sliding-window layers
            become all global FAVOR+ layers (``sliding_window: None``). A composite encoder-decoder
            (``EncoderDecoderModel``, ``VisionEncoderDecoderModel``, ...) has each supported sub-model converted and
            its config's ``encoder`` / ``decoder`` entries updated, so it saves and reloads as converted; a sub-model
            it does not support (a vision encoder, say) keeps its attention, with a warning. A PEFT model
            (``get_peft_model``) has its base model converted in place, adapters kept, and its adapters' configs
            name no base model (they named the stock source, onto which a reload would run softmax attention).
        config: the FAVOR+ settings (PerformerConfig or its dict); defaults to PerformerConfig().

    The model's ``name_or_path`` becomes "" (no checkpoint holds the converted model until ``save_pretrained``, which
    sets it to the folder); ``config.name_or_path`` keeps the source's.

    Raises (before anything is modified):
        ValueError: unsupported model (the message lists the supported model types), a model whose attention
            cannot be estimated by FAVOR+ (``refusals``: relative-position biases, ALiBi, attention sinks,
            soft-capping; the message names the reason), an already converted model, ``output_attentions=True``, a
            model without any attention module, or a sub-model taken out of a composite encoder-decoder (its
            layers hold another config object than it does: convert the composite model instead);
            NotImplementedError: favor++ with cross-attention.
        TypeError: ``config`` is not a PerformerConfig or dict.
    """
    if config is None:
        settings = PerformerConfig()
    elif isinstance(config, (PerformerConfig, dict)):
        settings = PerformerConfig.from_dict(config)
    else:
        raise TypeError(f"convert_to_performer expects a PerformerConfig (or its dict), got {type(config).__name__}.")
    base = getattr(model, "get_base_model", None)
    if callable(base) and hasattr(model, "peft_config") and base() is not model:  # a PEFT wrapper (PeftModel, ...)
        convert_to_performer(base(), settings)  # in place: the adapters stay in the converted layers
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = None  # (it named the stock source: a reload would run softmax)
        return model
    parts = _composite_parts(model)
    converted = _convert_composite(model, parts, settings) if parts is not None else _convert(model, settings)
    # no checkpoint holds this model yet: PEFT records a model's ``name_or_path`` as an adapter's base, and the
    # source's would reload the adapter onto softmax attention. Saving it sets its folder there
    # (``PerformerModelMixin.save_pretrained``); config.name_or_path keeps the source (model cards: "fine-tuned from")
    if isinstance(getattr(converted, "name_or_path", None), str):
        converted.name_or_path = ""
    # transformers saves a model loaded with ``from_pretrained`` back in its checkpoint's layout: the renamings it
    # loaded with (``_weight_conversions``, e.g. GPT-NeoX's lm_head <- embed_out) are reversed at save. They belong to
    # the stock classes; the Performer classes load their own parameter names, so the converted model keeps none
    for module in converted.modules():
        if isinstance(module, PreTrainedModel):
            module._weight_conversions = []
    return converted


def _convert_composite(model: nn.Module, parts: list[str], settings: PerformerConfig) -> nn.Module:
    """convert_to_performer for a composite encoder-decoder: each supported sub-model (checked first, all of them,
    before any is modified), then the composite config's entries for them."""
    supported = []
    for name in parts:
        sub = getattr(model, name)
        if isinstance(sub, PerformerModelMixin) or _family(sub) is not None:
            supported.append(name)
    if not supported:
        raise ValueError(
            f"convert_to_performer supports neither sub-model of {type(model).__name__} ("
            + ", ".join(f"{n}: {type(getattr(model, n)).__name__}" for n in parts)
            + f"). Supported model types: {', '.join(supported_model_types())}.")
    todo = [n for n in supported if not isinstance(getattr(model, n), PerformerModelMixin)]
    if not todo:
        raise ValueError(f"{type(model).__name__}'s sub-models already run FAVOR+ attention; convert the original "
                         "model instead.")
    plans = {n: _prepare(getattr(model, n), settings, inner=True) for n in todo}  # every check before any change
    for name in parts:
        if name not in supported:
            sub = getattr(model, name)
            warn_user(f"{type(model).__name__}.{name} ({type(sub).__name__}, model_type "
                      f"{getattr(sub.config, 'model_type', None)!r}) is not a family convert_to_performer supports: "
                      "it keeps its own attention; only the "
                      + " and ".join(supported) + " runs FAVOR+.")
    for name, prepared in plans.items():
        _apply(getattr(model, name), *prepared)
        setattr(model.config, name, getattr(model, name).config)  # what save_pretrained writes
    share_notice(favor_modules(model), encoder_decoder=True)  # one notice for the whole model, with its batch
    return model


def _convert(model: nn.Module, settings: PerformerConfig) -> nn.Module:
    """convert_to_performer for one model (no composite)."""
    _apply(model, *_prepare(model, settings, inner=False))
    return model


def _prepare(model: nn.Module, settings: PerformerConfig, inner: bool):
    """Every check and everything built before ``model`` changes: (old configs, new config, rederived attributes,
    Performer class, favor plan). ``inner``: ``model`` is a composite's sub-model, whose layers may hold the config
    it was built with while it holds the composite's copy (EncoderDecoderModel rebinds only the sub-model's
    ``config``): every config of the model's class inside it is replaced."""
    if isinstance(model, PerformerModelMixin) or str(getattr(getattr(model, "config", None), "model_type", "")
                                                     ).startswith("performer_"):  # (also through its folder's code)
        raise ValueError(f"{type(model).__name__} already runs FAVOR+ attention; convert the original model instead.")
    old = getattr(model, "config", None)
    family = _family(model)
    if family is None:
        raise _unsupported(model)
    config_cls, classes = family
    if getattr(old, "output_attentions", False):
        raise ValueError("config.output_attentions=True cannot be honoured: FAVOR+ never forms attention matrices.")

    # build and validate everything before touching the model
    performer_cls = classes[type(model)]
    plan = plan_favor(performer_cls._favor_sites(model), settings)
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no attention module to convert (num_hidden_layers="
            f"{getattr(old, 'num_hidden_layers', '?')}): converting it would change nothing. Build or load a model "
            "with attention layers."
        )
    fields = {k: v for k, v in old.to_dict().items() if k not in ("model_type", "transformers_version", "layer_types")}
    # e.g. sliding_window: None (every layer becomes global FAVOR+ attention; generic.py says why)
    fields.update(family_traits(old.model_type).cleared)
    new = config_cls.from_dict({**fields, "performer": settings.to_dict()})
    if config_cls.runtime_layer_type is None and list(new.layer_types) != list(old.layer_types):
        # the saved config.json cannot keep them (it says favor_attention), so a reload would derive others
        raise ValueError(
            f"{type(model).__name__}'s layer_types {old.layer_types} are not the ones its config derives from its other "
            f"fields ({new.layer_types}); a converted checkpoint could not reproduce them. Set the fields that define "
            "the layer pattern (e.g. global_attn_every_n_layers) instead of layer_types."
        )
    new._attn_implementation = ATTN_IMPLEMENTATION
    new.name_or_path = old.name_or_path
    # what the stock constructors derived from the fields the conversion changes (sliding_window, ...), as a model
    # built from the new config (a reload) derives it; computed before anything is modified
    cleared = family_traits(old.model_type).cleared
    changed = any(getattr(old, k, None) != v for k, v in cleared.items())  # (else nothing cached can differ)
    rederived = _rederived_attributes(type(model), old, new) if changed else {}

    held = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), type(old))}
    if len(held) > 1 and not inner:
        raise ValueError(
            f"{type(model).__name__}'s layers hold another config object than the model itself: it sits inside a "
            "composite model (EncoderDecoderModel and its kin rebind only the sub-model's config), whose own config "
            "would still save the stock sub-model. Convert the composite model itself "
            "(convert_to_performer(encoder_decoder_model)), or convert the sub-models before wrapping them."
        )
    return list(held.values()), new, rederived, performer_cls, plan


def _apply(model: nn.Module, olds: list, new, rederived: dict, performer_cls: type, plan) -> None:
    """Make the changes ``_prepare`` planned (nothing here can fail halfway on bad input)."""
    for module in model.modules():  # every module that shares the config sees the new one
        if any(getattr(module, "config", None) is old for old in olds):
            module.config = new
    modules = dict(model.named_modules())
    for name, attributes in rederived.items():
        for key, value in attributes.items():
            setattr(modules[name], key, value)
    model.__class__ = performer_cls
    model._keep_in_fp32_modules_strict = set(model._keep_in_fp32_modules_strict or ()) | set(KEEP_IN_FP32)
    attach_favor(plan)


def _plain(value) -> bool:
    """A value a constructor copies out of a config: None, bool, int, float, str, or a tuple/list of those."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _rederived_attributes(stock_cls: type, old, new) -> dict[str, dict]:
    """{module name: {attribute: value}}: the plain attributes (``_plain``) whose value the stock constructors
    derive differently from the stock config ``old`` and from the converted config ``new``, with their value under
    ``new``. Stock modules cache such values when they are built (Qwen2/Qwen3/SmolLM3: whether any layer slides,
    ``has_sliding_layers``, and each attention's ``layer_type`` and ``sliding_window``), so a model converted in
    place would keep running the layers the conversion removed (a sliding-window mask from a config without a
    window: every forward raised). Both models are built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        before, after = stock_cls(copy.deepcopy(old)), stock_cls(copy.deepcopy(new))
    changed = {}
    fresh = dict(after.named_modules())
    for name, module in before.named_modules():
        if name not in fresh:
            continue
        new_vars, old_vars = vars(fresh[name]), vars(module)
        diff = {k: v for k, v in new_vars.items() if k in old_vars and _plain(v) and _plain(old_vars[k])
                and old_vars[k] != v}
        if diff:
            changed[name] = diff
    return changed


def favor_modules(model: nn.Module) -> list[FavorAttention]:
    """Every FavorAttention of ``model`` (module order; the package's, or a saved folder's copy:
    ``attention.is_favor_attention``). Raises ValueError if there is none."""
    modules = [m for m in model.modules() if is_favor_attention(m)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no FavorAttention layers; convert it with convert_to_performer.")
    return modules


def redraw_features(model: nn.Module) -> int:
    """Redraw the random features of every FAVOR+ layer (draw count + 1). Returns the number of layers."""
    modules = favor_modules(model)
    for m in modules:
        m.redraw_features()
    _peft_redraw_notice(model)
    return len(modules)


_PEFT_NOTICE = [False]


def _peft_redraw_notice(model: nn.Module) -> None:
    """Once per process, when a PEFT-wrapped model's features are redrawn: an adapter saved alone will not carry
    them (they are buffers of the base model; ``PeftModel.save_pretrained`` writes the adapters only)."""
    if _PEFT_NOTICE[0] or getattr(model, "peft_config", None) is None:
        return
    _PEFT_NOTICE[0] = True
    warn_user(
        f"redrew the FAVOR+ features of a PEFT model ({type(model).__name__}): they are buffers of the base model, "
        "and PeftModel.save_pretrained saves the adapters only, so the base folder + that adapter reload with the "
        "base folder's features, not the ones the adapters were trained with. Save model.merge_and_unload() "
        "instead (a plain Performer checkpoint with these features), or train adapters with redraw_interval=0. "
        "This warning is shown once."
    )


def redraw_schedule(model: nn.Module) -> list[FavorAttention]:
    """The FAVOR+ layers of ``model`` that follow a redraw schedule (``redraw_interval`` > 0). Raises ValueError,
    naming the fix, when there is none: a redraw schedule on such a model would never redraw anything."""
    modules = [m for m in favor_modules(model) if m.config.redraw_interval > 0]
    for m in modules:  # something follows the schedule: no ``redraw_notice`` for these layers
        m.redraw_followed = True
    if not modules:
        raise ValueError(
            f"every FAVOR+ layer of {type(model).__name__} has redraw_interval=0 (never redraw), so following its "
            "redraw schedule would never redraw anything. Convert with PerformerConfig(redraw_interval=N) "
            "(hf-performer convert --redraw-interval N; the examples' --performer_redraw_interval N), call "
            "hf_performer.redraw_features(model) to redraw now, or drop the redraw callback."
        )
    return modules


def maybe_redraw_features(model: nn.Module, optimizer_step: int, start: list[int] | None = None) -> bool:
    """Follow ``PerformerConfig.redraw_interval`` (in optimizer steps): after ``optimizer_step`` steps every
    layer holds draw number ``start + optimizer_step // redraw_interval``. Call it after each optimizer step; calling
    it again for the same step (gradient accumulation, resumed runs) changes nothing. Returns True if it redrew.

    ``start``: each scheduled layer's draw count at step 0 of this run (``redraw_schedule`` order), from
    ``run_start_draws``; None = 0 (a run from a freshly converted model). A run that starts from a checkpoint which
    has drawn before needs it to redraw every interval of its own steps (else the first redraw waits until the
    step count passes the draws already made).

    Raises ValueError if the model has no FAVOR+ layer, or no layer with a redraw interval (it would never redraw).
    """
    redrew = False
    modules = redraw_schedule(model)
    start = [0] * len(modules) if start is None else start
    if len(start) != len(modules):
        raise ValueError(f"start has {len(start)} draw counts for the {len(modules)} layers of the redraw schedule.")
    for m, first in zip(modules, start):
        target = first + int(optimizer_step) // m.config.redraw_interval
        while m.draws < target:  # (a Python int: no host read per step)
            m.redraw_features()
            redrew = True
    if redrew:
        _peft_redraw_notice(model)
    return redrew


def run_start_draws(model: nn.Module, optimizer_step: int) -> list[int]:
    """The ``start`` of ``maybe_redraw_features`` for a run at ``optimizer_step`` (0 for a new run, the checkpoint's
    step when resuming): each scheduled layer's draw count less the draws its schedule made in those steps, never
    below 0. A new run on a model that has drawn d times starts from d; a resumed run gets the start its first part
    had (its checkpoint's draws include that part's); a checkpoint that holds fewer draws than its step implies
    starts from 0 (the schedule catches up)."""
    return [max(0, m.draws - int(optimizer_step) // m.config.redraw_interval) for m in redraw_schedule(model)]
