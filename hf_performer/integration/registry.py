"""Register the Performer model types with transformers' Auto classes (done on ``import hf_performer``).

After registration ``AutoModelFor*.from_pretrained(path)`` rebuilds a saved Performer model from its
``model_type`` (``performer_bert``, ``performer_gpt2``, ``performer_roberta``, ``performer_distilbert``).
Without the plugin, transformers finds the checkpoint's ``auto_map`` (``portable``) and asks for
``trust_remote_code=True`` to run the modeling code saved next to the weights (and the stock config classes refuse
the "favor_attention" layer types of a Performer config.json): never a silent softmax model.
Each Performer class is registered wherever transformers registers its stock class.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig

from .attention_function import register_favor_attention
from .auto_classes import auto_class_targets
from .bert import BERT_CLASSES, PerformerBertConfig
from .cache import register_favor_layer_type
from .distilbert import DISTILBERT_CLASSES, PerformerDistilBertConfig
from .generic import GENERIC_FAMILIES
from .gpt2 import GPT2_CLASSES, PerformerGPT2Config
from .roberta import ROBERTA_CLASSES, PerformerRobertaConfig

# stock model_type -> (Performer config class, {stock model class: Performer model class}): the four hand-written
# families, then every row of the generic table (``generic.ROWS``)
FAMILIES = {
    "bert": (PerformerBertConfig, BERT_CLASSES),
    "gpt2": (PerformerGPT2Config, GPT2_CLASSES),
    "roberta": (PerformerRobertaConfig, ROBERTA_CLASSES),
    "distilbert": (PerformerDistilBertConfig, DISTILBERT_CLASSES),
    **{t: (f.config_class, f.classes) for t, f in GENERIC_FAMILIES.items()},
}


@dataclass(frozen=True)
class Traits:
    """What the conversion tools need to know about a family (``family_traits``)."""

    causal: bool | None  # True: decoder; False: encoder; None: decided by config.is_decoder
    default_class: str  # a checkpoint without ``architectures`` is loaded as this class
    cleared: dict  # config fields the conversion sets
    qk: str | None = None  # regexes for calibration's --train qk / attention, and --train lora (None: built-in)
    projections: str | None = None
    lora: str | None = None


_HAND_WRITTEN = {
    "bert": Traits(None, "BertModel", {}),
    "roberta": Traits(None, "RobertaModel", {}),
    "distilbert": Traits(False, "DistilBertModel", {}),
    "gpt2": Traits(True, "GPT2LMHeadModel", {}),
}


def family_traits(model_type: str) -> Traits:
    """The traits of a supported stock (or ``performer_``) model type. Raises KeyError for others."""
    model_type = model_type.removeprefix("performer_")
    if model_type in GENERIC_FAMILIES:
        r = GENERIC_FAMILIES[model_type].row
        return Traits(r.causal, r.default_class, dict(r.cleared), r.qk, r.projections, r.lora)
    return _HAND_WRITTEN[model_type]


def register_performer_models() -> None:
    """Register the "favor" attention and every Performer config/model class (idempotent). (A Performer causal LM's
    class name joins transformers' causal-LM names as the class is defined: ``modeling.join_causal_lm_names``.)"""
    register_favor_attention()
    register_favor_layer_type()
    for stock_type, (config_cls, classes) in FAMILIES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_cls, performer_cls in auto_class_targets(stock_type, classes):
            auto_cls.register(config_cls, performer_cls, exist_ok=True)
