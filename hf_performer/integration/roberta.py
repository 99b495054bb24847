"""Performer RoBERTa: ``performer_roberta`` config and model classes (BERT-style attention, see bert.py)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import (
    RobertaConfig,
    RobertaForCausalLM,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)
from transformers.models.roberta.modeling_roberta import RobertaCrossAttention, RobertaSelfAttention

from .bert import CachedSelfAttentionMixin, bert_style_sites
from .modeling import (
    PerformerConfigMixin,
    PerformerGenerationMixin,
    PerformerModelMixin,
)


@strict
class PerformerRobertaConfig(PerformerConfigMixin, RobertaConfig):
    """RobertaConfig + FAVOR+ settings (``performer``: PerformerConfig.to_dict())."""

    model_type = "performer_roberta"
    performer: dict | None = None
    hf_performer_version: str | None = None
    layer_types: list[str] | None = None


class PerformerRobertaSelfAttention(CachedSelfAttentionMixin, RobertaSelfAttention):
    pass


class _PerformerRoberta(PerformerModelMixin):
    config_class = PerformerRobertaConfig

    def _favor_sites(self):
        return bert_style_sites(self, RobertaSelfAttention, RobertaCrossAttention, PerformerRobertaSelfAttention)


class PerformerRobertaModel(_PerformerRoberta, RobertaModel):
    pass


class PerformerRobertaForMaskedLM(_PerformerRoberta, RobertaForMaskedLM):
    pass


class PerformerRobertaForSequenceClassification(_PerformerRoberta, RobertaForSequenceClassification):
    pass


class PerformerRobertaForMultipleChoice(_PerformerRoberta, RobertaForMultipleChoice):
    pass


class PerformerRobertaForTokenClassification(_PerformerRoberta, RobertaForTokenClassification):
    pass


class PerformerRobertaForQuestionAnswering(_PerformerRoberta, RobertaForQuestionAnswering):
    pass


class PerformerRobertaForCausalLM(_PerformerRoberta, PerformerGenerationMixin, RobertaForCausalLM):
    pass


ROBERTA_CLASSES = {
    RobertaModel: PerformerRobertaModel,
    RobertaForMaskedLM: PerformerRobertaForMaskedLM,
    RobertaForSequenceClassification: PerformerRobertaForSequenceClassification,
    RobertaForMultipleChoice: PerformerRobertaForMultipleChoice,
    RobertaForTokenClassification: PerformerRobertaForTokenClassification,
    RobertaForQuestionAnswering: PerformerRobertaForQuestionAnswering,
    RobertaForCausalLM: PerformerRobertaForCausalLM,
}
