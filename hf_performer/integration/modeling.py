"""Pieces shared by the Performer model classes of every architecture.

A Performer model class is ``class PerformerXForY(PerformerModelMixin, XForY)``: the stock class builds
its modules, then ``post_init`` (overridden here) attaches a ``FavorAttention`` named ``favor`` to every
attention module and initialises it. Nothing else of the stock model changes, so every pretrained
weight keeps its name; the state dict gains ``...favor.projection`` etc. (persistent buffers).

Configs: ``PerformerXConfig(XConfig)`` adds ``performer`` (PerformerConfig.to_dict()),
``hf_performer_version`` and ``layer_types = ["favor_attention"] * n_layers``. The latter makes
``DynamicCache(config=...)`` build FAVOR cache layers, and makes the stock config class refuse the
checkpoint loudly (``layer_types`` entries are validated) instead of silently loading softmax attention.
A config's ``save_pretrained`` also writes the portable modeling code and ``auto_map`` (``portable``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation.configuration_utils import GenerationMode
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..attention import KEEP_IN_FP32, FavorAttention
from ..settings import PerformerConfig
from ..version import __version__
from .attention_function import ATTN_IMPLEMENTATION, STEP_KWARG, register_favor_attention
from .cache import LAYER_TYPE, check_past_mask, favor_cache_layer, register_favor_layer_type, use_favor_layers
from .portable import write_portable_code
from .zero_shot import share_notice

# The model classes need the "favor" attention and cache layer type: importing them registers both (idempotent), so
# the portable copy of this code that checkpoints carry (``portable``) works on its own.
register_favor_attention()
register_favor_layer_type()


def plugin_version() -> str:
    return __version__


# ---------------------------------------------------------------------------------------------- configs
class PerformerConfigMixin:
    """What every PerformerXConfig adds to its stock config class (listed first among the bases). The fields
    themselves (``performer``, ``hf_performer_version``, ``layer_types``) are declared on each config class,
    where the strict dataclass machinery sees them."""

    # the layer type the model code sees in memory. Families whose model code picks each layer's mask by
    # ``config.layer_types`` (Qwen2, ...) keep "full_attention" there (every layer is global FAVOR+ attention); the
    # saved config.json always says "favor_attention", which the stock config classes refuse.
    # None: the stock config derives them (ModernBERT: which layers are local, kept exact; ``generic.Row.exact_if``).
    runtime_layer_type = LAYER_TYPE

    def __post_init__(self, **kwargs):
        """Validate/normalise the Performer fields, then the stock checks."""
        self.performer = PerformerConfig.from_dict(self.performer or {}).to_dict()
        n = self.num_hidden_layers
        if self.runtime_layer_type is None:
            if self.layer_types is not None and list(self.layer_types) == [LAYER_TYPE] * n:
                self.layer_types = None  # the stock __post_init__ derives them
        elif self.layer_types is None or list(self.layer_types) == [LAYER_TYPE] * n:
            self.layer_types = [self.runtime_layer_type] * n
        if self.runtime_layer_type is not None and list(self.layer_types) != [self.runtime_layer_type] * n:
            raise ValueError(
                f"{type(self).__name__}.layer_types must be {n} x '{LAYER_TYPE}' (every layer is FAVOR+), "
                f"got {self.layer_types}."
            )
        if self.hf_performer_version is None:
            self.hf_performer_version = plugin_version()
        super().__post_init__(**kwargs)

    def validate_layer_type(self):  # "favor_attention" is checked in __post_init__
        pass

    def __setattr__(self, name, value):
        """``performer`` set after construction (``config.performer = {...}``, or a ``from_pretrained(...,
        performer={...})`` / ``AutoConfig`` override, which transformers applies by setattr after __post_init__)
        updates the current settings: the fields given replace theirs, the others keep their values, and the result
        is validated at once (``PerformerConfig.from_dict``; ValueError names a bad field). Such overrides were stored
        unchecked and partial, so a partial dict reset the other fields to their defaults and a bad one surfaced at
        the next load. Layers already built keep the settings they were built with, and such a model refuses to
        ``save_pretrained`` until the two agree again (``PerformerModelMixin.save_pretrained``)."""
        if name == "performer" and value is not None and isinstance(self.__dict__.get("performer"), dict):
            update = value.to_dict() if isinstance(value, PerformerConfig) else dict(value)
            value = PerformerConfig.from_dict({**self.__dict__["performer"], **update}).to_dict()
        super().__setattr__(name, value)

    def to_dict(self):
        d = super().to_dict()
        d["hf_performer_version"] = plugin_version()  # the plugin that writes the checkpoint
        if d.get("layer_types") is not None:
            d["layer_types"] = [LAYER_TYPE] * len(d["layer_types"])
        return d

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """``PreTrainedConfig.save_pretrained``, plus the portable modeling code and ``auto_map`` (see ``portable``):
        the folder then also loads with ``trust_remote_code=True`` where hf_performer is not installed."""
        write_portable_code(self, save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


# ---------------------------------------------------------------------------------------------- sites
@dataclass
class AttentionSite:
    """An attention module of a stock model and how to build its FavorAttention."""

    module: nn.Module
    head_dim: int
    num_heads: int
    layer_id: int  # self-attention: the layer index; cross-attention: num_layers + layer index
    performer_class: type | None = None  # subclass whose forward handles the FAVOR cache (or None)
    cross_attention: bool = False


def site_settings(site: AttentionSite, settings: PerformerConfig) -> PerformerConfig:
    """The FAVOR+ settings of one site.

    An uncalibrated bidirectional FavorAttention measures its key shift / balance factor / favor++ A on the
    queries of each call. For cross-attention that would make decoding (one query per call) differ from a
    full forward (all queries), so cross-attention sites run without those query statistics, and without a
    local window."""
    if not site.cross_attention:
        return settings
    if settings.kernel == "favor++":
        raise NotImplementedError(
            "kernel='favor++' is not supported with cross-attention: its variance-optimal A is measured on the "
            "queries of each call, so cached decoding would not match full forwards. Use kernel='softmax'."
        )
    # no local window either: query and key positions belong to different sequences
    return PerformerConfig.from_dict({**settings.to_dict(), "center_keys": False, "balance_qk": False, "local_window": 0})


def plan_favor(sites: Iterator[AttentionSite], settings: PerformerConfig) -> list[tuple[AttentionSite, PerformerConfig]]:
    """Every site with its settings; raises before anything is modified."""
    return [(site, site_settings(site, settings)) for site in sites]


def attach_favor(plan: list[tuple[AttentionSite, PerformerConfig]]) -> None:
    """Give every planned site a FavorAttention child ``favor`` (and its Performer forward), and the model's
    layers their shared zero-shot notice (``zero_shot.py``). Idempotent. ``plan`` covers every site of one model."""
    for site, settings in plan:
        module = site.module
        if site.performer_class is not None and not isinstance(module, site.performer_class):
            module.__class__ = site.performer_class  # adds a forward only: no new state, same weights
        if not isinstance(getattr(module, "favor", None), FavorAttention):
            ref = next(module.parameters(), None)
            favor = FavorAttention(site.head_dim, settings, num_heads=site.num_heads, layer_id=site.layer_id,
                                   cross_attention=site.cross_attention)
            module.favor = favor.to(ref.device) if ref is not None else favor
    share_notice([site.module.favor for site, _ in plan])


DERIVED_BUFFERS = ("projection", "aligned_projection", "aligned_bias")  # functions of seed, layer, draw, centers


def _loaded(t: torch.Tensor) -> bool:
    return bool(getattr(t, "_is_hf_initialized", False))


@torch.no_grad()
def init_favor_buffers(favor: FavorAttention) -> None:
    """Initialise the buffers a checkpoint did not provide (loaded ones carry transformers' initialised flag).

    Counters and statistics start at zero (uncalibrated, draw 0); the random features are re-derived from
    (seed, layer_id, draw_count): deterministic, never garbage."""
    for name, buf in favor.named_buffers(recurse=False):
        if name not in DERIVED_BUFFERS:
            init.zeros_(buf)
    derived = [getattr(favor, n) for n in DERIVED_BUFFERS if hasattr(favor, n)]
    if all(_loaded(t) for t in derived):
        return
    init.copy_(favor.projection, favor._draw(int(favor.draw_count)).to(favor.projection))
    if getattr(favor, "aligned", False):
        favor._draw_aligned()


# ---------------------------------------------------------------------------------------------- models
def join_causal_lm_names(cls: type) -> None:
    """A Performer model class whose stock class is a causal LM joins transformers' causal-LM names
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, under its config's model type): Trainer shifts the labels for label
    smoothing only for class names in it (and the text-generation pipeline and model cards read it); without it
    Trainer smoothed a converted GPT-2's loss against the current token instead of the next. Done as each class is
    defined, so the copy of this code that a saved folder carries (``portable``, loaded with
    ``trust_remote_code=True`` where hf_performer is not installed) does it too."""
    config_class = getattr(cls, "config_class", None)
    model_type = getattr(config_class, "model_type", "")
    if not model_type:
        return
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    stock = (b for b in cls.__mro__[1:] if not issubclass(b, PerformerModelMixin))
    if any(b.__name__ in causal for b in stock):
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(model_type, cls.__name__)


class PerformerModelMixin:
    """Mixed in front of a stock PreTrainedModel class (see the module docstring)."""

    _keep_in_fp32_modules_strict = list(KEEP_IN_FP32)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        join_causal_lm_names(cls)

    def _favor_sites(self) -> Iterator[AttentionSite]:  # pragma: no cover - defined per architecture
        raise NotImplementedError

    def post_init(self):
        attach_favor(plan_favor(self._favor_sites(), PerformerConfig.from_dict(self.config.performer)))
        super().post_init()

    def get_correct_attn_implementation(self, requested_attention, is_init_check: bool = False) -> str:
        """What transformers asks a sub-model when a wrapper (EncoderDecoderModel.set_attn_implementation, ...) sets
        the attention of the models inside it: refused as for the model itself (else its layers ran softmax)."""
        return self._check_and_adjust_attn_implementation(requested_attention, is_init_check)

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        if attn_implementation not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(
                f"{type(self).__name__} runs Performer FAVOR+ attention only (attn_implementation="
                f"'{ATTN_IMPLEMENTATION}'); got attn_implementation={attn_implementation!r}. To use softmax attention, "
                "load the original (unconverted) checkpoint."
            )
        return ATTN_IMPLEMENTATION

    def initialize_weights(self):
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, FavorAttention) and not module.projection.is_meta:
                init_favor_buffers(module)

    def favor_modules(self) -> list[FavorAttention]:
        return [m for m in self.modules() if isinstance(m, FavorAttention)]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then every FAVOR+ layer reads its loaded draw count and calibration
        flag (``FavorAttention.refresh_buffer_values``): transformers writes the buffers without ``load_state_dict``,
        and a model compiled right after loading would otherwise run as uncalibrated draw-0 layers."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (output_loading_info=True)
        for module in model.favor_modules():
            module.refresh_buffer_values()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, refused (ValueError, before anything is written) when
        ``config.performer`` no longer describes the FAVOR+ layers: set on a built model, it does not rebuild them,
        so the checkpoint would load as another model (other buffer shapes, or other settings than trained). Once
        saved, the model's ``name_or_path`` is the folder (what a PEFT adapter trained on it records as its base)."""
        settings = PerformerConfig.from_dict(self.config.performer)
        for site in self._favor_sites():
            built = getattr(getattr(site.module, "favor", None), "config", None)
            if built is None:
                continue
            try:
                wanted = site_settings(site, settings)
            except NotImplementedError:  # (a kernel cross-attention cannot take: it differs from the built one)
                wanted = settings
            wanted, built = wanted.to_dict(), built.to_dict()  # (by value: a folder copy has its own class)
            if wanted != built:
                field = next(f for f in wanted if wanted[f] != built.get(f))
                raise ValueError(
                    f"config.performer says {field}={wanted[field]!r}, but the FAVOR+ layers were built with "
                    f"{field}={built.get(field)!r}: setting config.performer on a built model does not rebuild "
                    "its layers, so this checkpoint would load as another model. Set it back, or convert the original "
                    "model with the settings you want."
                )
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        # the folder now reproduces this model: a PEFT adapter trained on it names it as its base (PEFT reads
        # ``name_or_path``), so AutoPeftModel reloads the adapter onto the converted model, not the stock source
        self.name_or_path = str(save_directory)
        return saved


class PerformerGenerationMixin:
    """Generation guards: the FAVOR state is a running sum, it cannot be rolled back (cropped); and the mask
    ``generate`` hands each step."""

    _is_stateful = True  # transformers refuses assisted generation for stateful models

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask=None, cache=None, **kwargs):
        """The mask ``generate`` builds for a step, outside the model's (possibly compiled) forward: the 2D padding
        mask [B, T] of the step's T new tokens, the only columns FAVOR+ reads with a cache (its keys are the new
        tokens; the past is in the state). A compiled decoding step then takes the same shapes at every token; with
        the whole mask, one column wider per token, it would compile (or record a CUDA graph) again for each. Any
        other mask is returned as it is; the forward makes its own mask from this one as without generate."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and cache is not None:
            return attention_mask[:, -inputs_embeds.shape[1] :]
        return attention_mask

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """The stock cache preparation; a static cache it builds gets FavorCacheLayers wherever the config's
        in-memory layer types gave key/value layers (``cache.use_favor_layers``). A quantized key/value cache is
        refused: there are no keys and values to quantize (transformers would otherwise ask some families to install
        its quantization backend, which could not help)."""
        if generation_config.cache_implementation == "quantized" and generation_config.use_cache is not False:
            raise ValueError(
                f"{type(self).__name__} cannot use cache_implementation='quantized': FAVOR+ decoding keeps a running "
                "state of fixed size per layer instead of keys and values, so there is nothing to quantize and no "
                "cache growing with the context to save memory on. Leave cache_implementation unset (or 'static' for a "
                "compiled decoding step)."
            )
        check_past_mask(model_kwargs.get("cache", model_kwargs.get("past_key_values")), model_kwargs.get("attention_mask"))
        prepared = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        use_favor_layers(model_kwargs.get("cache", model_kwargs.get("past_key_values")))
        return prepared

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        if generation_mode in (GenerationMode.ASSISTED_GENERATION, GenerationMode.CONTRASTIVE_SEARCH):
            raise ValueError(
                f"{type(self).__name__} cannot use {generation_mode.value}: FAVOR+ decoding keeps a running sum per "
                "layer, which cannot be cropped back after rejected draft tokens. Use greedy search, sampling or "
                "beam search."
            )
        return super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)


# ---------------------------------------------------------------------------------------------- decoding
class _StepCache:
    """The cache a stock attention module sees while its layer decodes through the FAVOR+ state: ``update`` hands
    the new keys/values straight back (nothing is stored), everything else is the real cache's."""

    def __init__(self, cache):
        self._cache = cache

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def __getattr__(self, name):
        return getattr(self._cache, name)


