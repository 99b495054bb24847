"""Performer classes for every family whose attention goes through transformers' attention interface, built from
one table row per family (``ROWS``): adding a family is a row plus tests, not a module of copied code.

A row names the stock attention module class, where the head layout lives, whether the family is causal, which
config fields the conversion changes, whether the model code picks masks by ``config.layer_types``, and the
parameter names calibration trains. From it this module derives, for the family's stock ``model_type``:

* ``Performer<X>Config`` (``performer_<type>``): the stock config + FAVOR+ settings (``PerformerConfigMixin``);
* ``Performer<X>Attention``: the stock attention module + ``RecurrentDecodingMixin`` (generation through the
  constant-size FAVOR+ state; the projections and rotary embeddings run unchanged, FAVOR+ sees the rotated q, k);
* ``Performer<X>Model``, ``Performer<X>ForCausalLM``, ...: one class per model class of the stock modeling module
  (every task head transformers has for the family), registered where transformers registers the stock class.

Grouped-query attention: each layer's ``FavorAttention`` has one set of statistics per key/value head, and decoding
one running state per key/value head (``grouped``). Layers: every attention layer is converted. A config that
mixes sliding-window and full layers (Mistral's ``sliding_window``, Qwen2/Qwen3/SmolLM3's ``use_sliding_window``,
Phi-3's ``sliding_window``) becomes all global FAVOR+ layers: an exact sliding window would need its own banded
op, and FAVOR+ is linear over the whole context anyway, so the converted model attends beyond the old window (the
converted config says ``sliding_window: null``). Up to the window length the attention is the same as before.

The classes are created at import (``type``), live in this module's namespace (``__module__`` is this module:
pickling, ``auto_map`` and the portable copy find them like hand-written classes).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .cache import LAYER_TYPE, use_favor_layers
from .modeling import (
    AttentionSite,
    PerformerConfigMixin,
    PerformerGenerationMixin,
    PerformerModelMixin,
    RecurrentDecodingMixin,
)
from .rotary_positions import mask_positions

LLAMA_QK = r"\.self_attn\.(q_proj|k_proj)\."
LLAMA_ATTENTION = r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\."
LLAMA_LORA = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass(frozen=True)
class Row:
    """One family of the table.

    model_type: the stock ``model_type``; its modeling module is ``transformers.models.<type>.modeling_<type>``.
    attention: the stock attention module class (in that module). It must call ``cache.update(k, v, layer_idx)``
        and then ``ALL_ATTENTION_FUNCTIONS``; q/k/v reach the function as [B, H|Hkv, L, head_dim].
    kv_heads: the config field with the number of key/value heads (None: as many as query heads).
    head_dim: the attention module's attribute with the head size.
    cross_attention: the stock cross-attention module class (BERT-style decoders with ``add_cross_attention``), or
        None. Cross-attention is bidirectional FAVOR+ over the encoder keys (``modeling.site_settings``).
    causal: True for decoders, False for encoders, None when ``config.is_decoder`` decides (BERT-style). The
        attention module's ``is_causal`` decides each call; this says whether the model decodes, for the
        full-sequence statistics/calibration forwards.
    cleared: config fields the conversion sets (e.g. ``sliding_window: None``: every layer becomes global).
    masks_by_layer_type: the model code indexes its masks by ``config.layer_types`` (keep "full_attention" there in
        memory; config.json still says "favor_attention").
    qk / projections / lora: regexes on parameter names (calibration ``--train qk`` / ``attention``) and module
        names (``--train lora``).
    default_class: what a checkpoint without ``architectures`` is loaded as.
    positions: how ``hf-performer convert --max-position-embeddings`` grows the position limit (``conversion.positions``).
    cache_kwarg: the name of the attention module's cache argument.
    shared: the model reuses its attention modules across layers (ALBERT's cross-layer parameter sharing:
        ``num_hidden_groups`` x ``inner_group_num`` attention modules run ``num_hidden_layers`` times). Such modules
        have no ``layer_idx``: each gets one FavorAttention (one random-feature draw, one set of statistics) with
        its position among the family's attention modules as layer id; the statistics step fits that one set on
        the q, k of every layer the module serves (``statistics.calibrate_feature_statistics`` pools its calls),
        and counts the module once.
    query_scaled: the stock module multiplies q by its ``scaling`` before the attention call and passes scaling=1.0
        (OPT): the attention function takes that factor back off q and into the scale, since FAVOR+ splits the scale
        evenly between q and k (d^-1/4 each) and an uneven split multiplies the estimator's variance, which grows
        like exp(|q' + k'|^2) (Choromanski et al. 2020, Lemma 2).
    exact_if: which layers are NOT converted: modules whose attribute ``exact_if`` is not None keep their exact
        attention (ModernBERT: ``sliding_window``, its local layers, run exactly in linear memory by ``local_exact``).
        The config's ``layer_types`` then stay the stock ones in memory (``runtime_layer_type = None``).
    """

    model_type: str
    attention: str
    kv_heads: str | None = "num_key_value_heads"
    head_dim: str = "head_dim"
    cross_attention: str | None = None
    causal: bool | None = True
    cleared: dict = field(default_factory=dict)
    masks_by_layer_type: bool = False
    qk: str = LLAMA_QK
    projections: str = LLAMA_ATTENTION
    lora: str = LLAMA_LORA
    default_class: str = ""
    positions: str = "rotary"  # "rotary" (computed), or a learned table indexed like "bert", "roberta" or "opt"
    exact_if: str | None = None  # attention modules whose attribute of this name is set keep exact attention
    cache_kwarg: str = "cache"  # the attention forward's cache argument (GPT-NeoX: "layer_past")
    shared: bool = False  # attention modules serve several layers (ALBERT); layer id = position among them
    query_scaled: bool = False  # q arrives already times the module's ``scaling``, called with scaling=1.0 (OPT)


BERT_QK = r"attention\.self\.(query|key)\."
BERT_ATTENTION = r"attention\.(self\.(query|key|value)|output\.dense)\."
BERT_LORA = r".*attention\.(self\.(query|key|value)|output\.dense)"


def bert_style(model_type: str, prefix: str, default_class: str, positions: str = "bert") -> Row:
    """A row for an encoder built like BERT (``<X>SelfAttention`` / ``<X>CrossAttention``, query/key/value Linear)."""
    return Row(model_type, f"{prefix}SelfAttention", kv_heads=None, head_dim="attention_head_size",
               cross_attention=f"{prefix}CrossAttention", causal=None, qk=BERT_QK, projections=BERT_ATTENTION,
               lora=BERT_LORA, default_class=default_class, positions=positions)


_NO_SLIDING = {"sliding_window": None}
_NO_SLIDING_SWITCH = {"use_sliding_window": False, "sliding_window": None}

ROWS = [
    Row("llama", "LlamaAttention", default_class="LlamaForCausalLM"),
    Row("mistral", "MistralAttention", cleared=_NO_SLIDING, default_class="MistralForCausalLM"),
    Row("qwen2", "Qwen2Attention", cleared=_NO_SLIDING_SWITCH, masks_by_layer_type=True,
        default_class="Qwen2ForCausalLM"),
    Row("qwen3", "Qwen3Attention", cleared=_NO_SLIDING_SWITCH, masks_by_layer_type=True,
        default_class="Qwen3ForCausalLM"),
    Row("gemma", "GemmaAttention", default_class="GemmaForCausalLM"),
    Row("phi3", "Phi3Attention", cleared=_NO_SLIDING, qk=r"\.self_attn\.qkv_proj\.",
        projections=r"\.self_attn\.(qkv_proj|o_proj)\.", lora=r".*\.self_attn\.(qkv_proj|o_proj)",
        default_class="Phi3ForCausalLM"),
    Row("olmo", "OlmoAttention", default_class="OlmoForCausalLM"),
    Row("olmo2", "Olmo2Attention", default_class="Olmo2ForCausalLM"),
    Row("smollm3", "SmolLM3Attention", cleared=_NO_SLIDING_SWITCH, masks_by_layer_type=True,
        default_class="SmolLM3ForCausalLM"),
    Row("gpt_neox", "GPTNeoXAttention", kv_heads=None, head_dim="head_size", cache_kwarg="layer_past",
        qk=r"\.attention\.query_key_value\.", projections=r"\.attention\.(query_key_value|dense)\.",
        lora=r".*\.attention\.(query_key_value|dense)", default_class="GPTNeoXForCausalLM"),
    Row("opt", "OPTAttention", kv_heads=None, qk=LLAMA_QK, projections=r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.",
        lora=r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)", default_class="OPTForCausalLM", positions="opt",
        query_scaled=True),
    bert_style("xlm-roberta", "XLMRoberta", "XLMRobertaModel", positions="roberta"),
    bert_style("electra", "Electra", "ElectraModel"),
    bert_style("camembert", "Camembert", "CamembertModel", positions="roberta"),
    bert_style("ernie", "Ernie", "ErnieModel"),
    # cross-layer parameter sharing: one attention module per layer group (one by default) serves every layer of
    # the group; it gets one FavorAttention, whose statistics are fitted on all the layers it serves (``shared``)
    Row("albert", "AlbertAttention", kv_heads=None, head_dim="attention_head_size", causal=False, shared=True,
        qk=r"\.attention\.(query|key)\.", projections=r"\.attention\.(query|key|value|dense)\.",
        lora=r".*\.attention\.(query|key|value|dense)", default_class="AlbertModel", positions="bert"),
    # global layers FAVOR+, local (sliding-window) layers exact in linear memory; layer_types derived by the stock
    # config from global_attn_every_n_layers (config.json says favor_attention for every layer)
    Row("modernbert", "ModernBertAttention", kv_heads=None, causal=False, exact_if="sliding_window",
        qk=r"\.attn\.Wqkv\.", projections=r"\.attn\.(Wqkv|Wo)\.", lora=r".*\.attn\.(Wqkv|Wo)",
        default_class="ModernBertModel"),
]


def _camel(name: str) -> str:
    return name.removesuffix("Attention").removesuffix("Self")


def _modeling(row: Row):
    name = row.model_type.replace("-", "_")
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _stock_model_classes(row: Row, config_cls: type) -> list[type]:
    """Every model class the stock modeling module exports for the family (task heads included)."""
    module = _modeling(row)
    classes = [getattr(module, n) for n in getattr(module, "__all__", [])]
    return [c for c in classes if isinstance(c, type) and issubclass(c, PreTrainedModel)
            and getattr(c, "config_class", None) is config_cls and not c.__name__.endswith("PreTrainedModel")]


def _sites(row: Row, attention_cls: type, performer_attention: type, cross_cls: type | None):
    def favor_sites(model):
        config = model.config
        heads, n = config.num_attention_heads, config.num_hidden_layers
        kv = getattr(config, row.kv_heads, None) if row.kv_heads else None
        position = 0  # shared modules (``Row.shared``): the layer id is the module's position among them
        for m in model.modules():
            if isinstance(m, attention_cls) and row.exact_if and getattr(m, row.exact_if, None) is not None:
                continue  # kept exact (already linear in memory)
            if isinstance(m, attention_cls):
                # statistics and decoding state per key/value head (grouped-query attention, ``grouped``)
                layer_id = position if row.shared else m.layer_idx
                position += 1
                yield AttentionSite(m, getattr(m, row.head_dim), kv or heads, layer_id, performer_attention)
            elif cross_cls is not None and isinstance(m, cross_cls):
                yield AttentionSite(m, getattr(m, row.head_dim), heads, n + m.layer_idx, cross_attention=True)

    return favor_sites


@dataclass
class Family:
    """What ``build_family`` derives from a row."""

    row: Row
    config_class: type
    attention_class: type  # the Performer attention module class
    classes: dict  # {stock model class: Performer model class}


def prepared_forward(forward, positions_from_mask: bool, static_layers: bool):
    """A stock class's ``forward`` with what its Performer class does first (same signature: ``functools.wraps``,
    which Trainer and pipelines read):

    * ``positions_from_mask`` (rotary families): position ids from the padding mask when the call passes a mask and
      none (``rotary_positions.mask_positions``: FAVOR+'s estimate depends on the absolute rotation);
    * ``static_layers`` (``Row.masks_by_layer_type``: Qwen2, Qwen3, SmolLM3): a ``StaticCache(config=...)`` the caller
      built holds key/value layers for these configs; its fresh layers become FavorCacheLayers
      (``cache.use_favor_layers``, as ``generate`` does), outside torch.compile (generate swaps them before it
      compiles). Before, a manual forward with such a cache failed on the mask it was given."""
    names = [n for n, p in list(inspect.signature(forward).parameters.items())[1:]
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        if len(args) > len(names):  # more than the forward takes: its own error
            return forward(self, *args, **kwargs)
        if args:  # (positional arguments by name: the mask may come second)
            kwargs = {**dict(zip(names, args)), **kwargs}
        if static_layers and not torch.compiler.is_compiling():
            use_favor_layers(kwargs.get("cache", kwargs.get("past_key_values")))
        if positions_from_mask:
            positions = mask_positions(kwargs)
            if positions is not None:
                kwargs["position_ids"] = positions
        return forward(self, **kwargs)

    return wrapped


def build_family(row: Row) -> Family:
    """Create (once) and return the Performer config/attention/model classes of ``row``'s family."""
    g = globals()
    stock_config = CONFIG_MAPPING[row.model_type]
    prefix = _camel(row.attention)
    config_name = f"Performer{prefix}Config"
    if config_name not in g:
        namespace = {
            "__module__": __name__,
            "__qualname__": config_name,
            "__doc__": f"{stock_config.__name__} + FAVOR+ settings (``performer``: PerformerConfig.to_dict()).",
            "__annotations__": {"performer": dict | None, "hf_performer_version": str | None,
                                "layer_types": list[str] | None},
            "model_type": f"performer_{row.model_type}",
            "runtime_layer_type": (None if row.exact_if else "full_attention" if row.masks_by_layer_type
                                   else LAYER_TYPE),
            "performer": None,
            "hf_performer_version": None,
            "layer_types": None,
        }
        g[config_name] = strict(type(config_name, (PerformerConfigMixin, stock_config), namespace))
    config_cls = g[config_name]

    attention_cls = getattr(_modeling(row), row.attention)
    attn_name = f"Performer{row.attention}"
    if attn_name not in g:
        g[attn_name] = type(attn_name, (RecurrentDecodingMixin, attention_cls),
                            {"__module__": __name__, "__qualname__": attn_name, "favor_cache_kwarg": row.cache_kwarg,
                             "favor_shared": row.shared, "favor_query_scaled": row.query_scaled})
    performer_attention = g[attn_name]

    base_name = f"_Performer{prefix}"
    if base_name not in g:
        g[base_name] = type(base_name, (PerformerModelMixin,), {
            "__module__": __name__, "__qualname__": base_name, "config_class": config_cls,
            "_favor_sites": _sites(row, attention_cls, performer_attention,
                                   getattr(_modeling(row), row.cross_attention) if row.cross_attention else None),
        })
    base = g[base_name]

    classes = {}
    for stock in _stock_model_classes(row, stock_config):
        name = f"Performer{stock.__name__}"
        if name not in g:
            mixins = (base, PerformerGenerationMixin) if issubclass(stock, GenerationMixin) else (base,)
            namespace = {"__module__": __name__, "__qualname__": name}
            rotary = row.positions == "rotary" and "position_ids" in inspect.signature(stock.forward).parameters
            if rotary or row.masks_by_layer_type:
                namespace["forward"] = prepared_forward(stock.forward, rotary, row.masks_by_layer_type)
            g[name] = type(name, (*mixins, stock), namespace)
        classes[stock] = g[name]
    register_generic_body(config_cls, classes.get(MODEL_MAPPING.get(stock_config, None)), classes.values())
    return Family(row, config_cls, performer_attention, classes)


GENERIC_HEADS = (GenericForSequenceClassification, GenericForQuestionAnswering, GenericForTokenClassification)


def register_generic_body(config_cls: type, body: type | None, classes) -> None:
    """Map ``config_cls`` to the family's Performer base model ``body`` in ``AutoModel`` when one of ``classes`` is
    a transformers ``GenericFor*`` head (Llama's, Mistral's, Qwen2's sequence/token classification and question
    answering): those build their body with ``AutoModel.from_config(config)``, without ``trust_remote_code``. The
    package registers it anyway (``registry.register_performer_models``); this makes the folder's copy of the code do
    the same on import, or a head loaded with ``trust_remote_code=True`` where hf_performer is not installed was
    refused ("contains custom code ... pass trust_remote_code=True", though the caller had)."""
    if body is not None and any(issubclass(c, GENERIC_HEADS) for c in classes):
        AutoModel.register(config_cls, body, exist_ok=True)


GENERIC_FAMILIES = {row.model_type: build_family(row) for row in ROWS}
