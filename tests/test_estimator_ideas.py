"""The proposal variants of benchmarks/estimator_ideas.py keep the softmax-kernel estimator unbiased and positive
(Monte Carlo against exp(q.k)), so the benchmark compares estimators of the same quantity."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
ideas = importlib.import_module("estimator_ideas")


@pytest.mark.parametrize("name, draw", [
    ("iid", ideas.proposal(ideas.iid_pairs)),
    ("stratified", ideas.proposal(ideas.stratified)),
    ("kmeans", ideas.proposal(ideas.kmeans)),
    ("antithetic", ideas.proposal(ideas.iid_pairs, antithetic=True)),
    ("width-1.4", ideas.proposal(ideas.iid_pairs, width=1.4)),
])
def test_proposal_variants_estimate_the_softmax_kernel_without_bias(name, draw):
    torch.manual_seed(0)
    d, rows = 3, 64
    centers = torch.randn(1, 32, d, dtype=torch.float64) * 0.8 + 0.5
    q, k = torch.tensor([0.4, -0.3, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.5, -0.1], dtype=torch.float64)
    estimates = []
    for draw_id in range(300):
        w, b = draw(centers, rows, width=1.0, seed=0, layer_id=0, draw=draw_id)  # [1, rows, d], [1, rows]
        phi_q = torch.exp(w[0] @ q - q @ q / 2 + b[0])
        phi_k = torch.exp(w[0] @ k - k @ k / 2 + b[0])
        assert (phi_q > 0).all() and (phi_k > 0).all()
        estimates.append((phi_q * phi_k).mean())
    est = torch.stack(estimates)
    exact = math.exp(float(q @ k))
    assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(len(est)) + 1e-3 * exact, (name, float(est.mean()), exact)


def test_favor_error_is_the_relative_error_of_the_naive_reference():
    """The fitted ideas' loss against an independent computation: ops.naive's FAVOR (explicit features, float64)
    and exact softmax, with padding; for the softmax kernel with IS weights and for FAVOR++ (its softmax-form rows
    and weights against the library's favor++ feature map)."""
    from hf_performer.features import FeatureMap
    from hf_performer.ops.naive import exact_softmax_attention, naive_linear_attention

    g = torch.Generator().manual_seed(0)
    B, H, L, d, m = 2, 3, 12, 4, 16
    q, k = (0.5 * torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, L, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 8:] = False
    w, b = torch.randn(H, m, d, generator=g, dtype=torch.float64), 0.3 * torch.randn(H, m, generator=g, dtype=torch.float64)
    a = torch.tensor([-0.05, -0.1, -0.02], dtype=torch.float64)
    exact = exact_softmax_attention(q, k, v, scale=1.0, key_padding_mask=mask)
    rows = mask[:, None, :, None]
    for fmap, args in [(FeatureMap("softmax", w, bias=b), (w, b)),
                       (FeatureMap("favor++", w, a=a[None, :, None, None]), ideas._favor_pp_rows(w, a))]:
        favor = naive_linear_attention(q, k, v, fmap, key_padding_mask=mask)
        err = ((((favor - exact) * rows) ** 2).sum((0, 2, 3)) / ((exact * rows) ** 2).sum((0, 2, 3))).sqrt().mean()
        got = ideas._favor_error(q, k, v, mask, *args)
        assert torch.allclose(got, err, rtol=1e-9), (float(got), float(err))


def test_fitted_proposal_rows_estimate_the_softmax_kernel_without_bias():
    """Rows drawn around arbitrary (fitted) component means with any width, one row per component, weighted by the
    mixture density: unbiased and positive whatever the parameters (Monte Carlo against exp(q.k))."""
    g = torch.Generator().manual_seed(0)
    d, rows = 3, 32
    mu = (torch.randn(1, rows, d, generator=g) * 0.8 + 0.5).double()
    q, k = torch.tensor([0.4, -0.3, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.5, -0.1], dtype=torch.float64)
    estimates = []
    for _ in range(400):
        w, b = ideas._rows_and_bias(mu, torch.tensor([0.2], dtype=torch.float64), ideas._noise(g, 1, rows, d).double())
        phi_q, phi_k = torch.exp(w[0] @ q - q @ q / 2 + b[0]), torch.exp(w[0] @ k - k @ k / 2 + b[0])
        assert (phi_q > 0).all() and (phi_k > 0).all()
        estimates.append((phi_q * phi_k).mean())
    est = torch.stack(estimates)
    exact = math.exp(float(q @ k))
    assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(len(est)) + 1e-3 * exact


@pytest.mark.parametrize("kind", ["proposal", "favor++"])
def test_fit_estimator_writes_the_rows_the_layers_then_use(kind):
    """The fitted ideas on a tiny converted BERT (statistics step first): every layer's aligned rows and weights are
    replaced by finite ones, the model's own FAVOR forward uses them (its attention output equals the fit's FAVOR
    computed from the written rows), and a padded key still gets no weight."""
    import transformers as tf

    from hf_performer import PerformerConfig, calibrate_feature_statistics
    from hf_performer.integration import convert_to_performer

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = convert_to_performer(tf.BertModel(cfg).eval(), PerformerConfig(nb_features=16, seed=1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    calibrate_feature_statistics(model, batch)
    layers = [m for m in model.modules() if isinstance(m, ideas.FavorAttention)]
    before = [m.aligned_projection.clone() for m in layers]
    ideas.fit_estimator(kind, steps=3)(model, [batch])
    for layer, old in zip(layers, before):
        assert layer.aligned and not torch.equal(layer.aligned_projection, old)
        assert torch.isfinite(layer.aligned_projection).all() and torch.isfinite(layer.aligned_bias).all()
    # the layer's forward on its captured inputs equals the FAVOR attention of the written rows (naive reference)
    from hf_performer.ops.naive import naive_linear_attention

    for _, (layer, inputs) in sorted(ideas._layer_inputs(model, [batch]).items()):
        q, k, v, kmask, scale = inputs[0]
        fmap = layer._prepare(q, k, False, kmask, scale)
        want = naive_linear_attention(q.double(), k.double(), v.double(), fmap_double(fmap), key_padding_mask=kmask)
        with torch.no_grad():
            got = layer(q, k, v, key_padding_mask=kmask, scale=scale)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


def fmap_double(fmap):
    """The same feature map in float64 (projection, bias and transforms), for the naive reference."""
    from hf_performer.features import FeatureMap

    cast = lambda t: None if t is None else t.double()  # noqa: E731
    return FeatureMap(fmap.kernel, fmap.projection.double(), fmap.eps, bias=cast(fmap.bias)[..., 0, :],
                      q_scale=cast(fmap.q_scale), k_scale=cast(fmap.k_scale), k_shift=cast(fmap.k_shift))
