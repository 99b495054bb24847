"""Register the Performer model types with transformers' Auto classes (done on ``import hf_performer``).

After registration ``AutoModelFor*.from_pretrained(path)`` rebuilds a saved Performer model from its
``model_type`` (``performer_bert``, ``performer_gpt2``, ``performer_roberta``, ``performer_distilbert``).
Without the plugin, transformers finds the checkpoint's ``auto_map`` (``portable``) and asks for
``trust_remote_code=True`` to run the modeling code saved next to the weights (and the stock config classes refuse
the "favor_attention" layer types of a Performer config.json): never a silent softmax model.
Each Performer class is registered wherever transformers registers its stock class.
"""

from __future__ import annotations

from transformers import AutoConfig

from .attention_function import register_favor_attention
from .auto_classes import auto_class_targets
from .bert import BERT_CLASSES, PerformerBertConfig
from .cache import register_favor_layer_type
from .distilbert import DISTILBERT_CLASSES, PerformerDistilBertConfig
from .gpt2 import GPT2_CLASSES, PerformerGPT2Config
from .roberta import ROBERTA_CLASSES, PerformerRobertaConfig

# stock model_type -> (Performer config class, {stock model class: Performer model class})
FAMILIES = {
    "bert": (PerformerBertConfig, BERT_CLASSES),
    "gpt2": (PerformerGPT2Config, GPT2_CLASSES),
    "roberta": (PerformerRobertaConfig, ROBERTA_CLASSES),
    "distilbert": (PerformerDistilBertConfig, DISTILBERT_CLASSES),
}


def register_performer_models() -> None:
    """Register the "favor" attention and every Performer config/model class (idempotent)."""
    register_favor_attention()
    register_favor_layer_type()
    for stock_type, (config_cls, classes) in FAMILIES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_cls, performer_cls in auto_class_targets(stock_type, classes):
            auto_cls.register(config_cls, performer_cls, exist_ok=True)
