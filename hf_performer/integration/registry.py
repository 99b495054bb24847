"""Register the Performer model types with transformers' Auto classes (done on ``import hf_performer``).

After registration ``AutoModelFor*.from_pretrained(path)`` rebuilds a saved Performer model from its
``model_type`` (``performer_bert``, ``performer_gpt2``, ``performer_roberta``, ``performer_distilbert``).
Without the plugin that model type is unknown and loading fails loudly (and the stock config classes refuse
the "favor_attention" layer types of a Performer config.json).
Each Performer class is registered wherever transformers registers its stock class.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto import modeling_auto as names

from .attention_function import register_favor_attention
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

AUTO_CLASSES = [
    (AutoModel, names.MODEL_MAPPING_NAMES),
    (AutoModelForPreTraining, names.MODEL_FOR_PRETRAINING_MAPPING_NAMES),
    (AutoModelForMaskedLM, names.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    (AutoModelForCausalLM, names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    (AutoModelForSequenceClassification, names.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    (AutoModelForTokenClassification, names.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
    (AutoModelForQuestionAnswering, names.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
    (AutoModelForMultipleChoice, names.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES),
    (AutoModelForNextSentencePrediction, names.MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES),
]


def register_performer_models() -> None:
    """Register the "favor" attention and every Performer config/model class (idempotent)."""
    register_favor_attention()
    register_favor_layer_type()
    for stock_type, (config_cls, classes) in FAMILIES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_cls, stock_names in AUTO_CLASSES:
            for stock_cls, performer_cls in classes.items():
                if stock_names.get(stock_type) == stock_cls.__name__:
                    auto_cls.register(config_cls, performer_cls, exist_ok=True)