class RecurrentDecodingMixin:
    """Mixed in front of a stock attention module that calls ``cache.update(k, v, layer_idx)`` and then the attention
    interface (Llama and its relatives). With a cache, the module runs unchanged (projections, rotary embeddings)
    but stores nothing in it; the attention function receives the layer's ``FavorCacheLayer`` and advances its
    constant-size FAVOR+ state (``FavorCacheLayer.step``) instead of attending over stored keys."""

    favor_cache_kwarg = "cache"  # the stock forward's name for its cache argument (GPT-NeoX: "layer_past")
    # the module serves several layers (ALBERT's cross-layer sharing, ``generic.Row.shared``): the statistics step pools
    # the q, k of all its calls into its one set of statistics (``statistics.calibrate_feature_statistics``)
    favor_shared = False

    def forward(self, *args, **kwargs):
        name = self.favor_cache_kwarg
        if "past_key_values" in kwargs and kwargs.get(name) is None:  # the deprecated name
            kwargs[name] = kwargs.pop("past_key_values")
        cache = kwargs.get(name)
        if cache is None:
            return super().forward(*args, **kwargs)
        kwargs[name] = _StepCache(cache)
        kwargs[STEP_KWARG] = favor_cache_layer(cache, self.layer_idx)
        return super().forward(*args, **kwargs)
