"""Performer GPT-2: ``performer_gpt2`` config and model classes (same weights, causal FAVOR+ attention).

Without a cache the stock GPT2Attention runs through the "favor" attention function. With a cache
(generation) ``PerformerGPT2Attention`` advances the layer's recurrent FAVOR+ state instead of storing
keys/values: constant memory per layer whatever the context length. GPT-2's per-layer scaling
(``scale_attn_weights``, ``scale_attn_by_inverse_layer_idx``) is folded in ``module.scaling`` and passed
as FAVOR's ``scale``; ``reorder_and_upcast_attn`` runs the attention math in float32.
Cross-attention (``add_cross_attention``) is bidirectional FAVOR+ over the encoder keys.
"""

from __future__ import annotations

from collections.abc import Iterator

from huggingface_hub.dataclasses import strict
from transformers import (
    GPT2Config,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

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
class PerformerGPT2Config(PerformerConfigMixin, GPT2Config):
    """GPT2Config + FAVOR+ settings (``performer``: PerformerConfig.to_dict())."""

    model_type = "performer_gpt2"
    performer: dict | None = None
    hf_performer_version: str | None = None
    layer_types: list[str] | None = None


class PerformerGPT2Attention(GPT2Attention):
    """GPT2Attention whose cached (generation) path runs the recurrent FAVOR+ step."""

    def forward(
        self,
        hidden_states,
        cache=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        **kwargs,
    ):
        if cache is None or encoder_hidden_states is not None:  # stock forward, "favor" attention function
            return super().forward(
                hidden_states, cache, attention_mask, encoder_hidden_states, encoder_attention_mask,
                output_attentions=output_attentions, **kwargs,
            )
        reject_attention_weights(output_attentions)
        warn_ignored_dropout(self.attn_dropout.p if self.training else 0.0)
        notice_uncalibrated(self.favor)
        notice_unfollowed_redraw(self.favor, self.training)
        B, T, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)  # 3 x [B, T, C]
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        out_dtype = v.dtype
        if self.reorder_and_upcast_attn:
            q, k, v = q.float(), k.float(), v.float()
        mask = key_padding_mask(attention_mask, T)  # [B, T] new tokens, or None
        out = favor_cache_layer(cache, self.layer_idx).step(self.favor, q, k, v, mask, self.scaling)
        out = out.to(out_dtype).transpose(1, 2).reshape(B, T, -1)  # [B, T, C]
        out = self.resid_dropout(self.c_proj(out))
        return out, None


def gpt2_sites(model) -> Iterator[AttentionSite]:
    n = model.config.num_hidden_layers
    for m in model.modules():
        if isinstance(m, GPT2Attention):
            layer_id = n + m.layer_idx if m.is_cross_attention else m.layer_idx
            yield AttentionSite(m, m.head_dim, m.num_heads, layer_id, PerformerGPT2Attention, m.is_cross_attention)


class _PerformerGPT2(PerformerModelMixin):
    config_class = PerformerGPT2Config

    def _favor_sites(self):
        return gpt2_sites(self)


class PerformerGPT2Model(_PerformerGPT2, GPT2Model):
    pass


class PerformerGPT2LMHeadModel(_PerformerGPT2, PerformerGenerationMixin, GPT2LMHeadModel):
    pass


class PerformerGPT2DoubleHeadsModel(_PerformerGPT2, PerformerGenerationMixin, GPT2DoubleHeadsModel):
    pass


class PerformerGPT2ForSequenceClassification(_PerformerGPT2, GPT2ForSequenceClassification):
    pass


class PerformerGPT2ForTokenClassification(_PerformerGPT2, GPT2ForTokenClassification):
    pass


class PerformerGPT2ForQuestionAnswering(_PerformerGPT2, GPT2ForQuestionAnswering):
    pass


GPT2_CLASSES = {
    GPT2Model: PerformerGPT2Model,
    GPT2LMHeadModel: PerformerGPT2LMHeadModel,
    GPT2DoubleHeadsModel: PerformerGPT2DoubleHeadsModel,
    GPT2ForSequenceClassification: PerformerGPT2ForSequenceClassification,
    GPT2ForTokenClassification: PerformerGPT2ForTokenClassification,
    GPT2ForQuestionAnswering: PerformerGPT2ForQuestionAnswering,
}
