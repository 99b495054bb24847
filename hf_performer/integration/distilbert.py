"""Performer DistilBERT: ``performer_distilbert`` config and model classes (encoder only)."""

from __future__ import annotations

from collections.abc import Iterator

from huggingface_hub.dataclasses import strict
from transformers import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
)
from transformers.models.distilbert.modeling_distilbert import DistilBertSelfAttention

from .modeling import AttentionSite, PerformerConfigMixin, PerformerModelMixin


@strict
class PerformerDistilBertConfig(PerformerConfigMixin, DistilBertConfig):
    """DistilBertConfig + FAVOR+ settings (``performer``: PerformerConfig.to_dict())."""

    model_type = "performer_distilbert"
    performer: dict | None = None
    hf_performer_version: str | None = None
    layer_types: list[str] | None = None


def distilbert_sites(model) -> Iterator[AttentionSite]:
    attentions = [m for m in model.modules() if isinstance(m, DistilBertSelfAttention)]  # in layer order
    for i, m in enumerate(attentions):
        yield AttentionSite(m, m.attention_head_size, m.n_heads, i)


class _PerformerDistilBert(PerformerModelMixin):
    config_class = PerformerDistilBertConfig

    def _favor_sites(self):
        return distilbert_sites(self)


class PerformerDistilBertModel(_PerformerDistilBert, DistilBertModel):
    pass


class PerformerDistilBertForMaskedLM(_PerformerDistilBert, DistilBertForMaskedLM):
    pass


class PerformerDistilBertForSequenceClassification(_PerformerDistilBert, DistilBertForSequenceClassification):
    pass


class PerformerDistilBertForMultipleChoice(_PerformerDistilBert, DistilBertForMultipleChoice):
    pass


class PerformerDistilBertForTokenClassification(_PerformerDistilBert, DistilBertForTokenClassification):
    pass


class PerformerDistilBertForQuestionAnswering(_PerformerDistilBert, DistilBertForQuestionAnswering):
    pass


DISTILBERT_CLASSES = {
    DistilBertModel: PerformerDistilBertModel,
    DistilBertForMaskedLM: PerformerDistilBertForMaskedLM,
    DistilBertForSequenceClassification: PerformerDistilBertForSequenceClassification,
    DistilBertForMultipleChoice: PerformerDistilBertForMultipleChoice,
    DistilBertForTokenClassification: PerformerDistilBertForTokenClassification,
    DistilBertForQuestionAnswering: PerformerDistilBertForQuestionAnswering,
}
