"""Estimator statistics of the random features against closed forms."""

import math

import pytest
import torch

from hf_performer.features import FeatureMap, derive_seed, draw_projection, oprf_a

D64 = torch.float64


def _pair(d, sum_sq, dot, seed=0):
    """x, y in R^d with |x + y|^2 = sum_sq and x.y = dot (|x| = |y|)."""
    g = torch.Generator().manual_seed(seed)
    e1, e2 = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=D64))[0].T
    # x = a e1 + b e2, y = a e1 - b e2: |x+y|^2 = 4a^2, x.y = a^2 - b^2
    a = math.sqrt(sum_sq) / 2
    b = math.sqrt(a * a - dot)
    return a * e1 + b * e2, a * e1 - b * e2


def _estimates(kernel, x, y, m, draws, orthogonal, a=None):
    d = x.shape[0]
    rows = m // 2 if kernel == "trig" else m
    w = torch.stack([draw_projection(rows, d, orthogonal=orthogonal, seed=1234, draw=i) for i in range(draws)])
    fmap = FeatureMap(kernel, w, a=a)  # [draws, rows, d]: one independent draw per batch entry
    return (fmap.features(x[None, None]) * fmap.features(y[None, None])).sum(-1).squeeze(-1)


def test_draws_are_deterministic_and_distinct():
    a = draw_projection(40, 16, seed=3, layer_id=2, draw=5)
    assert torch.equal(a, draw_projection(40, 16, seed=3, layer_id=2, draw=5))
    assert not torch.equal(a, draw_projection(40, 16, seed=3, layer_id=2, draw=6))
    assert not torch.equal(a, draw_projection(40, 16, seed=3, layer_id=1, draw=5))
    assert len({derive_seed(0, i, j) for i in range(10) for j in range(10)}) == 100


def test_orthogonal_blocks_and_norms():
    w = draw_projection(48, 16, orthogonal=True, feature_norm="sqrt_d", seed=1)
    for block in w.split(16):
        gram = block @ block.T
        assert torch.allclose(gram, 16 * torch.eye(block.shape[0], dtype=D64), atol=1e-9)
    w = draw_projection(4096, 16, orthogonal=True, feature_norm="chi", seed=1)
    # chi_16 norms: E|w|^2 = 16
    assert abs((w * w).sum(1).mean().item() - 16) < 0.5


def test_positive_features_are_unbiased_and_match_the_iid_mse_closed_form():
    d, m, draws = 4, 16, 8000
    x, y = _pair(d, sum_sq=1.0, dot=0.1)
    est = _estimates("softmax", x, y, m, draws, orthogonal=False)
    sm = math.exp(0.1)
    se = est.std().item() / math.sqrt(draws)
    assert abs(est.mean().item() - sm) < 4 * se
    mse = ((est - sm) ** 2).mean().item()
    closed = math.exp(1.0) * sm**2 * (1 - math.exp(-1.0)) / m
    assert 0.85 * closed < mse < 1.15 * closed


def test_orthogonal_features_have_lower_mse_than_iid():
    # m = d: the iid draw and the orthogonal one start from the same Gaussian block (paired samples)
    d, m, draws = 16, 16, 4000
    x, y = _pair(d, sum_sq=1.0, dot=0.2)
    sm = math.exp(0.2)
    mse_iid = ((_estimates("softmax", x, y, m, draws, orthogonal=False) - sm) ** 2).mean()
    mse_ort = ((_estimates("softmax", x, y, m, draws, orthogonal=True) - sm) ** 2).mean()
    assert mse_ort < 0.9 * mse_iid  # other seeds give ratios 0.70-0.82


def test_positive_features_beat_trig_where_the_kernel_is_small():
    d, m, draws = 8, 16, 3000
    x, y = _pair(d, sum_sq=0.04, dot=-1.5)  # x ≈ -y: exp(x.y) small
    sm = math.exp(-1.5)
    rel = lambda e: (((e - sm) / sm) ** 2).mean().item()
    assert rel(_estimates("softmax", x, y, m, draws, False)) < 0.2 * rel(_estimates("trig", x, y, m, draws, False))


@pytest.mark.parametrize("sum_sq", [6.0, 10.0])
def test_favor_plus_plus_is_unbiased_with_lower_mse_at_large_norms(sum_sq):
    d, m, draws = 8, 16, 3000
    x, y = _pair(d, sum_sq=sum_sq, dot=0.5)
    sm = math.exp(0.5)
    a = oprf_a(torch.tensor(sum_sq / d, dtype=D64))
    assert a < 0
    plus = _estimates("softmax", x, y, m, draws, orthogonal=False)
    pp = _estimates("favor++", x, y, m, draws, orthogonal=False, a=a)
    assert abs(pp.mean().item() - sm) < 4 * pp.std().item() / math.sqrt(draws)
    assert ((pp - sm) ** 2).mean() < 0.5 * ((plus - sm) ** 2).mean()


def test_oprf_a_reduces_to_favor_plus_at_zero():
    assert oprf_a(torch.tensor(0.0)).item() == 0.0
    x = torch.randn(3, 5, 8, dtype=D64)
    w = draw_projection(16, 8)
    plus = FeatureMap("softmax", w).features(x)
    pp = FeatureMap("favor++", w, a=torch.tensor(0.0, dtype=D64)).features(x)
    assert torch.allclose(plus, pp)


def test_aligned_features_are_unbiased_with_far_lower_mse_at_large_norms():
    from hf_performer.features import draw_aligned_projection

    d, m, draws = 8, 16, 500
    x, y = _pair(d, sum_sq=9.0, dot=0.5)  # |x + y| = 3: N(0, I) features have MSE ~ exp(9) / m
    sm = math.exp(0.5)
    g = torch.Generator().manual_seed(0)
    centers = (x + y)[None, None] + 0.5 * torch.randn(1, 64, d, generator=g, dtype=D64)  # pairs near x + y
    est = torch.empty(draws, dtype=D64)
    for i in range(draws):
        w, b = draw_aligned_projection(centers, m, width=1.0, seed=0, layer_id=0, draw=i)
        fmap = FeatureMap("softmax", w[0], bias=b[0])
        est[i] = (fmap.features(x) * fmap.features(y)).sum()
    assert abs(est.mean().item() - sm) < 4 * est.std().item() / math.sqrt(draws)
    plus = _estimates("softmax", x, y, m, draws, orthogonal=True)
    assert ((est - sm) ** 2).mean() < 0.05 * ((plus - sm) ** 2).mean()
