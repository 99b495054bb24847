"""Performer BERT: ``performer_bert`` config and model classes (same weights, FAVOR+ attention).

Encoders run the stock modules with attn_implementation="favor". A BERT decoder (``is_decoder``) that
is given a cache decodes through the recurrent FAVOR+ state (``CachedSelfAttentionMixin``); its
cross-attention is bidirectional FAVOR+ over the encoder keys.
"""

from __future__ import annotations

from collections.abc import Iterator

from huggingface_hub.dataclasses import strict
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
)
from transformers.models.bert.modeling_bert import BertCrossAttention, BertSelfAttention

from .attention_function import key_padding_mask, reject_attention_weights, warn_ignored_dropout
from .cache import favor_cache_layer
from .modeling import (
    AttentionSite,
    PerformerConfigMixin,
    PerformerGenerationMixin,
    PerformerModelMixin,
)
from .redraw_notice import notice_unfollowed_redraw
from .zero_shot import notice_uncalibrated


@strict
class PerformerBertConfig(PerformerConfigMixin, BertConfig):
    """BertConfig + FAVOR+ settings (``performer``: PerformerConfig.to_dict())."""

    model_type = "performer_bert"
    performer: dict | None = None
    hf_performer_version: str | None = None
    layer_types: list[str] | None = None


class CachedSelfAttentionMixin:
    """BERT-style self-attention (query/key/value Linear): with a cache, decode via the FAVOR+ state."""

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        if cache is None:  # the stock forward, through the "favor" attention function
            return super().forward(hidden_states, attention_mask=attention_mask, cache=None, **kwargs)
        reject_attention_weights(kwargs.get("output_attentions"))
        warn_ignored_dropout(self.dropout.p if self.training else 0.0)
        notice_uncalibrated(self.favor)
        notice_unfollowed_redraw(self.favor, self.training)
        if not self.is_causal:
            raise ValueError("a bidirectional (encoder) self-attention cannot decode incrementally with a cache")
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)  # [B, H, T, hd]
        k = self.key(hidden_states).view(shape).transpose(1, 2)  # [B, H, T, hd]
        v = self.value(hidden_states).view(shape).transpose(1, 2)  # [B, H, T, hd]
        mask = key_padding_mask(attention_mask, T)  # [B, T] new tokens, or None
        out = favor_cache_layer(cache, self.layer_idx).step(self.favor, q, k, v, mask, self.scaling)
        return out.transpose(1, 2).reshape(B, T, -1), None  # [B, T, H*hd]


class PerformerBertSelfAttention(CachedSelfAttentionMixin, BertSelfAttention):
    pass


def bert_style_sites(model, self_cls, cross_cls, performer_self_cls) -> Iterator[AttentionSite]:
    n = model.config.num_hidden_layers
    for m in model.modules():
        if isinstance(m, self_cls):
            yield AttentionSite(m, m.attention_head_size, m.num_attention_heads, m.layer_idx, performer_self_cls)
        elif isinstance(m, cross_cls):
            yield AttentionSite(m, m.attention_head_size, m.num_attention_heads, n + m.layer_idx, cross_attention=True)


class _PerformerBert(PerformerModelMixin):
    config_class = PerformerBertConfig

    def _favor_sites(self):
        return bert_style_sites(self, BertSelfAttention, BertCrossAttention, PerformerBertSelfAttention)


class PerformerBertModel(_PerformerBert, BertModel):
    pass


class PerformerBertForPreTraining(_PerformerBert, BertForPreTraining):
    pass


class PerformerBertForMaskedLM(_PerformerBert, BertForMaskedLM):
    pass


class PerformerBertForNextSentencePrediction(_PerformerBert, BertForNextSentencePrediction):
    pass


class PerformerBertForSequenceClassification(_PerformerBert, BertForSequenceClassification):
    pass


class PerformerBertForMultipleChoice(_PerformerBert, BertForMultipleChoice):
    pass


class PerformerBertForTokenClassification(_PerformerBert, BertForTokenClassification):
    pass


class PerformerBertForQuestionAnswering(_PerformerBert, BertForQuestionAnswering):
    pass


class PerformerBertLMHeadModel(_PerformerBert, PerformerGenerationMixin, BertLMHeadModel):
    pass


# stock class -> Performer class (used by convert_to_performer and the Auto registration)
BERT_CLASSES = {
    BertModel: PerformerBertModel,
    BertForPreTraining: PerformerBertForPreTraining,
    BertForMaskedLM: PerformerBertForMaskedLM,
    BertForNextSentencePrediction: PerformerBertForNextSentencePrediction,
    BertForSequenceClassification: PerformerBertForSequenceClassification,
    BertForMultipleChoice: PerformerBertForMultipleChoice,
    BertForTokenClassification: PerformerBertForTokenClassification,
    BertForQuestionAnswering: PerformerBertForQuestionAnswering,
    BertLMHeadModel: PerformerBertLMHeadModel,
}
