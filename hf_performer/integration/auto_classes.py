"""Which transformers Auto classes a Performer model class belongs to.

A Performer class is registered (``registry``) and listed in a checkpoint's ``auto_map`` (``portable``) wherever
transformers maps its stock class: ``AutoModelForMaskedLM`` for ``PerformerBertForMaskedLM`` because transformers
maps ``bert`` to ``BertForMaskedLM`` there, and so on.
"""

from __future__ import annotations

from transformers import (
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

AUTO_CLASSES = [  # generic classes first (``portable.auto_class_name`` takes the last match)
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


def auto_class_targets(stock_type: str, classes: dict[type, type]) -> list[tuple[type, type]]:
    """(Auto class, Performer model class) pairs for one family.

    Args:
        stock_type: the stock ``model_type`` ("bert", "gpt2", ...).
        classes: {stock model class: Performer model class} of that family.
    """
    return [
        (auto_cls, performer_cls)
        for auto_cls, stock_names in AUTO_CLASSES
        for stock_cls, performer_cls in classes.items()
        if stock_names.get(stock_type) == stock_cls.__name__
    ]
